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

/// Prefetches the (scale, zero) pairs of the next `R` rows (the `R * n`
/// f16 after the `R * n` at `sz`, `n` a row's), one line a group from
/// the first: [`scales`] reads them all at once at the start of the next
/// call, where each miss would stall it.
#[inline(always)]
unsafe fn prefetch_scales<const R: usize>(sz: *const u16, n: usize, g: usize) {
    if R > 1 && g * 64 < R * n * 2 {
        let next = (sz as *const u8).wrapping_add(R * n * 2 + g * 64);
        _mm_prefetch::<_MM_HINT_T1>(next as *const i8);
    }
}

/// One block of 32 activations as int8 into `q` (`q8::quantize`'s
/// operations, in its order: the largest magnitude, `127 / amax`, the
/// products rounded to nearest even); returns the block's step.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> f32 {
    let p = x.as_ptr();
    let v = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(p.add(8 * i)));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
        _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    // |v| * inv <= 127 (rounded): the saturating packs never clip.
    let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
    let b = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    // The packs work within 128-bit lanes: dword k of `b` holds values
    // 4m..4m + 4 for m = [0, 2, 4, 6, 1, 3, 5, 7][k]; put them in order.
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    amax / 127.0
}

/// The (scale, zero) pairs of `R` rows, f16 (row `r`'s `2 * groups` from
/// `sz.add(r * 2 * groups)`), as f32 into `dst` in the same layout, and
/// each row's zero-point term `sum_g s_g z_g sum_g x̂` (`zsums`:
/// `Q8Row::zsums`, a zero after each group's sum, so the zeros' lanes
/// drop out): one F16C conversion for four groups.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales<const R: usize>(
    sz: *const u16,
    groups: usize,
    zsums: &[f32],
    dst: &mut [f32],
) -> [f32; R] {
    let n = 2 * groups;
    assert!(zsums.len() >= n && dst.len() >= R * n);
    // The rows' sums run side by side (one would wait on its own adds).
    let mut acc = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i + 8 <= n {
        let zs = _mm256_loadu_ps(zsums.as_ptr().add(i));
        for r in 0..R {
            let p = _mm256_cvtph_ps(_mm_loadu_si128(sz.add(r * n + i) as *const __m128i));
            _mm256_storeu_ps(dst.as_mut_ptr().add(r * n + i), p);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(p, zs), _mm256_movehdup_ps(p), acc[r]);
        }
        i += 8;
    }
    let mut zero = acc.map(|a| hsum(a));
    for r in 0..R {
        for i in (i..n).step_by(2) {
            let (s, z) = (
                f16_bits(*sz.add(r * n + i)),
                f16_bits(*sz.add(r * n + i + 1)),
            );
            (dst[r * n + i], dst[r * n + i + 1]) = (s, z);
            zero[r] += s * zsums[i] * z;
        }
    }
    zero
}

fn f16_bits(v: u16) -> f32 {
    half::f16::from_bits(v).to_f32()
}

/// `R` rows of W4 g128 (sixteen words a group), zero points included;
/// the arguments are [`rows`]'.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn w4_rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: *const u16,
    zsums: &[f32],
    scratch: &mut [f32],
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    let groups = row_words / 16;
    let zero = scales::<R>(sz, groups, zsums, scratch);
    // Row r's scale for group g at `sf.add(r * 2 * groups + 2 * g)`
    // (`scales` wrote R rows' pairs), read without a bounds check in
    // the loop (the checks cost about 4 % of the kernel's time).
    let (szh, sf) = (sz, scratch.as_ptr());
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (qp, dp) = (q.as_ptr(), lane_d.as_ptr());
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        prefetch_next::<R>(wp, row_words, g, R * 64);
        prefetch_scales::<R>(szh, 2 * groups, g);
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
                let s = _mm256_mul_ps(dv, _mm256_broadcast_ss(&*sf.add(r * 2 * groups + 2 * g)));
                total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, total[r]);
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]) - zero[r];
    }
    out
}

/// `R` rows of W3 g128 (twelve words a group: eight low-plane words of
/// sixteen 2-bit codes, four high-plane words of one bit a code), zero
/// points included; the arguments are [`rows`]'. For shift `j`, byte `p`
/// of the low words (byte `b` of word `w`, `p = 4w + b`) gives code `4p +
/// j`'s low bits; its high bit is bit `j` of the plane's nibble `p`. The
/// sixteen plane bytes are widened to 16-bit lanes and each lane or-ed
/// with itself shifted by four, so that byte `p` holds nibble `p` (and
/// nothing else in its low four bits); a shift puts bit `j` at bit 2
/// (worth 4), where it is or-ed into the low bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn w3_rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: *const u16,
    zsums: &[f32],
    scratch: &mut [f32],
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    let groups = row_words / 12;
    let zero = scales::<R>(sz, groups, zsums, scratch);
    // Row r's scale for group g at `sf.add(r * 2 * groups + 2 * g)`
    // (`scales` wrote R rows' pairs), read without a bounds check in
    // the loop (the checks cost about 4 % of the kernel's time).
    let (szh, sf) = (sz, scratch.as_ptr());
    let (qp, dp) = (q.as_ptr(), lane_d.as_ptr());
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let ones = _mm256_set1_epi16(1);
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        prefetch_next::<R>(wp, row_words, g, R * 48);
        prefetch_scales::<R>(szh, 2 * groups, g);
        let dv = _mm256_loadu_ps(dp.add(g * 8));
        let x =
            [0, 1, 2, 3].map(|j| _mm256_loadu_si256(qp.add(g * 128 + 32 * j) as *const __m256i));
        for r in 0..R {
            let row = wp.add(r * row_words + g * 12);
            let lo = _mm256_loadu_si256(row as *const __m256i);
            // Lane i: plane byte i B; B | B << 4 puts B's low nibble in the
            // low byte's bits 0-3 and its high nibble in the high byte's.
            // The shifts below are 16-bit too: only bit 2 of each byte is
            // kept, and it comes from the byte's own bit `j`.
            let pw = _mm256_cvtepu8_epi16(_mm_loadu_si128(row.add(8) as *const __m128i));
            let h = _mm256_or_si256(pw, _mm256_slli_epi16::<4>(pw));
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
            let s = _mm256_mul_ps(dv, _mm256_broadcast_ss(&*sf.add(r * 2 * groups + 2 * g)));
            total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, total[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]) - zero[r];
    }
    out
}

/// `R` rows of a layout `Isa::Avx2Int8` takes (W3 or W4 at group 128):
/// the products, zero points included. Row `r`'s codes start at `wp + r *
/// row_words`, its f16 (scale, zero) pairs at `sz + r * 2 * groups`;
/// `scratch` takes them as f32 (`R * 2 * groups` values at least);
/// `zsums`, `q` and `lane_d` are `Q8Row`'s.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn rows<const R: usize>(
    wp: *const u32,
    row_words: usize,
    sz: *const u16,
    zsums: &[f32],
    scratch: &mut [f32],
    bits: u32,
    q: &[i8],
    lane_d: &[f32],
) -> [f32; R] {
    match bits {
        3 => w3_rows::<R>(wp, row_words, sz, zsums, scratch, q, lane_d),
        _ => w4_rows::<R>(wp, row_words, sz, zsums, scratch, q, lane_d),
    }
}
