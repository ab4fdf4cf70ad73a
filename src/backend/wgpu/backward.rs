//! [`Grad`] for wgpu: the backward ops of the sensitivity pass.
//!
//! On the device: `rope_backward` (the forward `rope` kernel with negated
//! inverse frequencies: sin is odd, so this is the rotation by minus the
//! angle), `gated_backward`, `rms_norm_backward` and `linear_backward`
//! (dense weights, f32 or f16 pairs) in `shaders/backward.wgsl`.
//!
//! `attention_backward` runs `shaders/attention_backward.wgsl` (two passes
//! through a `[heads, n, n]` scratch of probabilities and score gradients,
//! so that dk / dv need no float atomics), or, when that scratch would not
//! fit one storage binding, the host fallback below.
//!
//! `cross_entropy` runs `shaders/cross_entropy.wgsl` (one workgroup per
//! row, f32 reductions); only the per-row losses are downloaded.

use super::linear::{DenseParts, WgpuWeight};
use super::{u32_of, Wgpu, WgpuTensor, WG};
use crate::backend::backward::Grad;
use crate::backend::cpu::Cpu;
use crate::backend::{act_code, AttnShape, Backend};
use crate::config::Act;
use crate::error::Result;

/// Threads of attention_backward.wgsl's workgroups (keys, then dims).
const ATTN_BW_WG: u32 = 64;

impl Grad for Wgpu {
    fn linear_backward_unchecked(&self, dy: &WgpuTensor, w: &WgpuWeight) -> Result<WgpuTensor> {
        let DenseParts {
            out,
            inp,
            ld,
            f16,
            chunks,
        } = w.dense_parts("linear_backward")?;
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
            .def("F16", f16 as u32);
        for (i, c) in chunks.iter().enumerate() {
            let params = [
                u32_of("linear_backward", m)?,
                u32_of("linear_backward", inp)?,
                u32_of("linear_backward", c.rows)?,
                u32_of("linear_backward", ld)?,
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

    fn rms_norm_backward_unchecked(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        eps: f32,
        dy: &WgpuTensor,
    ) -> Result<WgpuTensor> {
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

    fn gated_backward_unchecked(
        &self,
        gate: &WgpuTensor,
        up: &WgpuTensor,
        dy: &WgpuTensor,
        act: Act,
    ) -> Result<(WgpuTensor, WgpuTensor)> {
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

    /// On the device (attention_backward.wgsl) through a scratch of
    /// `2 heads n^2` f32; a host fallback (download, the CPU reference,
    /// upload) when that scratch would not fit one storage binding.
    fn attention_backward_unchecked(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        dout: &WgpuTensor,
        shape: AttnShape,
    ) -> Result<(WgpuTensor, WgpuTensor, WgpuTensor)> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale,
        } = shape;
        let n = q.rows;
        let scratch = (heads * n * n * 4) as u64;
        if scratch > self.rec.ctx.max_binding {
            let (dq, dk, dv) = Cpu.attention_backward(
                &self.download(q)?,
                &self.download(k)?,
                &self.download(v)?,
                &self.download(dout)?,
                shape,
            )?;
            return Ok((self.upload(&dq)?, self.upload(&dk)?, self.upload(&dv)?));
        }
        let dq = self.tensor(n, q.cols, "attention_backward dq")?;
        let dk = self.tensor(n, k.cols, "attention_backward dk")?;
        let dv = self.tensor(n, k.cols, "attention_backward dv")?;
        if n == 0 || d == 0 || heads == 0 {
            return Ok((dq, dk, dv));
        }
        let pbuf = self.rec.output(scratch)?;
        let sbuf = self.rec.output(scratch)?;
        let params = [
            u32_of("attention_backward", n)?,
            heads as u32,
            kv_heads as u32,
            d as u32,
            scale.to_bits(),
        ];
        let key = self.key("attention_backward.wgsl", "rows", ATTN_BW_WG);
        self.rec.dispatch(
            &key,
            &[
                (0, q.buf()),
                (1, k.buf()),
                (2, v.buf()),
                (3, dout.buf()),
                (4, pbuf.get()),
                (5, sbuf.get()),
                (6, dq.buf()),
            ],
            9,
            &params,
            u32_of("attention_backward", n * heads)?,
        )?;
        let key = self.key("attention_backward.wgsl", "cols", ATTN_BW_WG);
        self.rec.dispatch(
            &key,
            &[
                (0, q.buf()),
                (3, dout.buf()),
                (4, pbuf.get()),
                (5, sbuf.get()),
                (7, dk.buf()),
                (8, dv.buf()),
            ],
            9,
            &params,
            u32_of("attention_backward", n * kv_heads)?,
        )?;
        Ok((dq, dk, dv))
    }

    /// On the device (`shaders/cross_entropy.wgsl`, one workgroup per row,
    /// f32 max and exp-sum): the gradient stays on the device and only the
    /// `rows` per-row losses come back, summed in f64 for the mean.
    fn cross_entropy_unchecked(
        &self,
        logits: &WgpuTensor,
        labels: &[u32],
    ) -> Result<(f64, WgpuTensor)> {
        let (rows, vocab) = (logits.rows, logits.cols);
        let grad = self.tensor(rows, vocab, "cross_entropy gradient")?;
        let losses = self.tensor(rows, 1, "cross_entropy losses")?;
        let label_buf = self
            .rec
            .upload(bytemuck::cast_slice(labels), "cross_entropy labels")?;
        let key = self.key("cross_entropy.wgsl", "cross_entropy", WG);
        self.rec.dispatch(
            &key,
            &[
                (0, logits.buf()),
                (1, &label_buf),
                (2, grad.buf()),
                (3, losses.buf()),
            ],
            4,
            &[
                u32_of("cross_entropy", rows)?,
                u32_of("cross_entropy", vocab)?,
            ],
            u32_of("cross_entropy", rows)?,
        )?;
        let sum: f64 = self.download(&losses)?.data.iter().map(|&v| v as f64).sum();
        Ok((sum / rows as f64, grad))
    }
}
