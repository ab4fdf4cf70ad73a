//! Integer kernels for packed rows (AVX-512 VNNI, with BW, VL and BITALG):
//! codes as unsigned bytes times int8 activations (`q8.rs`), four
//! products a 32-bit lane a `vpdpbusd`, over `R` output rows at once.
//! Each 32-bit lane holds one code word's sums, so one conversion and
//! one multiply-add a group and lane apply the group's scale and the
//! lane's activation step: about ten instructions per 128 W4 weights
//! where the f32 kernels need thirty-two.

use std::arch::x86_64::*;

/// `R` rows of W4 g128 (`B = 4`) or W8 g64 / g128 (`B = 8`). Row `r`'s
/// words start at `wp + r * row_words`, its (scale, zero) pairs at
/// `sz[r * 2 * groups..]`; `q` and `lane_d` are `Q8Row`'s.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn packed_rows<const R: usize, const B: u32>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    wpg: usize,
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    let groups = row_words / wpg;
    let nib = _mm512_set1_epi8(0x0F);
    let (qp, dp) = (q.as_ptr(), lane_d.as_ptr());
    let mut total = [_mm512_setzero_ps(); R];
    for c in 0..row_words / 16 {
        let dv = _mm512_loadu_ps(dp.add(c * 16));
        let g = c * 16 / wpg;
        let mut acc = [_mm512_setzero_si512(); R];
        if B == 4 {
            let xl = _mm512_loadu_si512(qp.add(c * 128) as *const __m512i);
            let xh = _mm512_loadu_si512(qp.add(c * 128 + 64) as *const __m512i);
            for r in 0..R {
                let v = _mm512_loadu_si512(wp.add(r * row_words + c * 16) as *const __m512i);
                let lo = _mm512_and_si512(v, nib);
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), nib);
                acc[r] = _mm512_dpbusd_epi32(acc[r], lo, xl);
                acc[r] = _mm512_dpbusd_epi32(acc[r], hi, xh);
            }
        } else {
            let x = _mm512_loadu_si512(qp.add(c * 64) as *const __m512i);
            for r in 0..R {
                let v = _mm512_loadu_si512(wp.add(r * row_words + c * 16) as *const __m512i);
                acc[r] = _mm512_dpbusd_epi32(acc[r], v, x);
            }
        }
        for r in 0..R {
            let s = _mm512_mul_ps(dv, _mm512_set1_ps(sz[r * 2 * groups + 2 * g]));
            total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), s, total[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(total[r]);
    }
    out
}

/// For shift `j`, the bit byte `4w + b` takes from its 64-bit lane of the
/// high plane: `16 (w % 2) + 4b + j`.
const W3_HIGH_BITS: [[u8; 32]; 4] = {
    let mut sel = [[0u8; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut p = 0;
        while p < 32 {
            let (w, b) = (p / 4, p % 4);
            sel[j][p] = (16 * (w % 2) + 4 * b + j) as u8;
            p += 1;
        }
        j += 1;
    }
    sel
};

/// `R` rows of W3 g128 (twelve words a group: eight low-plane words of
/// sixteen 2-bit codes, four high-plane words of one bit a code), a group
/// a step at 256 bits. For shift `j`, byte `b` of low word `w` gives code
/// `16w + 4b + j`'s low bits; `vpshufbitqmb` picks the same codes' high
/// bits out of the high words (high word `w / 2`, bit `16 (w % 2) + 4b +
/// j`) into a byte mask, under which 4 is added.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg,avx2,fma,f16c")]
pub unsafe fn w3_rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    let groups = row_words / 12;
    let (qp, dp) = (q.as_ptr(), lane_d.as_ptr());
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let sel = W3_HIGH_BITS.map(|s| _mm256_loadu_si256(s.as_ptr() as *const __m256i));
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        let dv = _mm256_loadu_ps(dp.add(g * 8));
        let x =
            [0, 1, 2, 3].map(|j| _mm256_loadu_si256(qp.add(g * 128 + 32 * j) as *const __m256i));
        for r in 0..R {
            let row = wp.add(r * row_words + g * 12);
            let lo = _mm256_loadu_si256(row as *const __m256i);
            // High word h as the 64-bit lane h.
            let hi = _mm256_cvtepu32_epi64(_mm_loadu_si128(row.add(8) as *const __m128i));
            let mut acc = _mm256_setzero_si256();
            for j in 0..4 {
                let c =
                    _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_set1_epi32(2 * j as i32)), m3);
                let k = _mm256_bitshuffle_epi64_mask(hi, sel[j]);
                let c = _mm256_mask_add_epi8(c, k, c, four);
                acc = _mm256_dpbusd_epi32(acc, c, x[j]);
            }
            let s = _mm256_mul_ps(dv, _mm256_set1_ps(sz[r * 2 * groups + 2 * g]));
            total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, total[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let v = total[r];
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
        out[r] = _mm_cvtss_f32(h);
    }
    out
}

/// `R` rows of any layout `q8::layout` accepts.
#[inline(always)]
pub unsafe fn rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    bits: u32,
    wpg: usize,
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    match bits {
        3 => w3_rows::<R>(wp, row_words, sz, q, lane_d),
        4 => packed_rows::<R, 4>(wp, row_words, sz, wpg, q, lane_d),
        _ => packed_rows::<R, 8>(wp, row_words, sz, wpg, q, lane_d),
    }
}
