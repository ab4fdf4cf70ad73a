//! The MBQ reference pseudo-quantizer (`pseudo_quantize_tensor` in the
//! official code, weight-only, asymmetric min/max per group), computed in
//! f16 arithmetic as the official code computes it on a half-precision
//! model: every operation rounds to f16. With the scale and zero stored as
//! f16, `(q - z) * s` rounded to f16 is then bit-identical to the reference's
//! fake-quantized weight.

use half::f16;
use rayon::prelude::*;

use super::format::{check_shape, PackedLinear};
use crate::error::Result;

fn r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Codes, scale and zero of one group of f16 values.
pub fn quantize_group(w: &[f32], bits: u32) -> (Vec<u8>, f16, f16) {
    let max_int = ((1u32 << bits) - 1) as f32;
    // amax / amin of f16 values are exact.
    let max = w.iter().copied().map(r).fold(f32::NEG_INFINITY, f32::max);
    let min = w.iter().copied().map(r).fold(f32::INFINITY, f32::min);
    // scales = (max - min).clamp(min=1e-5) / max_int
    let scale = r(r(max - min).max(r(1e-5)) / max_int);
    // zeros = (-round(min / scales)).clamp(0, max_int)
    let zero = (-(r(min / scale).round_ties_even())).clamp(0.0, max_int);
    // q = clamp(round(w / scales) + zeros, 0, max_int)
    let codes = w
        .iter()
        .map(|&x| (r(r(x) / scale).round_ties_even() + zero).clamp(0.0, max_int) as u8)
        .collect();
    (codes, f16::from_f32(scale), f16::from_f32(zero))
}

/// Quantizes a weight `[out, in]` (f32 values, rounded to f16 first) into
/// the packed format.
pub fn quantize_linear(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
    group_size: usize,
) -> Result<PackedLinear> {
    check_shape(name, inp, bits, group_size)?;
    // Groups are independent: quantize them in parallel, in order.
    let mut codes = vec![0u8; w.len() / group_size * group_size];
    let sz: Vec<f16> = codes
        .par_chunks_exact_mut(group_size)
        .zip(w.par_chunks_exact(group_size))
        .flat_map_iter(|(c, group)| {
            let (q, s, z) = quantize_group(group, bits);
            c.copy_from_slice(&q);
            [s, z]
        })
        .collect();
    PackedLinear::from_codes(name, out, inp, bits, group_size, &codes, sz)
}

/// The reference's fake-quantized weight: `(q - z) * s` rounded to f16.
pub fn fake_quantize(
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
    group_size: usize,
) -> Result<Vec<f32>> {
    let p = quantize_linear("weight", w, out, inp, bits, group_size)?;
    Ok(p.dequantize().into_iter().map(r).collect())
}

/// How the scale search fake-quantizes a weight whose input channels are
/// scaled by `s` (docs/MBQ.md): the one definition the backends'
/// `fake_quant` kernels are tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeQuant {
    /// Weight-only, asymmetric min/max per group of `group_size` inputs
    /// ([`fake_quantize`]): `Q(W s) / s`.
    Group { bits: u32, group_size: usize },
    /// W4A8's weights, symmetric INT4 per output channel
    /// (`w4a8::fake_quantize_w4_per_channel`): `Q(W s)`; the input is
    /// divided by `s` when the linear runs.
    W4PerChannel,
}

/// The search's effective weight `[out, in]` of `w` with input channels
/// scaled by `s` (`in` values), as [`FakeQuant`] says. Every value that
/// passes through f16 is rounded as the reference rounds it; the final
/// division by `s` is f32.
pub fn fake_quant_scaled(
    w: &[f32],
    out: usize,
    inp: usize,
    s: &[f32],
    q: FakeQuant,
) -> Result<Vec<f32>> {
    if s.len() != inp || w.len() != out * inp {
        return Err(crate::error::Error::invalid(format!(
            "fake_quant: a [{out}, {inp}] weight needs {} values and {inp} scales, got {} and {}",
            out * inp,
            w.len(),
            s.len()
        )));
    }
    let mut ws = w.to_vec();
    for r in ws.chunks_exact_mut(inp.max(1)) {
        r.iter_mut().zip(s).for_each(|(v, k)| *v *= k);
    }
    Ok(match q {
        FakeQuant::Group { bits, group_size } => {
            let mut d = fake_quantize(&ws, out, inp, bits, group_size)?;
            for r in d.chunks_exact_mut(inp.max(1)) {
                r.iter_mut().zip(s).for_each(|(v, k)| *v /= k);
            }
            d
        }
        FakeQuant::W4PerChannel => super::w4a8::fake_quantize_w4_per_channel(&ws, out, inp),
    })
}
