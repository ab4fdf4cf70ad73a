//! The AVX-512F kernels (sixteen lanes) for packed and 16-bit float rows,
//! over `R` output rows at once (four for W4 / W8 and f16 / bf16, one for
//! W3): each activation vector is loaded once for the `R` rows (the
//! activations, four bytes a weight, would otherwise be read once per row
//! and bound the kernel; a long row's activations do not fit L1).

use std::arch::x86_64::*;

/// `R` rows of W4 / W8 (`B` bits) with blocks of sixteen words inside
/// one group (`reorder` at sixteen lanes). Row `r`'s words start at
/// `wp + r * row_words`, its (scale, zero) pairs at `sz[r * 2 * groups..]`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn packed_rows<const R: usize, const B: u32>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    wpg: usize,
    x: &[f32],
) -> [f32; R] {
    let per = (32 / B) as usize;
    let groups = row_words / wpg;
    let m = _mm512_set1_epi32((1i32 << B) - 1);
    let xp = x.as_ptr();
    let mut total = [_mm512_setzero_ps(); R];
    for blk in 0..row_words / 16 {
        let xb = xp.add(blk * 16 * per);
        let mut v = [_mm512_setzero_si512(); R];
        for (r, v) in v.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(wp.add(r * row_words + blk * 16) as *const __m512i);
        }
        let mut acc = [_mm512_setzero_ps(); R];
        for j in 0..per {
            let xv = _mm512_loadu_ps(xb.add(16 * j));
            let sh = _mm512_set1_epi32((B as usize * j) as i32);
            for r in 0..R {
                let c = _mm512_and_si512(_mm512_srlv_epi32(v[r], sh), m);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), xv, acc[r]);
            }
        }
        let g = blk * 16 / wpg;
        for r in 0..R {
            let s = _mm512_set1_ps(sz[r * 2 * groups + 2 * g]);
            total[r] = _mm512_fmadd_ps(acc[r], s, total[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(total[r]);
    }
    out
}

/// `R` rows of W3 g128 (twelve words a group), two groups a step: the
/// low bit planes as codes 0-3 over sixteen lanes (`x` in
/// `reorder_w3_pairs` order), the high plane as `4 * x` added where its
/// bit is set (`natural`: the row as is).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn w3_rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    x: &[f32],
    natural: &[f32],
) -> [f32; R] {
    let groups = row_words / 12;
    let (xp, np) = (x.as_ptr(), natural.as_ptr());
    let m3 = _mm512_set1_epi32(3);
    let s_of = |r: usize, g: usize| {
        if g < groups {
            sz[r * 2 * groups + 2 * g]
        } else {
            0.0
        }
    };
    let mut total = [_mm512_setzero_ps(); R];
    for pair in 0..groups.div_ceil(2) {
        let (ga, gb) = (2 * pair, 2 * pair + 1);
        let mut lo = [_mm512_setzero_si512(); R];
        for (r, lo) in lo.iter_mut().enumerate() {
            let row = wp.add(r * row_words);
            let a = _mm256_loadu_si256(row.add(ga * 12) as *const __m256i);
            let b = if gb < groups {
                _mm256_loadu_si256(row.add(gb * 12) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            *lo = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
        }
        let xg = xp.add(pair * 256);
        let mut acc = [_mm512_setzero_ps(); R];
        for j in 0..16 {
            let xv = _mm512_loadu_ps(xg.add(16 * j));
            let sh = _mm512_set1_epi32(2 * j as i32);
            for r in 0..R {
                let c = _mm512_and_si512(_mm512_srlv_epi32(lo[r], sh), m3);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), xv, acc[r]);
            }
        }
        for r in 0..R {
            let s = _mm512_castsi512_ps(_mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set1_ps(s_of(r, ga)))),
                _mm256_castps_si256(_mm256_set1_ps(s_of(r, gb))),
            ));
            total[r] = _mm512_fmadd_ps(acc[r], s, total[r]);
        }
        // The high plane: bit k of a group's four high words is code k's.
        for g in [ga, gb] {
            if g >= groups {
                break;
            }
            let xn = np.add(g * 128);
            let mut h = [_mm512_setzero_ps(); R];
            for i in 0..8 {
                let xv = _mm512_loadu_ps(xn.add(16 * i));
                for r in 0..R {
                    let word = *wp.add(r * row_words + g * 12 + 8 + i / 2);
                    let k = (word >> (16 * (i % 2))) as __mmask16;
                    h[r] = _mm512_mask_add_ps(h[r], k, h[r], xv);
                }
            }
            for r in 0..R {
                let s4 = _mm512_set1_ps(4.0 * s_of(r, g));
                total[r] = _mm512_fmadd_ps(h[r], s4, total[r]);
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(total[r]);
    }
    out
}

/// `R` rows of any layout `avx512_layout` accepts.
#[inline(always)]
pub unsafe fn rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    bits: u32,
    wpg: usize,
    x: &[f32],
    natural: &[f32],
) -> [f32; R] {
    match bits {
        3 => w3_rows::<R>(wp, row_words, sz, x, natural),
        4 => packed_rows::<R, 4>(wp, row_words, sz, wpg, x),
        _ => packed_rows::<R, 8>(wp, row_words, sz, wpg, x),
    }
}

/// `R` rows of 16-bit floats (`n` values each, row `r` at `wp + r *
/// stride`) dotted with `x`; `widen` turns sixteen of them into f32. Two
/// accumulators a row.
#[inline(always)]
unsafe fn half_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
    widen: impl Fn(*const u16) -> __m512,
) -> [f32; R] {
    let xp = x.as_ptr();
    let mut a = [[_mm512_setzero_ps(); 2]; R];
    let mut k = 0;
    while k + 32 <= n {
        let x0 = _mm512_loadu_ps(xp.add(k));
        let x1 = _mm512_loadu_ps(xp.add(k + 16));
        for r in 0..R {
            let p = wp.add(r * stride + k);
            a[r][0] = _mm512_fmadd_ps(widen(p), x0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(widen(p.add(16)), x1, a[r][1]);
        }
        k += 32;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
    }
    out
}

/// `R` f16 rows (the first `n - n % 32` values; the caller adds the rest).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn f16_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
) -> [f32; R] {
    let widen = |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
    half_rows::<R>(wp, stride, n, x, widen)
}

/// `R` bf16 rows (the first `n - n % 32` values; the caller adds the rest).
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn bf16_rows<const R: usize>(
    wp: *const u16,
    stride: usize,
    n: usize,
    x: &[f32],
) -> [f32; R] {
    // bf16 is the high half of an f32: widen and shift.
    let widen = |p: *const u16| {
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            16,
        ))
    };
    half_rows::<R>(wp, stride, n, x, widen)
}
