//! Activations as int8 for the integer kernels of `vnni.rs` and
//! `avx2_int8.rs` (one layout for both): a row is cut
//! into blocks of [`BLOCK`] values, each stored as `round(x / d)` in
//! -127..=127 with its own f32 step `d = max |x| / 127` (llama.cpp's Q8_0
//! blocks; `round` to nearest, ties to even, as the SIMD conversion
//! does). The products of codes and int8 activations are then exact
//! integer sums, scaled once per block lane.
//!
//! The integer kernels compute exactly `sum_k w_k x̂_k`, with `x̂` the
//! row after this rounding ([`round_trip`]), up to f32 rounding of the
//! per-block sums; tests hold them to the plain definition on `x̂`, and
//! measure the rounding's own error against `x` separately.

/// Activations a scale (the block of llama.cpp's Q8_0).
pub const BLOCK: usize = 32;

/// A row as int8 codes and one step per block (a shorter last block when
/// `x.len()` is not a multiple of [`BLOCK`]): the plain definition.
pub fn quantize(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let d = x
        .chunks(BLOCK)
        .zip(q.chunks_mut(BLOCK))
        .map(|(xb, qb)| quantize_block(xb, qb))
        .collect();
    (q, d)
}

/// One block into `qb`; returns its step.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (qv, &v) in qb.iter_mut().zip(xb) {
        *qv = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// [`quantize`] with whole blocks done by the AVX2 kernel where the CPU
/// has it (the same operations in the same order: the same bytes, which
/// the tests check).
pub fn quantize_fast(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        let mut q = vec![0i8; x.len()];
        let d = x
            .chunks(BLOCK)
            .zip(q.chunks_mut(BLOCK))
            .map(|(xb, qb)| match (xb.try_into(), qb.try_into()) {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                (Ok(xb), Ok(qb)) => unsafe { super::avx2_int8::quantize_block(xb, qb) },
                _ => quantize_block(xb, qb),
            })
            .collect();
        return (q, d);
    }
    quantize(x)
}

/// The row the integer kernels compute with: each value rounded to its
/// block's int8 grid.
pub fn round_trip(x: &[f32]) -> Vec<f32> {
    let (q, d) = quantize(x);
    q.iter()
        .enumerate()
        .map(|(k, &v)| v as f32 * d[k / BLOCK])
        .collect()
}

/// An activation row prepared for the integer kernels of one layout.
pub struct Q8Row {
    /// The int8 values in the kernel's order.
    pub q: Vec<i8>,
    /// The step of each 32-bit lane's block, in lane order: one a code
    /// word (W4, W8), one a low-plane word (W3).
    pub lane_d: Vec<f32>,
    /// `sum_k x̂_k` over each weight group (for the zero points; moved
    /// into `PackedInput::sums`, which the VNNI path reads).
    pub sums: Vec<f32>,
    /// `sums` with a zero after each: in step with a row's (scale, zero)
    /// pairs, for the AVX2 kernels' zero-point term.
    pub zsums: Vec<f32>,
}

/// Whether the integer kernels read this layout: whole groups a vector
/// (W4 g128: sixteen words; W8 g64 / g128: sixteen or thirty-two), W3 at
/// group 128 (a group a step).
pub fn layout(bits: u32, group_size: usize) -> bool {
    matches!((bits, group_size), (3, 128) | (4, 128) | (8, 64) | (8, 128))
}

impl Q8Row {
    /// `x` quantized and reordered for `bits` (a [`layout`] it accepts).
    pub fn new(bits: u32, group_size: usize, x: &[f32]) -> Q8Row {
        let (xq, d) = quantize_fast(x);
        let sums: Vec<f32> = xq
            .chunks_exact(group_size)
            .enumerate()
            .map(|(g, qg)| {
                qg.chunks_exact(BLOCK)
                    .enumerate()
                    .map(|(b, qb)| {
                        let s: i32 = qb.iter().map(|&v| v as i32).sum();
                        s as f32 * d[g * group_size / BLOCK + b]
                    })
                    .sum()
            })
            .collect();
        let mut q = vec![0i8; xq.len()];
        let lane_d: Vec<f32>;
        match bits {
            // A chunk of sixteen words (128 codes): the low nibbles' 64
            // activations, then the high nibbles'. Byte b of word w holds
            // codes 8w + 2b (low nibble) and 8w + 2b + 1 (high).
            4 => {
                for (src, dst) in xq.chunks_exact(128).zip(q.chunks_exact_mut(128)) {
                    for w in 0..16 {
                        for b in 0..4 {
                            dst[4 * w + b] = src[8 * w + 2 * b];
                            dst[64 + 4 * w + b] = src[8 * w + 2 * b + 1];
                        }
                    }
                }
                lane_d = (0..x.len() / 8).map(|w| d[w * 8 / BLOCK]).collect();
            }
            // Byte b of word w is code 4w + b: the natural order.
            8 => {
                q.copy_from_slice(&xq);
                lane_d = (0..x.len() / 4).map(|w| d[w * 4 / BLOCK]).collect();
            }
            // Per group, four vectors of 32 bytes: byte 4w + b of vector
            // j is code 16w + 4b + j (bits 2j of byte b of low word w).
            _ => {
                for (src, dst) in xq.chunks_exact(128).zip(q.chunks_exact_mut(128)) {
                    for j in 0..4 {
                        for w in 0..8 {
                            for b in 0..4 {
                                dst[32 * j + 4 * w + b] = src[16 * w + 4 * b + j];
                            }
                        }
                    }
                }
                lane_d = (0..x.len() / 16).map(|w| d[w * 16 / BLOCK]).collect();
            }
        }
        let zsums = sums.iter().flat_map(|&s| [s, 0.0]).collect();
        Q8Row {
            q,
            lane_d,
            sums,
            zsums,
        }
    }
}
