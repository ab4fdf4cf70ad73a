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

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde_json::json;

use super::compressed::{packed_to_compressed, CtStrategy};
use super::format::{
    check_format_version, read_packed, META_ACT_BITS, META_BITS, META_GROUP_SIZE, META_METHOD,
    META_PACKED, SUPPORTED_BITS, SUPPORTED_GROUPS,
};
use super::gptq::packed_to_gptq;
use super::safetensors_out::{self, OutTensor};
use super::writer::{
    check_output, copy_other_files, set_quantization_config, weight_file_names, Progress, TempDir,
};
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
/// checkpoint.
fn gptq_quantize_config(src: &Source) -> serde_json::Value {
    json!({
        "bits": src.bits,
        "group_size": src.group_size,
        "desc_act": false,
        "sym": false,
        "static_groups": false,
        "true_sequential": true,
        "lm_head": false,
        "damp_percent": 0.01,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "model_file_base_name": "model",
        "meta": {"quantizer": [format!("mbq:{}", env!("CARGO_PKG_VERSION"))], "mbq_method": src.method},
    })
}

/// Little-endian bytes of i32 values.
fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[half::f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
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
    let mut made: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, (p, &(out, inp))) in src.packed.iter().zip(&shapes).enumerate() {
        let pl = read_packed(&w.pp(p), out, inp)?;
        let mut add = |leaf: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>| {
            made.push((format!("{p}.{leaf}"), dtype, shape.to_vec(), bytes))
        };
        match format {
            ExportFormat::Gptq => {
                let t = packed_to_gptq(p, &pl)?;
                add(
                    "qweight",
                    Dtype::I32,
                    &t.qweight_shape(),
                    i32_bytes(&t.qweight),
                );
                add(
                    "qzeros",
                    Dtype::I32,
                    &t.qzeros_shape(),
                    i32_bytes(&t.qzeros),
                );
                add(
                    "scales",
                    Dtype::F16,
                    &t.scales_shape(),
                    f16_bytes(&t.scales),
                );
                add("g_idx", Dtype::I32, &[inp], i32_bytes(&t.g_idx));
            }
            ExportFormat::CompressedTensors => {
                let strategy = match src.act_bits {
                    Some(_) => CtStrategy::Channel,
                    None => CtStrategy::Group(pl.group_size),
                };
                let t = packed_to_compressed(p, &pl, strategy)?;
                let packed = i32_bytes(&t.weight_packed);
                add(
                    "weight_packed",
                    Dtype::I32,
                    &t.weight_packed_shape(),
                    packed,
                );
                let scale = f16_bytes(&t.weight_scale);
                add("weight_scale", Dtype::F16, &t.weight_scale_shape(), scale);
                if let Some(zp) = &t.weight_zero_point {
                    let shape = t.weight_zero_point_shape();
                    add("weight_zero_point", Dtype::I32, &shape, i32_bytes(zp));
                }
                let shape: Vec<u8> = t
                    .weight_shape()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                add("weight_shape", Dtype::I64, &[2], shape);
            }
        }
        progress(Progress::Packed {
            done: k + 1,
            total: src.packed.len(),
            name: p,
        });
    }
    progress(Progress::Writing);

    let replaced: HashSet<String> = src
        .packed
        .iter()
        .flat_map(|p| [format!("{p}.qweight"), format!("{p}.scales_zeros")])
        .collect();
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
    for (name, dtype, shape, bytes) in &made {
        tensors.push(OutTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            data: bytes.into(),
        });
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
    let mut copied = super::writer::Report::default();
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
        super::writer::sync_file(&p)?;
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
        copied_files: copied.copied_files,
        weight_file_bytes,
    })
}
