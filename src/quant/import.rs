//! Quantized checkpoints written by other tools, read into the packed
//! format ([`super::format`]) when a model is loaded: GPTQ (v1 and v2
//! zeros, 3/4/8-bit, symmetric or not, no act-order; [`super::gptq`]),
//! AWQ (GEMM layout, 4-bit) and compressed-tensors pack-quantized (group or
//! channel weights, optionally with dynamic per-token INT8 activations;
//! [`super::compressed`]). The repacking is exact: the same integer codes,
//! zero points and f16 scales, so `w_hat = (q - z) * s` is the checkpoint's
//! own dequantization. docs/FORMAT.md ("Other formats") has the layouts.
//!
//! Which format a directory holds comes from the `quantization_config` of
//! its config.json (or AutoGPTQ's `quantize_config.json`), which
//! [`crate::weights::WeightFiles`] keeps; [`read_linear`] is what the model
//! calls for every quantized linear ([`is_quantized`]).

use std::path::PathBuf;

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Dtype;
use serde_json::Value;

use super::compressed::{compressed_to_packed, CompressedTensors, CtStrategy};
use super::format::{check_shape, read_packed, PackedLinear, META_ACT_BITS, SUPPORTED_GROUPS};
use super::gptq::{gptq_to_packed, GptqTensors, GptqZeros};
use crate::error::{Error, Result};
use crate::weights::Prefixed;

/// AWQ's GEMM layout puts output `8 j + AWQ_ORDER[k]` in field `k` of word `j`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// The inverse: output `8 j + m` is in field `AWQ_FIELD[m]`.
const AWQ_FIELD: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// A quantized checkpoint of another tool, as its `quantization_config`
/// describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Foreign {
    /// GPTQ: `qweight`, `qzeros`, `scales`, `g_idx` ([`super::gptq`]).
    Gptq {
        bits: u32,
        group_size: usize,
        zeros: GptqZeros,
    },
    /// AWQ GEMM: `qweight [in, out / 8]`, `qzeros [in / G, out / 8]`,
    /// `scales [in / G, out]`, 4-bit, [`AWQ_ORDER`] within each word.
    Awq { group_size: usize },
    /// compressed-tensors pack-quantized: `weight_packed`, `weight_scale`,
    /// `weight_zero_point` ([`super::compressed`]); `act_bits` 8 when the
    /// inputs are quantized per token (W4A8).
    Compressed {
        bits: u32,
        strategy: CtStrategy,
        symmetric: bool,
        act_bits: Option<u32>,
    },
}

impl Foreign {
    pub fn bits(&self) -> u32 {
        match self {
            Foreign::Gptq { bits, .. } | Foreign::Compressed { bits, .. } => *bits,
            Foreign::Awq { .. } => 4,
        }
    }
    /// The group size of the repacked weights (for a per-channel
    /// compressed-tensors scheme, whose one scale per row is repeated in
    /// every group, 128 where the row allows it).
    pub fn group_size(&self) -> usize {
        match self {
            Foreign::Gptq { group_size, .. } | Foreign::Awq { group_size } => *group_size,
            Foreign::Compressed { strategy, .. } => match strategy {
                CtStrategy::Group(g) => *g,
                CtStrategy::Channel => 128,
            },
        }
    }
    pub fn act_bits(&self) -> Option<u32> {
        match self {
            Foreign::Compressed { act_bits, .. } => *act_bits,
            _ => None,
        }
    }
    pub fn method(&self) -> &'static str {
        match self {
            Foreign::Gptq { .. } => "gptq",
            Foreign::Awq { .. } => "awq",
            Foreign::Compressed { .. } => "compressed-tensors",
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Foreign::Gptq {
                zeros: GptqZeros::V1,
                ..
            } => "GPTQ",
            Foreign::Gptq { .. } => "GPTQ (v2 zeros)",
            Foreign::Awq { .. } => "AWQ (GEMM)",
            Foreign::Compressed { .. } => "compressed-tensors (pack-quantized)",
        }
    }
}

/// Whether the linear `vb` is stored quantized: mbq's, GPTQ's or AWQ's
/// `qweight`, or compressed-tensors' `weight_packed`.
pub fn is_quantized(vb: &Prefixed) -> bool {
    vb.contains("qweight") || vb.contains("weight_packed")
}

/// The foreign format of a model's weights, from the `quantization_config`
/// its directory declares: `None` when there is none (a dense model) or it
/// is mbq's own. A `quant_method` or setting this reader cannot repack
/// exactly is an error naming the file, the key and what is supported.
pub fn foreign_format(qc: Option<&(PathBuf, Value)>) -> Result<Option<Foreign>> {
    let Some((path, qc)) = qc else {
        return Ok(None);
    };
    let unsupported = |what: &str, found: String, supported: &str| Error::Unsupported {
        path: path.clone(),
        what: format!("quantization_config {what}"),
        found,
        supported: supported.to_string(),
    };
    let method = qc
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or(if qc.get("bits").is_some() { "gptq" } else { "" })
        .to_ascii_lowercase();
    let int = |key: &str| qc.get(key).and_then(Value::as_i64);
    let group = |g: Option<i64>| -> Result<usize> {
        let g = g.ok_or_else(|| {
            Error::config(path, "quantization_config has no integer \"group_size\"")
        })?;
        match usize::try_from(g) {
            Ok(g) if SUPPORTED_GROUPS.contains(&g) => Ok(g),
            _ => Err(unsupported(
                "\"group_size\"",
                g.to_string(),
                "32, 64 or 128 (per-channel, -1, is not repackable into the packed format)",
            )),
        }
    };
    let bits = |b: Option<i64>| -> Result<u32> {
        match b {
            Some(b @ (3 | 4 | 8)) => Ok(b as u32),
            Some(b) => Err(unsupported("\"bits\"", b.to_string(), "3, 4 or 8")),
            None => Err(Error::config(
                path,
                "quantization_config has no integer \"bits\"",
            )),
        }
    };
    match method.as_str() {
        "mbq" | "" => Ok(None),
        "gptq" => {
            let format = qc
                .get("checkpoint_format")
                .or_else(|| qc.get("format"))
                .and_then(Value::as_str)
                .unwrap_or("gptq")
                .to_ascii_lowercase();
            let zeros = match format.as_str() {
                "gptq" => GptqZeros::V1,
                "gptq_v2" => GptqZeros::V2,
                other => {
                    return Err(unsupported(
                        "\"checkpoint_format\"",
                        other.to_string(),
                        "gptq (v1) or gptq_v2 (other GPTQ layouts such as marlin are for one GPU kernel)",
                    ))
                }
            };
            Ok(Some(Foreign::Gptq {
                bits: bits(int("bits"))?,
                group_size: group(int("group_size"))?,
                zeros,
            }))
        }
        "awq" => {
            if let Some(b) = int("bits").or_else(|| int("w_bit")) {
                if b != 4 {
                    return Err(unsupported("\"bits\"", b.to_string(), "4"));
                }
            }
            let version = qc
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or("gemm")
                .to_ascii_lowercase();
            if version != "gemm" {
                return Err(unsupported(
                    "\"version\"",
                    version,
                    "gemm (the GEMM layout AutoAWQ and GPTQModel write by default)",
                ));
            }
            if qc.get("zero_point").and_then(Value::as_bool) == Some(false) {
                return Err(unsupported("\"zero_point\"", "false".into(), "true"));
            }
            Ok(Some(Foreign::Awq {
                group_size: group(int("group_size").or_else(|| int("q_group_size")))?,
            }))
        }
        "compressed-tensors" => compressed_scheme(path, qc).map(Some),
        other => Err(unsupported(
            "\"quant_method\"",
            other.to_string(),
            "gptq, awq, compressed-tensors (repacked when loaded) or mbq",
        )),
    }
}

/// The one weight scheme of a compressed-tensors config: pack-quantized
/// int weights (group or channel), inputs either not quantized or dynamic
/// per-token symmetric INT8.
fn compressed_scheme(path: &std::path::Path, qc: &Value) -> Result<Foreign> {
    let unsupported = |what: &str, found: String, supported: &str| Error::Unsupported {
        path: path.to_path_buf(),
        what: format!("compressed-tensors {what}"),
        found,
        supported: supported.to_string(),
    };
    let groups: Vec<&Value> = qc
        .get("config_groups")
        .and_then(Value::as_object)
        .map(|m| m.values().collect())
        .unwrap_or_default();
    let [scheme] = groups.as_slice() else {
        return Err(unsupported(
            "config_groups",
            format!("{} groups", groups.len()),
            "exactly one scheme for every quantized linear",
        ));
    };
    let format = scheme
        .get("format")
        .or_else(|| qc.get("format"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if format != "pack-quantized" {
        return Err(unsupported(
            "\"format\"",
            format.to_string(),
            "pack-quantized",
        ));
    }
    let w = scheme
        .get("weights")
        .filter(|w| w.is_object())
        .ok_or_else(|| Error::config(path, "compressed-tensors scheme without \"weights\""))?;
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    if s(w, "type") != "int" {
        return Err(unsupported("weights \"type\"", s(w, "type"), "int"));
    }
    let bits = match w.get("num_bits").and_then(Value::as_i64) {
        Some(b @ (3 | 4 | 8)) => b as u32,
        other => {
            return Err(unsupported(
                "weights \"num_bits\"",
                format!("{other:?}"),
                "3, 4 or 8",
            ))
        }
    };
    let symmetric = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
    let strategy = match s(w, "strategy").as_str() {
        "group" => match w.get("group_size").and_then(Value::as_u64) {
            Some(g) if SUPPORTED_GROUPS.contains(&(g as usize)) => CtStrategy::Group(g as usize),
            g => {
                return Err(unsupported(
                    "weights \"group_size\"",
                    format!("{g:?}"),
                    "32, 64 or 128",
                ))
            }
        },
        "channel" if symmetric => CtStrategy::Channel,
        other => {
            return Err(unsupported(
                "weights \"strategy\"",
                format!("{other} (symmetric: {symmetric})"),
                "group, or channel when symmetric",
            ))
        }
    };
    if w.get("actorder").is_some_and(|a| !a.is_null()) {
        return Err(unsupported(
            "weights \"actorder\"",
            w["actorder"].to_string(),
            "null (no act-order)",
        ));
    }
    let act_bits = match scheme.get("input_activations").filter(|a| !a.is_null()) {
        None => None,
        Some(a)
            if s(a, "type") == "int"
                && a.get("num_bits").and_then(Value::as_i64) == Some(8)
                && a.get("symmetric").and_then(Value::as_bool) == Some(true)
                && a.get("dynamic").and_then(Value::as_bool) == Some(true)
                && s(a, "strategy") == "token" =>
        {
            Some(8)
        }
        Some(a) => {
            return Err(unsupported(
                "input_activations",
                a.to_string(),
                "none, or dynamic per-token symmetric int8 (W4A8)",
            ))
        }
    };
    Ok(Foreign::Compressed {
        bits,
        strategy,
        symmetric,
        act_bits,
    })
}

/// The packed weight of the quantized linear `vb` (`[out, inp]`) and the
/// bits its input is quantized to (`Some(8)` for W4A8): mbq's own `qweight`
/// + `scales_zeros` (activation bits from the file's `mbq.act_bits`), or a
///   GPTQ / AWQ / compressed-tensors linear repacked exactly.
pub fn read_linear(vb: &Prefixed, out: usize, inp: usize) -> Result<(PackedLinear, Option<u32>)> {
    if vb.contains("scales_zeros") {
        return Ok((read_packed(vb, out, inp)?, mbq_act_bits(vb)?));
    }
    let foreign = foreign_format(vb.files.quantization_config.as_ref())?.ok_or_else(|| {
        Error::invalid(format!(
            "{}: a quantized linear without mbq's scales_zeros, and {} declares no quantization_config (gptq, awq or compressed-tensors) saying how to read it",
            vb.prefix,
            vb.files.location().display()
        ))
    })?;
    Ok((read_foreign(vb, &foreign, out, inp)?, foreign.act_bits()))
}

/// The activation bits of an mbq file (`mbq.act_bits`): `None` when
/// absent (weight-only), `Some(8)` for W4A8; any other value is an error
/// naming the file and the value.
fn mbq_act_bits(vb: &Prefixed) -> Result<Option<u32>> {
    match vb.files.metadata.get(META_ACT_BITS).map(String::as_str) {
        None => Ok(None),
        Some("8") => Ok(Some(8)),
        Some(other) => Err(Error::Unsupported {
            path: vb.files.location(),
            what: format!("packed activation bits (metadata \"{META_ACT_BITS}\")"),
            found: other.to_string(),
            supported: "8 (W4A8), or absent for weight-only".into(),
        }),
    }
}

/// The GPTQ, AWQ or compressed-tensors linear `vb` (`[out, inp]`) in the
/// packed format: the same codes, zero points and scales.
pub fn read_foreign(
    vb: &Prefixed,
    foreign: &Foreign,
    out: usize,
    inp: usize,
) -> Result<PackedLinear> {
    let name = &vb.prefix;
    let bits = foreign.bits();
    let g = match foreign {
        // One scale per row, repeated in every group of the largest size
        // that divides the row.
        Foreign::Compressed {
            strategy: CtStrategy::Channel,
            ..
        } => SUPPORTED_GROUPS
            .iter()
            .rev()
            .copied()
            .find(|g| inp.is_multiple_of(*g))
            .unwrap_or(foreign.group_size()),
        _ => foreign.group_size(),
    };
    check_shape(name, inp, bits, g)?;
    let groups = inp / g;
    match *foreign {
        Foreign::Gptq { zeros, .. } => {
            let t = GptqTensors {
                bits,
                group_size: g,
                out,
                inp,
                qweight: i32s(vb, "qweight", None)?,
                qzeros: i32s(vb, "qzeros", None)?,
                scales: f16s(vb, "scales", &[groups, out])?,
                g_idx: if vb.contains("g_idx") {
                    i32s(vb, "g_idx", Some(&[inp]))?
                } else {
                    Vec::new()
                },
            };
            for (leaf, want) in [("qweight", t.qweight_shape()), ("qzeros", t.qzeros_shape())] {
                shape(vb, leaf, &want)?;
            }
            gptq_to_packed(name, &t, zeros)
        }
        Foreign::Awq { .. } => awq_to_packed(vb, out, inp, g),
        Foreign::Compressed {
            strategy,
            symmetric,
            ..
        } => {
            let mut t = CompressedTensors {
                bits,
                out,
                inp,
                strategy,
                weight_packed: Vec::new(),
                weight_scale: Vec::new(),
                weight_zero_point: None,
            };
            t.weight_packed = i32s(vb, "weight_packed", Some(&t.weight_packed_shape()))?;
            t.weight_scale = f16s(vb, "weight_scale", &t.weight_scale_shape())?;
            if !symmetric {
                t.weight_zero_point = Some(i32s(
                    vb,
                    "weight_zero_point",
                    Some(&t.weight_zero_point_shape()),
                )?);
            }
            compressed_to_packed(name, &t, g)
        }
    }
}

/// AWQ GEMM tensors in the packed format.
fn awq_to_packed(vb: &Prefixed, out: usize, inp: usize, g: usize) -> Result<PackedLinear> {
    if !out.is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "{}: AWQ packs 8 outputs per word, but the linear has {out}",
            vb.name("qweight")
        )));
    }
    let groups = inp / g;
    let qweight = i32s(vb, "qweight", Some(&[inp, out / 8]))?;
    let qzeros = i32s(vb, "qzeros", Some(&[groups, out / 8]))?;
    let scales = f16s(vb, "scales", &[groups, out])?;
    // Word j of an input row holds outputs 8 j .. 8 j + 7: one task per word
    // column fills those eight output rows.
    let mut codes = vec![0u8; out * inp];
    codes
        .par_chunks_mut(inp * 8)
        .enumerate()
        .for_each(|(j, rows)| {
            for i in 0..inp {
                let w = qweight[i * out / 8 + j] as u32;
                for (k, &o) in AWQ_ORDER.iter().enumerate() {
                    rows[o * inp + i] = ((w >> (4 * k)) & 0xf) as u8;
                }
            }
        });
    let mut sz = Vec::with_capacity(out * groups * 2);
    for o in 0..out {
        for gi in 0..groups {
            let w = qzeros[gi * out / 8 + o / 8] as u32;
            let z = (w >> (4 * AWQ_FIELD[o % 8])) & 0xf;
            sz.extend([scales[gi * out + o], f16::from_f32(z as f32)]);
        }
    }
    PackedLinear::from_codes(&vb.prefix, out, inp, 4, g, &codes, sz)
}

fn shape(vb: &Prefixed, leaf: &str, want: &[usize]) -> Result<()> {
    let name = vb.name(leaf);
    let (_, found, _) = vb.files.raw(&name)?;
    if found != want {
        return Err(Error::Shape {
            name,
            expected: want.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// An I32 (or U32) tensor's values, of `want` shape when given.
fn i32s(vb: &Prefixed, leaf: &str, want: Option<&[usize]>) -> Result<Vec<i32>> {
    if let Some(want) = want {
        shape(vb, leaf, want)?;
    }
    let name = vb.name(leaf);
    let (dtype, _, bytes) = vb.files.raw(&name)?;
    if !matches!(dtype, Dtype::I32 | Dtype::U32) {
        return Err(Error::invalid(format!(
            "tensor \"{name}\": expected I32, found {dtype:?}"
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Scales as f16: F16 as stored; BF16 or F32 only where every value is
/// exactly an f16 (the packed format keeps f16 scales).
fn f16s(vb: &Prefixed, leaf: &str, want: &[usize]) -> Result<Vec<f16>> {
    shape(vb, leaf, want)?;
    let name = vb.name(leaf);
    let (dtype, _, bytes) = vb.files.raw(&name)?;
    let vals: Vec<f32> = match dtype {
        Dtype::F16 => {
            return Ok(bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect())
        }
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => {
            return Err(Error::invalid(format!(
                "tensor \"{name}\": expected F16 scales, found {other:?}"
            )))
        }
    };
    vals.iter()
        .map(|&v| {
            let h = f16::from_f32(v);
            if h.to_f32() == v {
                Ok(h)
            } else {
                Err(Error::invalid(format!(
                    "tensor \"{name}\": scale {v} is not exactly an f16 (the packed format keeps f16 scales)"
                )))
            }
        })
        .collect()
}
