//! Writing a quantized model directory: the language model's decoder linears
//! (q, k, v, o, gate, up, down of every layer) are quantized with the MBQ
//! reference quantizer ([`super::pseudo`]) and stored packed
//! ([`super::format`]); every other tensor is copied byte for byte with its
//! dtype, every other file of the directory as it is.
//!
//! A GPTQ / AWQ / compressed-tensors input is repacked as it is instead
//! (`import.rs`). The packed linears are made one at a time while the file
//! is written. The output is built and published as [`super::outdir`]
//! does: OUT either does not exist or is complete. Nothing is ever
//! overwritten, and the input is only read.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::format::{
    check_shape, quantization_config, PackedLinear, FORMAT_VERSION, MBQ_WEIGHTS_FILE,
    META_ACT_BITS, META_BITS, META_FORMAT, META_GROUP_SIZE, META_METHOD, META_PACKED,
    SUPPORTED_BITS, SUPPORTED_GROUPS,
};
pub use super::outdir::check_output;
use super::outdir::{
    copy_other_files, file_len, set_quantization_config, sync_file, weight_file_names, Copied,
    TempDir,
};
use super::pseudo::quantize_linear;
use super::safetensors_out::{self, Data, OutTensor};
use crate::config::VlmConfig;
use crate::error::{Error, Result};
use crate::weights::{Prefixes, WeightFiles, DECODER_LINEARS};

/// What [`quantize_rtn_dir`] reports while it works.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Before the first linear: how many will be packed.
    Start { linears: usize },
    /// After each linear.
    Packed {
        done: usize,
        total: usize,
        name: &'a str,
    },
    /// All linears packed; the output file is being written and synced.
    Writing,
    /// Something to tell the user (a stale temporary directory removed).
    Note(&'a str),
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub output: PathBuf,
    /// How the codes were chosen (`mbq.method`): the method, or for a
    /// repacked GPTQ / AWQ / compressed-tensors checkpoint, its format.
    pub method: String,
    /// Prefixes of the packed linears (`...layers.0.self_attn.q_proj`).
    pub packed: Vec<String>,
    /// Number of weights in the packed linears.
    pub packed_weights: usize,
    /// Bytes of the packed linears' weights in the input (their own dtype).
    pub packed_bytes_before: usize,
    /// Bytes of their codes plus scales and zeros.
    pub packed_bytes_after: usize,
    /// Tensors copied unchanged.
    pub copied_tensors: usize,
    /// Non-weight files copied (relative paths).
    pub copied_files: Vec<PathBuf>,
    /// Files of other weight formats that were left out (relative paths).
    pub skipped_files: Vec<PathBuf>,
    /// Total bytes of the input's and the output's safetensors files.
    pub weight_file_bytes_before: u64,
    pub weight_file_bytes_after: u64,
}

impl Report {
    /// Storage of the packed linears, bits per weight (codes, scales, zeros).
    pub fn bits_per_weight(&self) -> f64 {
        self.packed_bytes_after as f64 * 8.0 / self.packed_weights.max(1) as f64
    }
}

/// Packs one weight `[out, in]` (its name, f32 values, out, in).
pub type QuantizeFn = dyn Fn(&str, &[f32], usize, usize) -> Result<PackedLinear> + Sync;

/// How the decoder linears are quantized and what the output records.
pub struct QuantSpec<'a> {
    /// Recorded as `mbq.method` (rtn, mbq, awq, smoothquant).
    pub method: &'a str,
    pub bits: u32,
    pub group_size: usize,
    /// Packs one weight `[out, in]` (f32 values) into the packed format.
    pub quantize: &'a QuantizeFn,
    /// Extra `mbq.*` metadata (e.g. the activation bits of W4A8).
    pub extra_meta: Vec<(String, String)>,
}

/// What replaces the input: tensors by name (f32 values, written back in
/// the input tensor's dtype; a replaced decoder-linear weight is what gets
/// quantized) and files to add to the output directory.
#[derive(Default)]
pub struct Replacements {
    pub tensors: std::collections::HashMap<String, Vec<f32>>,
    /// Replacements read from files as the output is written (host memory
    /// holds one at a time): `(prefix, file, inner)` replaces every tensor
    /// `prefix + rest` for which `file` holds `inner + rest`.
    pub sources: Vec<(String, WeightFiles, String)>,
    pub files: Vec<(PathBuf, Vec<u8>)>,
}

impl Replacements {
    /// The replacement values of tensor `name`, if it has one.
    pub fn get(&self, name: &str) -> Result<Option<std::borrow::Cow<'_, [f32]>>> {
        if let Some(v) = self.tensors.get(name) {
            return Ok(Some(std::borrow::Cow::Borrowed(v.as_slice())));
        }
        for (prefix, file, inner) in &self.sources {
            if let Some(rest) = name.strip_prefix(prefix.as_str()) {
                let inner_name = format!("{inner}{rest}");
                if file.contains(&inner_name) {
                    return Ok(Some(std::borrow::Cow::Owned(
                        file.get_any(&inner_name)?.data,
                    )));
                }
            }
        }
        Ok(None)
    }
}

/// Quantizes the decoder linears of the model directory `input` with RTN
/// (the MBQ reference quantizer without calibration) and writes a packed
/// model directory `output`, which must not exist.
pub fn quantize_rtn_dir(
    input: &Path,
    output: &Path,
    bits: u32,
    group_size: usize,
    progress: impl FnMut(Progress<'_>),
) -> Result<Report> {
    check_bits_group(bits, group_size)?;
    let quantize = move |name: &str, w: &[f32], out: usize, inp: usize| {
        quantize_rows(name, w, out, inp, bits, group_size)
    };
    let spec = QuantSpec {
        method: "rtn",
        bits,
        group_size,
        quantize: &quantize,
        extra_meta: Vec::new(),
    };
    write_quantized_dir(input, output, &spec, &Replacements::default(), progress)
}

/// Checks `bits` and `group_size` are supported by the packed format.
pub fn check_bits_group(bits: u32, group_size: usize) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(Error::invalid(format!(
            "{bits}-bit quantization is not supported (supported: 3, 4, 8)"
        )));
    }
    if !SUPPORTED_GROUPS.contains(&group_size) {
        return Err(Error::invalid(format!(
            "group size {group_size} is not supported (supported: 32, 64, 128)"
        )));
    }
    Ok(())
}

/// Writes the packed model directory `output` from `input`: the decoder
/// linears quantized by `spec.quantize` (from their replacement when
/// `repl` has one), other replaced tensors in their input dtype, every
/// other tensor and file as it is, plus `repl.files`.
pub fn write_quantized_dir(
    input: &Path,
    output: &Path,
    spec: &QuantSpec<'_>,
    repl: &Replacements,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Report> {
    let QuantSpec {
        bits, group_size, ..
    } = *spec;
    check_bits_group(bits, group_size)?;
    let parent = check_output(input, output)?;

    // Everything is read and checked before anything is written.
    let cfg = VlmConfig::load(input)?;
    let w = WeightFiles::open(input)?;
    let prefixes = Prefixes::detect(&w)?;
    let foreign = super::import::foreign_format(w.quantization_config.as_ref())?;
    if w.metadata.contains_key(META_FORMAT)
        || (foreign.is_none() && w.names().any(|n| n.ends_with(".qweight")))
    {
        return Err(Error::invalid(format!(
            "{}: the model is already quantized (packed weights found)",
            input.display()
        )));
    }
    if let Some(f) = &foreign {
        check_repack(input, f, spec)?;
    }
    let linears = match &foreign {
        None => decoder_linears(
            &w,
            &prefixes.text,
            cfg.text.num_hidden_layers,
            bits,
            group_size,
        )?,
        Some(_) => foreign_linears(&w, &prefixes.text, cfg.text.num_hidden_layers)?,
    };

    let tmp = TempDir::create(&parent, output, &mut |m| progress(Progress::Note(m)))?;

    let report = RefCell::new(Report {
        output: output.to_path_buf(),
        ..Report::default()
    });
    let progress = RefCell::new(progress);
    (progress.borrow_mut())(Progress::Start {
        linears: linears.len(),
    });

    // The output's tensors: every input tensor but the replaced weights, as
    // they are, then the packed ones.
    let replaced: HashSet<String> = match &foreign {
        None => linears.iter().map(|p| format!("{p}.weight")).collect(),
        Some(_) => linears
            .iter()
            .flat_map(|p| foreign_tensors(&w, p))
            .collect(),
    };
    // Replaced (non-linear) tensors, converted back to their own dtype.
    let mut converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    // Packed (scale, zero) pairs waiting for their turn, and a count of the
    // linears packed (see below); declared before the tensors that borrow them.
    let pending: RefCell<HashMap<String, Vec<u8>>> = RefCell::new(HashMap::new());
    let packed_count = Cell::new(0usize);
    let mut tensors: Vec<OutTensor<'_>> = Vec::new();
    for n in w.names().filter(|n| !replaced.contains(*n)) {
        let (dtype, shape, bytes) = w.raw(n)?;
        if let Some(vals) = repl.get(n)? {
            converted.push((
                n.to_string(),
                dtype,
                shape.to_vec(),
                to_dtype_bytes(n, dtype, shape, &vals)?,
            ));
            continue;
        }
        tensors.push(OutTensor {
            name: n.to_string(),
            dtype,
            shape: shape.to_vec(),
            data: bytes.into(),
        });
        report.borrow_mut().copied_tensors += 1;
    }
    for (name, dtype, shape, bytes) in &converted {
        tensors.push(OutTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            data: bytes.into(),
        });
    }
    // The packed linears are made while the file is written, one at a time
    // (host memory holds one linear, not the packed model): the writer
    // reaches every U32 `qweight` before any 16-bit tensor, so each
    // linear's codes are written as it is packed and its (scale, zero)
    // pairs wait in `pending` for their turn.
    for p in &linears {
        let (out, inp) = match &foreign {
            Some(_) => linear_shape(&cfg.text, p),
            None => match w.shape(&format!("{p}.weight")) {
                Some(&[out, inp]) => (out, inp),
                _ => {
                    return Err(Error::invalid(format!(
                        "tensor \"{p}.weight\": expected a 2-d weight [out, in]"
                    )))
                }
            },
        };
        let (foreign, w, report, progress) = (&foreign, &w, &report, &progress);
        let (pending, packed_count, n_linears) = (&pending, &packed_count, linears.len());
        let pack = move || -> Result<Vec<u8>> {
            let (pl, bytes_before) = match foreign {
                Some(_) => {
                    let (pl, _) = super::import::read_linear(&w.pp(p), out, inp)?;
                    let before = foreign_tensors(w, p)
                        .iter()
                        .map(|n| w.raw(n).map(|(_, _, b)| b.len()))
                        .sum::<Result<usize>>()?;
                    (pl, before)
                }
                None => {
                    let wname = format!("{p}.weight");
                    let (_, _, raw) = w.raw(&wname)?;
                    let data = match repl.get(&wname)? {
                        Some(d) if d.len() == out * inp => d,
                        Some(d) => {
                            return Err(Error::invalid(format!(
                                "replacement for \"{wname}\" has {} values, expected {out} x {inp}",
                                d.len()
                            )))
                        }
                        None => std::borrow::Cow::Owned(w.get_any(&wname)?.data),
                    };
                    ((spec.quantize)(&wname, &data, out, inp)?, raw.len())
                }
            };
            {
                let mut r = report.borrow_mut();
                r.packed_weights += out * inp;
                r.packed_bytes_before += bytes_before;
                r.packed_bytes_after += pl.nbytes();
            }
            let s: Vec<u8> = pl
                .scales_zeros
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            pending.borrow_mut().insert(p.clone(), s);
            let done = packed_count.get() + 1;
            packed_count.set(done);
            let mut progress = progress.borrow_mut();
            (progress)(Progress::Packed {
                done,
                total: n_linears,
                name: p,
            });
            if done == n_linears {
                (progress)(Progress::Writing);
            }
            Ok(pl.qweight.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        let scales = move || -> Result<Vec<u8>> {
            pending.borrow_mut().remove(p.as_str()).ok_or_else(|| {
                Error::invalid(format!(
                    "{p}.scales_zeros: reached before {p}.qweight (the writer's order)"
                ))
            })
        };
        tensors.push(OutTensor {
            name: format!("{p}.qweight"),
            dtype: Dtype::U32,
            shape: vec![out, inp * bits as usize / 32],
            data: Data::Later(Box::new(pack)),
        });
        tensors.push(OutTensor {
            name: format!("{p}.scales_zeros"),
            dtype: Dtype::F16,
            shape: vec![out, inp / group_size, 2],
            data: Data::Later(Box::new(scales)),
        });
    }
    if linears.is_empty() {
        (progress.borrow_mut())(Progress::Writing);
    }
    let mut meta: BTreeMap<String, String> = w
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("mbq."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(META_FORMAT.into(), FORMAT_VERSION.to_string());
    meta.insert(META_BITS.into(), bits.to_string());
    meta.insert(META_GROUP_SIZE.into(), group_size.to_string());
    // A repacked checkpoint keeps the name of the method that chose its codes.
    let method = foreign.as_ref().map_or(spec.method, |f| f.method());
    meta.insert(META_METHOD.into(), method.into());
    report.borrow_mut().method = method.to_string();
    for (k, v) in &spec.extra_meta {
        meta.insert(k.clone(), v.clone());
    }
    meta.insert(
        META_PACKED.into(),
        serde_json::to_string(&linears).map_err(|e| Error::invalid(e.to_string()))?,
    );
    let out_file = tmp.path.join(MBQ_WEIGHTS_FILE);
    let bytes_after = safetensors_out::write(&out_file, &meta, tensors)?;
    let mut report = report.into_inner();
    report.weight_file_bytes_after = bytes_after;
    report.packed = linears;

    // Every other file of the input directory.
    let mut skip = weight_file_names(input, &w);
    if foreign.is_some() {
        // AutoGPTQ's description of the input; config.json gets mbq's.
        skip.insert(PathBuf::from("quantize_config.json"));
    }
    for f in &skip {
        report.weight_file_bytes_before += file_len(&input.join(f)).unwrap_or(0);
    }
    let mut copied = Copied::default();
    copy_other_files(input, &tmp.path, Path::new(""), &skip, &mut copied)?;
    report.copied_files = copied.files;
    report.skipped_files = copied.skipped;
    let act_bits = spec
        .extra_meta
        .iter()
        .find(|(k, _)| k == META_ACT_BITS)
        .and_then(|(_, v)| v.parse::<u32>().ok());
    set_quantization_config(
        &input.join("config.json"),
        &tmp.path.join("config.json"),
        &quantization_config(bits, group_size, method, act_bits),
    )?;
    for (rel, bytes) in &repl.files {
        let to = tmp.path.join(rel);
        fs::write(&to, bytes).map_err(|e| Error::io(&to, e))?;
        sync_file(&to)?;
    }
    tmp.publish(output)?;
    Ok(report)
}

/// A GPTQ / AWQ / compressed-tensors checkpoint is repacked as it is: the
/// same bits, group size and activation bits, with no calibration (its
/// codes were chosen by the tool that made it); anything else is refused,
/// naming what would work.
pub(crate) fn check_repack(
    input: &Path,
    f: &super::import::Foreign,
    spec: &QuantSpec<'_>,
) -> Result<()> {
    let act = spec
        .extra_meta
        .iter()
        .find(|(k, _)| k == META_ACT_BITS)
        .and_then(|(_, v)| v.parse::<u32>().ok());
    let same = spec.method == "rtn"
        && spec.bits == f.bits()
        && spec.group_size == f.group_size()
        && act == f.act_bits();
    if same {
        return Ok(());
    }
    let a = f
        .act_bits()
        .map_or(String::new(), |a| format!(" --a-bit {a}"));
    Err(Error::invalid(format!(
        "{}: a {} checkpoint, {}-bit in groups of {}{}; mbq quantize repacks it into the packed format as it is (--method rtn --w-bit {} --group-size {}{a}); re-quantizing or calibrating an already quantized model needs the unquantized one",
        input.display(),
        f.name(),
        f.bits(),
        f.group_size(),
        f.act_bits().map_or(String::new(), |a| format!(", {a}-bit activations")),
        f.bits(),
        f.group_size(),
    )))
}

/// The decoder linears of a foreign checkpoint (each stored quantized);
/// a quantized tensor anywhere else (a quantized lm_head, say) is refused,
/// naming it.
fn foreign_linears(w: &WeightFiles, text: &str, layers: usize) -> Result<Vec<String>> {
    let mut linears = Vec::new();
    for i in 0..layers {
        for l in DECODER_LINEARS {
            let p = format!("{text}.layers.{i}.{l}");
            if !super::import::is_quantized(&w.pp(&p)) {
                return Err(Error::MissingTensor {
                    name: format!("{p}.qweight"),
                    path: w.location(),
                });
            }
            linears.push(p);
        }
    }
    let mut others: Vec<&str> = w
        .names()
        .filter(|n| n.ends_with(".qweight") || n.ends_with(".weight_packed"))
        .filter(|n| {
            !linears.iter().any(|p| {
                n.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
        })
        .collect();
    others.sort_unstable();
    if let Some(n) = others.first() {
        return Err(Error::invalid(format!(
            "tensor \"{n}\": only the decoder layers' linears can be packed; this checkpoint also quantizes {} other linear(s)",
            others.len()
        )));
    }
    Ok(linears)
}

/// The tensors of a foreign quantized linear `p` (all but its bias).
fn foreign_tensors(w: &WeightFiles, p: &str) -> Vec<String> {
    let head = format!("{p}.");
    w.names()
        .filter(|n| n.strip_prefix(&head).is_some_and(|leaf| leaf != "bias"))
        .map(str::to_string)
        .collect()
}

/// `[out, in]` of the decoder linear `p` (`....self_attn.q_proj`, ...).
fn linear_shape(t: &crate::config::TextConfig, p: &str) -> (usize, usize) {
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (q, kv) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    match p.rsplit('.').next().unwrap_or("") {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (i, h),
        _ => (h, i), // down_proj
    }
}

/// The prefixes of the decoder linears (`<text>.layers.<i>.self_attn.q_proj`,
/// ...), each checked to be a 2-d weight that `group_size` divides.
fn decoder_linears(
    w: &WeightFiles,
    text: &str,
    layers: usize,
    bits: u32,
    group_size: usize,
) -> Result<Vec<String>> {
    let mut linears = Vec::new();
    for i in 0..layers {
        for l in DECODER_LINEARS {
            let p = format!("{text}.layers.{i}.{l}");
            let wname = format!("{p}.weight");
            let shape = w.shape(&wname).ok_or_else(|| Error::MissingTensor {
                name: wname.clone(),
                path: w.location(),
            })?;
            let [_, inp] = shape else {
                return Err(Error::invalid(format!(
                    "tensor \"{wname}\": expected a 2-d weight [out, in], found shape {shape:?}"
                )));
            };
            check_shape(&wname, *inp, bits, group_size)?;
            linears.push(p);
        }
    }
    Ok(linears)
}

/// `vals` as the bytes of a tensor of `dtype` (f32, f16 or bf16).
fn to_dtype_bytes(name: &str, dtype: Dtype, shape: &[usize], vals: &[f32]) -> Result<Vec<u8>> {
    let n: usize = shape.iter().product();
    if vals.len() != n {
        return Err(Error::invalid(format!(
            "replacement for \"{name}\" has {} values, expected {n} ({shape:?})",
            vals.len()
        )));
    }
    Ok(match dtype {
        Dtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        d => {
            return Err(Error::invalid(format!(
                "tensor \"{name}\": cannot write a replacement of dtype {d:?} (f32, f16, bf16 only)"
            )))
        }
    })
}

/// `quantize_linear` over blocks of rows in parallel (rows are independent,
/// and the packed layout is row-major, so the blocks concatenate).
pub fn quantize_rows(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
    group_size: usize,
) -> Result<PackedLinear> {
    const ROWS: usize = 32;
    if let Some(i) = w.iter().position(|x| !half::f16::from_f32(*x).is_finite()) {
        return Err(Error::invalid(format!(
            "tensor \"{name}\": value {} at [{}, {}] is not finite in f16; it cannot be quantized",
            w[i],
            i / inp,
            i % inp
        )));
    }
    let blocks: Vec<PackedLinear> = w
        .par_chunks(ROWS * inp)
        .map(|b| quantize_linear(name, b, b.len() / inp, inp, bits, group_size))
        .collect::<Result<_>>()?;
    for (r, b) in blocks.iter().enumerate() {
        if let Some(i) = b
            .scales_zeros
            .iter()
            .step_by(2)
            .position(|s| !s.is_finite())
        {
            let (row, g) = (r * ROWS + i / b.groups(), i % b.groups());
            return Err(Error::invalid(format!(
                "tensor \"{name}\": the values of row {row}, group {g} span more than f16 can hold; it cannot be quantized"
            )));
        }
    }
    let mut qweight = Vec::with_capacity(out * inp * bits as usize / 32);
    let mut scales_zeros = Vec::with_capacity(out * (inp / group_size) * 2);
    for b in blocks {
        qweight.extend_from_slice(&b.qweight);
        scales_zeros.extend_from_slice(&b.scales_zeros);
    }
    Ok(PackedLinear {
        out,
        inp,
        bits,
        group_size,
        qweight: qweight.into(),
        scales_zeros: scales_zeros.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_config_is_appended_then_replaced_in_place() {
        let dir = std::env::temp_dir().join(format!("mbq-qc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a.json"), dir.join("b.json"), dir.join("c.json"));
        fs::write(&a, "{\n  \"z\": 1,\n  \"a\": [1, 2]\n}\n").unwrap();
        set_quantization_config(&a, &b, &serde_json::json!({"quant_method": "mbq"})).unwrap();
        let text = fs::read_to_string(&b).unwrap();
        assert_eq!(
            text,
            "{\n  \"z\": 1,\n  \"a\": [1, 2],\n  \"quantization_config\": {\n    \"quant_method\": \"mbq\"\n  }\n}\n"
        );
        // Replacing mbq's own keeps the rest of the text as it was.
        set_quantization_config(&b, &c, &serde_json::json!({"quant_method": "gptq"})).unwrap();
        let text = fs::read_to_string(&c).unwrap();
        assert!(
            text.starts_with("{\n  \"z\": 1,\n  \"a\": [1, 2],\n  \"quantization_config\""),
            "{text}"
        );
        assert!(text.contains("gptq") && !text.contains("mbq"), "{text}");
        // An empty object, and one that is not an object.
        fs::write(&a, "{}").unwrap();
        set_quantization_config(&a, &b, &serde_json::json!({})).unwrap();
        assert_eq!(
            fs::read_to_string(&b).unwrap(),
            "{\n  \"quantization_config\": {}\n}\n"
        );
        fs::write(&a, "[1]").unwrap();
        let e = set_quantization_config(&a, &b, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.json") && e.contains("object"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groups_that_f16_cannot_quantize_are_named() {
        let (out, inp) = (40, 64);
        let mut w = vec![0.01f32; out * inp];
        // Row 33 (second block of rows), group 1 of 32: range 80000 > f16 max.
        w[33 * inp + 40] = 40000.0;
        w[33 * inp + 41] = -40000.0;
        let e = quantize_rows("x.weight", &w, out, inp, 4, 32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.weight") && e.contains("row 33, group 1"),
            "{e}"
        );
        w[33 * inp + 41] = 1e5; // not finite in f16
        let e = quantize_rows("x.weight", &w, out, inp, 4, 32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[33, 41]") && e.contains("not finite"), "{e}");
        w[33 * inp + 41] = 0.0;
        let p = quantize_rows("x.weight", &w, out, inp, 4, 32).unwrap();
        let whole = quantize_linear("x.weight", &w, out, inp, 4, 32).unwrap();
        assert_eq!(p, whole, "blocks of rows concatenate to the whole");
    }
}
