//! [`Search`] for CUDA: a grid point of the scale search stays on the
//! device (`kernels/search.cu`).
//!
//! - `fake_quant`: the layer's dense weight (f32 or f16 on the device) with
//!   its input channels scaled by `s`, fake-quantized with the reference's
//!   f16 roundings (the same codes, bit-exact), into a new f32 weight. Weight
//!   groups: one warp per (row, group); W4A8's per-channel INT4: one block
//!   per row. A packed weight is an invalid-input error (the search runs on
//!   the unquantized model).
//! - `loss_terms`: one block per row sums `dist(want - got)` over the
//!   columns into a row buffer, then one block sums the rows under the
//!   caption and vision masks and over all rows: `[1, 3]`, no float atomics,
//!   no host round trip. `abs_terms` is the same with `got` = 0
//!   (`abs_rows_f32`).
//! - `abs_col_stats`: one thread per column adds the rows' |x| in order to
//!   a compensated f32 sum (hi + lo) and a max, continuing from an earlier
//!   result when there is one.
//! - `to_half` / `half_to_f32`: convert.cu's `f32_to_f16` (round to nearest
//!   even) and `f16_to_f32`, one thread per value; `weight_to_half` the
//!   same over a weight, `linear_half` the f16 GEMM of `linear.rs`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{grid_stride, int, per_row, Ctx, Cuda, CudaHalf, CudaTensor, CudaWeight};
use crate::backend::{Distance, Search};
use crate::error::{Error, Result};
use crate::quant::pseudo::FakeQuant;

/// search.cu: SEARCH_THREADS, the block of every kernel there (a multiple
/// of 32: fake_quant_group runs one warp per group).
const SEARCH_THREADS: u32 = 256;
/// Threads of a warp: fake_quant_group's threads per weight group.
const WARP: usize = 32;
/// Threads per block of abs_col_stats (one column each): small, so that a
/// few thousand columns still spread over many blocks.
const STATS_THREADS: u32 = 64;

/// The buffer of a dense weight: what fake_quant reads.
enum Dense<'a> {
    F32(&'a CudaSlice<f32>),
    /// f16 bits.
    F16(&'a CudaSlice<u16>),
}

impl Cuda {
    /// The first `n` values of `src` rounded to f16 (convert.cu
    /// `f32_to_f16`: nearest even, saturating).
    fn f32_to_f16(&self, src: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let mut data = self
            .stream()
            .alloc_zeros::<u16>(n.max(1))
            .ctx("cuMemAlloc")?;
        if n > 0 {
            let f = self.function("f32_to_f16")?;
            let n_i = n as i64;
            let mut l = self.stream().launch_builder(&f);
            l.arg(src).arg(&mut data).arg(&n_i);
            // SAFETY: convert.cu f32_to_f16: src holds at least n values
            // (a tensor's buffer is never shorter than rows * cols), dst n.
            unsafe { l.launch(grid_stride(n, 256)) }.ctx("f32_to_f16")?;
        }
        Ok(data)
    }
}

/// fake_quant of a packed weight: the search needs the unquantized values.
fn packed_input() -> Error {
    Error::invalid(
        "cuda fake_quant: needs a dense weight (f32 or f16), found a packed one; the scale \
         search runs on the unquantized model",
    )
}

impl Search for Cuda {
    type Half = CudaHalf;

    fn to_half(&self, x: &CudaTensor) -> Result<CudaHalf> {
        Ok(CudaHalf {
            data: self.f32_to_f16(&x.data, x.numel())?,
            rows: x.rows,
            cols: x.cols,
        })
    }

    fn half_dims(&self, h: &CudaHalf) -> (usize, usize) {
        (h.rows, h.cols)
    }

    fn weight_to_half(&self, w: &CudaWeight) -> Result<CudaWeight> {
        let (out, inp) = w.shape();
        let w = match w {
            CudaWeight::F32 { w, .. } => self.f32_to_f16(w, out * inp)?,
            CudaWeight::F16 { w, .. } => self.stream().clone_dtod(w).ctx("cuMemcpyDtoD")?,
            CudaWeight::Packed { .. } => {
                return Err(Error::invalid(
                    "cuda weight_to_half: needs a dense weight, found a packed one",
                ))
            }
        };
        Ok(CudaWeight::F16 { w, out, inp })
    }

    fn linear_half_unchecked(
        &self,
        x: &CudaHalf,
        w: &CudaWeight,
        b: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.linear_half_impl(x, w, b)
    }

    fn half_to_f32(&self, h: &CudaHalf) -> Result<CudaTensor> {
        let n = h.rows * h.cols;
        let data = if n > 0 {
            self.expand_f16(&h.data, n)?
        } else {
            self.zeros(0)?
        };
        Ok(CudaTensor {
            data,
            rows: h.rows,
            cols: h.cols,
        })
    }

    fn fake_quant_unchecked(
        &self,
        w: &CudaWeight,
        s: &CudaTensor,
        q: FakeQuant,
    ) -> Result<CudaWeight> {
        let (out, inp) = w.shape();
        let src = match w {
            CudaWeight::F32 { w, .. } => Dense::F32(w),
            CudaWeight::F16 { w, .. } => Dense::F16(w),
            CudaWeight::Packed { .. } => return Err(packed_input()),
        };
        let mut y = self.zeros(out * inp)?;
        if out == 0 || inp == 0 {
            return Ok(CudaWeight::F32 { w: y, out, inp });
        }
        let (o_i, i_i) = (int(out, "fake_quant out")?, int(inp, "fake_quant in")?);
        let kind = match src {
            Dense::F32(_) => "f32",
            Dense::F16(_) => "f16",
        };
        let (entry, cfg, group) = match q {
            FakeQuant::Group { bits, group_size } => (
                format!("fake_quant_group_{kind}"),
                // One warp per group of group_size inputs (a multiple of 32
                // dividing inp, checked by the trait).
                grid_stride(out * (inp / group_size) * WARP, SEARCH_THREADS),
                Some((bits as i32, int(group_size, "fake_quant group size")?)),
            ),
            FakeQuant::W4PerChannel => (
                format!("fake_quant_w4_{kind}"),
                per_row(out, SEARCH_THREADS),
                None,
            ),
        };
        let f = self.function(&entry)?;
        let mut l = self.stream().launch_builder(&f);
        match src {
            Dense::F32(w) => l.arg(w),
            Dense::F16(w) => l.arg(w),
        };
        l.arg(&s.data).arg(&mut y).arg(&o_i).arg(&i_i);
        if let Some((bits, group)) = &group {
            l.arg(bits).arg(group);
        }
        // SAFETY: search.cu fake_quant_{group,w4}_{f32,f16}: w [out, in]
        // (f32 or f16 bits), s at least in values (the trait checked it),
        // y [out, in] f32, a fresh buffer.
        unsafe { l.launch(cfg) }.ctx(&entry)?;
        Ok(CudaWeight::F32 { w: y, out, inp })
    }

    fn loss_terms_unchecked(
        &self,
        want: &CudaTensor,
        got: &CudaTensor,
        masks: &CudaTensor,
        dist: Distance,
    ) -> Result<CudaTensor> {
        let (rows, cols) = (want.rows, want.cols);
        let mut terms = self.tensor(1, 3)?;
        if rows == 0 {
            return Ok(terms);
        }
        let (r_i, c_i) = (int(rows, "loss_terms rows")?, int(cols, "loss_terms cols")?);
        let code = dist.code() as i32;
        let mut err = self.zeros(rows)?;
        let f = self.function("loss_rows_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&want.data)
            .arg(&got.data)
            .arg(&mut err)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&code);
        // SAFETY: search.cu loss_rows_f32: want, got [rows, cols] (the trait
        // checked equal shapes), err [rows]; one block per row.
        unsafe { l.launch(per_row(rows, SEARCH_THREADS)) }.ctx("loss_rows_f32")?;
        self.masked_terms(&err, masks, &mut terms)?;
        Ok(terms)
    }

    fn abs_col_stats_unchecked(
        &self,
        x: &CudaTensor,
        acc: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (rows, cols) = (x.rows, x.cols);
        let mut out = self.tensor(3, cols)?;
        if cols == 0 {
            return Ok(out);
        }
        let (r_i, c_i) = (
            int(rows, "abs_col_stats rows")?,
            int(cols, "abs_col_stats cols")?,
        );
        let entry = match acc {
            Some(_) => "abs_col_stats_acc_f32",
            None => "abs_col_stats_f32",
        };
        let f = self.function(entry)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data);
        if let Some(a) = acc {
            l.arg(&a.data);
        }
        l.arg(&mut out.data).arg(&r_i).arg(&c_i);
        // SAFETY: search.cu abs_col_stats{,_acc}_f32: x [rows, cols], acc
        // [3, cols] (the trait checked it), out [3, cols], a fresh buffer;
        // a grid-stride loop over the columns.
        unsafe { l.launch(grid_stride(cols, STATS_THREADS)) }.ctx(entry)?;
        Ok(out)
    }

    fn abs_terms_unchecked(&self, x: &CudaTensor, masks: &CudaTensor) -> Result<CudaTensor> {
        let (rows, cols) = (x.rows, x.cols);
        let mut terms = self.tensor(1, 3)?;
        if rows == 0 {
            return Ok(terms);
        }
        let (r_i, c_i) = (int(rows, "abs_terms rows")?, int(cols, "abs_terms cols")?);
        let mut err = self.zeros(rows)?;
        let f = self.function("abs_rows_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data).arg(&mut err).arg(&r_i).arg(&c_i);
        // SAFETY: search.cu abs_rows_f32: x [rows, cols], err [rows]; one
        // block per row.
        unsafe { l.launch(per_row(rows, SEARCH_THREADS)) }.ctx("abs_rows_f32")?;
        self.masked_terms(&err, masks, &mut terms)?;
        Ok(terms)
    }
}

impl Cuda {
    /// loss_terms_f32: `terms` (`[1, 3]`) from the per-row sums `err` (one
    /// value a row of `masks`, written earlier on the same stream).
    fn masked_terms(
        &self,
        err: &CudaSlice<f32>,
        masks: &CudaTensor,
        terms: &mut CudaTensor,
    ) -> Result<()> {
        let r_i = int(masks.rows, "loss_terms rows")?;
        let f = self.function("loss_terms_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(err).arg(&masks.data).arg(&mut terms.data).arg(&r_i);
        // SAFETY: search.cu loss_terms_f32: err [rows] written by a launch
        // before on the same stream, masks [rows, 2] (checked by the trait),
        // terms 3 values; one block.
        unsafe { l.launch(per_row(1, SEARCH_THREADS)) }.ctx("loss_terms_f32")?;
        Ok(())
    }
}
