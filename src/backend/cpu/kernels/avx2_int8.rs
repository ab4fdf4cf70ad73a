//! Integer kernels for packed rows on AVX2 (with FMA and F16C): codes as
//! unsigned bytes times int8 activations (`q8.rs`, the same layout as the
//! AVX-512 VNNI kernels of `vnni.rs`, read eight words at a time), as
//! llama.cpp's AVX2 path does. `vpmaddubsw` multiplies code and activation
//! bytes and adds neighbouring pairs into i16 (at most 2 x 15 x 127 for W4,
//! so no saturation; W8 codes could saturate and stay on the f32 kernels),
//! the pairs of a row are added in i16, and `vpmaddwd` against ones sums
//! them into one i32 per code word: the 32-bit lane sums of `vpdpbusd`.
//! One conversion and one multiply-add a lane then apply the group's scale
//! and the lane's activation step.

use std::arch::x86_64::*;

use super::avx2::hsum;

/// Prefetches the next `R` rows (the block after the one the kernel
/// reads, `R * row_words` words from `wp`) into L2 at the rate the
/// kernel reads its own: at group `g`, the block's bytes `g * step ..
/// (g + 1) * step`, `step` being its bytes a group. The kernel reads `R`
/// short streams at once (a 3,584-input W3 row is 21 cache lines), which
/// the hardware prefetcher barely learns before they end; this makes the
/// next block one sequential stream. A prefetch past the weight's end is
/// harmless (it never faults; the pointer is only formed, not read).
#[inline(always)]
unsafe fn prefetch_next<const R: usize>(wp: *const u32, row_words: usize, g: usize, step: usize) {
    if R > 1 {
        let next = (wp as *const u8).wrapping_add(R * row_words * 4 + g * step);
        let mut off = 0;
        while off < step {
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(off) as *const i8);
            off += 64;
        }
    }
}

/// `R` rows of W4 g128 (sixteen words a group). Row `r`'s words start at
/// `wp + r * row_words`, its (scale, zero) pairs at `sz[r * 2 * groups..]`;
/// `q` and `lane_d` are `Q8Row`'s.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn w4_rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    let groups = row_words / 16;
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (qp, dp) = (q.as_ptr(), lane_d.as_ptr());
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        prefetch_next::<R>(wp, row_words, g, R * 64);
        // Words 8h..8h + 8 of the group: their low nibbles' activations
        // are bytes 32h.. of the group's first 64, the high nibbles' the
        // same bytes of the second 64.
        for h in 0..2 {
            let dv = _mm256_loadu_ps(dp.add(g * 16 + 8 * h));
            let xl = _mm256_loadu_si256(qp.add(g * 128 + 32 * h) as *const __m256i);
            let xh = _mm256_loadu_si256(qp.add(g * 128 + 64 + 32 * h) as *const __m256i);
            for r in 0..R {
                let v =
                    _mm256_loadu_si256(wp.add(r * row_words + g * 16 + 8 * h) as *const __m256i);
                let lo = _mm256_and_si256(v, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi32::<4>(v), nib);
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                let sums = _mm256_madd_epi16(pairs, ones);
                let s = _mm256_mul_ps(dv, _mm256_set1_ps(sz[r * 2 * groups + 2 * g]));
                total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, total[r]);
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]);
    }
    out
}

/// For byte `4w + b` of each of the four activation vectors of a W3 group
/// (code `16w + 4b + j` for vector `j`), the byte of the group's 16-byte
/// high plane that holds its high bit: `(16w + 4b + j) / 8 = 2w + b / 2`
/// (the same for every `j`; each 128-bit half of the register holds the
/// whole plane, so the index is the byte's own).
const W3_HIGH_BYTE: [u8; 32] = {
    let mut sel = [0u8; 32];
    let mut p = 0;
    while p < 32 {
        let (w, b) = (p / 4, p % 4);
        sel[p] = (2 * w + b / 2) as u8;
        p += 1;
    }
    sel
};

/// Bytes whose high bit sits in the upper nibble of their plane byte
/// (`b` odd: bit `4 + j` for vector `j`), marked for `vpblendvb`.
const W3_UPPER_NIBBLE: [u8; 32] = {
    let mut m = [0u8; 32];
    let mut p = 0;
    while p < 32 {
        if p % 2 == 1 {
            m[p] = 0x80;
        }
        p += 1;
    }
    m
};

/// `R` rows of W3 g128 (twelve words a group: eight low-plane words of
/// sixteen 2-bit codes, four high-plane words of one bit a code). For
/// shift `j`, byte `b` of low word `w` gives code `16w + 4b + j`'s low
/// bits. Its high bit is bit `(4b + j) % 8` of plane byte `2w + b / 2`:
/// a byte shuffle brings that byte to each position, and the upper nibble
/// of odd `b` is moved down, so that bit `j` of every byte is vector
/// `j`'s high bit; a shift puts it at bit 2 (worth 4), where it is or-ed
/// into the low bits.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let ones = _mm256_set1_epi16(1);
    let sel = _mm256_loadu_si256(W3_HIGH_BYTE.as_ptr() as *const __m256i);
    let upper = _mm256_loadu_si256(W3_UPPER_NIBBLE.as_ptr() as *const __m256i);
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        prefetch_next::<R>(wp, row_words, g, R * 48);
        let dv = _mm256_loadu_ps(dp.add(g * 8));
        let x =
            [0, 1, 2, 3].map(|j| _mm256_loadu_si256(qp.add(g * 128 + 32 * j) as *const __m256i));
        for r in 0..R {
            let row = wp.add(r * row_words + g * 12);
            let lo = _mm256_loadu_si256(row as *const __m256i);
            let plane = _mm256_broadcastsi128_si256(_mm_loadu_si128(row.add(8) as *const __m128i));
            let hb = _mm256_shuffle_epi8(plane, sel);
            // Odd bytes are the high byte of their 16-bit lane: shifting
            // the lane by 4 moves their upper nibble down cleanly. The
            // shifts below are 16-bit too; only bit 2 of each byte is kept,
            // and it comes from the byte's own bit `j`.
            let h = _mm256_blendv_epi8(hb, _mm256_srli_epi16::<4>(hb), upper);
            let c0 = _mm256_or_si256(
                _mm256_and_si256(lo, m3),
                _mm256_and_si256(_mm256_slli_epi16::<2>(h), four),
            );
            let c1 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32::<2>(lo), m3),
                _mm256_and_si256(_mm256_add_epi8(h, h), four),
            );
            let c2 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32::<4>(lo), m3),
                _mm256_and_si256(h, four),
            );
            let c3 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32::<6>(lo), m3),
                _mm256_and_si256(_mm256_srli_epi16::<1>(h), four),
            );
            // Codes <= 7: four vectors' pairs stay within i16.
            let pairs = _mm256_add_epi16(
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(c0, x[0]),
                    _mm256_maddubs_epi16(c1, x[1]),
                ),
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(c2, x[2]),
                    _mm256_maddubs_epi16(c3, x[3]),
                ),
            );
            let sums = _mm256_madd_epi16(pairs, ones);
            let s = _mm256_mul_ps(dv, _mm256_set1_ps(sz[r * 2 * groups + 2 * g]));
            total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, total[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]);
    }
    out
}

/// `R` rows of a layout `Isa::Avx2Int8` takes (W3 or W4 at group 128).
#[inline(always)]
pub unsafe fn rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: &[f32],
    bits: u32,
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    match bits {
        3 => w3_rows::<R>(wp, row_words, sz, q, lane_d),
        _ => w4_rows::<R>(wp, row_words, sz, q, lane_d),
    }
}
