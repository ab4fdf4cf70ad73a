//! The packed weight format, version 1: the one definition that the CPU
//! reference, the WGSL shaders and the CUDA kernels all read. See
//! docs/FORMAT.md for the same description with pictures.
//!
//! A linear weight `W [out, in]` is cut into groups of `group_size`
//! consecutive input features per output row. Each group has an f16 scale
//! `s` and an f16 zero point `z` (an integer in `0..2^bits`), and each
//! weight an unsigned code `q` in `0..2^bits`:
//!
//! ```text
//! w_hat = (q - z) * s
//! ```
//!
//! Codes are stored in u32 words, row-major, `group_size * bits / 32` words
//! per group (so every group starts on a word boundary):
//! - 8 bits: code k of a group in word `k / 4`, bits `8 (k % 4)..`.
//! - 4 bits: code k in word `k / 8`, bits `4 (k % 8)..`.
//! - 3 bits: two bit planes. The low two bits of code k are in word
//!   `k / 16`, bits `2 (k % 16)..` (the first `group_size / 16` words); the
//!   high bit is in word `group_size / 16 + k / 32`, bit `k % 32` (the next
//!   `group_size / 32` words). A group of 128 is 8 + 4 = 12 words: 3 bits
//!   per weight, 3.25 with the scale and zero.
//!
//! Scales and zeros are a separate stream of f16 pairs `[out, groups, 2]`
//! (scale, then zero), so one aligned u32 load fetches both.
//!
//! In safetensors, a packed linear `P.weight` becomes `P.qweight` (U32
//! `[out, in * bits / 32]`) and `P.scales_zeros` (F16 `[out, in / group, 2]`);
//! the file's metadata holds [`META_FORMAT`], [`META_BITS`],
//! [`META_GROUP_SIZE`], [`META_METHOD`] and [`META_PACKED`], and for a
//! weight-activation (W4A8) model [`META_ACT_BITS`].

use half::f16;

use crate::error::{Error, Result};
use crate::store::Store;

pub const FORMAT_VERSION: u32 = 1;
/// Metadata keys of a packed safetensors file.
pub const META_FORMAT: &str = "mbq.format_version";
pub const META_BITS: &str = "mbq.bits";
pub const META_GROUP_SIZE: &str = "mbq.group_size";
pub const META_METHOD: &str = "mbq.method";
/// JSON list of the packed linears' prefixes (`...q_proj`).
pub const META_PACKED: &str = "mbq.packed";
/// Bits of the activations entering the packed linears: `"8"` for W4A8
/// (per-token symmetric INT8, fake-quantized by the runtime before every
/// packed linear, see [`super::w4a8`]); absent for weight-only models. Any
/// other value is rejected when the model is loaded.
pub const META_ACT_BITS: &str = "mbq.act_bits";

/// The file `mbq quantize` writes its packed weights to (defined with the
/// other weight file names in [`crate::weights`], which finds it).
pub use crate::weights::MBQ_WEIGHTS_FILE;

/// `quant_method` of the `quantization_config` that `mbq quantize` adds to
/// config.json.
pub const QUANT_METHOD: &str = "mbq";

/// The `quantization_config` object `mbq quantize` adds to config.json: it
/// says what the directory holds (the safetensors metadata stays the
/// reference for the runtime). `act_bits` is `Some(8)` for W4A8.
pub fn quantization_config(
    bits: u32,
    group_size: usize,
    method: &str,
    act_bits: Option<u32>,
) -> serde_json::Value {
    let mut q = serde_json::json!({
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size,
        "method": method,
        "weights_file": MBQ_WEIGHTS_FILE,
        "modules": "decoder linears of the language model (q k v o gate up down proj)",
    });
    if let Some(a) = act_bits {
        q["act_bits"] = a.into();
    }
    q
}

pub const SUPPORTED_BITS: &[u32] = &[3, 4, 8];
pub const SUPPORTED_GROUPS: &[usize] = &[32, 64, 128];

/// Words of packed codes per group.
pub fn words_per_group(bits: u32, group_size: usize) -> usize {
    group_size * bits as usize / 32
}

/// A packed linear weight, host side.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLinear {
    pub out: usize,
    pub inp: usize,
    pub bits: u32,
    pub group_size: usize,
    /// `[out, in * bits / 32]` (mapped from the weight file when read
    /// from one, see [`Store`]).
    pub qweight: Store<u32>,
    /// `[out, in / group_size, 2]`: (scale, zero) pairs.
    pub scales_zeros: Store<f16>,
}

/// Checks that `(bits, group_size)` is a supported combination for a
/// weight with `inp` input features; the message names the tensor.
pub fn check_shape(name: &str, inp: usize, bits: u32, group_size: usize) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(Error::invalid(format!(
            "{name}: {bits}-bit packing is not supported (supported: 3, 4, 8)"
        )));
    }
    if group_size == 0 || !group_size.is_multiple_of(32) {
        return Err(Error::invalid(format!(
            "{name}: group size {group_size} must be a positive multiple of 32 (32, 64, 128)"
        )));
    }
    if !inp.is_multiple_of(group_size) {
        return Err(Error::invalid(format!(
            "{name}: input dimension {inp} is not divisible by the group size {group_size}"
        )));
    }
    Ok(())
}

impl PackedLinear {
    /// Checks that the weight is one every backend can read: supported
    /// bits and group size ([`check_shape`]), `qweight` of
    /// `out * in * bits / 32` words and `out * in / group_size` (scale,
    /// zero) pairs. `Backend::packed_weight` calls it before any backend
    /// sees the weight; the message names `name`.
    pub fn validate(&self, name: &str) -> Result<()> {
        check_shape(name, self.inp, self.bits, self.group_size)?;
        if self.qweight.len() != self.out * self.words_per_row()
            || self.scales_zeros.len() != self.out * self.groups() * 2
        {
            return Err(Error::invalid(format!(
                "{name}: [{}, {}] at {} bits in groups of {}: {} code words and {} scale/zero values",
                self.out,
                self.inp,
                self.bits,
                self.group_size,
                self.qweight.len(),
                self.scales_zeros.len()
            )));
        }
        Ok(())
    }

    pub fn groups(&self) -> usize {
        self.inp / self.group_size
    }

    pub fn words_per_row(&self) -> usize {
        self.inp * self.bits as usize / 32
    }

    /// Packs codes `[out, in]` (each `< 2^bits`) with their (scale, zero).
    pub fn from_codes(
        name: &str,
        out: usize,
        inp: usize,
        bits: u32,
        group_size: usize,
        codes: &[u8],
        scales_zeros: Vec<f16>,
    ) -> Result<PackedLinear> {
        check_shape(name, inp, bits, group_size)?;
        let groups = inp / group_size;
        if codes.len() != out * inp || scales_zeros.len() != out * groups * 2 {
            return Err(Error::invalid(format!(
                "{name}: {} codes and {} scale/zero values for [{out}, {inp}] in groups of {group_size}",
                codes.len(),
                scales_zeros.len()
            )));
        }
        let wpg = words_per_group(bits, group_size);
        let mut qweight = vec![0u32; out * groups * wpg];
        for (gi, (chunk, words)) in codes
            .chunks_exact(group_size)
            .zip(qweight.chunks_exact_mut(wpg))
            .enumerate()
        {
            if let Some(&bad) = chunk.iter().find(|&&c| (c as u32) >> bits != 0) {
                return Err(Error::invalid(format!(
                    "{name}: code {bad} in group {gi} does not fit {bits} bits"
                )));
            }
            pack_group(chunk, bits, words);
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

    /// The codes of row `r`, group `g`.
    pub fn group_codes(&self, r: usize, g: usize) -> Vec<u8> {
        let wpg = words_per_group(self.bits, self.group_size);
        let start = (r * self.groups() + g) * wpg;
        unpack_group(
            &self.qweight[start..start + wpg],
            self.bits,
            self.group_size,
        )
    }

    /// (scale, zero) of row `r`, group `g`, as f32.
    pub fn scale_zero(&self, r: usize, g: usize) -> (f32, f32) {
        let i = (r * self.groups() + g) * 2;
        (
            self.scales_zeros[i].to_f32(),
            self.scales_zeros[i + 1].to_f32(),
        )
    }

    /// Row `r` dequantized: `(q - z) * s` in f32 (exact: q - z is a small
    /// integer and s an f16).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let wpg = words_per_group(self.bits, self.group_size);
        let g_n = self.groups();
        for g in 0..g_n {
            let (s, z) = self.scale_zero(r, g);
            let start = (r * g_n + g) * wpg;
            let dst = &mut out[g * self.group_size..(g + 1) * self.group_size];
            dequantize_group(&self.qweight[start..start + wpg], self.bits, s, z, dst);
        }
    }

    /// The whole weight dequantized, `[out, in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.out * self.inp];
        for (r, row) in w.chunks_exact_mut(self.inp).enumerate() {
            self.dequantize_row(r, row);
        }
        w
    }

    /// Bytes of codes + scales/zeros.
    pub fn nbytes(&self) -> usize {
        self.qweight.len() * 4 + self.scales_zeros.len() * 2
    }
}

/// Packs one group of codes into `words` (see the module docs for the layout).
pub fn pack_group(codes: &[u8], bits: u32, words: &mut [u32]) {
    words.iter_mut().for_each(|w| *w = 0);
    let g = codes.len();
    match bits {
        3 => {
            let hi_base = g / 16;
            for (k, &c) in codes.iter().enumerate() {
                let c = c as u32;
                words[k / 16] |= (c & 3) << (2 * (k % 16));
                words[hi_base + k / 32] |= (c >> 2) << (k % 32);
            }
        }
        4 | 8 => {
            let per = (32 / bits) as usize;
            for (k, &c) in codes.iter().enumerate() {
                words[k / per] |= (c as u32) << (bits as usize * (k % per));
            }
        }
        _ => unreachable!("bits checked by check_shape"),
    }
}

/// Dequantizes one packed group into `out` (its length is the group size):
/// `out[k] = (q_k - zero) * scale`.
pub fn dequantize_group(words: &[u32], bits: u32, scale: f32, zero: f32, out: &mut [f32]) {
    let g = out.len();
    match bits {
        3 => {
            let hi_base = g / 16;
            for (k, o) in out.iter_mut().enumerate() {
                let lo = (words[k / 16] >> (2 * (k % 16))) & 3;
                let hi = (words[hi_base + k / 32] >> (k % 32)) & 1;
                *o = ((lo | (hi << 2)) as f32 - zero) * scale;
            }
        }
        _ => {
            let per = (32 / bits) as usize;
            let mask = (1u32 << bits) - 1;
            for (k, o) in out.iter_mut().enumerate() {
                let q = (words[k / per] >> (bits as usize * (k % per))) & mask;
                *o = (q as f32 - zero) * scale;
            }
        }
    }
}

/// Inverse of [`pack_group`].
pub fn unpack_group(words: &[u32], bits: u32, group_size: usize) -> Vec<u8> {
    match bits {
        3 => {
            let hi_base = group_size / 16;
            (0..group_size)
                .map(|k| {
                    let lo = (words[k / 16] >> (2 * (k % 16))) & 3;
                    let hi = (words[hi_base + k / 32] >> (k % 32)) & 1;
                    (lo | (hi << 2)) as u8
                })
                .collect()
        }
        _ => {
            let per = (32 / bits) as usize;
            let mask = (1u32 << bits) - 1;
            (0..group_size)
                .map(|k| ((words[k / per] >> (bits as usize * (k % per))) & mask) as u8)
                .collect()
        }
    }
}

/// Checks the `mbq.format_version` metadata of a file holding packed
/// tensors: `MAJOR` or `MAJOR.MINOR`, and a reader rejects a major version it
/// does not know (a minor version only adds what a reader may ignore).
pub fn check_format_version(
    metadata: &std::collections::HashMap<String, String>,
    location: &std::path::Path,
) -> Result<()> {
    let bad = |msg: String| Error::Safetensors {
        path: location.to_path_buf(),
        msg,
    };
    let v = metadata.get(META_FORMAT).ok_or_else(|| {
        bad(format!(
            "packed tensors (.qweight) but no \"{META_FORMAT}\" metadata; this reader knows format version {FORMAT_VERSION}"
        ))
    })?;
    let major = v.split('.').next().unwrap_or("").trim().parse::<u32>().ok();
    if major != Some(FORMAT_VERSION) {
        return Err(bad(format!(
            "packed format version \"{v}\" is not supported; this reader knows version {FORMAT_VERSION}"
        )));
    }
    Ok(())
}

/// Checks the packed-format metadata of a file against what the tensors of
/// the linear `prefix` say (`bits` and `group_size` follow from their
/// shapes): `mbq.bits` and `mbq.group_size` must equal them and `mbq.packed`
/// must be a JSON list of names that holds `prefix`. A key that is absent
/// is not checked; one that contradicts the tensors is refused.
pub fn check_metadata(
    metadata: &std::collections::HashMap<String, String>,
    location: &std::path::Path,
    prefix: &str,
    bits: u32,
    group_size: usize,
) -> Result<()> {
    let bad = |msg: String| Error::Safetensors {
        path: location.to_path_buf(),
        msg,
    };
    for (key, found) in [(META_BITS, bits as usize), (META_GROUP_SIZE, group_size)] {
        if let Some(v) = metadata.get(key) {
            if v.trim().parse::<usize>().ok() != Some(found) {
                return Err(bad(format!(
                    "metadata \"{key}\" is \"{v}\", but the tensors of {prefix} (qweight, scales_zeros) say {found}"
                )));
            }
        }
    }
    if let Some(v) = metadata.get(META_PACKED) {
        let list: Vec<String> = serde_json::from_str(v).map_err(|e| {
            bad(format!(
                "metadata \"{META_PACKED}\" is not a JSON list of names ({e}): \"{}\"",
                v.chars().take(80).collect::<String>()
            ))
        })?;
        if !list.iter().any(|p| p == prefix) {
            return Err(bad(format!(
                "metadata \"{META_PACKED}\" does not list {prefix}, but the file holds it packed ({prefix}.qweight)"
            )));
        }
    }
    Ok(())
}

/// Reads `<prefix>.qweight` and `<prefix>.scales_zeros` of a linear that must
/// be `[out, inp]`; bits and group size follow from the tensor shapes. The
/// file's format version must be one this reader knows.
pub fn read_packed(vb: &crate::weights::Prefixed, out: usize, inp: usize) -> Result<PackedLinear> {
    use safetensors::tensor::Dtype;
    check_format_version(&vb.files.metadata, &vb.files.location())?;
    let qname = vb.name("qweight");
    let sname = vb.name("scales_zeros");
    let (qd, qshape, _) = vb.files.raw(&qname)?;
    let (sd, sshape, _) = vb.files.raw(&sname)?;
    let bad = |name: &str, msg: String| Error::invalid(format!("packed tensor \"{name}\": {msg}"));
    if qd != Dtype::U32 || qshape.len() != 2 || qshape[0] != out || (qshape[1] * 32) % inp != 0 {
        return Err(bad(
            &qname,
            format!("expected U32 [{out}, {inp} * bits / 32], found {qd:?} {qshape:?}"),
        ));
    }
    let bits = (qshape[1] * 32 / inp) as u32;
    if sd != Dtype::F16
        || sshape.len() != 3
        || sshape[0] != out
        || sshape[2] != 2
        || sshape[1] == 0
        || !inp.is_multiple_of(sshape[1])
    {
        return Err(bad(
            &sname,
            format!("expected F16 [{out}, {inp} / group_size, 2], found {sd:?} {sshape:?}"),
        ));
    }
    let group_size = inp / sshape[1];
    check_shape(&qname, inp, bits, group_size)?;
    check_metadata(
        &vb.files.metadata,
        &vb.files.location(),
        &vb.prefix,
        bits,
        group_size,
    )?;
    // Used where the file holds them (mapped), not copied.
    let qweight = vb.files.store(&qname, Dtype::U32)?;
    let scales_zeros = vb.files.store(&sname, Dtype::F16)?;
    Ok(PackedLinear {
        out,
        inp,
        bits,
        group_size,
        qweight,
        scales_zeros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_roundtrip_every_layout() {
        let mut seed = 7u32;
        for &bits in SUPPORTED_BITS {
            for &g in SUPPORTED_GROUPS {
                let codes: Vec<u8> = (0..g)
                    .map(|_| {
                        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                        ((seed >> 16) % (1 << bits)) as u8
                    })
                    .collect();
                let mut words = vec![0u32; words_per_group(bits, g)];
                pack_group(&codes, bits, &mut words);
                assert_eq!(
                    unpack_group(&words, bits, g),
                    codes,
                    "bits {bits} group {g}"
                );
            }
        }
    }

    #[test]
    fn w3_g128_costs_3_25_bits_per_weight() {
        let out = 4;
        let inp = 256;
        let p = PackedLinear::from_codes(
            "w",
            out,
            inp,
            3,
            128,
            &vec![5u8; out * inp],
            vec![f16::ONE; out * 2 * 2],
        )
        .unwrap();
        assert_eq!(p.nbytes() as f64 * 8.0 / (out * inp) as f64, 3.25);
    }

    #[test]
    fn indivisible_dimension_is_a_clear_error() {
        let e = check_shape("model.layers.0.mlp.down_proj", 200, 3, 128).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("down_proj") && m.contains("200") && m.contains("128"),
            "{m}"
        );
    }
}
