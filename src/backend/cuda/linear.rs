//! The products of the CUDA backend: `y [rows, out] = x [rows, in] . w^T (+ b)`.
//!
//! - Up to [`GEMV_MAX_ROWS`] = 8 rows (decode, `mbq serve` decoding several
//!   sequences per step): one launch of `gemv_f16` (f16 weights) or the
//!   fused `gemv_packed_w{bits}_g{group}` (packed weights, groups 32 / 64 /
//!   128) for all m rows: each block computes its 8 outputs for every row,
//!   reading each weight word once (x `[m, in]`, y `[m, out]`, m a kernel
//!   argument up to the kernels' MAXM = 8), f32 accumulation in the
//!   one-row order for each row.
//! - More rows (prefill), dense f32 weights, and packed groups the GEMV has
//!   no kernel for: the weight as f32 (`f16_to_f32` / `dequant_packed_f32`
//!   into a scratch buffer, exactly the CPU's values), then an f32 SGEMM
//!   with f32 accumulation: cuBLAS (default math mode: no TF32), or
//!   `gemm_f32` without cuBLAS; the bias is added after cuBLAS by
//!   `bias_rows_f32`, inside `gemm_f32`.
//!
//! All paths compute in f32 on exact weight values, so they match the CPU
//! reference up to f32 summation order (tests/backend_ops, `linear` tolerance).
//!
//! The scale search's `linear_half` (f16 activations and f16 weights, f32
//! sums) is cuBLAS's `cublasGemmEx` on the f16 buffers with f32 output
//! (the tensor cores), or both expanded to f32 and `gemm_f32` without it.

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{err, grid_stride, int, Ctx, Cuda, CudaHalf, CudaTensor, CudaWeight, GEMV_MAX_ROWS};
use crate::backend::cuda_kernels::gemv_packed_entry;
use crate::error::{Error, Result};

/// Rows of W per block of gemv_f16.cu / gemv_packed.cu (GEMV_*_ROWS) and
/// their block size.
const GEMV_ROWS_PER_BLOCK: usize = 8;
/// Most rows of x one GEMV launch takes (MAXM of gemv_f16.cu /
/// gemv_packed.cu).
const GEMV_MAXM: usize = 8;
const _: () = assert!(GEMV_MAX_ROWS <= GEMV_MAXM);
const GEMV_THREADS: u32 = 128;
const GEMM_TILE: usize = 16;

enum GemvWeight<'a> {
    F16(&'a CudaSlice<u16>),
    Packed(&'a CudaSlice<u32>, &'a CudaSlice<u32>),
}

impl Cuda {
    pub(crate) fn linear_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (out, inp) = w.shape();
        if x.cols != inp {
            return Err(Error::invalid(format!(
                "cuda linear: input has {} features, weight [{out}, {inp}] expects {inp}",
                x.cols
            )));
        }
        if let Some(b) = b {
            if b.numel() != out {
                return Err(Error::invalid(format!(
                    "cuda linear: bias of {} for {out} outputs",
                    b.numel()
                )));
            }
        }
        let rows = x.rows;
        let mut y = self.tensor(rows, out)?;
        if rows == 0 || out == 0 {
            return Ok(y);
        }
        match w {
            CudaWeight::F16 { w, .. } if rows <= GEMV_MAX_ROWS => {
                self.gemv("gemv_f16", x, GemvWeight::F16(w), b, &mut y)?;
                return Ok(y);
            }
            CudaWeight::Packed {
                q, sz, bits, group, ..
            } if rows <= GEMV_MAX_ROWS => {
                if let Ok(entry) = gemv_packed_entry(*bits, *group) {
                    self.gemv(&entry, x, GemvWeight::Packed(q, sz), b, &mut y)?;
                    return Ok(y);
                }
            }
            _ => {}
        }
        let scratch;
        let wf: &CudaSlice<f32> = match w {
            CudaWeight::F32 { w, .. } => w,
            CudaWeight::F16 { w, .. } => {
                scratch = self.expand_f16(w, out * inp)?;
                &scratch
            }
            CudaWeight::Packed {
                q, sz, bits, group, ..
            } => {
                scratch = self.dequantize(q, sz, out, inp, *bits, *group)?;
                &scratch
            }
        };
        self.sgemm(x, wf, b, &mut y)?;
        Ok(y)
    }

    /// [`crate::backend::search::Search::linear_half`]: cuBLAS's GEMM on
    /// f16 operands with f32 output and f32 accumulation
    /// (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`: the tensor cores), or, without
    /// cuBLAS, both operands expanded to f32 (exact) and `gemm_f32`.
    pub(crate) fn linear_half_impl(
        &self,
        x: &CudaHalf,
        w: &CudaWeight,
        b: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let CudaWeight::F16 { w, out, inp } = w else {
            return Err(Error::invalid(
                "cuda linear_half: needs an f16 weight (weight_to_half)",
            ));
        };
        let (rows, out, inp) = (x.rows, *out, *inp);
        let mut y = self.tensor(rows, out)?;
        if rows == 0 || out == 0 {
            return Ok(y);
        }
        match &self.blas {
            Some(blas) if inp > 0 => {
                let (r_i, i_i, o_i) = (int(rows, "rows")?, int(inp, "in")?, int(out, "out")?);
                let (alpha, beta) = (1.0f32, 0.0f32);
                let blas = blas.lock().map_err(|_| err("cuBLAS handle poisoned"))?;
                let stream = self.stream();
                let (wp, _w_rec) = w.device_ptr(stream);
                let (xp, _x_rec) = x.data.device_ptr(stream);
                let (yp, _y_rec) = y.data.device_ptr_mut(stream);
                // Column-major view, as `sgemm`: y^T [out, rows] = W [out, in]
                // (read transposed) . x^T [in, rows].
                // SAFETY: w holds out * in f16 values, x rows * in, y rows *
                // out f32; the pointers live while the records do.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        o_i,
                        r_i,
                        i_i,
                        (&alpha) as *const f32 as *const _,
                        wp as *const _,
                        cudaDataType_t::CUDA_R_16F,
                        i_i,
                        xp as *const _,
                        cudaDataType_t::CUDA_R_16F,
                        i_i,
                        (&beta) as *const f32 as *const _,
                        yp as *mut _,
                        cudaDataType_t::CUDA_R_32F,
                        o_i,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .ctx("cublasGemmEx (f16 in, f32 out)")?;
                drop((_w_rec, _x_rec, _y_rec));
                if let Some(b) = b {
                    self.add_bias_rows(&mut y, b)?;
                }
            }
            _ => {
                let xf = CudaTensor {
                    data: self.expand_f16(&x.data, rows * inp)?,
                    rows,
                    cols: inp,
                };
                let wf = self.expand_f16(w, out * inp)?;
                self.sgemm(&xf, &wf, b, &mut y)?;
            }
        }
        Ok(y)
    }

    /// `y[r, c] += b[c]` (gemm.cu `bias_rows_f32`).
    fn add_bias_rows(&self, y: &mut CudaTensor, b: &CudaTensor) -> Result<()> {
        let (r_i, o_i) = (int(y.rows, "rows")?, int(y.cols, "out")?);
        let f = self.function("bias_rows_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&mut y.data).arg(&b.data).arg(&r_i).arg(&o_i);
        // SAFETY: gemm.cu bias_rows_f32: y [rows, out], bias [out].
        unsafe { l.launch(grid_stride(y.rows * y.cols, 256)) }.ctx("bias_rows_f32")?;
        Ok(())
    }

    /// One GEMV launch for all rows of x (1..=[`GEMV_MAXM`]): gemv_f16
    /// takes (w, x, bias, y, in, out, m), gemv_packed (x, q, sz, bias, y, in,
    /// out, m).
    fn gemv(
        &self,
        entry: &str,
        x: &CudaTensor,
        w: GemvWeight<'_>,
        b: Option<&CudaTensor>,
        y: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, inp, out) = (x.rows, x.cols, y.cols);
        if rows == 0 || rows > GEMV_MAXM {
            return Err(err(format!(
                "{entry}: {rows} rows, the GEMV takes 1 to {GEMV_MAXM}"
            )));
        }
        let f = self.function(entry)?;
        let (in_i, out_i) = (int(inp, "linear in")?, int(out, "linear out")?);
        let m_i = rows as i32;
        let null = 0u64;
        let cfg = LaunchConfig {
            grid_dim: (out.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream().launch_builder(&f);
        match w {
            GemvWeight::F16(w) => l.arg(w).arg(&x.data),
            GemvWeight::Packed(q, sz) => l.arg(&x.data).arg(q).arg(sz),
        };
        match b {
            Some(b) => l.arg(&b.data),
            None => l.arg(&null),
        };
        l.arg(&mut y.data).arg(&in_i).arg(&out_i).arg(&m_i);
        // SAFETY: the arguments of gemv_f16.cu / gemv_packed.cu in order;
        // x holds m = rows rows of `in` values, y m rows of `out`, the weight
        // [out, in] (shapes checked by linear_impl), 1 <= m <= MAXM (above);
        // in % group == 0 for packed weights (format::check_shape).
        unsafe { l.launch(cfg) }.ctx(entry)?;
        Ok(())
    }

    /// An f16 weight of `n` values as f32.
    pub(crate) fn expand_f16(&self, w: &CudaSlice<u16>, n: usize) -> Result<CudaSlice<f32>> {
        let mut dst = self.zeros(n)?;
        let f = self.function("f16_to_f32")?;
        let n_i = n as i64;
        let mut l = self.stream().launch_builder(&f);
        l.arg(w).arg(&mut dst).arg(&n_i);
        // SAFETY: convert.cu f16_to_f32: src and dst hold n values.
        unsafe { l.launch(grid_stride(n, 256)) }.ctx("f16_to_f32")?;
        Ok(dst)
    }

    /// A packed weight as f32 `[out, in]`.
    fn dequantize(
        &self,
        q: &CudaSlice<u32>,
        sz: &CudaSlice<u32>,
        out: usize,
        inp: usize,
        bits: u32,
        group: usize,
    ) -> Result<CudaSlice<f32>> {
        if !matches!(bits, 3 | 4 | 8) || !group.is_multiple_of(32) || !inp.is_multiple_of(group) {
            return Err(err(format!(
                "packed weight of {bits} bits in groups of {group} over {inp} inputs: \
                 dequant_packed_f32 needs bits 3, 4 or 8 and groups of a multiple of 32"
            )));
        }
        let mut dst = self.zeros(out * inp)?;
        let f = self.function("dequant_packed_f32")?;
        let (o_i, i_i) = (int(out, "out")?, int(inp, "in")?);
        let (b_i, g_i) = (bits as i32, group as i32);
        let mut l = self.stream().launch_builder(&f);
        l.arg(q)
            .arg(sz)
            .arg(&mut dst)
            .arg(&o_i)
            .arg(&i_i)
            .arg(&b_i)
            .arg(&g_i);
        // SAFETY: convert.cu dequant_packed_f32; q / sz as packed_weight uploaded them.
        unsafe { l.launch(grid_stride(out * inp, 256)) }.ctx("dequant_packed_f32")?;
        Ok(dst)
    }

    /// y = x . w^T (+ b) in f32, w `[out, in]` f32.
    fn sgemm(
        &self,
        x: &CudaTensor,
        w: &CudaSlice<f32>,
        b: Option<&CudaTensor>,
        y: &mut CudaTensor,
    ) -> Result<()> {
        let (rows, inp, out) = (x.rows, x.cols, y.cols);
        let (r_i, i_i, o_i) = (int(rows, "rows")?, int(inp, "in")?, int(out, "out")?);
        if let Some(blas) = &self.blas {
            if inp > 0 {
                // Column-major view: y^T [out, rows] = W [out, in] . x^T [in, rows],
                // W being the row-major [out, in] buffer read transposed.
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: o_i,
                    n: r_i,
                    k: i_i,
                    alpha: 1.0f32,
                    lda: i_i,
                    ldb: i_i,
                    beta: 0.0f32,
                    ldc: o_i,
                };
                let blas = blas.lock().map_err(|_| err("cuBLAS handle poisoned"))?;
                // SAFETY: w holds out * in values, x rows * in, y rows * out.
                unsafe { blas.gemm(cfg, w, &x.data, &mut y.data) }.ctx("cublasSgemm")?;
            }
            if let Some(b) = b {
                self.add_bias_rows(y, b)?;
            }
            return Ok(());
        }
        let f = self.function("gemm_f32")?;
        let null = 0u64;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data).arg(w);
        match b {
            Some(b) => l.arg(&b.data),
            None => l.arg(&null),
        };
        l.arg(&mut y.data).arg(&r_i).arg(&o_i).arg(&i_i);
        let cfg = LaunchConfig {
            grid_dim: (
                out.div_ceil(GEMM_TILE) as u32,
                rows.div_ceil(GEMM_TILE) as u32,
                1,
            ),
            block_dim: (GEMM_TILE as u32, GEMM_TILE as u32, 1),
            shared_mem_bytes: 0,
        };
        if rows.div_ceil(GEMM_TILE) > 65535 {
            return Err(err(format!("gemm_f32: {rows} rows exceed the grid")));
        }
        // SAFETY: gemm.cu gemm_f32: x [rows, in], w [out, in], bias [out] or NULL, y [rows, out].
        unsafe { l.launch(cfg) }.ctx("gemm_f32")?;
        Ok(())
    }
}
