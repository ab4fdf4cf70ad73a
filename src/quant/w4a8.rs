//! W4A8, the weight-activation setting of MBQ (docs/MBQ.md, section 3), as the
//! official code's fake quantizers define it:
//!
//! - weights: per output channel (row), symmetric absmax INT4, no groups:
//!   `scale = max(max|w_row|, 1e-5) / 7`, `q = clamp(round(w / scale), -8, 7)`,
//!   `w_hat = q * scale`. Computed in f16 arithmetic as the official code does
//!   on a half-precision model (every operation rounds to f16, as in
//!   [`super::pseudo`]).
//! - activations: per token (row of x), dynamic symmetric absmax INT8:
//!   `s = max(max|x_row|, 1e-5) / 127`, `x_hat = clamp(round(x / s), -128, 127) * s`,
//!   in f32.
//!
//! `round` is round-half-to-even (`torch.round`).
//!
//! The weights are stored in the packed format v1 unchanged
//! ([`super::format`]): 4-bit codes `c = q + 8`, zero point 8, and the row's
//! one f16 scale repeated for every group of the row. Dequantizing gives
//! `(c - 8) * scale = q * scale`, which rounded to f16 is the reference's
//! fake-quantized weight. The file's metadata says
//! [`super::format::META_ACT_BITS`] = `"8"`, and the runtime then
//! quantizes each packed linear's input per token (`Backend::linear_a8`):
//! the reference fake-quantizes it with [`fake_quantize_act_int8`]
//! (`Backend::quant_act_int8`) before the float product; wgpu computes in
//! integers (`dot4I8Packed`) where it can, equal up to summation order.

use half::f16;
use rayon::prelude::*;

use super::format::{check_shape, PackedLinear};
use crate::error::{Error, Result};

/// Largest INT4 value (symmetric: the range is `-8..=7`).
pub const W4_MAX_INT: f32 = 7.0;
pub const W4_MIN_INT: f32 = -8.0;
/// Largest INT8 value (the range is `-128..=127`).
pub const A8_MAX_INT: f32 = 127.0;
pub const A8_MIN_INT: f32 = -128.0;
/// The zero point of the packed 4-bit codes (`c = q + 8`).
pub const W4_ZERO: u8 = 8;

fn r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The f16 scale and the signed codes `q` of one row (f32 values, rounded to
/// f16 first).
fn quantize_row(w: &[f32]) -> (f32, impl Iterator<Item = f32> + '_) {
    // max|w| of f16 values is exact; clamp(min=1e-5) with 1e-5 as an f16.
    let max = w.iter().map(|&x| r(x).abs()).fold(0.0f32, f32::max);
    let scale = r(max.max(r(1e-5)) / W4_MAX_INT);
    let q = w.iter().map(move |&x| {
        r(r(x) / scale)
            .round_ties_even()
            .clamp(W4_MIN_INT, W4_MAX_INT)
    });
    (scale, q)
}

fn check_len(name: &str, w: &[f32], out: usize, inp: usize) -> Result<()> {
    if w.len() != out * inp {
        return Err(Error::invalid(format!(
            "{name}: {} values for a [{out}, {inp}] weight",
            w.len()
        )));
    }
    Ok(())
}

/// Quantizes a weight `[out, in]` per output channel to symmetric INT4 and
/// stores it in the packed format v1 (4 bits, groups of `group_size`, each
/// group of a row with the row's scale and zero point 8). `group_size` only
/// decides the layout: the values do not depend on it.
pub fn quantize_linear_w4_per_channel(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    group_size: usize,
) -> Result<PackedLinear> {
    check_shape(name, inp, 4, group_size)?;
    check_len(name, w, out, inp)?;
    let groups = inp / group_size;
    let mut codes = Vec::with_capacity(out * inp);
    let mut sz = Vec::with_capacity(out * groups * 2);
    for (row, wr) in w.chunks_exact(inp.max(1)).enumerate() {
        if let Some(i) = wr.iter().position(|x| !f16::from_f32(*x).is_finite()) {
            return Err(Error::invalid(format!(
                "{name}: value {} at [{row}, {i}] is not finite in f16; it cannot be quantized",
                wr[i]
            )));
        }
        let (scale, q) = quantize_row(wr);
        codes.extend(q.map(|q| (q as i32 + W4_ZERO as i32) as u8));
        for _ in 0..groups {
            sz.push(f16::from_f32(scale));
            sz.push(f16::from_f32(W4_ZERO as f32));
        }
    }
    PackedLinear::from_codes(name, out, inp, 4, group_size, &codes, sz)
}

/// The reference's fake-quantized weight `[out, in]`: `q * scale` rounded
/// to f16, computed directly (not through the packed form).
pub fn fake_quantize_w4_per_channel(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(w.len(), out * inp, "[{out}, {inp}] weight");
    let mut y = Vec::with_capacity(out * inp);
    for wr in w.chunks_exact(inp.max(1)) {
        let (scale, q) = quantize_row(wr);
        y.extend(q.map(|q| r(q * scale)));
    }
    y
}

/// Fake-quantizes the activations `x` `[rows, cols]` in place, per row
/// (token), to symmetric INT8 in f32: `s = max(max|x_row|, 1e-5) / 127`,
/// `x = clamp(round(x / s), -128, 127) * s`.
pub fn fake_quantize_act_int8(x: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    x.par_chunks_mut(cols).for_each(|row| {
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = max.max(1e-5) / A8_MAX_INT;
        for v in row.iter_mut() {
            *v = (*v / s).round_ties_even().clamp(A8_MIN_INT, A8_MAX_INT) * s;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random weights of varied row scales (a few outliers), f16 values.
    fn weights(out: usize, inp: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        (0..out * inp)
            .map(|i| {
                let row_scale = 0.01 * (1 + (i / inp) % 7) as f32;
                let v = next() * row_scale;
                if i % 97 == 0 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn packed_dequantizes_to_the_reference_bit_exactly() {
        let (out, inp) = (13, 256);
        let mut w = weights(out, inp, 3);
        // A zero row and a row of one tiny value.
        w[2 * inp..3 * inp].iter_mut().for_each(|v| *v = 0.0);
        w[5 * inp..6 * inp].iter_mut().for_each(|v| *v = 0.0);
        w[5 * inp + 17] = -3e-6;
        let want = fake_quantize_w4_per_channel(&w, out, inp);
        assert!(want[2 * inp..3 * inp].iter().all(|&v| v == 0.0));
        for g in [32, 64, 128] {
            let p = quantize_linear_w4_per_channel("w", &w, out, inp, g).unwrap();
            assert_eq!((p.bits, p.group_size), (4, g));
            // Every group of a row has the row's scale and zero 8.
            for row in 0..out {
                let (s0, _) = p.scale_zero(row, 0);
                for gi in 0..p.groups() {
                    assert_eq!(p.scale_zero(row, gi), (s0, 8.0), "row {row} group {gi}");
                }
            }
            let got: Vec<f32> = p.dequantize().into_iter().map(r).collect();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                // Bit-exact but for the sign of zero (the reference keeps
                // torch's -0.0 of round(-0.3) * scale).
                assert!(
                    a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                    "g{g} [{}, {}]: {a} vs {b}",
                    i / inp,
                    i % inp
                );
            }
        }
        // The row's absmax maps to code 8 +- 7.
        let p = quantize_linear_w4_per_channel("w", &w, out, inp, 128).unwrap();
        for row in [0, 7, 12] {
            let wr = &w[row * inp..(row + 1) * inp];
            let max = wr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let i = wr.iter().position(|v| v.abs() == max).unwrap();
            let c = p.group_codes(row, i / 128)[i % 128] as i32 - 8;
            assert_eq!(c, 7 * wr[i].signum() as i32, "row {row}");
        }
    }

    #[test]
    fn weight_grid_is_the_row_scale() {
        let (out, inp) = (4, 64);
        let w = weights(out, inp, 9);
        let y = fake_quantize_w4_per_channel(&w, out, inp);
        for row in 0..out {
            let wr = &w[row * inp..(row + 1) * inp];
            let max = wr.iter().fold(0.0f32, |m, v| m.max(r(*v).abs()));
            let scale = r(max / 7.0);
            for (i, &v) in y[row * inp..(row + 1) * inp].iter().enumerate() {
                let q = (r(wr[i]) / scale).round_ties_even().clamp(-8.0, 7.0);
                assert_eq!(v, r(q * scale), "[{row}, {i}]");
            }
        }
    }

    #[test]
    fn bad_shapes_and_values_are_named_errors() {
        let w = vec![0.1f32; 2 * 96];
        let e = quantize_linear_w4_per_channel("a.weight", &w, 2, 96, 64).unwrap_err();
        assert!(e.to_string().contains("a.weight"), "{e}");
        let mut w = vec![0.1f32; 2 * 64];
        w[70] = 1e6;
        let e = quantize_linear_w4_per_channel("b.weight", &w, 2, 64, 64).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("b.weight") && m.contains("[1, 6]"), "{m}");
    }

    #[test]
    fn act_quant_is_on_the_per_row_grid() {
        let cols = 37;
        let mut x: Vec<f32> = weights(5, cols, 11).iter().map(|v| v * 100.0).collect();
        // Row 3: all zero; row 4: one row with a larger scale than the others.
        x[3 * cols..4 * cols].iter_mut().for_each(|v| *v = 0.0);
        x[4 * cols..5 * cols].iter_mut().for_each(|v| *v *= 1000.0);
        let orig = x.clone();
        fake_quantize_act_int8(&mut x, cols);
        for row in 0..5 {
            let o = &orig[row * cols..(row + 1) * cols];
            let q = &x[row * cols..(row + 1) * cols];
            let max = o.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = max.max(1e-5) / 127.0;
            for (i, (&a, &b)) in o.iter().zip(q).enumerate() {
                let k = b / s;
                assert!(
                    (k - k.round()).abs() <= 1e-4 && k.round().abs() <= 128.0,
                    "[{row}, {i}]: {b} is not on the grid of {s}"
                );
                assert!((a - b).abs() <= 0.5 * s * (1.0 + 1e-5), "[{row}, {i}]");
            }
            if max > 0.0 {
                let imax = o.iter().position(|v| v.abs() == max).unwrap();
                assert_eq!(q[imax], o[imax].signum() * 127.0 * s, "row {row} max");
            } else {
                assert!(q.iter().all(|&v| v == 0.0));
            }
        }
        // Rows are independent: quantizing one row alone gives the same.
        let mut one = orig[cols..2 * cols].to_vec();
        fake_quantize_act_int8(&mut one, cols);
        assert_eq!(one, x[cols..2 * cols]);
        let mut one = orig[4 * cols..5 * cols].to_vec();
        fake_quantize_act_int8(&mut one, cols);
        assert_eq!(one, x[4 * cols..5 * cols]);
        // Quantizing is idempotent up to the grid.
        let mut again = x.clone();
        fake_quantize_act_int8(&mut again, cols);
        for (a, b) in again.iter().zip(&x) {
            assert!((a - b).abs() <= b.abs() * 1e-6);
        }
    }
}
