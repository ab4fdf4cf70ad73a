//! compressed-tensors' `pack-quantized` layout (llm-compressor's output;
//! vLLM and transformers load it), both directions: [`packed_to_compressed`]
//! for `mbq export --format compressed-tensors`, [`compressed_to_packed`] to
//! run such a checkpoint. docs/FORMAT.md, "Other formats", has the details.
//!
//! Per quantized linear `P` (weight `[out, in]`, `b` bits):
//!
//! | tensor | dtype | shape | holds |
//! |---|---|---|---|
//! | `P.weight_packed` | I32 | `[out, ceil(in * b / 32)]` | row `o` is the bit stream of its `in` codes |
//! | `P.weight_scale` | F16 | `[out, in / G]` (group) or `[out, 1]` (channel) | scales |
//! | `P.weight_zero_point` | I32 | `[ceil(out * b / 32), in / G]` | asymmetric only: column `g` is the bit stream of the `out` zero points |
//! | `P.weight_shape` | I64 | `[2]` | `[out, in]` |
//!
//! Streams are dense little-endian bit streams ([`super::bitstream`]).
//! compressed-tensors quantizes to signed integers (`-2^(b-1) .. 2^(b-1) -
//! 1`) and stores each code and zero point plus `2^(b-1)`; the stored fields
//! are therefore exactly the packed format's unsigned codes `q` and zero
//! points `z`, and `(q - z) * s` is its dequantization too. A symmetric
//! scheme stores no zero point: it is 0 signed, `2^(b-1)` stored.

use half::f16;
use rayon::prelude::*;

use super::bitstream::{get_code, pack_stream, stream_words};
use super::format::{check_shape, PackedLinear};
use super::gptq::integer_zero;
use crate::error::{Error, Result};

/// How the weights of a linear are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtStrategy {
    /// A scale (and zero point) per `group_size` input features of a row:
    /// `"strategy": "group"`.
    Group(usize),
    /// One scale per output row: `"strategy": "channel"`.
    Channel,
}

/// The tensors of one pack-quantized linear, host side (see the module
/// docs for their shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedTensors {
    pub bits: u32,
    pub out: usize,
    pub inp: usize,
    pub strategy: CtStrategy,
    /// `[out, ceil(in * bits / 32)]`.
    pub weight_packed: Vec<i32>,
    /// `[out, in / G]` or `[out, 1]`.
    pub weight_scale: Vec<f16>,
    /// `[ceil(out * bits / 32), in / G]` (`[.., 1]` for a channel);
    /// `None` for a symmetric scheme.
    pub weight_zero_point: Option<Vec<i32>>,
}

impl CompressedTensors {
    /// Scale columns: groups per row, 1 for a channel.
    pub fn scale_cols(&self) -> usize {
        match self.strategy {
            CtStrategy::Group(g) => self.inp / g.max(1),
            CtStrategy::Channel => 1,
        }
    }
    pub fn weight_packed_shape(&self) -> [usize; 2] {
        [self.out, stream_words(self.inp, self.bits)]
    }
    pub fn weight_scale_shape(&self) -> [usize; 2] {
        [self.out, self.scale_cols()]
    }
    pub fn weight_zero_point_shape(&self) -> [usize; 2] {
        [stream_words(self.out, self.bits), self.scale_cols()]
    }
    /// `weight_shape`'s values.
    pub fn weight_shape(&self) -> [i64; 2] {
        [self.out as i64, self.inp as i64]
    }
    pub fn symmetric(&self) -> bool {
        self.weight_zero_point.is_none()
    }
}

/// The pack-quantized tensors of a packed linear.
///
/// - `CtStrategy::Group(G)` with `G` the linear's own group size: an
///   asymmetric group scheme (codes, scales and zero points as they are).
/// - `CtStrategy::Channel`: a symmetric per-channel scheme (mbq's W4A8
///   weights): every group of a row must have the same scale and the zero
///   point `2^(b-1)`, else an error names the row.
pub fn packed_to_compressed(
    name: &str,
    p: &PackedLinear,
    strategy: CtStrategy,
) -> Result<CompressedTensors> {
    p.validate(name)?;
    let (bits, out, inp) = (p.bits, p.out, p.inp);
    let groups = p.groups();
    let rw = stream_words(inp, bits);
    let rows: Vec<Vec<i32>> = (0..out)
        .into_par_iter()
        .map(|r| {
            let mut words = vec![0u32; rw];
            pack_stream(
                (0..groups).flat_map(|g| p.group_codes(r, g).into_iter().map(u32::from)),
                bits,
                &mut words,
            );
            words.into_iter().map(|w| w as i32).collect()
        })
        .collect();
    let weight_packed = rows.concat();
    let (weight_scale, weight_zero_point) = match strategy {
        CtStrategy::Group(g) => {
            if g != p.group_size {
                return Err(Error::invalid(format!(
                    "{name}: the linear is quantized in groups of {}, not {g}",
                    p.group_size
                )));
            }
            let scale: Vec<f16> = p.scales_zeros.iter().step_by(2).copied().collect();
            let mut zeros = vec![0u32; out * groups];
            for r in 0..out {
                for g in 0..groups {
                    zeros[r * groups + g] = integer_zero(name, p, r, g)?;
                }
            }
            // Column g: the stream of the out zero points of group g.
            let zw = stream_words(out, bits);
            let mut zp = vec![0i32; zw * groups];
            let mut col = vec![0u32; zw];
            for g in 0..groups {
                pack_stream((0..out).map(|r| zeros[r * groups + g]), bits, &mut col);
                for (w, &x) in col.iter().enumerate() {
                    zp[w * groups + g] = x as i32;
                }
            }
            (scale, Some(zp))
        }
        CtStrategy::Channel => {
            let mid = 1u32 << (bits - 1);
            let mut scale = Vec::with_capacity(out);
            for r in 0..out {
                let s0 = p.scales_zeros[r * groups * 2];
                for g in 0..groups {
                    let s = p.scales_zeros[(r * groups + g) * 2];
                    let z = integer_zero(name, p, r, g)?;
                    if s.to_bits() != s0.to_bits() || z != mid {
                        return Err(Error::invalid(format!(
                            "{name}: row {r} is not symmetric per channel (group {g} has scale {s} and zero point {z}, group 0 scale {s0}; a per-channel scheme needs one scale per row and zero point {mid})"
                        )));
                    }
                }
                scale.push(s0);
            }
            (scale, None)
        }
    };
    Ok(CompressedTensors {
        bits,
        out,
        inp,
        strategy,
        weight_packed,
        weight_scale,
        weight_zero_point,
    })
}

/// The packed linear of pack-quantized tensors. A group scheme keeps its
/// group size; a channel scheme is stored in groups of `layout_group` (its
/// one scale repeated in every group, as mbq's W4A8). `name` (the linear's
/// prefix) is for messages.
pub fn compressed_to_packed(
    name: &str,
    t: &CompressedTensors,
    layout_group: usize,
) -> Result<PackedLinear> {
    let (bits, out, inp) = (t.bits, t.out, t.inp);
    let gs = match t.strategy {
        CtStrategy::Group(g) => g,
        CtStrategy::Channel => layout_group,
    };
    check_shape(name, inp, bits, gs)?;
    let check = |what: &str, len: usize, shape: [usize; 2]| -> Result<()> {
        if len != shape[0] * shape[1] {
            return Err(Error::invalid(format!(
                "{name}.{what}: {len} values; a [{out}, {inp}] linear at {bits} bits ({:?}) needs {shape:?}",
                t.strategy
            )));
        }
        Ok(())
    };
    check(
        "weight_packed",
        t.weight_packed.len(),
        t.weight_packed_shape(),
    )?;
    check("weight_scale", t.weight_scale.len(), t.weight_scale_shape())?;
    if let Some(zp) = &t.weight_zero_point {
        check("weight_zero_point", zp.len(), t.weight_zero_point_shape())?;
    }
    let groups = inp / gs;
    let cols = t.scale_cols();
    let rw = stream_words(inp, bits);
    let mid = 1u32 << (bits - 1);
    let mut codes = vec![0u8; out * inp];
    codes.par_chunks_mut(inp).enumerate().for_each(|(r, row)| {
        let words = &t.weight_packed[r * rw..(r + 1) * rw];
        for (k, c) in row.iter_mut().enumerate() {
            *c = get_code(|w| words[w] as u32, k, bits) as u8;
        }
    });
    let mut scales_zeros = Vec::with_capacity(out * groups * 2);
    for r in 0..out {
        for g in 0..groups {
            let c = if cols == 1 { 0 } else { g };
            let z = match &t.weight_zero_point {
                Some(zp) => get_code(|w| zp[w * cols + c] as u32, r, bits),
                None => mid,
            };
            scales_zeros.extend([t.weight_scale[r * cols + c], f16::from_f32(z as f32)]);
        }
    }
    PackedLinear::from_codes(name, out, inp, bits, gs, &codes, scales_zeros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::tests::random_packed;

    #[test]
    fn group_round_trips_bit_exact() {
        for bits in [3u32, 4, 8] {
            for gs in [32usize, 64, 128] {
                for (out, inp) in [(32usize, 128usize), (100, 384), (37, 640)] {
                    let p = random_packed(out, inp, bits, gs, 7 * bits + gs as u32);
                    let t = packed_to_compressed("t", &p, CtStrategy::Group(gs)).unwrap();
                    assert_eq!(t.weight_packed.len(), out * stream_words(inp, bits));
                    let zp = t.weight_zero_point.as_ref().unwrap();
                    assert_eq!(zp.len(), stream_words(out, bits) * (inp / gs));
                    let back = compressed_to_packed("t", &t, 0).unwrap();
                    assert_eq!(back, p, "bits {bits} group {gs} [{out}, {inp}]");
                }
            }
        }
    }

    #[test]
    fn four_bit_rows_and_zero_columns_are_streams() {
        let codes: Vec<u8> = (0..8 * 32).map(|k| (k % 16) as u8).collect();
        let sz: Vec<f16> = (0..8)
            .flat_map(|r| [f16::ONE, f16::from_f32(r as f32)])
            .collect();
        let p = PackedLinear::from_codes("t", 8, 32, 4, 32, &codes, sz).unwrap();
        let t = packed_to_compressed("t", &p, CtStrategy::Group(32)).unwrap();
        assert_eq!(t.weight_packed[0] as u32, 0x7654_3210);
        assert_eq!(t.weight_zero_point, Some(vec![0x7654_3210]));
    }

    #[test]
    fn channel_needs_symmetric_rows() {
        // mbq's W4A8 layout: zero 8, the row's scale in every group.
        let (out, inp) = (5, 96);
        let codes: Vec<u8> = (0..out * inp).map(|k| (k * 5 % 16) as u8).collect();
        let sz: Vec<f16> = (0..out)
            .flat_map(|r| {
                (0..3).flat_map(move |_| [f16::from_f32(0.01 * (r + 1) as f32), f16::from_f32(8.0)])
            })
            .collect();
        let p = PackedLinear::from_codes("t", out, inp, 4, 32, &codes, sz).unwrap();
        let t = packed_to_compressed("t", &p, CtStrategy::Channel).unwrap();
        assert!(t.symmetric());
        assert_eq!(t.weight_scale.len(), out);
        assert_eq!(compressed_to_packed("t", &t, 32).unwrap(), p);
        let g = random_packed(32, 64, 4, 32, 3);
        let e = packed_to_compressed("l.up_proj", &g, CtStrategy::Channel)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l.up_proj") && e.contains("row 0"), "{e}");
    }
}
