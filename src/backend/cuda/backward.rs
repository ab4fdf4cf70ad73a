//! [`Grad`] for CUDA: the backward ops of the sensitivity pass.
//!
//! On the device: `rope_backward` (the forward `rope_f32` with negated
//! inverse frequencies: sin is odd, so this is the rotation by minus the
//! angle), `gated_backward`, `rms_norm_backward` and `linear_backward`
//! (dense f32 or f16 weights; packed weights are an invalid-input error,
//! as on the CPU) in `kernels/backward.cu`.
//!
//! Host fallbacks (download, the CPU reference of `backend/backward.rs`,
//! upload), documented as such: `cross_entropy` (O(rows x vocab) once per
//! sample) and `attention_backward` (not yet a kernel).

use cudarc::driver::PushKernelArg;

use super::{grid_stride, int, per_row, Ctx, Cuda, CudaTensor, CudaWeight};
use crate::backend::backward::Grad;
use crate::backend::cpu::Cpu;
use crate::backend::{act_code, AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};

/// backward.cu: BW_THREADS, and the block of rms_norm_backward_f32.
const BW_THREADS: u32 = 256;

fn invalid(op: &str, msg: String) -> Error {
    Error::invalid(format!("cuda {op}: {msg}"))
}

impl Grad for Cuda {
    fn linear_backward(&self, dy: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        let (out, inp) = w.shape();
        if w.is_packed() {
            return Err(Error::invalid(
                "cuda linear_backward: needs an unquantized model (dense weights), found packed \
                 weights",
            ));
        }
        if dy.cols != out {
            return Err(invalid(
                "linear_backward",
                format!("dy [{}, {}] for a weight [{out}, {inp}]", dy.rows, dy.cols),
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

    fn rms_norm_backward(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        dy: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        if (dy.rows, dy.cols) != (rows, c) || w.numel() != c {
            return Err(invalid(
                "rms_norm_backward",
                format!(
                    "x [{rows}, {c}], w {}, dy [{}, {}]",
                    w.numel(),
                    dy.rows,
                    dy.cols
                ),
            ));
        }
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

    fn rope_backward(
        &self,
        dy: &CudaTensor,
        heads: usize,
        rope: &Rope,
        pos0: usize,
    ) -> Result<CudaTensor> {
        let neg = Rope {
            inv_freq: rope.inv_freq.iter().map(|f| -f).collect(),
            head_dim: rope.head_dim,
        };
        self.rope(dy, heads, &neg, pos0)
    }

    fn gated_backward(
        &self,
        gate: &CudaTensor,
        up: &CudaTensor,
        dy: &CudaTensor,
        act: Act,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let dims = |t: &CudaTensor| (t.rows, t.cols);
        if dims(gate) != dims(up) || dims(up) != dims(dy) {
            return Err(invalid(
                "gated_backward",
                format!(
                    "gate {:?}, up {:?}, dy {:?}",
                    dims(gate),
                    dims(up),
                    dims(dy)
                ),
            ));
        }
        let (rows, cols) = dims(gate);
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

    /// Host fallback: downloads q, k, v and dout, runs the CPU reference
    /// and uploads dq, dk, dv.
    fn attention_backward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        shape: AttnShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let (dq, dk, dv) = Cpu.attention_backward(
            &self.download(q)?,
            &self.download(k)?,
            &self.download(v)?,
            &self.download(dout)?,
            shape,
        )?;
        Ok((self.upload(&dq)?, self.upload(&dk)?, self.upload(&dv)?))
    }

    /// Host fallback: downloads the logits, runs the CPU reference (f64
    /// log-sum-exp) and uploads the gradient; O(rows x vocab), once per
    /// sample.
    fn cross_entropy(&self, logits: &CudaTensor, labels: &[u32]) -> Result<(f64, CudaTensor)> {
        let (loss, grad) = Cpu.cross_entropy(&self.download(logits)?, labels)?;
        Ok((loss, self.upload(&grad)?))
    }
}
