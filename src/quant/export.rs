//! `mbq export`: an mbq quantized model directory rewritten in a format
//! other runtimes load: GPTQ v1 ([`super::gptq`]; vLLM's `gptq`,
//! transformers through optimum + gptqmodel) or compressed-tensors
//! `pack-quantized` ([`super::compressed`]; vLLM, transformers). The packed
//! linears are converted bit for bit (same codes, scales and zero points,
//! so the same dequantized weights); every other tensor and file is carried
//! over unchanged, so the output is a complete model directory, and
//! config.json gets the format's `quantization_config`.
//!
//! The output is written as `mbq quantize` writes: in a temporary sibling
//! directory renamed into place when complete; an existing OUT is refused.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde_json::json;

use super::compressed::{packed_to_compressed, CompressedTensors, CtStrategy};
use super::format::{
    check_format_version, read_packed, META_ACT_BITS, META_BITS, META_GROUP_SIZE, META_METHOD,
    META_PACKED, SUPPORTED_BITS, SUPPORTED_GROUPS,
};
use super::gptq::{packed_to_gptq, GptqTensors};
use super::outdir::{
    check_output, copy_other_files, set_quantization_config, sync_file, weight_file_names, Copied,
    TempDir,
};
use super::safetensors_out::{self, Data, OutTensor};
use super::writer::Progress;
use crate::error::{Error, Result};
use crate::weights::WeightFiles;

/// The formats `mbq export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// GPTQ v1 (`quant_method: "gptq"`, `checkpoint_format: "gptq"`).
    Gptq,
    /// compressed-tensors `pack-quantized`.
    CompressedTensors,
}

impl ExportFormat {
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Gptq => "gptq",
            ExportFormat::CompressedTensors => "compressed-tensors",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gptq" => Ok(ExportFormat::Gptq),
            "compressed-tensors" => Ok(ExportFormat::CompressedTensors),
            _ => Err(Error::invalid(format!(
                "--format {s}: unknown; supported: gptq, compressed-tensors"
            ))),
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub output: PathBuf,
    pub format: ExportFormat,
    /// `W3 g128`, `W4A8 per-channel`, ... as the output's scheme says it.
    pub scheme: String,
    /// Linears converted.
    pub linears: usize,
    /// Tensors copied unchanged.
    pub copied_tensors: usize,
    /// Files copied unchanged (relative paths; config.json is rewritten).
    pub copied_files: Vec<PathBuf>,
    /// Bytes of the output's model.safetensors.
    pub weight_file_bytes: u64,
}

/// What the source holds, from its safetensors metadata.
struct Source {
    bits: u32,
    group_size: usize,
    act_bits: Option<u32>,
    method: String,
    packed: Vec<String>,
}

fn read_source(w: &WeightFiles, input: &Path) -> Result<Source> {
    let loc = w.location();
    let bad = |msg: String| Error::Safetensors {
        path: loc.clone(),
        msg,
    };
    let Some(packed) = w.metadata.get(META_PACKED) else {
        return Err(Error::invalid(format!(
            "{}: not an mbq quantized model (no \"{META_PACKED}\" in the safetensors metadata); quantize it first with `mbq quantize`",
            input.display()
        )));
    };
    check_format_version(&w.metadata, &loc)?;
    let packed: Vec<String> = serde_json::from_str(packed).map_err(|e| {
        bad(format!(
            "metadata \"{META_PACKED}\" is not a JSON list of names ({e})"
        ))
    })?;
    let num = |key: &str| -> Result<usize> {
        let v = w
            .metadata
            .get(key)
            .ok_or_else(|| bad(format!("no \"{key}\" metadata")))?;
        v.trim()
            .parse()
            .map_err(|_| bad(format!("metadata \"{key}\" is \"{v}\", expected a number")))
    };
    let act_bits = match w.metadata.get(META_ACT_BITS).map(|v| v.trim()) {
        None => None,
        Some("8") => Some(8),
        Some(v) => {
            return Err(bad(format!(
                "metadata \"{META_ACT_BITS}\" is \"{v}\"; only \"8\" (W4A8) is known"
            )))
        }
    };
    let (bits, group_size) = (num(META_BITS)?, num(META_GROUP_SIZE)?);
    if !SUPPORTED_BITS.contains(&(bits as u32)) || !SUPPORTED_GROUPS.contains(&group_size) {
        return Err(bad(format!(
            "metadata says {bits} bits in groups of {group_size}; the packed format has 3, 4 or 8 bits in groups of 32, 64 or 128"
        )));
    }
    Ok(Source {
        bits: bits as u32,
        group_size,
        act_bits,
        method: w
            .metadata
            .get(META_METHOD)
            .cloned()
            .unwrap_or_else(|| "unknown".into()),
        packed,
    })
}

/// Checks that `format` can express the source's quantization; the
/// message names the format that can.
fn check_expressible(format: ExportFormat, src: &Source) -> Result<()> {
    if format == ExportFormat::Gptq && src.act_bits.is_some() {
        return Err(Error::invalid(format!(
            "the model is W{}A{} (weights and activations quantized); GPTQ has no activation quantization; export with --format compressed-tensors",
            src.bits,
            src.act_bits.unwrap_or(8)
        )));
    }
    if format == ExportFormat::CompressedTensors && src.act_bits.is_some() && src.bits != 4 {
        return Err(Error::invalid(format!(
            "W{}A8 is not a weight-activation scheme mbq exports (W4A8 is)",
            src.bits
        )));
    }
    Ok(())
}

/// The `quantization_config` of the output's config.json.
fn quantization_config(format: ExportFormat, src: &Source) -> serde_json::Value {
    let quantizer = format!("mbq:{}", env!("CARGO_PKG_VERSION"));
    match format {
        ExportFormat::Gptq => json!({
            "quant_method": "gptq",
            "bits": src.bits,
            "group_size": src.group_size,
            "desc_act": false,
            "sym": false,
            "static_groups": false,
            "true_sequential": true,
            "lm_head": false,
            "damp_percent": 0.01,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "meta": {"quantizer": [quantizer], "mbq_method": src.method},
        }),
        ExportFormat::CompressedTensors => {
            let (weights, input) = match src.act_bits {
                Some(a) => (
                    json!({
                        "num_bits": src.bits, "type": "int", "symmetric": true,
                        "strategy": "channel", "group_size": null, "dynamic": false,
                        "actorder": null, "block_structure": null, "observer": "minmax",
                        "observer_kwargs": {},
                    }),
                    json!({
                        "num_bits": a, "type": "int", "symmetric": true,
                        "strategy": "token", "group_size": null, "dynamic": true,
                        "actorder": null, "block_structure": null, "observer": null,
                        "observer_kwargs": {},
                    }),
                ),
                None => (
                    json!({
                        "num_bits": src.bits, "type": "int", "symmetric": false,
                        "strategy": "group", "group_size": src.group_size, "dynamic": false,
                        "actorder": null, "block_structure": null, "observer": "minmax",
                        "observer_kwargs": {},
                    }),
                    serde_json::Value::Null,
                ),
            };
            json!({
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": weights,
                        "input_activations": input,
                        "output_activations": null,
                        "format": "pack-quantized",
                    }
                },
                "ignore": [
                    "re:.*lm_head.*",
                    "re:.*vision_tower.*",
                    "re:.*multi_modal_projector.*",
                ],
                "kv_cache_scheme": null,
                "global_compression_ratio": null,
                "sparsity_config": {},
                "transform_config": {},
                "version": "0.20.1",
                "mbq": {"quantizer": quantizer, "method": src.method},
            })
        }
    }
}

/// `quantize_config.json` as AutoGPTQ / GPTQModel write it beside a GPTQ
/// checkpoint: config.json's `quantization_config` and the weights' base
/// file name.
fn gptq_quantize_config(src: &Source) -> serde_json::Value {
    let mut qc = quantization_config(ExportFormat::Gptq, src);
    qc["model_file_base_name"] = json!("model");
    qc
}

/// Little-endian bytes of i32 values.
fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[half::f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One packed linear converted on first use; its tensors handed out one
/// by one as the writer reaches them.
struct Lazy<'a> {
    #[allow(clippy::type_complexity)]
    make: RefCell<Option<Box<dyn FnOnce() -> Result<Vec<(&'static str, Vec<u8>)>> + 'a>>>,
    parts: RefCell<HashMap<&'static str, Vec<u8>>>,
}

impl Lazy<'_> {
    fn take(&self, p: &str, leaf: &'static str) -> Result<Vec<u8>> {
        let make = self.make.borrow_mut().take();
        if let Some(make) = make {
            self.parts.borrow_mut().extend(make()?);
        }
        self.parts
            .borrow_mut()
            .remove(leaf)
            .ok_or_else(|| Error::invalid(format!("{p}.{leaf}: not made by the conversion")))
    }
}

/// compressed-tensors' weight strategy for the source: per channel for
/// W4A8 (one scale per row), else its groups.
fn ct_strategy(src: &Source) -> CtStrategy {
    match src.act_bits {
        Some(_) => CtStrategy::Channel,
        None => CtStrategy::Group(src.group_size),
    }
}

/// The tensors `format` stores for a packed linear `[out, inp]` made from
/// its codes: leaf name, dtype and shape (the codecs' own shape rules).
/// compressed-tensors' `weight_shape` is not among them: it is known
/// before any conversion (and, being I64, written first).
fn planned(
    format: ExportFormat,
    src: &Source,
    out: usize,
    inp: usize,
) -> Vec<(&'static str, Dtype, Vec<usize>)> {
    match format {
        ExportFormat::Gptq => {
            let t = GptqTensors {
                bits: src.bits,
                group_size: src.group_size,
                out,
                inp,
                qweight: Vec::new(),
                qzeros: Vec::new(),
                scales: Vec::new(),
                g_idx: Vec::new(),
            };
            vec![
                ("qweight", Dtype::I32, t.qweight_shape().to_vec()),
                ("qzeros", Dtype::I32, t.qzeros_shape().to_vec()),
                ("scales", Dtype::F16, t.scales_shape().to_vec()),
                ("g_idx", Dtype::I32, vec![inp]),
            ]
        }
        ExportFormat::CompressedTensors => {
            let t = CompressedTensors {
                bits: src.bits,
                out,
                inp,
                strategy: ct_strategy(src),
                weight_packed: Vec::new(),
                weight_scale: Vec::new(),
                weight_zero_point: src.act_bits.is_none().then(Vec::new),
            };
            let mut v = vec![
                (
                    "weight_packed",
                    Dtype::I32,
                    t.weight_packed_shape().to_vec(),
                ),
                ("weight_scale", Dtype::F16, t.weight_scale_shape().to_vec()),
            ];
            if !t.symmetric() {
                v.push((
                    "weight_zero_point",
                    Dtype::I32,
                    t.weight_zero_point_shape().to_vec(),
                ));
            }
            v
        }
    }
}

/// Exports the mbq quantized model directory `input` to `output` (which
/// must not exist) in `format`.
pub fn export_dir(
    input: &Path,
    output: &Path,
    format: ExportFormat,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<ExportReport> {
    let parent = check_output(input, output)?;
    // Everything is read and checked before anything is written.
    let w = WeightFiles::open(input)?;
    let src = read_source(&w, input)?;
    check_expressible(format, &src)?;
    let mut shapes = Vec::with_capacity(src.packed.len());
    for p in &src.packed {
        let qname = format!("{p}.qweight");
        let shape = w.shape(&qname).ok_or_else(|| Error::MissingTensor {
            name: qname.clone(),
            path: w.location(),
        })?;
        let [out, words] = shape else {
            return Err(Error::invalid(format!(
                "packed tensor \"{qname}\": expected 2 dimensions, found {shape:?}"
            )));
        };
        shapes.push((*out, words * 32 / src.bits as usize));
    }

    let tmp = TempDir::create(&parent, output, &mut |m| progress(Progress::Note(m)))?;
    progress(Progress::Start {
        linears: src.packed.len(),
    });
    let progress = RefCell::new(progress);
    let converted = Cell::new(0usize);
    let total = src.packed.len();

    // Each linear is converted when the writer reaches the first of its
    // tensors (one linear's output in memory at a time); its other tensors
    // wait in `Lazy::parts` for their turn.
    let lazies: Vec<Lazy<'_>> = src
        .packed
        .iter()
        .zip(&shapes)
        .map(|(p, &(out, inp))| {
            let (w, src, progress, converted) = (&w, &src, &progress, &converted);
            let make = move || -> Result<Vec<(&'static str, Vec<u8>)>> {
                let pl = read_packed(&w.pp(p), out, inp)?;
                let parts = match format {
                    ExportFormat::Gptq => {
                        let t = packed_to_gptq(p, &pl)?;
                        vec![
                            ("qweight", i32_bytes(&t.qweight)),
                            ("qzeros", i32_bytes(&t.qzeros)),
                            ("scales", f16_bytes(&t.scales)),
                            ("g_idx", i32_bytes(&t.g_idx)),
                        ]
                    }
                    ExportFormat::CompressedTensors => {
                        let t = packed_to_compressed(p, &pl, ct_strategy(src))?;
                        let mut parts = vec![
                            ("weight_packed", i32_bytes(&t.weight_packed)),
                            ("weight_scale", f16_bytes(&t.weight_scale)),
                        ];
                        if let Some(zp) = &t.weight_zero_point {
                            parts.push(("weight_zero_point", i32_bytes(zp)));
                        }
                        parts
                    }
                };
                let done = converted.get() + 1;
                converted.set(done);
                let mut progress = progress.borrow_mut();
                (progress)(Progress::Packed {
                    done,
                    total,
                    name: p,
                });
                if done == total {
                    (progress)(Progress::Writing);
                }
                Ok(parts)
            };
            Lazy {
                make: RefCell::new(Some(Box::new(make))),
                parts: RefCell::new(HashMap::new()),
            }
        })
        .collect();
    if total == 0 {
        (progress.borrow_mut())(Progress::Writing);
    }

    let replaced: HashSet<String> = src
        .packed
        .iter()
        .flat_map(|p| [format!("{p}.qweight"), format!("{p}.scales_zeros")])
        .collect();
    // compressed-tensors' `weight_shape` of every linear: `[out, in]`.
    let weight_shapes: Vec<(String, Vec<u8>)> = match format {
        ExportFormat::Gptq => Vec::new(),
        ExportFormat::CompressedTensors => src
            .packed
            .iter()
            .zip(&shapes)
            .map(|(p, &(out, inp))| {
                let b = [out as i64, inp as i64]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                (format!("{p}.weight_shape"), b)
            })
            .collect(),
    };
    let mut tensors: Vec<OutTensor<'_>> = Vec::new();
    let mut copied_tensors = 0;
    for n in w.names().filter(|n| !replaced.contains(*n)) {
        let (dtype, shape, bytes) = w.raw(n)?;
        tensors.push(OutTensor {
            name: n.to_string(),
            dtype,
            shape: shape.to_vec(),
            data: bytes.into(),
        });
        copied_tensors += 1;
    }
    for (name, bytes) in &weight_shapes {
        tensors.push(OutTensor {
            name: name.clone(),
            dtype: Dtype::I64,
            shape: vec![2],
            data: bytes.into(),
        });
    }
    for ((p, &(out, inp)), lazy) in src.packed.iter().zip(&shapes).zip(&lazies) {
        for (leaf, dtype, shape) in planned(format, &src, out, inp) {
            tensors.push(OutTensor {
                name: format!("{p}.{leaf}"),
                dtype,
                shape,
                data: Data::Later(Box::new(move || lazy.take(p, leaf))),
            });
        }
    }
    let mut meta: BTreeMap<String, String> = w
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("mbq."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("format".into(), "pt".into());
    let weight_file_bytes =
        safetensors_out::write(&tmp.path.join("model.safetensors"), &meta, tensors)?;

    let mut skip = weight_file_names(input, &w);
    skip.insert(PathBuf::from("config.json"));
    if format == ExportFormat::Gptq {
        skip.insert(PathBuf::from("quantize_config.json"));
    }
    let mut copied = Copied::default();
    copy_other_files(input, &tmp.path, Path::new(""), &skip, &mut copied)?;
    set_quantization_config(
        &input.join("config.json"),
        &tmp.path.join("config.json"),
        &quantization_config(format, &src),
    )?;
    if format == ExportFormat::Gptq {
        let p = tmp.path.join("quantize_config.json");
        let text = serde_json::to_string_pretty(&gptq_quantize_config(&src))
            .map_err(|e| Error::invalid(e.to_string()))?;
        std::fs::write(&p, text + "\n").map_err(|e| Error::io(&p, e))?;
        sync_file(&p)?;
    }
    tmp.publish(output)?;
    let scheme = match src.act_bits {
        Some(a) => format!("W{}A{a} per-channel", src.bits),
        None => format!("W{} g{}", src.bits, src.group_size),
    };
    Ok(ExportReport {
        output: output.to_path_buf(),
        format,
        scheme,
        linears: src.packed.len(),
        copied_tensors,
        copied_files: copied.files,
        weight_file_bytes,
    })
}
