//! The CPU's linear layer, `y [rows, out] = x [rows, in] . W^T (+ b)`, for
//! every form a weight takes on the CPU ([`CpuWeight`]): f32 (calibration's
//! own weights), f16 / bf16 as the checkpoint stores them (used from the
//! mapped file, converted as they are read), and packed codes.
//!
//! - A few rows (decode): the row kernels of `kernels/` per (output, input
//!   row), output rows split over threads. Packed rows are never expanded.
//! - Many rows (prefill, the vision tower, calibration): the `gemm` crate's
//!   f32 GEMM (runtime SIMD dispatch; on a stable compiler its AVX2 + FMA
//!   microkernels). f16, bf16 and packed weights are converted to f32 a
//!   tile of [`TILE`] output rows at a time, so no f32 copy of a whole
//!   matrix is made.
//!
//! [`reference_linear`] is the plain definition every path is tested
//! against; `MBQ_CPU_ISA=scalar` runs the scalar row kernels, the same
//! sums grouped differently.

use half::{bf16, f16};
use rayon::prelude::*;

use super::kernels::{self, Isa, PackedInput};
use super::OutPtr;
use crate::quant::format::PackedLinear;
use crate::store::Store;
use crate::tensor::Tensor;

/// A linear weight `[out, in]` on the CPU.
#[derive(Clone, Debug)]
pub enum CpuWeight {
    /// f32 values (made by calibration and tests; an f32 checkpoint).
    Dense(Tensor),
    /// f16 values as the checkpoint stores them.
    F16 {
        out: usize,
        inp: usize,
        data: Store<f16>,
    },
    /// bf16 values as the checkpoint stores them.
    BF16 {
        out: usize,
        inp: usize,
        data: Store<bf16>,
    },
    /// Packed codes (dequantized a tile at a time for a GEMM, never whole).
    Packed(PackedLinear),
}

impl CpuWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CpuWeight::Dense(t) => (t.shape[0], t.shape[1]),
            CpuWeight::F16 { out, inp, .. } | CpuWeight::BF16 { out, inp, .. } => (*out, *inp),
            CpuWeight::Packed(p) => (p.out, p.inp),
        }
    }

    /// Output row `r` as f32 into `dst` (`in` values).
    pub fn row_f32(&self, r: usize, dst: &mut [f32]) {
        let (_, inp) = self.shape();
        let span = r * inp..(r + 1) * inp;
        match self {
            CpuWeight::Dense(t) => dst.copy_from_slice(&t.data[span]),
            CpuWeight::F16 { data, .. } => {
                use half::slice::HalfFloatSliceExt;
                data[span].convert_to_f32_slice(dst)
            }
            CpuWeight::BF16 { data, .. } => {
                use half::slice::HalfFloatSliceExt;
                data[span].convert_to_f32_slice(dst)
            }
            CpuWeight::Packed(p) => p.dequantize_row(r, dst),
        }
    }

    /// The weight as f32 values (a copy, except for an f32 weight).
    pub fn to_dense(&self) -> std::borrow::Cow<'_, Tensor> {
        match self {
            CpuWeight::Dense(t) => std::borrow::Cow::Borrowed(t),
            w => {
                let (out, inp) = w.shape();
                let mut data = vec![0.0f32; out * inp];
                data.par_chunks_mut(inp.max(1))
                    .enumerate()
                    .for_each(|(r, row)| w.row_f32(r, row));
                std::borrow::Cow::Owned(Tensor {
                    shape: vec![out, inp],
                    data,
                })
            }
        }
    }
}

/// From this many rows on, the product is a GEMM (below, row kernels).
pub const GEMM_ROWS: usize = 8;
/// Output rows converted to f32 at a time for the GEMM of a non-f32
/// weight (64 rows of 3,584 inputs: 0.9 MB, about one core's L2).
pub const TILE: usize = 64;
/// Output rows per task of the row kernels, at least.
const MIN_CHUNK: usize = 16;

/// `y [rows, out] = x . W^T (+ b)` (shapes checked by the caller).
pub fn linear(x: &[f32], rows: usize, w: &CpuWeight, b: Option<&[f32]>) -> Vec<f32> {
    linear_with(Isa::detect(), x, rows, w, b)
}

/// [`linear`] with the kernels of `isa` (tests run each).
pub fn linear_with(isa: Isa, x: &[f32], rows: usize, w: &CpuWeight, b: Option<&[f32]>) -> Vec<f32> {
    let out = w.shape().0;
    let mut y = if rows >= GEMM_ROWS && w.shape().1 > 0 {
        gemm_linear(isa, x, rows, w)
    } else {
        rows_linear(isa, x, rows, w)
    };
    if let Some(b) = b {
        for row in y.chunks_exact_mut(out.max(1)) {
            row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
        }
    }
    y
}

/// Row kernels: each task computes a chunk of outputs for every input row
/// (a few chunks a thread: a task per few rows would cost more in
/// scheduling than a short row takes).
fn rows_linear(isa: Isa, x: &[f32], rows: usize, w: &CpuWeight) -> Vec<f32> {
    let (out, inp) = w.shape();
    let xr: Vec<&[f32]> = (0..rows).map(|r| &x[r * inp..(r + 1) * inp]).collect();
    let prepared: Vec<PackedInput> = match w {
        CpuWeight::Packed(p) => xr.iter().map(|x| PackedInput::new(isa, p, x)).collect(),
        _ => Vec::new(),
    };
    let chunk = out
        .div_ceil(4 * rayon::current_num_threads())
        .next_multiple_of(MIN_CHUNK);
    let mut yt = vec![0.0f32; out * rows];
    yt.par_chunks_mut((chunk * rows).max(1))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(scratch, ys), (ci, block)| {
                let o0 = ci * chunk;
                let n = block.len() / rows.max(1);
                ys.resize(n, 0.0f32);
                for r in 0..rows {
                    match w {
                        CpuWeight::Packed(p) => {
                            kernels::packed_rows(p, o0, &prepared[r], ys, scratch)
                        }
                        CpuWeight::F16 { data, .. } => {
                            kernels::f16_rows(isa, data, inp, o0, xr[r], ys)
                        }
                        CpuWeight::BF16 { data, .. } => {
                            kernels::bf16_rows(isa, data, inp, o0, xr[r], ys)
                        }
                        CpuWeight::Dense(t) => {
                            for (i, y) in ys.iter_mut().enumerate() {
                                let span = (o0 + i) * inp..(o0 + i + 1) * inp;
                                *y = super::dot(&t.data[span], xr[r]);
                            }
                        }
                    }
                    for (i, y) in ys.iter().enumerate() {
                        block[i * rows + r] = *y;
                    }
                }
            },
        );
    transpose(&yt, out, rows)
}

/// `dst [m, n]` (row stride `dst_rs`) = `a [m, k]` . `bt [n, k]`^T, one
/// thread unless `parallel`.
///
/// # Safety
/// `dst` must be valid for `m` rows of stride `dst_rs` and `n` columns,
/// not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_nt(
    dst: *mut f32,
    dst_rs: usize,
    a: &[f32],
    m: usize,
    bt: &[f32],
    n: usize,
    k: usize,
    parallel: bool,
) {
    debug_assert!(a.len() >= m * k && bt.len() >= n * k);
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a.as_ptr(),
        1,
        k as isize,
        bt.as_ptr(),
        k as isize,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// The GEMM: in one call for an f32 weight, else a tile of output rows at
/// a time, converted to f32, tiles over threads.
fn gemm_linear(isa: Isa, x: &[f32], rows: usize, w: &CpuWeight) -> Vec<f32> {
    let (out, inp) = w.shape();
    let mut y = vec![0.0f32; rows * out];
    if let CpuWeight::Dense(t) = w {
        // SAFETY: y is [rows, out], written by this call only.
        unsafe { gemm_nt(y.as_mut_ptr(), out, x, rows, &t.data, out, inp, true) };
        return y;
    }
    // Packed tiles are dequantized in the SIMD kernels' input order; the
    // activations follow it.
    let xo: std::borrow::Cow<[f32]> = match w {
        CpuWeight::Packed(p) if kernels::dequant_reordered(isa, p) => x
            .par_chunks(inp)
            .flat_map_iter(|r| kernels::gemm_order(isa, p, r))
            .collect::<Vec<f32>>()
            .into(),
        _ => x.into(),
    };
    let dst = OutPtr(y.as_mut_ptr());
    (0..out.div_ceil(TILE)).into_par_iter().for_each_init(
        || (vec![0.0f32; TILE * inp], Vec::new()),
        |(buf, scratch), t| {
            let o0 = t * TILE;
            let n = TILE.min(out - o0);
            for (i, row) in buf.chunks_exact_mut(inp).take(n).enumerate() {
                match w {
                    CpuWeight::Packed(p) => kernels::dequant_row(isa, p, o0 + i, row, scratch),
                    w => w.row_f32(o0 + i, row),
                }
            }
            // SAFETY: columns o0..o0 + n of y belong to this task alone.
            unsafe { gemm_nt(dst.at(o0), out, &xo, rows, buf, n, inp, false) };
        },
    );
    y
}

/// `[a, b]` -> `[b, a]`.
fn transpose(m: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a * b];
    for i in 0..a {
        for j in 0..b {
            t[j * a + i] = m[i * b + j];
        }
    }
    t
}

/// The definition: every row of `W` as f32 (`(q - z) s` for packed codes,
/// the stored value for f16 / bf16), dotted with every input row in plain
/// sequential f32 sums. Slow; tests compare every path with it.
pub fn reference_linear(x: &[f32], rows: usize, w: &CpuWeight, b: Option<&[f32]>) -> Vec<f32> {
    let (out, inp) = w.shape();
    let mut y = vec![0.0f32; rows * out];
    let mut wr = vec![0.0f32; inp];
    for o in 0..out {
        w.row_f32(o, &mut wr);
        for r in 0..rows {
            let s: f32 = wr
                .iter()
                .zip(&x[r * inp..(r + 1) * inp])
                .map(|(a, b)| a * b)
                .sum();
            y[r * out + o] = s + b.map_or(0.0, |b| b[o]);
        }
    }
    y
}
