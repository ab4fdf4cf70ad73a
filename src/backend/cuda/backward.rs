//! [`Grad`] for CUDA: the backward ops of the sensitivity pass.
//!
//! On the device: `rope_backward` (the forward `rope_f32` with negated
//! inverse frequencies: sin is odd, so this is the rotation by minus the
//! angle), `gated_backward`, `rms_norm_backward` and `linear_backward`
//! (dense f32 or f16 weights; packed weights are an invalid-input error,
//! as on the CPU) in `kernels/backward.cu`.
//!
//! `attention_backward` runs two kernels of backward.cu through a
//! `[heads, n, n]` scratch (no float atomics), or the host fallback when
//! that scratch would be over [`ATTN_BW_MAX_SCRATCH`] values.
//!
//! `cross_entropy` runs `cross_entropy_f32` of backward.cu (one block per
//! row, f32 reductions); only the per-row losses are downloaded.

use cudarc::driver::PushKernelArg;

use super::{grid_stride, int, per_row, Ctx, Cuda, CudaTensor, CudaWeight};
use crate::backend::backward::Grad;
use crate::backend::cpu::Cpu;
use crate::backend::{act_code, AttnShape, Backend};
use crate::config::Act;
use crate::error::{Error, Result};

/// backward.cu: BW_THREADS, and the block of rms_norm_backward_f32 and
/// of the attention backward.
const BW_THREADS: u32 = 256;
/// Most f32 values of each of the attention backward's two scratch
/// buffers (`heads n^2`, 256 MiB); past it the host fallback runs.
const ATTN_BW_MAX_SCRATCH: usize = 1 << 26;

impl Grad for Cuda {
    fn linear_backward_unchecked(&self, dy: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        let (out, inp) = w.shape();
        if w.is_packed() {
            return Err(Error::invalid(
                "cuda linear_backward: needs an unquantized model (dense weights), found packed \
                 weights",
            ));
        }
        let m = dy.rows;
        let mut dx = self.tensor(m, inp)?;
        if m == 0 || inp == 0 {
            return Ok(dx);
        }
        let (m_i, o_i, i_i) = (int(m, "rows")?, int(out, "out")?, int(inp, "in")?);
        let cfg = grid_stride(m * inp, BW_THREADS);
        match w {
            CudaWeight::F32 { w, .. } => {
                let f = self.function("linear_backward_f32")?;
                let mut l = self.stream().launch_builder(&f);
                l.arg(&dy.data)
                    .arg(w)
                    .arg(&mut dx.data)
                    .arg(&m_i)
                    .arg(&o_i)
                    .arg(&i_i);
                // SAFETY: backward.cu linear_backward_f32: dy [m, out], w [out, in], dx [m, in].
                unsafe { l.launch(cfg) }.ctx("linear_backward_f32")?;
            }
            CudaWeight::F16 { w, .. } => {
                let f = self.function("linear_backward_f16")?;
                let mut l = self.stream().launch_builder(&f);
                l.arg(&dy.data)
                    .arg(w)
                    .arg(&mut dx.data)
                    .arg(&m_i)
                    .arg(&o_i)
                    .arg(&i_i);
                // SAFETY: backward.cu linear_backward_f16: as the f32 kernel, w f16 bits.
                unsafe { l.launch(cfg) }.ctx("linear_backward_f16")?;
            }
            CudaWeight::Packed { .. } => unreachable!("rejected above"),
        }
        Ok(dx)
    }

    fn rms_norm_backward_unchecked(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        dy: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        let mut dx = self.tensor(rows, c)?;
        if rows == 0 || c == 0 {
            return Ok(dx);
        }
        let f = self.function("rms_norm_backward_f32")?;
        let (r_i, c_i) = (int(rows, "rows")?, int(c, "cols")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data)
            .arg(&w.data)
            .arg(&dy.data)
            .arg(&mut dx.data)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&eps);
        // SAFETY: backward.cu rms_norm_backward_f32, one block per row.
        unsafe { l.launch(per_row(rows, BW_THREADS)) }.ctx("rms_norm_backward_f32")?;
        Ok(dx)
    }

    fn gated_backward_unchecked(
        &self,
        gate: &CudaTensor,
        up: &CudaTensor,
        dy: &CudaTensor,
        act: Act,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (rows, cols) = (gate.rows, gate.cols);
        let mut dg = self.tensor(rows, cols)?;
        let mut du = self.tensor(rows, cols)?;
        let n = rows * cols;
        if n == 0 {
            return Ok((dg, du));
        }
        let f = self.function("gated_backward_f32")?;
        let (n_i, code) = (int(n, "gated_backward")?, act_code(act) as i32);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&gate.data)
            .arg(&up.data)
            .arg(&dy.data)
            .arg(&mut dg.data)
            .arg(&mut du.data)
            .arg(&n_i)
            .arg(&code);
        // SAFETY: backward.cu gated_backward_f32: every buffer holds n values.
        unsafe { l.launch(grid_stride(n, BW_THREADS)) }.ctx("gated_backward_f32")?;
        Ok((dg, du))
    }

    /// On the device (backward.cu `attention_backward_rows_f32`, then
    /// `_cols_f32`) through a `2 heads n^2` f32 scratch; a host fallback
    /// (download, the CPU reference, upload) past [`ATTN_BW_MAX_SCRATCH`].
    fn attention_backward_unchecked(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        shape: AttnShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale,
        } = shape;
        let n = q.rows;
        let scratch = heads * n * n;
        if scratch > ATTN_BW_MAX_SCRATCH {
            let (dq, dk, dv) = Cpu.attention_backward(
                &self.download(q)?,
                &self.download(k)?,
                &self.download(v)?,
                &self.download(dout)?,
                shape,
            )?;
            return Ok((self.upload(&dq)?, self.upload(&dk)?, self.upload(&dv)?));
        }
        let mut dq = self.tensor(n, q.cols)?;
        let mut dk = self.tensor(n, k.cols)?;
        let mut dv = self.tensor(n, k.cols)?;
        if n == 0 || d == 0 || heads == 0 {
            return Ok((dq, dk, dv));
        }
        let mut pbuf = self.zeros(scratch)?;
        let mut sbuf = self.zeros(scratch)?;
        let (n_i, h_i, kv_i, d_i) = (
            int(n, "attention_backward")?,
            int(heads, "heads")?,
            int(kv_heads, "kv_heads")?,
            int(d, "head_dim")?,
        );
        let f = self.function("attention_backward_rows_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&dout.data)
            .arg(&mut pbuf)
            .arg(&mut sbuf)
            .arg(&mut dq.data)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&kv_i)
            .arg(&d_i)
            .arg(&scale);
        // SAFETY: backward.cu attention_backward_rows_f32, one block per
        // (row, head); P, S hold heads n^2 values.
        unsafe { l.launch(per_row(n * heads, BW_THREADS)) }.ctx("attention_backward_rows_f32")?;
        let f = self.function("attention_backward_cols_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&q.data)
            .arg(&dout.data)
            .arg(&pbuf)
            .arg(&sbuf)
            .arg(&mut dk.data)
            .arg(&mut dv.data)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&kv_i)
            .arg(&d_i)
            .arg(&scale);
        // SAFETY: backward.cu attention_backward_cols_f32, one block per
        // (key row, kv head), after the rows launch on the same stream.
        unsafe { l.launch(per_row(n * kv_heads, BW_THREADS)) }
            .ctx("attention_backward_cols_f32")?;
        Ok((dq, dk, dv))
    }

    /// On the device (backward.cu `cross_entropy_f32`, one block per row,
    /// f32 max and exp-sum): the gradient stays on the device and only the
    /// `rows` per-row losses come back, summed in f64 for the mean.
    fn cross_entropy_unchecked(
        &self,
        logits: &CudaTensor,
        labels: &[u32],
    ) -> Result<(f64, CudaTensor)> {
        let (rows, vocab) = (logits.rows, logits.cols);
        let mut grad = self.tensor(rows, vocab)?;
        let mut losses = self.tensor(rows, 1)?;
        let dlabels = self
            .stream()
            .clone_htod(labels)
            .ctx("upload cross_entropy labels")?;
        let (r_i, v_i) = (int(rows, "rows")?, int(vocab, "vocab")?);
        let f = self.function("cross_entropy_f32")?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&logits.data)
            .arg(&dlabels)
            .arg(&mut grad.data)
            .arg(&mut losses.data)
            .arg(&r_i)
            .arg(&v_i);
        // SAFETY: backward.cu cross_entropy_f32, one block per row: logits
        // and grad hold rows x vocab values, labels and losses rows, every
        // label < vocab (checked by `Grad::cross_entropy`).
        unsafe { l.launch(per_row(rows, BW_THREADS)) }.ctx("cross_entropy_f32")?;
        let sum: f64 = self.download(&losses)?.data.iter().map(|&v| v as f64).sum();
        Ok((sum / rows as f64, grad))
    }
}
