//! The AVX2 + FMA + F16C kernels (eight lanes): packed rows in
//! `reorder`'s eight-lane order, their dequantization for GEMM tiles, and
//! f16 / bf16 rows.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::LANES;

/// The sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `acc += float(v >> SHIFT & mask) * x[..8]`.
macro_rules! fma_codes {
    ($acc:ident, $v:expr, $shift:literal, $mask:expr, $x:expr) => {
        $acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32($v, $shift), $mask)),
            _mm256_loadu_ps($x),
            $acc,
        );
    };
}

/// `sum_g s_g sum_k q_k x_k` over a row, `x` in `reorder`'s order.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn packed_row(words: &[u32], sz: &[f32], bits: u32, wpg: usize, x: &[f32]) -> f32 {
    let mut total = _mm256_setzero_ps();
    let wp = words.as_ptr();
    let xp = x.as_ptr();
    match bits {
        3 => {
            // One group (12 words: 8 low-plane, 4 high-plane) a step.
            let m3 = _mm256_set1_epi32(3);
            let m4 = _mm256_set1_epi32(4);
            // Lane w needs high word w / 2, shifted by 16 (w % 2).
            let idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
            let hs = _mm256_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16);
            for (g, p) in sz.chunks_exact(2).enumerate() {
                let gw = wp.add(g * wpg);
                let lo = _mm256_loadu_si256(gw as *const __m256i);
                let hi4 = _mm_loadu_si128(gw.add(8) as *const __m128i);
                let hi = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(hi4), idx);
                // Bit j of lane w: the high bit of code w * 16 + j, moved to bit j + 2.
                let hi = _mm256_slli_epi32(_mm256_srlv_epi32(hi, hs), 2);
                let xg = xp.add(g * 128);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                macro_rules! step {
                    ($acc:ident, $j:literal, $lo_shift:literal) => {
                        let c = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi32(lo, $lo_shift), m3),
                            _mm256_and_si256(_mm256_srli_epi32(hi, $j), m4),
                        );
                        $acc = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(c),
                            _mm256_loadu_ps(xg.add($j * LANES)),
                            $acc,
                        );
                    };
                }
                step!(a0, 0, 0);
                step!(a1, 1, 2);
                step!(a0, 2, 4);
                step!(a1, 3, 6);
                step!(a0, 4, 8);
                step!(a1, 5, 10);
                step!(a0, 6, 12);
                step!(a1, 7, 14);
                step!(a0, 8, 16);
                step!(a1, 9, 18);
                step!(a0, 10, 20);
                step!(a1, 11, 22);
                step!(a0, 12, 24);
                step!(a1, 13, 26);
                step!(a0, 14, 28);
                step!(a1, 15, 30);
                let s = _mm256_set1_ps(p[0]);
                total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, total);
            }
        }
        4 => {
            let m = _mm256_set1_epi32(0xF);
            for blk in 0..words.len() / LANES {
                let v = _mm256_loadu_si256(wp.add(blk * LANES) as *const __m256i);
                let xb = xp.add(blk * 64);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                fma_codes!(a0, v, 0, m, xb);
                fma_codes!(a1, v, 4, m, xb.add(8));
                fma_codes!(a0, v, 8, m, xb.add(16));
                fma_codes!(a1, v, 12, m, xb.add(24));
                fma_codes!(a0, v, 16, m, xb.add(32));
                fma_codes!(a1, v, 20, m, xb.add(40));
                fma_codes!(a0, v, 24, m, xb.add(48));
                fma_codes!(a1, v, 28, m, xb.add(56));
                let s = block_scales(sz, blk * LANES, wpg);
                total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, total);
            }
        }
        _ => {
            let m = _mm256_set1_epi32(0xFF);
            for blk in 0..words.len() / LANES {
                let v = _mm256_loadu_si256(wp.add(blk * LANES) as *const __m256i);
                let xb = xp.add(blk * 32);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                fma_codes!(a0, v, 0, m, xb);
                fma_codes!(a1, v, 8, m, xb.add(8));
                fma_codes!(a0, v, 16, m, xb.add(16));
                fma_codes!(a1, v, 24, m, xb.add(24));
                let s = block_scales(sz, blk * LANES, wpg);
                total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, total);
            }
        }
    }
    hsum(total)
}

/// The scale of each lane's word for the block starting at word `w0`:
/// one group's scale, or two when a group is four words (W4 g32).
#[inline(always)]
unsafe fn block_scales(sz: &[f32], w0: usize, wpg: usize) -> __m256 {
    let s = |w: usize| sz[2 * (w / wpg)];
    if wpg >= LANES {
        _mm256_set1_ps(s(w0))
    } else {
        let (a, b) = (s(w0), s(w0 + 4));
        _mm256_setr_ps(a, a, a, a, b, b, b, b)
    }
}

/// `(q - z) s` of a row into `dst`, in `reorder`'s eight-lane order.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_row(words: &[u32], sz: &[f32], bits: u32, wpg: usize, dst: &mut [f32]) {
    let (wp, dp) = (words.as_ptr(), dst.as_mut_ptr());
    // Per word w of a block: scale and zero of its group.
    let sz_at = |w: usize| (sz[2 * (w / wpg)], sz[2 * (w / wpg) + 1]);
    let vec_sz = |w0: usize| {
        let ((sa, za), (sb, zb)) = (sz_at(w0), sz_at(w0 + 4));
        (
            _mm256_setr_ps(sa, sa, sa, sa, sb, sb, sb, sb),
            _mm256_setr_ps(za, za, za, za, zb, zb, zb, zb),
        )
    };
    match bits {
        3 => {
            let (m3, m4) = (_mm256_set1_epi32(3), _mm256_set1_epi32(4));
            let idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
            let hs = _mm256_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16);
            for g in 0..sz.len() / 2 {
                let gw = wp.add(g * wpg);
                let lo = _mm256_loadu_si256(gw as *const __m256i);
                let hi4 = _mm_loadu_si128(gw.add(8) as *const __m128i);
                let hi = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(hi4), idx);
                let hi = _mm256_slli_epi32(_mm256_srlv_epi32(hi, hs), 2);
                let (s, z) = (_mm256_set1_ps(sz[2 * g]), _mm256_set1_ps(sz[2 * g + 1]));
                for j in 0..16 {
                    let c = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_set1_epi32(2 * j)), m3),
                        _mm256_and_si256(_mm256_srlv_epi32(hi, _mm256_set1_epi32(j)), m4),
                    );
                    let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), z), s);
                    _mm256_storeu_ps(dp.add(g * 128 + j as usize * LANES), v);
                }
            }
        }
        _ => {
            let per = 32 / bits as usize;
            let m = _mm256_set1_epi32((1i32 << bits) - 1);
            for blk in 0..words.len() / LANES {
                let v = _mm256_loadu_si256(wp.add(blk * LANES) as *const __m256i);
                let (s, z) = vec_sz(blk * LANES);
                for j in 0..per {
                    let c = _mm256_and_si256(
                        _mm256_srlv_epi32(v, _mm256_set1_epi32((bits as usize * j) as i32)),
                        m,
                    );
                    let f = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), z), s);
                    _mm256_storeu_ps(dp.add(blk * LANES * per + j * LANES), f);
                }
            }
        }
    }
}

/// The dot product of a row of 16-bit floats with `x`; `widen` turns
/// eight of them into f32. Four independent accumulators in registers.
#[inline(always)]
unsafe fn half_row(
    n: usize,
    wp: *const u16,
    xp: *const f32,
    widen: impl Fn(*const u16) -> __m256,
) -> (f32, usize) {
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let mut k = 0;
    while k + 32 <= n {
        a0 = _mm256_fmadd_ps(widen(wp.add(k)), _mm256_loadu_ps(xp.add(k)), a0);
        a1 = _mm256_fmadd_ps(widen(wp.add(k + 8)), _mm256_loadu_ps(xp.add(k + 8)), a1);
        a2 = _mm256_fmadd_ps(widen(wp.add(k + 16)), _mm256_loadu_ps(xp.add(k + 16)), a2);
        a3 = _mm256_fmadd_ps(widen(wp.add(k + 24)), _mm256_loadu_ps(xp.add(k + 24)), a3);
        k += 32;
    }
    while k + 8 <= n {
        a0 = _mm256_fmadd_ps(widen(wp.add(k)), _mm256_loadu_ps(xp.add(k)), a0);
        k += 8;
    }
    (
        hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))),
        k,
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f16_row(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let widen = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let (mut s, k) = half_row(n, w.as_ptr(), x.as_ptr(), widen);
    for i in k..n {
        s += f16::from_bits(w[i]).to_f32() * x[i];
    }
    s
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn bf16_row(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    // bf16 is the high half of an f32: widen and shift.
    let widen = |p: *const u16| {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        ))
    };
    let (mut s, k) = half_row(n, w.as_ptr(), x.as_ptr(), widen);
    for i in k..n {
        s += bf16::from_bits(w[i]).to_f32() * x[i];
    }
    s
}

/// `R` rows of 16-bit floats (`n` values each, row `r` at `wp + r *
/// stride`) dotted with `x`, the first `n - n % 16` values (the caller
/// adds the rest); `widen` turns eight of them into f32. Two accumulators
/// a row; one load of `x` serves all `R` rows, and the `R` rows are `R`
/// streams of loads in flight.
#[inline(always)]
unsafe fn half_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
    widen: impl Fn(*const u16) -> __m256,
) -> [f32; R] {
    let xp = x.as_ptr();
    let mut a = [[_mm256_setzero_ps(); 2]; R];
    let mut k = 0;
    while k + 16 <= n {
        let x0 = _mm256_loadu_ps(xp.add(k));
        let x1 = _mm256_loadu_ps(xp.add(k + 8));
        for (r, ar) in a.iter_mut().enumerate() {
            let p = wp.add(r * stride + k);
            ar[0] = _mm256_fmadd_ps(widen(p), x0, ar[0]);
            ar[1] = _mm256_fmadd_ps(widen(p.add(8)), x1, ar[1]);
        }
        k += 16;
    }
    let mut out = [0.0f32; R];
    for (o, ar) in out.iter_mut().zip(&a) {
        *o = hsum(_mm256_add_ps(ar[0], ar[1]));
    }
    out
}

/// `R` f16 rows (the first `n - n % 16` values; the caller adds the rest).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f16_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
) -> [f32; R] {
    let widen = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    half_rows::<R>(wp, stride, n, x, widen)
}

/// `R` bf16 rows (the first `n - n % 16` values; the caller adds the rest).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn bf16_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
) -> [f32; R] {
    let widen = |p: *const u16| {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        ))
    };
    half_rows::<R>(wp, stride, n, x, widen)
}
