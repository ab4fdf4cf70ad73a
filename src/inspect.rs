//! `mbq inspect`: what a model directory holds, for a person (`text`) or a
//! tool (`--json`, the serialized [`Inspection`]): architecture, vision and
//! text sizes, the weights' dtypes per part, the quantization recorded in
//! the safetensors metadata (`mbq.*`, see [`crate::quant::format`]), the
//! calibration report if there is one, and the files with their sizes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::calib::report::CalibReport;
use crate::config::{Arch, TextKind, VisionKind, VlmConfig};
use crate::error::{Error, Result};
use crate::quant::format::{
    META_ACT_BITS, META_BITS, META_FORMAT, META_GROUP_SIZE, META_METHOD, META_PACKED,
};
use crate::weights::{Prefixes, WeightFiles};

#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    /// config.json's `architectures[0]`, else the class mbq reads it as.
    pub architecture: String,
    /// `llava` or `llava_onevision`.
    pub model_type: String,
    pub vision: VisionSummary,
    pub text: TextSummary,
    /// Per part (`vision_tower`, `projector`, `language_model`, `lm_head`,
    /// `other`; `all` when the parts are not found):
    /// per dtype, tensors and bytes.
    pub weights: BTreeMap<String, BTreeMap<String, DtypeCount>>,
    /// Absent for an unquantized model.
    pub quantization: Option<Quantization>,
    /// From `calibration_report.json`, when the directory has one.
    pub calibration: Option<Calibration>,
    pub files: Vec<FileSize>,
    pub total_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VisionSummary {
    /// `clip` or `siglip`.
    pub kind: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TextSummary {
    /// `llama` or `qwen2`.
    pub kind: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tie_word_embeddings: bool,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DtypeCount {
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Quantization {
    /// Whose layout the file holds: `mbq` (the packed format), or `GPTQ` /
    /// `AWQ (GEMM)` (another tool's checkpoint, repacked when loaded).
    pub format: String,
    pub method: Option<String>,
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    /// 8 for W4A8; absent for weight-only models.
    pub act_bits: Option<u32>,
    pub format_version: Option<String>,
    /// Number of packed linears (`mbq.packed`).
    pub packed: usize,
    /// Packed linears per kind (`q_proj`, ..., `down_proj`).
    pub packed_by_kind: BTreeMap<String, usize>,
    /// Decoder layers with at least one packed linear.
    pub packed_layers: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub method: Option<String>,
    pub backend: Option<String>,
    pub loss: Option<String>,
    /// `--n-samples` asked for.
    pub n_samples: Option<u64>,
    /// Samples actually used.
    pub samples: usize,
    pub skipped: usize,
    pub calib: Option<String>,
    pub layers: Vec<CalibLayer>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CalibLayer {
    pub index: usize,
    /// Chosen alpha per searched group (attn_in, attn_out, mlp_in, mlp_out).
    pub alphas: BTreeMap<String, f64>,
    /// MBQ's vision/caption loss weights (attn, mlp).
    pub ratio: Option<(f64, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileSize {
    pub name: String,
    pub bytes: u64,
}

fn arch_name(a: Arch) -> (&'static str, &'static str) {
    match a {
        Arch::Llava => ("llava", "LlavaForConditionalGeneration"),
        Arch::LlavaOnevision => ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
        Arch::Qwen2Vl => ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
        Arch::Qwen25Vl => ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
        Arch::InternVl => ("internvl", "InternVLForConditionalGeneration"),
    }
}

/// Reads `dir`: config.json, the safetensors headers (not the weights),
/// calibration_report.json and the file sizes.
pub fn inspect(dir: &Path) -> Result<Inspection> {
    let cfg = VlmConfig::load(dir)?;
    let (model_type, class) = arch_name(cfg.arch);
    let config_path = dir.join("config.json");
    let architecture = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_else(|| class.to_string());
    let v = &cfg.vision;
    let vision = VisionSummary {
        kind: match v.kind {
            VisionKind::Clip => "clip",
            VisionKind::Siglip => "siglip",
            VisionKind::Qwen2Vl => "qwen2_vl",
            VisionKind::Qwen25Vl => "qwen2_5_vl",
            VisionKind::InternVit => "internvl_vision",
        }
        .into(),
        layers: v.num_hidden_layers,
        hidden: v.hidden_size,
        intermediate: v.intermediate_size,
        heads: v.num_attention_heads,
        image_size: v.image_size,
        patch_size: v.patch_size,
    };
    let t = &cfg.text;
    let text = TextSummary {
        kind: match t.kind {
            TextKind::Llama => "llama",
            TextKind::Qwen2 => "qwen2",
        }
        .into(),
        layers: t.num_hidden_layers,
        hidden: t.hidden_size,
        intermediate: t.intermediate_size,
        heads: t.num_attention_heads,
        kv_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        vocab: t.vocab_size,
        tie_word_embeddings: t.tie_word_embeddings,
    };

    let wf = WeightFiles::open(dir)?;
    let weights = weight_parts(&wf)?;
    let quantization = match quantization(&wf.metadata, &wf.location())? {
        Some(q) => Some(q),
        None => foreign_quantization(&wf)?,
    };
    let report = dir.join("calibration_report.json");
    let calibration = if report.is_file() {
        Some(calibration(&crate::calib::report::read_json(&report)?))
    } else {
        None
    };
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let meta = e.metadata().map_err(|err| Error::io(e.path(), err))?;
        if meta.is_file() {
            files.push(FileSize {
                name: e.file_name().to_string_lossy().into_owned(),
                bytes: meta.len(),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let total_bytes = files.iter().map(|f| f.bytes).sum();
    Ok(Inspection {
        path: dir.to_path_buf(),
        architecture,
        model_type: model_type.into(),
        vision,
        text,
        weights,
        quantization,
        calibration,
        files,
        total_bytes,
    })
}

fn weight_parts(wf: &WeightFiles) -> Result<BTreeMap<String, BTreeMap<String, DtypeCount>>> {
    let p = Prefixes::detect(wf).ok();
    let part_of = |name: &str| -> &'static str {
        let Some(p) = &p else { return "all" };
        let under = |pre: &str| !pre.is_empty() && name.starts_with(&format!("{pre}."));
        if under(&p.text) {
            "language_model"
        } else if under(&p.lm_head) {
            "lm_head"
        } else if under(&p.vision) {
            "vision_tower"
        } else if under(&p.projector) {
            "projector"
        } else {
            "other"
        }
    };
    let mut names: Vec<&str> = wf.names().collect();
    names.sort_unstable();
    let mut parts: BTreeMap<String, BTreeMap<String, DtypeCount>> = BTreeMap::new();
    for name in names {
        let (dtype, _, bytes) = wf.raw(name)?;
        let c = parts
            .entry(part_of(name).to_string())
            .or_default()
            .entry(format!("{dtype:?}"))
            .or_default();
        c.tensors += 1;
        c.bytes += bytes.len() as u64;
    }
    Ok(parts)
}

fn quantization(
    meta: &std::collections::HashMap<String, String>,
    path: &Path,
) -> Result<Option<Quantization>> {
    if !meta.keys().any(|k| k.starts_with("mbq.")) {
        return Ok(None);
    }
    let num = |k: &str| -> Result<Option<u64>> {
        meta.get(k)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    Error::config(
                        path,
                        format!("metadata \"{k}\": expected a number, found {v:?}"),
                    )
                })
            })
            .transpose()
    };
    let packed: Vec<String> = match meta.get(META_PACKED) {
        None => Vec::new(),
        Some(v) => serde_json::from_str(v).map_err(|e| {
            Error::config(
                path,
                format!("metadata \"{META_PACKED}\": expected a JSON list of names ({e})"),
            )
        })?,
    };
    let (packed_by_kind, packed_layers) = packed_summary(&packed);
    Ok(Some(Quantization {
        format: "mbq".into(),
        method: meta.get(META_METHOD).cloned(),
        bits: num(META_BITS)?.map(|b| b as u32),
        group_size: num(META_GROUP_SIZE)?.map(|g| g as usize),
        act_bits: num(META_ACT_BITS)?.map(|b| b as u32),
        format_version: meta.get(META_FORMAT).cloned(),
        packed: packed.len(),
        packed_by_kind,
        packed_layers,
    }))
}

/// Packed linears per kind (`q_proj`, ...) and the decoder layers that
/// have any, from the linears' names.
fn packed_summary(packed: &[String]) -> (BTreeMap<String, usize>, Vec<usize>) {
    let mut packed_by_kind = BTreeMap::new();
    let mut packed_layers = Vec::new();
    for p in packed {
        let kind = p.rsplit('.').next().unwrap_or(p).to_string();
        *packed_by_kind.entry(kind).or_insert(0) += 1;
        let mut parts = p.split('.');
        while let Some(s) = parts.next() {
            if s == "layers" {
                if let Some(i) = parts.next().and_then(|i| i.parse::<usize>().ok()) {
                    if !packed_layers.contains(&i) {
                        packed_layers.push(i);
                    }
                }
                break;
            }
        }
    }
    packed_layers.sort_unstable();
    (packed_by_kind, packed_layers)
}

/// A GPTQ / AWQ / compressed-tensors checkpoint's quantization, from its
/// quantization_config and the linears stored quantized.
fn foreign_quantization(wf: &WeightFiles) -> Result<Option<Quantization>> {
    let Some(f) = crate::quant::import::foreign_format(wf.quantization_config.as_ref())? else {
        return Ok(None);
    };
    let mut packed: Vec<String> = wf
        .names()
        .filter_map(|n| {
            n.strip_suffix(".qweight")
                .or_else(|| n.strip_suffix(".weight_packed"))
                .map(str::to_string)
        })
        .collect();
    packed.sort();
    let (packed_by_kind, packed_layers) = packed_summary(&packed);
    Ok(Some(Quantization {
        format: f.name().to_string(),
        method: Some(f.method().into()),
        bits: Some(f.bits()),
        group_size: Some(f.group_size()),
        act_bits: f.act_bits(),
        format_version: None,
        packed: packed.len(),
        packed_by_kind,
        packed_layers,
    }))
}

fn calibration(r: &CalibReport) -> Calibration {
    let s = &r.settings;
    let string = |k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let count = |k: &str| s.get(k).and_then(|v| v.as_array()).map_or(0, |a| a.len());
    Calibration {
        method: string("method"),
        backend: string("backend"),
        loss: string("loss"),
        n_samples: s.get("n_samples").and_then(|v| v.as_u64()),
        samples: count("samples"),
        skipped: count("skipped"),
        calib: string("calib"),
        layers: r
            .layers
            .iter()
            .map(|l| CalibLayer {
                index: l.index,
                alphas: l.groups.iter().map(|g| (g.name.clone(), g.alpha)).collect(),
                ratio: l.ratio.as_ref().map(|r| (r.attn, r.mlp)),
            })
            .collect(),
    }
}

/// Bytes as "2.03 MB" (decimal, like the quantize report) or "512 B".
pub fn size(bytes: u64) -> String {
    if bytes >= 1_000_000 {
        format!("{:.2} MB", bytes as f64 / 1e6)
    } else if bytes >= 1_000 {
        format!("{:.1} kB", bytes as f64 / 1e3)
    } else {
        format!("{bytes} B")
    }
}

impl Inspection {
    /// The report for a person.
    pub fn text(&self) -> String {
        let mut s = format!("{}\n", self.path.display());
        s += &format!(
            "  architecture  {} ({})\n",
            self.architecture, self.model_type
        );
        let v = &self.vision;
        s += &format!(
            "  vision        {}: {} layers, hidden {}, intermediate {}, {} heads, image {}x{}, patch {}\n",
            v.kind, v.layers, v.hidden, v.intermediate, v.heads, v.image_size, v.image_size, v.patch_size
        );
        let t = &self.text;
        s += &format!(
            "  text          {}: {} layers, hidden {}, intermediate {}, {} heads ({} kv, head dim {}), vocab {}{}\n",
            t.kind,
            t.layers,
            t.hidden,
            t.intermediate,
            t.heads,
            t.kv_heads,
            t.head_dim,
            t.vocab,
            if t.tie_word_embeddings { ", tied embeddings" } else { "" }
        );
        s += "  weights\n";
        for (part, dtypes) in &self.weights {
            let d: Vec<String> = dtypes
                .iter()
                .map(|(d, c)| {
                    let n = if c.tensors == 1 { "tensor" } else { "tensors" };
                    format!("{d} {} {n} {}", c.tensors, size(c.bytes))
                })
                .collect();
            s += &format!("    {:<15} {}\n", part.replace('_', " "), d.join(", "));
        }
        match &self.quantization {
            None => s += "  quantization  none (no mbq.* metadata)\n",
            Some(q) => {
                let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
                let scheme = match q.act_bits {
                    Some(a) => format!("W{}A{a} per-channel", opt(q.bits.map(|b| b.to_string()))),
                    None => format!(
                        "W{} g{}",
                        opt(q.bits.map(|b| b.to_string())),
                        opt(q.group_size.map(|g| g.to_string()))
                    ),
                };
                let layout = match &q.format_version {
                    Some(v) if q.format == "mbq" => format!("format v{v}"),
                    _ if q.format == "mbq" => "format v?".to_string(),
                    _ => format!("{} checkpoint, repacked when loaded", q.format),
                };
                s += &format!(
                    "  quantization  {} {scheme} ({layout})\n",
                    opt(q.method.clone()),
                );
                let kinds: Vec<String> = q
                    .packed_by_kind
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                s += &format!(
                    "    packed      {} linears in {} layers ({}): {}\n",
                    q.packed,
                    q.packed_layers.len(),
                    ranges(&q.packed_layers),
                    kinds.join(", ")
                );
            }
        }
        if let Some(c) = &self.calibration {
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
            s += &format!(
                "  calibration   {} on {}, {} samples{} ({} loss), {}\n",
                opt(&c.method),
                opt(&c.backend),
                c.samples,
                if c.skipped > 0 {
                    format!(", {} skipped", c.skipped)
                } else {
                    String::new()
                },
                opt(&c.loss),
                opt(&c.calib)
            );
            for l in &c.layers {
                let a: Vec<String> = l
                    .alphas
                    .iter()
                    .map(|(g, a)| format!("{g} {a:.2}"))
                    .collect();
                let ratio = l
                    .ratio
                    .map(|(a, m)| format!("; ratio attn {a:.3} mlp {m:.3}"))
                    .unwrap_or_default();
                s += &format!("    layer {:<3}   alpha {}{ratio}\n", l.index, a.join(", "));
            }
        }
        s += "  files\n";
        for f in &self.files {
            s += &format!("    {:<28} {:>10}\n", f.name, size(f.bytes));
        }
        s += &format!("    {:<28} {:>10}\n", "total", size(self.total_bytes));
        s
    }
}

/// "0-3" or "0-1, 5".
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 3]), "0-3");
        assert_eq!(ranges(&[0, 1, 5]), "0-1, 5");
        assert_eq!(ranges(&[]), "");
    }
}
