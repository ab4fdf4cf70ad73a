//! The CPU's row kernels for matrix-vector products (decode): one output
//! row of a weight against one activation row, for each stored form of
//! the weight: packed W3 / W4 / W8 codes, f16, bf16 and f32.
//!
//! Each kernel has a scalar version (any CPU) and an AVX2 + FMA (+ F16C)
//! version chosen at run time ([`Isa::detect`]); the tests run every
//! version against the scalar reference of `linear.rs` on odd shapes and
//! every group size.
//!
//! Packed rows are never dequantized: a group's product is
//! `s * (sum_k q_k x_k - z * sum_k x_k)`, so the kernels only turn codes
//! into floats and multiply-add; the zero point is folded once per group
//! with the group's `sum_k x_k`, which [`PackedInput`] computes once per
//! activation row. To read eight codes with one shift and one mask, the
//! AVX2 kernels read eight consecutive u32 words at a time (lane `w` holds
//! word `w`), so the `j`-th code of every word is one vector; the
//! activation row is reordered once per row to match
//! ([`PackedInput::new`]): that is the layout trick of GPU W4 kernels,
//! done on the activations instead of the weights.

use half::{bf16, f16};

use crate::quant::format::{words_per_group, PackedLinear};

/// The instruction set a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (what the compiler vectorises for the baseline target).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
    /// x86-64 AVX-512F on top of AVX2: the packed kernels at sixteen lanes,
    /// W3's high bit plane added under a mask (dense rows as AVX2).
    Avx512,
}

impl Isa {
    /// The best kernels this CPU runs. `MBQ_CPU_ISA=scalar` forces the
    /// scalar ones (to compare, or to rule the SIMD code out).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            let best = all.last().copied().unwrap_or(Isa::Scalar);
            match std::env::var("MBQ_CPU_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") if all.contains(&Isa::Avx2) => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Every kernel version this CPU can run, scalar first (the tests run
    /// each).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma+f16c",
            Isa::Avx512 => "avx512f",
        }
    }
}

/// Codes per u32 word and lanes of the AVX2 kernels.
const LANES: usize = 8;

/// Whether the AVX2 packed kernel reads this layout: rows of whole
/// blocks of eight code words, each block inside one group or two groups
/// of four words (W4 and W8 whenever a row is a multiple of eight words;
/// W3 at group 128, where a group's eight low-plane words are one block).
/// Other layouts (W3 g32 / g64, odd rows) use the scalar kernel.
fn simd_layout(bits: u32, group_size: usize, inp: usize) -> bool {
    match bits {
        3 => group_size == 128,
        4 | 8 => {
            words_per_group(bits, group_size).is_multiple_of(4)
                && (inp * bits as usize / 32).is_multiple_of(LANES)
        }
        _ => false,
    }
}

/// The sixteen-lane layout: W4 / W8 rows of whole blocks of sixteen words
/// inside one group; W3 at group 128 (two groups a step, the last one
/// alone).
fn avx512_layout(bits: u32, group_size: usize, inp: usize) -> bool {
    match bits {
        3 => group_size == 128,
        4 | 8 => {
            words_per_group(bits, group_size).is_multiple_of(16)
                && (inp * bits as usize / 32).is_multiple_of(16)
        }
        _ => false,
    }
}

/// One activation row prepared for the packed kernels of one weight
/// layout: the row itself, reordered to the kernel's lanes, and its sum
/// per group (for the zero points).
pub struct PackedInput {
    isa: Isa,
    /// The activations in the kernel's order (the row as is for scalar).
    x: Vec<f32>,
    /// The row as is (AVX-512 W3 adds it under the high-bit masks).
    natural: Vec<f32>,
    /// `sum_k x_k` over each group.
    sums: Vec<f32>,
}

impl PackedInput {
    pub fn new(isa: Isa, w: &PackedLinear, x: &[f32]) -> PackedInput {
        let g = w.group_size;
        let sums = x.chunks_exact(g).map(|c| c.iter().sum()).collect();
        let isa = match isa {
            Isa::Avx512 if avx512_layout(w.bits, g, w.inp) => Isa::Avx512,
            Isa::Avx512 | Isa::Avx2 if simd_layout(w.bits, g, w.inp) => Isa::Avx2,
            _ => Isa::Scalar,
        };
        let (xr, natural) = match isa {
            Isa::Scalar => (x.to_vec(), Vec::new()),
            Isa::Avx2 => (reorder(x, w.bits, LANES), Vec::new()),
            Isa::Avx512 if w.bits == 3 => (reorder_w3_pairs(x), x.to_vec()),
            Isa::Avx512 => (reorder(x, w.bits, 16), Vec::new()),
        };
        PackedInput {
            isa,
            x: xr,
            natural,
            sums,
        }
    }
}

/// The activation order of the AVX2 kernels. W4 / W8: per block of eight
/// words (`8 * per` codes, `per` codes a word), position `j * 8 + w` holds
/// code `j` of word `w`, i.e. input `w * per + j`. W3 g128: the block is
/// the group, whose eight low-plane words hold 16 codes each: position
/// `j * 8 + w` holds input `w * 16 + j`.
fn reorder(x: &[f32], bits: u32, lanes: usize) -> Vec<f32> {
    let per = match bits {
        3 => 16,
        b => 32 / b as usize,
    };
    let block = lanes * per;
    let mut out = vec![0.0f32; x.len()];
    for (src, dst) in x.chunks_exact(block).zip(out.chunks_exact_mut(block)) {
        for w in 0..lanes {
            for j in 0..per {
                dst[j * lanes + w] = src[w * per + j];
            }
        }
    }
    out
}

/// The AVX-512 W3 g128 order: two groups a step, lanes 0-7 the first
/// group's low-plane words, 8-15 the second's; position `j * 16 + w`
/// holds code `j` of lane `w`. An odd last group is padded with zeros.
fn reorder_w3_pairs(x: &[f32]) -> Vec<f32> {
    let groups = x.len() / 128;
    let mut out = vec![0.0f32; groups.div_ceil(2) * 256];
    for (g, src) in x.chunks_exact(128).enumerate() {
        let dst = &mut out[(g / 2) * 256..];
        let half = (g % 2) * 8;
        for w in 0..8 {
            for j in 0..16 {
                dst[j * 16 + half + w] = src[w * 16 + j];
            }
        }
    }
    out
}

/// Rows `o0..o0 + y.len()` of a packed weight times the prepared
/// activations, into `y`; `scratch` takes the rows' scales and zeros as
/// f32 (converted at once for all the rows, not one f16 at a time).
pub fn packed_rows(
    w: &PackedLinear,
    o0: usize,
    xin: &PackedInput,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    use half::slice::HalfFloatSliceExt;
    let groups = w.groups();
    let wpg = words_per_group(w.bits, w.group_size);
    let n = y.len();
    scratch.resize(n * groups * 2, 0.0);
    w.scales_zeros[o0 * groups * 2..(o0 + n) * groups * 2].convert_to_f32_slice(scratch);
    let row_words = groups * wpg;
    // The zero points of row i: - sum_g s_g z_g sum(x_g).
    let zero_term = |i: usize| -> f32 {
        let sz = &scratch[i * groups * 2..(i + 1) * groups * 2];
        sz.chunks_exact(2)
            .zip(&xin.sums)
            .map(|(p, s)| p[0] * p[1] * s)
            .sum()
    };
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if xin.isa == Isa::Avx512 {
        // Four rows at a time (W4, W8), then one.
        while i < n {
            let wp = w.qweight[(o0 + i) * row_words..].as_ptr();
            let sz = &scratch[i * groups * 2..];
            // SAFETY: `Isa::Avx512` only when the CPU has AVX-512F (and AVX2,
            // FMA, F16C); the layout was checked by `avx512_layout`; rows
            // i..i + 4 (or i) lie inside the weight.
            // W3 keeps one row a step: four rows' high-plane masks and low
            // planes measured slower on short rows (3,584 inputs) here.
            if i + 4 <= n && w.bits != 3 {
                let d = unsafe {
                    avx512::rows::<4>(wp, row_words, sz, w.bits, wpg, &xin.x, &xin.natural)
                };
                for (k, d) in d.into_iter().enumerate() {
                    y[i + k] = d - zero_term(i + k);
                }
                i += 4;
            } else {
                let [d] = unsafe {
                    avx512::rows::<1>(wp, row_words, sz, w.bits, wpg, &xin.x, &xin.natural)
                };
                y[i] = d - zero_term(i);
                i += 1;
            }
        }
    }
    for i in i..n {
        let r = o0 + i;
        let words = &w.qweight[r * row_words..(r + 1) * row_words];
        let sz = &scratch[i * groups * 2..(i + 1) * groups * 2];
        let codes_dot = match xin.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2, FMA
            // and F16C; the layout was checked by `simd_layout`.
            Isa::Avx2 => unsafe { avx2::packed_row(words, sz, w.bits, wpg, &xin.x) },
            _ => packed_row_scalar(words, sz, w.bits, w.group_size, &xin.x),
        };
        y[i] = codes_dot - zero_term(i);
    }
}

/// Whether [`dequant_row`] writes rows in the eight-lane order of the
/// AVX2 kernels (then the GEMM's activations go through [`gemm_order`]).
pub fn dequant_reordered(isa: Isa, w: &PackedLinear) -> bool {
    isa != Isa::Scalar && simd_layout(w.bits, w.group_size, w.inp)
}

/// An activation row in the order of [`dequant_row`]'s output.
pub fn gemm_order(isa: Isa, w: &PackedLinear, x: &[f32]) -> Vec<f32> {
    if dequant_reordered(isa, w) {
        reorder(x, w.bits, LANES)
    } else {
        x.to_vec()
    }
}

/// Row `r` of a packed weight as f32 `(q - z) s`, for a GEMM tile: in the
/// input order of the eight-lane kernels where [`dequant_reordered`] (a
/// GEMM only needs the weights and activations in the same order), else
/// as is.
pub fn dequant_row(isa: Isa, w: &PackedLinear, r: usize, dst: &mut [f32], scratch: &mut Vec<f32>) {
    if !dequant_reordered(isa, w) {
        return w.dequantize_row(r, dst);
    }
    use half::slice::HalfFloatSliceExt;
    let groups = w.groups();
    let wpg = words_per_group(w.bits, w.group_size);
    let words = &w.qweight[r * groups * wpg..(r + 1) * groups * wpg];
    scratch.resize(groups * 2, 0.0);
    w.scales_zeros[r * groups * 2..(r + 1) * groups * 2].convert_to_f32_slice(scratch);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a SIMD `isa` is only detected with AVX2, FMA and F16C; the
    // layout was checked by `simd_layout`.
    unsafe {
        avx2::dequant_row(words, scratch, w.bits, wpg, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("only detected on x86-64")
}

/// `sum_g s_g sum_k q_k x_k` in plain Rust.
fn packed_row_scalar(words: &[u32], sz: &[f32], bits: u32, g: usize, x: &[f32]) -> f32 {
    let wpg = words_per_group(bits, g);
    let mut total = 0.0f32;
    for ((gw, p), xg) in words
        .chunks_exact(wpg)
        .zip(sz.chunks_exact(2))
        .zip(x.chunks_exact(g))
    {
        let mut acc = [0.0f32; 8];
        match bits {
            3 => {
                let hi = &gw[g / 16..];
                for (k, &xv) in xg.iter().enumerate() {
                    let lo = (gw[k / 16] >> (2 * (k % 16))) & 3;
                    let h = (hi[k / 32] >> (k % 32)) & 1;
                    acc[k % 8] += (lo | (h << 2)) as f32 * xv;
                }
            }
            _ => {
                let per = (32 / bits) as usize;
                let mask = (1u32 << bits) - 1;
                for (k, &xv) in xg.iter().enumerate() {
                    let q = (gw[k / per] >> (bits as usize * (k % per))) & mask;
                    acc[k % 8] += q as f32 * xv;
                }
            }
        }
        total += p[0] * acc.iter().sum::<f32>();
    }
    total
}

/// A dense row stored as f16, bf16 or f32, dotted with `x`.
pub fn f16_row(isa: Isa, w: &[f16], x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::f16_row(w, x) },
        _ => {
            let mut acc = [0.0f32; 8];
            for (k, (a, b)) in w.iter().zip(x).enumerate() {
                acc[k % 8] += a.to_f32() * b;
            }
            acc.iter().sum()
        }
    }
}

pub fn bf16_row(isa: Isa, w: &[bf16], x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when the CPU has AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::bf16_row(w, x) },
        _ => {
            let mut acc = [0.0f32; 8];
            for (k, (a, b)) in w.iter().zip(x).enumerate() {
                acc[k % 8] += a.to_f32() * b;
            }
            acc.iter().sum()
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::LANES;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
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
    pub unsafe fn f16_row(w: &[f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let widen = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let (mut s, k) = half_row(n, w.as_ptr() as *const u16, x.as_ptr(), widen);
        for i in k..n {
            s += w[i].to_f32() * x[i];
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bf16_row(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        // bf16 is the high half of an f32: widen and shift.
        let widen = |p: *const u16| {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            ))
        };
        let (mut s, k) = half_row(n, w.as_ptr() as *const u16, x.as_ptr(), widen);
        for i in k..n {
            s += w[i].to_f32() * x[i];
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // rows index several arrays at once
mod avx512 {
    //! Sixteen-lane kernels over `R` output rows at once: each activation
    //! vector is loaded once for the `R` rows (the activations, four
    //! bytes a code, would otherwise be read from L1 once per row and
    //! bound the kernel).

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
}
