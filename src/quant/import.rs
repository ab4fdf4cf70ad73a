//! Quantized checkpoints written by other tools, read into the packed
//! format ([`super::format`]) when a model is loaded: GPTQ (v1 and v2
//! layouts, 3/4/8-bit, symmetric or not, no act-order) and AWQ (GEMM layout,
//! 4-bit). The repacking is exact: the same integer codes, zero points and
//! f16 scales, so `w_hat = (q - z) * s` is the checkpoint's own
//! dequantization. docs/FORMAT.md ("Other formats") has the layouts.
//!
//! Which format a directory holds comes from the `quantization_config` of
//! its config.json (or AutoGPTQ's `quantize_config.json`), which
//! [`crate::weights::WeightFiles`] keeps; [`read_linear`] is what the model
//! calls for every linear that has a `qweight`.

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Dtype;
use serde_json::Value;

use super::format::{check_shape, read_packed, PackedLinear, SUPPORTED_GROUPS};
use crate::error::{Error, Result};
use crate::weights::Prefixed;

/// AWQ's GEMM layout puts output `8 j + AWQ_ORDER[k]` in field `k` of word `j`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// The inverse: output `8 j + m` is in field `AWQ_FIELD[m]`.
const AWQ_FIELD: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
/// Output rows decoded per parallel task.
const ROWS_PER_TASK: usize = 16;

/// A quantized checkpoint of another tool, as its `quantization_config`
/// describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Foreign {
    /// GPTQ: `qweight [in * b / 32, out]`, `qzeros [in / G, out * b / 32]`,
    /// `scales [in / G, out]`, `g_idx [in]`. `v1`: the zeros are stored
    /// minus one (checkpoint_format "gptq", the usual one).
    Gptq {
        bits: u32,
        group_size: usize,
        v1: bool,
    },
    /// AWQ GEMM: `qweight [in, out / 8]`, `qzeros [in / G, out / 8]`,
    /// `scales [in / G, out]`, 4-bit, [`AWQ_ORDER`] within each word.
    Awq { group_size: usize },
}

impl Foreign {
    pub fn bits(&self) -> u32 {
        match self {
            Foreign::Gptq { bits, .. } => *bits,
            Foreign::Awq { .. } => 4,
        }
    }
    pub fn group_size(&self) -> usize {
        match self {
            Foreign::Gptq { group_size, .. } | Foreign::Awq { group_size } => *group_size,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Foreign::Gptq { v1: true, .. } => "GPTQ",
            Foreign::Gptq { v1: false, .. } => "GPTQ (v2 zeros)",
            Foreign::Awq { .. } => "AWQ (GEMM)",
        }
    }
}

/// The foreign format of a model's weights, from the `quantization_config`
/// its directory declares: `None` when there is none (a dense model, or mbq's
/// own format). A `quant_method` or setting this reader cannot repack
/// exactly is an error naming the file, the key and what is supported.
pub fn foreign_format(qc: Option<&(std::path::PathBuf, Value)>) -> Result<Option<Foreign>> {
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
    let group = || -> Result<usize> {
        let g = int("group_size")
            .or_else(|| int("q_group_size"))
            .ok_or_else(|| {
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
    match method.as_str() {
        "mbq" | "" => Ok(None),
        "gptq" => {
            let bits = int("bits").ok_or_else(|| {
                Error::config(path, "quantization_config has no integer \"bits\"")
            })?;
            if ![3, 4, 8].contains(&bits) {
                return Err(unsupported("\"bits\"", bits.to_string(), "3, 4 or 8"));
            }
            let format = qc
                .get("checkpoint_format")
                .or_else(|| qc.get("format"))
                .and_then(Value::as_str)
                .unwrap_or("gptq")
                .to_ascii_lowercase();
            let v1 = match format.as_str() {
                "gptq" => true,
                "gptq_v2" => false,
                other => {
                    return Err(unsupported(
                        "\"checkpoint_format\"",
                        other.to_string(),
                        "gptq (v1) or gptq_v2 (other GPTQ layouts such as marlin are for one GPU kernel)",
                    ))
                }
            };
            Ok(Some(Foreign::Gptq {
                bits: bits as u32,
                group_size: group()?,
                v1,
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
                group_size: group()?,
            }))
        }
        other => Err(unsupported(
            "\"quant_method\"",
            other.to_string(),
            "gptq, awq (repacked when loaded) or mbq",
        )),
    }
}

/// The packed weight of the linear `vb` (`[out, inp]`): mbq's own
/// `qweight` + `scales_zeros`, or a GPTQ / AWQ linear repacked exactly.
pub fn read_linear(vb: &Prefixed, out: usize, inp: usize) -> Result<PackedLinear> {
    if vb.contains("scales_zeros") {
        return read_packed(vb, out, inp);
    }
    let foreign = foreign_format(vb.files.quantization_config.as_ref())?.ok_or_else(|| {
        Error::invalid(format!(
            "{}: a quantized linear (qweight) without scales_zeros, and {} declares no quantization_config (gptq or awq) saying how to read it",
            vb.name("qweight"),
            vb.files.location().display()
        ))
    })?;
    read_foreign(vb, &foreign, out, inp)
}

/// The GPTQ or AWQ linear `vb` (`[out, inp]`) in the packed format: the
/// same codes, zero points and scales.
pub fn read_foreign(
    vb: &Prefixed,
    foreign: &Foreign,
    out: usize,
    inp: usize,
) -> Result<PackedLinear> {
    let bits = foreign.bits();
    let g = foreign.group_size();
    check_shape(&vb.name("qweight"), inp, bits, g)?;
    let groups = inp / g;
    let (codes, zeros) = match *foreign {
        Foreign::Gptq { v1, .. } => {
            let qweight = int32s(vb, "qweight", &[inp * bits as usize / 32, out])?;
            let qzeros = int32s(vb, "qzeros", &[groups, out * bits as usize / 32])?;
            check_g_idx(vb, inp, g)?;
            // 32 inputs of one column are `bits` words, one per qweight row
            // of the block: decode a block of rows for a chunk of outputs at
            // a time (contiguous reads along the rows, 32-byte writes).
            let b = bits as usize;
            let mut codes = vec![0u8; out * inp];
            codes
                .par_chunks_mut(inp * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(t, chunk)| {
                    let o0 = t * ROWS_PER_TASK;
                    for (r, row) in chunk.chunks_exact_mut(inp).enumerate() {
                        let o = o0 + r;
                        let mut words = [0u32; 8];
                        for (blk, dst) in row.chunks_exact_mut(32).enumerate() {
                            for (j, w) in words[..b].iter_mut().enumerate() {
                                *w = qweight[(blk * b + j) * out + o];
                            }
                            for (i, c) in dst.iter_mut().enumerate() {
                                *c = field(|k| words[k], b, i, bits);
                            }
                        }
                    }
                });
            let wpr = out * bits as usize / 32; // words along one qzeros row
            let mut zeros = vec![0u8; out * groups];
            for gi in 0..groups {
                let mut words = qzeros[gi * wpr..(gi + 1) * wpr].to_vec();
                if v1 {
                    undo_v1_offset(&mut words, bits);
                }
                for o in 0..out {
                    zeros[o * groups + gi] = field(|k| words[k], wpr, o, bits);
                }
            }
            (codes, zeros)
        }
        Foreign::Awq { .. } => {
            if !out.is_multiple_of(8) {
                return Err(Error::invalid(format!(
                    "{}: AWQ packs 8 outputs per word, but the linear has {out}",
                    vb.name("qweight")
                )));
            }
            let qweight = int32s(vb, "qweight", &[inp, out / 8])?;
            let qzeros = int32s(vb, "qzeros", &[groups, out / 8])?;
            // Field k of word j is output 8 j + AWQ_ORDER[k].
            let awq =
                |words: &[u32], o: usize| ((words[o / 8] >> (4 * AWQ_FIELD[o % 8])) & 0xf) as u8;
            let mut codes = vec![0u8; out * inp];
            codes
                .par_chunks_mut(inp * 8)
                .enumerate()
                .for_each(|(j, chunk)| {
                    for i in 0..inp {
                        let w = qweight[i * out / 8 + j];
                        for (k, &o) in AWQ_ORDER.iter().enumerate() {
                            chunk[o * inp + i] = ((w >> (4 * k)) & 0xf) as u8;
                        }
                    }
                });
            let mut zeros = vec![0u8; out * groups];
            for gi in 0..groups {
                let words = &qzeros[gi * out / 8..(gi + 1) * out / 8];
                for o in 0..out {
                    zeros[o * groups + gi] = awq(words, o);
                }
            }
            (codes, zeros)
        }
    };
    let scales = f16s(vb, "scales", &[groups, out])?;
    let mut sz = Vec::with_capacity(out * groups * 2);
    for o in 0..out {
        for gi in 0..groups {
            sz.push(scales[gi * out + o]);
            sz.push(f16::from_f32(zeros[o * groups + gi] as f32));
        }
    }
    PackedLinear::from_codes(&vb.name("qweight"), out, inp, bits, g, &codes, sz)
}

/// Field `i` of a little-endian bit stream of `bits`-bit fields over `n`
/// words (`word(k)`): GPTQ's 3-bit 10 + 1 + 10 + 1 + 10 packing is this
/// stream, as are its 4- and 8-bit packings.
fn field(word: impl Fn(usize) -> u32, n: usize, i: usize, bits: u32) -> u8 {
    let bit = i * bits as usize;
    let (k, shift) = (bit / 32, bit % 32);
    let mut v = (word(k) as u64) >> shift;
    if shift + bits as usize > 32 && k + 1 < n {
        v |= (word(k + 1) as u64) << (32 - shift);
    }
    (v & ((1u64 << bits) - 1)) as u8
}

/// GPTQ v1 stores each zero point minus one. The reference loader
/// (GPTQModel, which transformers uses) adds the one back as a whole-word
/// add of 0x11111111 (4-bit) or 0x01010101 (8-bit), wrapping, so a stored
/// field of 2^b - 1 (zero 0) carries into the next field, which the writer's
/// whole-word subtraction had borrowed from; for 3 bits, whose fields cross
/// words, it adds one to each field modulo 8. The same here, so zeros of 0
/// read back as the reference reads them.
fn undo_v1_offset(words: &mut [u32], bits: u32) {
    match bits {
        4 => words
            .iter_mut()
            .for_each(|w| *w = w.wrapping_add(0x1111_1111)),
        8 => words
            .iter_mut()
            .for_each(|w| *w = w.wrapping_add(0x0101_0101)),
        _ => {
            let n = words.len();
            let fields = n * 32 / bits as usize;
            let vals: Vec<u8> = (0..fields)
                .map(|i| (field(|k| words[k], n, i, bits) + 1) & ((1 << bits) - 1) as u8)
                .collect();
            words.iter_mut().for_each(|w| *w = 0);
            for (i, v) in vals.into_iter().enumerate() {
                let bit = i * bits as usize;
                let (k, shift) = (bit / 32, bit % 32);
                words[k] |= (v as u32) << shift;
                if shift + bits as usize > 32 {
                    words[k + 1] |= (v as u32) >> (32 - shift);
                }
            }
        }
    }
}

/// `g_idx`, when present, must be `i / group_size` (no act-order): the
/// packed format's groups are consecutive input features.
fn check_g_idx(vb: &Prefixed, inp: usize, g: usize) -> Result<()> {
    if !vb.contains("g_idx") {
        return Ok(());
    }
    let idx = int32s(vb, "g_idx", &[inp])?;
    if let Some(i) = (0..inp).find(|&i| idx[i] as usize != i / g) {
        return Err(Error::invalid(format!(
            "{}: g_idx[{i}] is {}, expected {} ({i} / group size {g}): act-order (desc_act) GPTQ checkpoints, whose groups are not consecutive input features, are not supported; use a checkpoint quantized without act-order",
            vb.name("g_idx"),
            idx[i] as i32,
            i / g
        )));
    }
    Ok(())
}

fn raw<'a>(vb: &'a Prefixed, leaf: &str, shape: &[usize]) -> Result<(Dtype, &'a [u8])> {
    let name = vb.name(leaf);
    let (dtype, found, bytes) = vb.files.raw(&name)?;
    if found != shape {
        return Err(Error::Shape {
            name,
            expected: shape.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok((dtype, bytes))
}

fn int32s(vb: &Prefixed, leaf: &str, shape: &[usize]) -> Result<Vec<u32>> {
    let (dtype, bytes) = raw(vb, leaf, shape)?;
    if !matches!(dtype, Dtype::I32 | Dtype::U32) {
        return Err(Error::invalid(format!(
            "tensor \"{}\": expected I32, found {dtype:?}",
            vb.name(leaf)
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Scales as f16: F16 as stored; BF16 or F32 only where every value is
/// exactly an f16 (the packed format's scales are f16).
fn f16s(vb: &Prefixed, leaf: &str, shape: &[usize]) -> Result<Vec<f16>> {
    let (dtype, bytes) = raw(vb, leaf, shape)?;
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
                "tensor \"{}\": expected F16 scales, found {other:?}",
                vb.name(leaf)
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
                    "tensor \"{}\": scale {v} is not exactly an f16 (the packed format keeps f16 scales)",
                    vb.name(leaf)
                )))
            }
        })
        .collect()
}
