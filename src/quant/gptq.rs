//! The GPTQ v1 checkpoint layout (AutoGPTQ / GPTQModel, vLLM's `gptq`
//! method, transformers through optimum + gptqmodel), both directions:
//! [`packed_to_gptq`] for `mbq export --format gptq`, [`gptq_to_packed`] to
//! run a GPTQ checkpoint. docs/FORMAT.md, "Other formats", has the same with
//! pictures.
//!
//! Per quantized linear `P` (weight `[out, in]`, `b` bits, groups of `G`
//! input features):
//!
//! | tensor | dtype | shape | holds |
//! |---|---|---|---|
//! | `P.qweight` | I32 | `[in * b / 32, out]` | codes; column `o` is the bit stream of row `o`'s `in` codes |
//! | `P.qzeros` | I32 | `[in / G, ceil(out * b / 32)]` | row `g` is the bit stream of the `out` zero points of group `g` (v1: `zero - 1`) |
//! | `P.scales` | F16 | `[in / G, out]` | scale of (group, output) |
//! | `P.g_idx` | I32 | `[in]` | group of each input feature, `i / G` |
//!
//! Streams are dense little-endian bit streams ([`super::bitstream`]);
//! dequantization is `scale * (q - zero)`, the packed format's.
//!
//! Zero point 0 has no v1 encoding every loader agrees on (stored `-1` is
//! all ones in its field; one loader adds 1 to the whole word, carrying
//! into the next field, another adds 1 per field). So a group whose zero
//! is 0 is written flipped: codes `M - q`, zero `M` and scale `-s` (`M =
//! 2^b - 1`), which dequantizes to exactly `(-s) (M - q - M) = s q`. Every
//! stored `zero - 1` is then in `0 .. M - 1`. [`gptq_to_packed`] flips such
//! a group back (a negative scale with zero `M`), so a packed linear with
//! non-negative scales (all that `mbq quantize` writes) round-trips bit
//! for bit.

use half::f16;
use rayon::prelude::*;

use super::bitstream::{get_code, pack_stream, stream_words};
use super::format::{check_shape, PackedLinear};
use crate::error::{Error, Result};

/// How a checkpoint stores its zero points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptqZeros {
    /// `zero - 1` (`checkpoint_format: "gptq"`, AutoGPTQ and GPTQModel's
    /// default), undone as the reference loader does (`undo_v1_offset`).
    V1,
    /// The zero itself (GPTQModel's `checkpoint_format: "gptq_v2"`).
    V2,
}

/// The tensors of one GPTQ linear, host side (see the module docs for
/// their shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct GptqTensors {
    pub bits: u32,
    pub group_size: usize,
    pub out: usize,
    pub inp: usize,
    /// `[in * bits / 32, out]`.
    pub qweight: Vec<i32>,
    /// `[in / group_size, ceil(out * bits / 32)]`.
    pub qzeros: Vec<i32>,
    /// `[in / group_size, out]`.
    pub scales: Vec<f16>,
    /// `[in]`; empty means `i / group_size`.
    pub g_idx: Vec<i32>,
}

impl GptqTensors {
    pub fn groups(&self) -> usize {
        self.inp / self.group_size
    }
    pub fn qweight_shape(&self) -> [usize; 2] {
        [self.inp * self.bits as usize / 32, self.out]
    }
    pub fn qzeros_shape(&self) -> [usize; 2] {
        [self.groups(), stream_words(self.out, self.bits)]
    }
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.groups(), self.out]
    }
}

/// `M = 2^bits - 1`, the largest code.
fn max_code(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// The zero point of (row, group) of `p` as an integer code, or an error
/// naming the tensor when it is not one (GPTQ and compressed-tensors store
/// integer zero points).
pub(crate) fn integer_zero(name: &str, p: &PackedLinear, r: usize, g: usize) -> Result<u32> {
    let (_, z) = p.scale_zero(r, g);
    if z.fract() != 0.0 || z < 0.0 || z > max_code(p.bits) as f32 {
        return Err(Error::invalid(format!(
            "{name}: row {r}, group {g} has zero point {z}; other formats store an integer zero point in 0..={}",
            max_code(p.bits)
        )));
    }
    Ok(z as u32)
}

/// The GPTQ v1 tensors of a packed linear (zero-0 groups flipped, see the
/// module docs). `name` (the linear's prefix) is for messages.
pub fn packed_to_gptq(name: &str, p: &PackedLinear) -> Result<GptqTensors> {
    p.validate(name)?;
    let (bits, out, inp, gs) = (p.bits, p.out, p.inp, p.group_size);
    if !(out * bits as usize).is_multiple_of(32) {
        return Err(Error::invalid(format!(
            "{name}: {out} output features at {bits} bits do not fill whole 32-bit words of qzeros; GPTQ needs out * bits to be a multiple of 32"
        )));
    }
    let m = max_code(bits);
    let groups = p.groups();
    // Zeros (stored zero - 1) and scales, [groups, out]; which groups flip.
    let mut zeros_m1 = vec![0u32; groups * out];
    let mut scales = vec![f16::ZERO; groups * out];
    let mut flip = vec![false; out * groups];
    for r in 0..out {
        for g in 0..groups {
            let z = integer_zero(name, p, r, g)?;
            let s = p.scales_zeros[(r * groups + g) * 2];
            let (z, s) = if z == 0 {
                flip[r * groups + g] = true;
                (m, -s)
            } else {
                (z, s)
            };
            zeros_m1[g * out + r] = z - 1;
            scales[g * out + r] = s;
        }
    }
    // Each row's codes as one bit stream, then transposed to [words, out].
    let wpr = inp * bits as usize / 32;
    let rows: Vec<Vec<u32>> = (0..out)
        .into_par_iter()
        .map(|r| {
            let mut codes = Vec::with_capacity(inp);
            for g in 0..groups {
                let f = flip[r * groups + g];
                codes.extend(p.group_codes(r, g).into_iter().map(|q| {
                    if f {
                        m - q as u32
                    } else {
                        q as u32
                    }
                }));
            }
            let mut words = vec![0u32; wpr];
            pack_stream(codes, bits, &mut words);
            words
        })
        .collect();
    let mut qweight = vec![0i32; wpr * out];
    for (r, words) in rows.iter().enumerate() {
        for (w, &x) in words.iter().enumerate() {
            qweight[w * out + r] = x as i32;
        }
    }
    let zw = stream_words(out, bits);
    let mut qzeros = vec![0i32; groups * zw];
    for (g, row) in qzeros.chunks_exact_mut(zw).enumerate() {
        let mut words = vec![0u32; zw];
        pack_stream(
            zeros_m1[g * out..(g + 1) * out].iter().copied(),
            bits,
            &mut words,
        );
        for (d, w) in row.iter_mut().zip(words) {
            *d = w as i32;
        }
    }
    Ok(GptqTensors {
        bits,
        group_size: gs,
        out,
        inp,
        qweight,
        qzeros,
        scales,
        g_idx: (0..inp).map(|i| (i / gs) as i32).collect(),
    })
}

/// The packed linear of GPTQ tensors (`zeros` says how the zero points are
/// stored). Groups must be contiguous (`g_idx[i] = i / group_size`: no
/// act-order). A group with a negative scale and zero point `2^b - 1` is
/// flipped back (codes `M - q`, zero 0, scale `-s`: the same weights), so
/// [`packed_to_gptq`]'s output comes back bit for bit. `name` (the
/// linear's prefix) is for messages.
pub fn gptq_to_packed(name: &str, t: &GptqTensors, zeros: GptqZeros) -> Result<PackedLinear> {
    let (bits, gs, out, inp) = (t.bits, t.group_size, t.out, t.inp);
    check_shape(name, inp, bits, gs)?;
    let groups = t.groups();
    let check = |what: &str, len: usize, shape: [usize; 2]| -> Result<()> {
        if len != shape[0] * shape[1] {
            return Err(Error::invalid(format!(
                "{name}.{what}: {len} values; a [{out}, {inp}] linear at {bits} bits in groups of {gs} needs {shape:?}"
            )));
        }
        Ok(())
    };
    check("qweight", t.qweight.len(), t.qweight_shape())?;
    check("qzeros", t.qzeros.len(), t.qzeros_shape())?;
    check("scales", t.scales.len(), t.scales_shape())?;
    if !t.g_idx.is_empty() {
        if t.g_idx.len() != inp {
            return Err(Error::invalid(format!(
                "{name}.g_idx: {} values, expected {inp} (one per input feature)",
                t.g_idx.len()
            )));
        }
        if let Some(i) = (0..inp).find(|&i| t.g_idx[i] as i64 != (i / gs) as i64) {
            return Err(Error::invalid(format!(
                "{name}.g_idx: input {i} is in group {}, expected {} (i / {gs}); act-order (desc_act) checkpoints are not supported",
                t.g_idx[i],
                i / gs
            )));
        }
    }
    let m = max_code(bits);
    let zw = stream_words(out, bits);
    // Zero points [groups, out], as the reference loader reads them.
    let mut zero = vec![0u32; groups * out];
    for (g, z) in zero.chunks_exact_mut(out).enumerate() {
        let mut words: Vec<u32> = t.qzeros[g * zw..(g + 1) * zw]
            .iter()
            .map(|&w| w as u32)
            .collect();
        if zeros == GptqZeros::V1 {
            undo_v1_offset(&mut words, bits);
        }
        for (r, z) in z.iter_mut().enumerate() {
            *z = get_code(|w| words[w], r, bits);
        }
    }
    // Codes: 32 inputs of a column are `bits` words, one per qweight row of
    // the block. A task decodes ROWS consecutive outputs block by block, so
    // the words it reads from each qweight row are adjacent.
    const ROWS: usize = 16;
    let b = bits as usize;
    let mut codes = vec![0u8; out * inp];
    codes
        .par_chunks_mut(inp * ROWS)
        .enumerate()
        .for_each(|(task, chunk)| {
            let r0 = task * ROWS;
            let n = chunk.len() / inp;
            let mut words = [0u32; 8];
            for blk in 0..inp / 32 {
                for i in 0..n {
                    for (j, w) in words[..b].iter_mut().enumerate() {
                        *w = t.qweight[(blk * b + j) * out + r0 + i] as u32;
                    }
                    let dst = &mut chunk[i * inp + blk * 32..i * inp + blk * 32 + 32];
                    for (k, c) in dst.iter_mut().enumerate() {
                        *c = get_code(|w| words[w], k, bits) as u8;
                    }
                }
            }
        });
    let mut scales_zeros = Vec::with_capacity(out * groups * 2);
    for (r, row) in codes.chunks_exact_mut(inp).enumerate() {
        for g in 0..groups {
            let (s, z) = (t.scales[g * out + r], zero[g * out + r]);
            if s.is_sign_negative() && !s.is_nan() && z == m {
                row[g * gs..(g + 1) * gs]
                    .iter_mut()
                    .for_each(|q| *q = (m - *q as u32) as u8);
                scales_zeros.extend([-s, f16::ZERO]);
            } else {
                scales_zeros.extend([s, f16::from_f32(z as f32)]);
            }
        }
    }
    PackedLinear::from_codes(name, out, inp, bits, gs, &codes, scales_zeros)
}

/// Undoes v1's `zero - 1` the way the reference loader does (GPTQModel,
/// which transformers loads GPTQ through): 2-, 4- and 8-bit zeros by adding
/// 0x55555555 / 0x11111111 / 0x01010101 to each whole word, wrapping, so a
/// stored field of all ones (zero 0, as its writer's whole-word subtraction
/// leaves it) carries into the next field, which that subtraction had
/// borrowed from; 3-bit zeros, whose fields cross words, field by field
/// modulo 8. (vLLM adds 1 per field without wrapping: it and GPTQModel
/// disagree only where a zero is 0, which [`packed_to_gptq`] never writes.)
fn undo_v1_offset(words: &mut [u32], bits: u32) {
    let ones = match bits {
        2 => Some(0x5555_5555u32),
        4 => Some(0x1111_1111),
        8 => Some(0x0101_0101),
        _ => None,
    };
    if let Some(ones) = ones {
        words.iter_mut().for_each(|w| *w = w.wrapping_add(ones));
        return;
    }
    let n = words.len() * 32 / bits as usize;
    let m = max_code(bits);
    let fields: Vec<u32> = (0..n)
        .map(|k| (get_code(|w| words[w], k, bits) + 1) & m)
        .collect();
    pack_stream(fields, bits, words);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A packed linear with pseudo-random codes, scales and zero points,
    /// every `zero_every`-th group with zero point 0.
    pub(crate) fn random_packed(
        out: usize,
        inp: usize,
        bits: u32,
        gs: usize,
        seed: u32,
    ) -> PackedLinear {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            s >> 8
        };
        let m = (1u32 << bits) - 1;
        let codes: Vec<u8> = (0..out * inp).map(|_| (next() % (m + 1)) as u8).collect();
        let mut sz = Vec::new();
        for k in 0..out * (inp / gs) {
            let scale = f16::from_f32((next() % 1000 + 1) as f32 * 1e-4);
            let z = if k % 3 == 0 { 0 } else { next() % (m + 1) };
            sz.extend([scale, f16::from_f32(z as f32)]);
        }
        PackedLinear::from_codes("t", out, inp, bits, gs, &codes, sz).unwrap()
    }

    #[test]
    fn round_trips_bit_exact_with_zero_0_groups() {
        for bits in [3u32, 4, 8] {
            for gs in [32usize, 64, 128] {
                for (out, inp) in [(32usize, 128usize), (96, 384), (64, 640)] {
                    let p = random_packed(out, inp, bits, gs, bits * 1000 + gs as u32);
                    let t = packed_to_gptq("t", &p).unwrap();
                    assert_eq!(t.qweight.len(), t.qweight_shape().iter().product::<usize>());
                    // Every stored zero - 1 is in 0..M-1: no field is all ones.
                    for g in 0..t.groups() {
                        for r in 0..out {
                            let f =
                                get_code(|w| t.qzeros[g * t.qzeros_shape()[1] + w] as u32, r, bits);
                            assert!(f < (1 << bits) - 1);
                        }
                    }
                    let back = gptq_to_packed("t", &t, GptqZeros::V1).unwrap();
                    assert_eq!(back, p, "bits {bits} group {gs} [{out}, {inp}]");
                    // Dequantization agrees element for element with GPTQ's own formula.
                    let w = p.dequantize();
                    let m = (1u32 << bits) - 1;
                    for r in (0..out).step_by(7) {
                        for i in (0..inp).step_by(5) {
                            let g = i / gs;
                            let q = get_code(|x| t.qweight[x * out + r] as u32, i, bits) as f32;
                            let z =
                                get_code(|x| t.qzeros[g * t.qzeros_shape()[1] + x] as u32, r, bits)
                                    + 1;
                            assert!(z <= m);
                            let s = t.scales[g * out + r].to_f32();
                            assert_eq!(s * (q - z as f32), w[r * inp + i], "[{r}, {i}]");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn four_bit_layout_is_gptqs() {
        // Row 0 codes 0..7 then 8..15 fill qweight[0][0] and qweight[1][0].
        let codes: Vec<u8> = (0..32 * 32).map(|k| (k % 32 % 16) as u8).collect();
        let sz: Vec<f16> = (0..32)
            .flat_map(|_| [f16::ONE, f16::from_f32(3.0)])
            .collect();
        let p = PackedLinear::from_codes("t", 32, 32, 4, 32, &codes, sz).unwrap();
        let t = packed_to_gptq("t", &p).unwrap();
        assert_eq!(t.qweight[0] as u32, 0x7654_3210);
        assert_eq!(t.qweight[32] as u32, 0xFEDC_BA98);
        // Zero 3 stored as 2 in each of the 8 fields of a word.
        assert_eq!(t.qzeros[0] as u32, 0x2222_2222);
    }

    #[test]
    fn bad_shapes_and_act_order_are_named() {
        let p = random_packed(32, 64, 4, 32, 1);
        let mut t = packed_to_gptq("l.q_proj", &p).unwrap();
        t.g_idx.swap(0, 40);
        let e = gptq_to_packed("l.q_proj", &t, GptqZeros::V1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("l.q_proj.g_idx") && e.contains("act-order"),
            "{e}"
        );
        t.g_idx.clear();
        t.qzeros.pop();
        let e = gptq_to_packed("l.q_proj", &t, GptqZeros::V1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l.q_proj.qzeros"), "{e}");
        let p = random_packed(36, 64, 3, 32, 1);
        let e = packed_to_gptq("l.k_proj", &p).unwrap_err().to_string();
        assert!(e.contains("l.k_proj") && e.contains("36"), "{e}");
    }
}
