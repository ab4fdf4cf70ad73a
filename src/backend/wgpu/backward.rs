//! [`Grad`] for wgpu: the backward ops of the sensitivity pass.
//!
//! On the device: `rope_backward` (the forward `rope` kernel with negated
//! inverse frequencies: sin is odd, so this is the rotation by minus the
//! angle), `gated_backward`, `rms_norm_backward` and `linear_backward`
//! (dense weights, f32 or f16 pairs) in `shaders/backward.wgsl`.
//!
//! Host fallbacks (download, the CPU reference of `backend/backward.rs`,
//! upload), documented as such: `cross_entropy` (O(rows x vocab) once per
//! sample) and `attention_backward` (a kernel needs dk/dv accumulation
//! across the query heads of a group without float atomics; not yet).

use super::linear::WgpuWeight;
use super::{shape_err, u32_of, Wgpu, WgpuTensor, WG};
use crate::backend::backward::Grad;
use crate::backend::cpu::Cpu;
use crate::backend::{act_code, AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};

impl Grad for Wgpu {
    fn linear_backward(&self, dy: &WgpuTensor, w: &WgpuWeight) -> Result<WgpuTensor> {
        let WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16,
            chunks,
        } = w
        else {
            return Err(Error::invalid(
                "wgpu linear_backward: needs an unquantized model (dense weights), found packed \
                 weights",
            ));
        };
        let (out, inp) = (*out, *inp);
        if dy.cols != out {
            return Err(shape_err(
                "linear_backward",
                format!("dy [{}, {}] for a weight [{out}, {inp}]", dy.rows, dy.cols),
            ));
        }
        let m = dy.rows;
        let dx = self.tensor(m, inp, "linear_backward")?;
        let total = u32_of("linear_backward", m * inp)?;
        if total == 0 {
            return Ok(dx);
        }
        if chunks.is_empty() {
            // No outputs: dX is zero.
            return self.upload(&crate::tensor::Tensor::zeros(vec![m, inp]));
        }
        let key = self
            .key("backward.wgsl", "linear_backward", WG)
            .def("F16", *f16 as u32);
        for (i, c) in chunks.iter().enumerate() {
            let params = [
                u32_of("linear_backward", m)?,
                u32_of("linear_backward", inp)?,
                u32_of("linear_backward", c.rows)?,
                u32_of("linear_backward", *ld)?,
                u32_of("linear_backward", c.row0)?,
                u32_of("linear_backward", out)?,
                (i > 0) as u32,
            ];
            self.rec.dispatch(
                &key,
                &[(2, dy.buf()), (6, &c.buf), (3, dx.buf())],
                5,
                &params,
                total.div_ceil(WG),
            )?;
        }
        Ok(dx)
    }

    fn rms_norm_backward(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        eps: f32,
        dy: &WgpuTensor,
    ) -> Result<WgpuTensor> {
        if (x.rows, x.cols) != (dy.rows, dy.cols) || w.numel() != x.cols {
            return Err(shape_err(
                "rms_norm_backward",
                format!(
                    "x [{}, {}], w {}, dy [{}, {}]",
                    x.rows,
                    x.cols,
                    w.numel(),
                    dy.rows,
                    dy.cols
                ),
            ));
        }
        let dx = self.tensor(x.rows, x.cols, "rms_norm_backward")?;
        let rows = u32_of("rms_norm_backward", x.rows)?;
        let cols = u32_of("rms_norm_backward", x.cols)?;
        let key = self.key("backward.wgsl", "rms_norm_backward", WG);
        self.rec.dispatch(
            &key,
            &[(0, x.buf()), (1, w.buf()), (2, dy.buf()), (3, dx.buf())],
            5,
            &[rows, cols, eps.to_bits()],
            rows,
        )?;
        Ok(dx)
    }

    fn rope_backward(
        &self,
        dy: &WgpuTensor,
        heads: usize,
        rope: &Rope,
        pos0: usize,
    ) -> Result<WgpuTensor> {
        let neg = Rope {
            inv_freq: rope.inv_freq.iter().map(|f| -f).collect(),
            head_dim: rope.head_dim,
        };
        self.rope(dy, heads, &neg, pos0)
    }

    fn gated_backward(
        &self,
        gate: &WgpuTensor,
        up: &WgpuTensor,
        dy: &WgpuTensor,
        act: Act,
    ) -> Result<(WgpuTensor, WgpuTensor)> {
        let dims = |t: &WgpuTensor| (t.rows, t.cols);
        if dims(gate) != dims(up) || dims(up) != dims(dy) {
            return Err(shape_err(
                "gated_backward",
                format!(
                    "gate {:?}, up {:?}, dy {:?}",
                    dims(gate),
                    dims(up),
                    dims(dy)
                ),
            ));
        }
        let dg = self.tensor(gate.rows, gate.cols, "gated_backward d gate")?;
        let du = self.tensor(gate.rows, gate.cols, "gated_backward d up")?;
        let n = u32_of("gated_backward", gate.numel())?;
        let key = self.key("backward.wgsl", "gated_backward", WG);
        self.rec.dispatch(
            &key,
            &[
                (0, gate.buf()),
                (1, up.buf()),
                (2, dy.buf()),
                (3, dg.buf()),
                (4, du.buf()),
            ],
            5,
            &[n, act_code(act)],
            n.div_ceil(WG),
        )?;
        Ok((dg, du))
    }

    /// Host fallback: downloads q, k, v and dout, runs the CPU reference
    /// and uploads dq, dk, dv.
    fn attention_backward(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        dout: &WgpuTensor,
        shape: AttnShape,
    ) -> Result<(WgpuTensor, WgpuTensor, WgpuTensor)> {
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
    fn cross_entropy(&self, logits: &WgpuTensor, labels: &[u32]) -> Result<(f64, WgpuTensor)> {
        let (loss, grad) = Cpu.cross_entropy(&self.download(logits)?, labels)?;
        Ok((loss, self.upload(&grad)?))
    }
}
