//! The CPU's row kernels for matrix-vector products (decode): one output
//! row of a weight against one activation row, for each stored form of
//! the weight: packed W3 / W4 / W8 codes, f16, bf16 and f32.
//!
//! Each kernel has a scalar version (any CPU), an AVX2 + FMA (+ F16C)
//! version (`avx2.rs`) and an AVX-512F one (`avx512.rs`: packed rows,
//! and f16 / bf16 rows four at a time), chosen at run time
//! ([`Isa::detect`]); the tests run every version this CPU has against the
//! plain reference of `linear.rs` on odd shapes and every group size. No
//! NEON version yet: aarch64 runs the scalar loops (which the compiler
//! vectorises where it can).
//!
//! The runtime (not the library's default) may also round a packed row's
//! activations to int8 blocks (`q8.rs`) and take integer dot products
//! (`vnni.rs`, AVX-512 VNNI; `avx2_int8.rs`, AVX2 `vpmaddubsw` for W3 /
//! W4 g128): what llama.cpp does, three to four times fewer instructions
//! a weight than the f32 kernels; tested against the plain reference
//! applied to the rounded activations, and the rounding against its
//! half-a-step bound.
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

use std::sync::atomic::{AtomicBool, Ordering};

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
    /// W3's high bit plane added under a mask; f16 / bf16 rows four at a
    /// time.
    Avx512,
    /// AVX2 + FMA + F16C with the activations of packed W3 / W4 g128 rows
    /// rounded to int8 blocks (`q8.rs`) and integer dot products
    /// (`avx2_int8.rs`: `vpmaddubsw`, as llama.cpp's AVX2 path); everything
    /// else as [`Isa::Avx2`]. Chosen only after [`set_int8_activations`].
    Avx2Int8,
    /// AVX-512 with VNNI, BW, VL and BITALG: packed rows as integer dot
    /// products with the activations rounded to int8 blocks (`q8.rs`), as
    /// llama.cpp does; everything else as [`Isa::Avx512`].
    Avx512Vnni,
}

impl Isa {
    /// The kernels linears use: the best this CPU runs, but the integer
    /// kernels ([`Isa::Avx512Vnni`], int8 activations) only after
    /// [`set_int8_activations`] (the runtime commands turn them on; the
    /// library, calibration and the tests' references stay exact).
    /// `MBQ_CPU_ISA=scalar|avx2|avx512` caps the choice (to compare, to
    /// rule the SIMD code out, or to keep activations in f32: `avx512`).
    pub fn detect() -> Isa {
        match Isa::best() {
            Isa::Avx512Vnni if !INT8_ACTIVATIONS.load(Ordering::Relaxed) => Isa::Avx512,
            Isa::Avx2Int8 if !INT8_ACTIVATIONS.load(Ordering::Relaxed) => Isa::Avx2,
            isa => isa,
        }
    }

    /// The best kernels this CPU runs, within `MBQ_CPU_ISA`.
    fn best() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            let best = all.last().copied().unwrap_or(Isa::Scalar);
            match std::env::var("MBQ_CPU_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") if all.contains(&Isa::Avx2) => Isa::Avx2,
                Ok("avx512") if all.contains(&Isa::Avx512) => Isa::Avx512,
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
            v.push(Isa::Avx2Int8);
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
                if is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512bitalg")
                {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma+f16c",
            Isa::Avx2Int8 => "avx2+fma+f16c (int8 activations)",
            Isa::Avx512 => "avx512f",
            Isa::Avx512Vnni => "avx512-vnni (int8 activations)",
        }
    }
}

impl Isa {
    /// Whether this instruction set computes packed rows of this layout
    /// with int8 activations (the integer kernels).
    pub fn int8_layout(self, bits: u32, group_size: usize) -> bool {
        match self {
            Isa::Avx512Vnni => q8::layout(bits, group_size),
            // `vpmaddubsw` would saturate on W8's codes.
            Isa::Avx2Int8 => matches!((bits, group_size), (3, 128) | (4, 128)),
            _ => false,
        }
    }
}

static INT8_ACTIVATIONS: AtomicBool = AtomicBool::new(false);

/// Let packed rows (decode) round their activations to int8 blocks and
/// use the integer kernels where the CPU has them (AVX-512 VNNI), as
/// llama.cpp does: faster, within half an int8 step of the f32 product
/// (`q8.rs`). Off by default; `mbq-run`, `mbq serve` and `mbq bench` turn
/// it on.
pub fn set_int8_activations(on: bool) {
    INT8_ACTIVATIONS.store(on, Ordering::Relaxed);
}

/// Lanes of the AVX2 kernels: u32 code words (or f32 values) a vector.
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
    /// The row as int8 blocks (where [`Isa::int8_layout`]).
    q8: Option<q8::Q8Row>,
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
        if isa.int8_layout(w.bits, g) {
            let mut q8 = q8::Q8Row::new(w.bits, g, x);
            return PackedInput {
                isa,
                x: Vec::new(),
                natural: Vec::new(),
                sums: std::mem::take(&mut q8.sums),
                q8: Some(q8),
            };
        }
        let sums = x.chunks_exact(g).map(|c| c.iter().sum()).collect();
        let isa = match isa {
            Isa::Avx512 | Isa::Avx512Vnni if avx512_layout(w.bits, g, w.inp) => Isa::Avx512,
            Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2 | Isa::Avx2Int8
                if simd_layout(w.bits, g, w.inp) =>
            {
                Isa::Avx2
            }
            _ => Isa::Scalar,
        };
        let (xr, natural) = match isa {
            Isa::Scalar => (x.to_vec(), Vec::new()),
            Isa::Avx2 => (reorder(x, w.bits, LANES), Vec::new()),
            Isa::Avx512 if w.bits == 3 => (reorder_w3_pairs(x), x.to_vec()),
            _ => (reorder(x, w.bits, 16), Vec::new()),
        };
        PackedInput {
            isa,
            q8: None,
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
/// activations, into `y`; `scratch` takes the scales and zeros of the
/// rows a kernel call reads as f32 (converted at once for those rows, so
/// they stay in L1 next to the codes, not one f16 at a time).
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
    let row_words = groups * wpg;
    let per_row = groups * 2;
    scratch.resize(4 * per_row, 0.0);
    // Rows i..i + k's (scale, zero) pairs as f32, at the start of `scratch`.
    let convert = |i: usize, k: usize, scratch: &mut Vec<f32>| {
        let src = &w.scales_zeros[(o0 + i) * per_row..(o0 + i + k) * per_row];
        src.convert_to_f32_slice(&mut scratch[..k * per_row]);
    };
    let zero =
        |r: usize, scratch: &[f32]| zero_term(&scratch[r * per_row..(r + 1) * per_row], &xin.sums);
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if let Some(q8) = &xin.q8 {
        // Four rows at a time, then one.
        while i < n {
            let k = if i + 4 <= n { 4 } else { 1 };
            let wp = w.qweight[(o0 + i) * row_words..].as_ptr();
            let (q, d) = (&q8.q, &q8.lane_d);
            if xin.isa == Isa::Avx2Int8 {
                // The AVX2 kernels read the f16 (scale, zero) pairs and fold
                // the zero points themselves.
                let szp = w.scales_zeros[(o0 + i) * per_row..(o0 + i + k) * per_row].as_ptr();
                let (szp, zs) = (szp as *const u16, &q8.zsums[..]);
                // SAFETY: `Isa::Avx2Int8` only with AVX2, FMA and F16C, `q8`
                // only for a layout `Isa::int8_layout` accepts; rows i..i + k
                // (their codes and pairs) lie inside the weight, `scratch`
                // holds four rows' pairs.
                if k == 4 {
                    let r = unsafe {
                        avx2_int8::rows::<4>(wp, row_words, szp, zs, scratch, w.bits, q, d)
                    };
                    y[i..i + 4].copy_from_slice(&r);
                } else {
                    let [r] = unsafe {
                        avx2_int8::rows::<1>(wp, row_words, szp, zs, scratch, w.bits, q, d)
                    };
                    y[i] = r;
                }
                i += k;
                continue;
            }
            // SAFETY: otherwise `q8` is only made under `Isa::Avx512Vnni`
            // (AVX-512F, BW, VL, VNNI, BITALG, AVX2, FMA, F16C), for a layout
            // `Isa::int8_layout` accepts; rows i..i + 4 (or i) lie inside
            // the weight.
            convert(i, k, scratch);
            let sz = &scratch[..];
            if k == 4 {
                let r = unsafe { vnni::rows::<4>(wp, row_words, sz, w.bits, wpg, q, d) };
                for (k, r) in r.into_iter().enumerate() {
                    y[i + k] = r - zero(k, scratch);
                }
            } else {
                let [r] = unsafe { vnni::rows::<1>(wp, row_words, sz, w.bits, wpg, q, d) };
                y[i] = r - zero(0, scratch);
            }
            i += k;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if xin.isa == Isa::Avx512 {
        // Four rows at a time (W4, W8), then one.
        while i < n {
            let wp = w.qweight[(o0 + i) * row_words..].as_ptr();
            // SAFETY: `Isa::Avx512` only when the CPU has AVX-512F (and AVX2,
            // FMA, F16C); the layout was checked by `avx512_layout`; rows
            // i..i + 4 (or i) lie inside the weight.
            // W3 keeps one row a step: four rows' high-plane masks and low
            // planes measured slower on short rows (3,584 inputs) here.
            if i + 4 <= n && w.bits != 3 {
                convert(i, 4, scratch);
                let sz = &scratch[..];
                let d = unsafe {
                    avx512::rows::<4>(wp, row_words, sz, w.bits, wpg, &xin.x, &xin.natural)
                };
                for (k, d) in d.into_iter().enumerate() {
                    y[i + k] = d - zero(k, scratch);
                }
                i += 4;
            } else {
                convert(i, 1, scratch);
                let sz = &scratch[..];
                let [d] = unsafe {
                    avx512::rows::<1>(wp, row_words, sz, w.bits, wpg, &xin.x, &xin.natural)
                };
                y[i] = d - zero(0, scratch);
                i += 1;
            }
        }
    }
    for (i, yi) in y.iter_mut().enumerate().skip(i) {
        let r = o0 + i;
        let words = &w.qweight[r * row_words..(r + 1) * row_words];
        convert(i, 1, scratch);
        let sz = &scratch[..per_row];
        let codes_dot = match xin.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2, FMA
            // and F16C; the layout was checked by `simd_layout`.
            Isa::Avx2 => unsafe { avx2::packed_row(words, sz, w.bits, wpg, &xin.x) },
            _ => packed_row_scalar(words, sz, w.bits, w.group_size, &xin.x),
        };
        *yi = codes_dot - zero(0, scratch);
    }
}

/// A row's zero points, `sum_g s_g z_g sum(x_g)` over its (scale, zero)
/// pairs `sz` and the activations' group sums: eight partial sums, so
/// that the adds do not wait on each other (and vectorise).
fn zero_term(sz: &[f32], sums: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut pairs = sz.chunks_exact(16);
    let mut xs = sums.chunks_exact(8);
    for (p, s) in (&mut pairs).zip(&mut xs) {
        for l in 0..8 {
            acc[l] += p[2 * l] * p[2 * l + 1] * s[l];
        }
    }
    let tail: f32 = pairs
        .remainder()
        .chunks_exact(2)
        .zip(xs.remainder())
        .map(|(p, s)| p[0] * p[1] * s)
        .sum();
    acc.iter().sum::<f32>() + tail
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

/// Rows `o0..o0 + y.len()` of a dense `[out, inp]` weight stored as f16
/// (`data`), dotted with `x`, into `y`.
pub fn f16_rows(isa: Isa, data: &[f16], inp: usize, o0: usize, x: &[f32], y: &mut [f32]) {
    half_rows(isa, data, inp, o0, x, y, Half::F16)
}

/// [`f16_rows`] for bf16.
pub fn bf16_rows(isa: Isa, data: &[bf16], inp: usize, o0: usize, x: &[f32], y: &mut [f32]) {
    // SAFETY: bf16 and u16 have the same size and alignment.
    let bits = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) };
    half_rows(isa, bits, inp, o0, x, y, Half::BF16)
}

/// From this many inputs on, f16 / bf16 rows go four at a time under
/// AVX-512 (their f32 activations, 32 KiB and more, no longer fit L1, and
/// one load serves four rows); shorter rows one at a time with the AVX2
/// kernel, which measured faster on them on an AVX-512 host (the
/// 3,584-input LM head: 128 against 145-162 ms a decode step). On an
/// AVX2-only host (Zen 3) four rows at a time measured faster at every
/// shape of the 7B (docs/BENCHMARKS.md), so AVX2 always takes four.
const LONG_ROW: usize = 8192;

#[derive(Clone, Copy)]
enum Half {
    F16,
    BF16,
}

fn half_to_f32(v: u16, kind: Half) -> f32 {
    match kind {
        Half::F16 => f16::from_bits(v).to_f32(),
        Half::BF16 => bf16::from_bits(v).to_f32(),
    }
}

fn half_rows<T: Copy>(
    isa: Isa,
    data: &[T],
    inp: usize,
    o0: usize,
    x: &[f32],
    y: &mut [f32],
    kind: Half,
) {
    assert!(std::mem::size_of::<T>() == 2 && data.len() >= (o0 + y.len()) * inp);
    // SAFETY: T is f16 or u16 (two bytes, checked above).
    let bits = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) };
    let row = |i: usize| &bits[(o0 + i) * inp..(o0 + i + 1) * inp];
    // The values a SIMD kernel left out at the end of a row.
    let tail = |i: usize, from: usize| -> f32 {
        row(i)[from..]
            .iter()
            .zip(&x[from..inp])
            .map(|(&w, &xv)| half_to_f32(w, kind) * xv)
            .sum()
    };
    // The four-row and one-row SIMD kernels of this ISA and kind, and the
    // multiple of inputs they take (`tail` adds the rest of a row).
    #[cfg(target_arch = "x86_64")]
    let simd: Option<(usize, HalfRows<4>, HalfRows<1>)> = match (isa, kind) {
        (Isa::Avx512 | Isa::Avx512Vnni, Half::F16) if inp >= LONG_ROW => {
            Some((32, avx512::f16_rows::<4>, avx512::f16_rows::<1>))
        }
        (Isa::Avx512 | Isa::Avx512Vnni, Half::BF16) if inp >= LONG_ROW => {
            Some((32, avx512::bf16_rows::<4>, avx512::bf16_rows::<1>))
        }
        (Isa::Avx2 | Isa::Avx2Int8, Half::F16) => {
            Some((16, avx2::f16_rows::<4>, avx2::f16_rows::<1>))
        }
        (Isa::Avx2 | Isa::Avx2Int8, Half::BF16) => {
            Some((16, avx2::bf16_rows::<4>, avx2::bf16_rows::<1>))
        }
        // Short rows on AVX-512 hosts: one at a time (`LONG_ROW`), below.
        _ => None,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some((multiple, four, one)) = simd {
        let done = inp - inp % multiple;
        let mut i = 0;
        while i < y.len() {
            let wp = row(i).as_ptr();
            // SAFETY: the Avx512 ISAs are only detected with AVX-512F, AVX2,
            // FMA and F16C, the Avx2 ones with AVX2, FMA and F16C; rows
            // i..i + 4 (or i) lie inside `data` (asserted above).
            if i + 4 <= y.len() {
                let block = unsafe { four(wp, inp, done, x) };
                for (k, d) in block.into_iter().enumerate() {
                    y[i + k] = d + tail(i + k, done);
                }
                i += 4;
            } else {
                y[i] = unsafe { one(wp, inp, done, x) }[0] + tail(i, done);
                i += 1;
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
        for (i, y) in y.iter_mut().enumerate() {
            // SAFETY: the Avx512 ISAs are only detected with AVX2, FMA and
            // F16C.
            *y = unsafe {
                match kind {
                    Half::F16 => avx2::f16_row(row(i), x),
                    Half::BF16 => avx2::bf16_row(row(i), x),
                }
            };
        }
        return;
    }
    for (i, y) in y.iter_mut().enumerate() {
        let mut acc = [0.0f32; 8];
        for (k, (&w, &xv)) in row(i).iter().zip(x).enumerate() {
            acc[k % 8] += half_to_f32(w, kind) * xv;
        }
        *y = acc.iter().sum();
    }
}

/// `R` rows of 16-bit floats from `wp` (row stride, values per row)
/// dotted with `x`: the SIMD kernels of [`half_rows`].
#[cfg(target_arch = "x86_64")]
type HalfRows<const R: usize> = unsafe fn(*const u16, usize, usize, &[f32]) -> [f32; R];

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // rows index several arrays at once
mod avx2_int8;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // rows index several arrays at once
mod avx512;
pub mod q8;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // rows index several arrays at once
mod vnni;
