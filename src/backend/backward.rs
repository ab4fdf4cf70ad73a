//! The backward of each op family of [`Backend`], for the sensitivity
//! pass (activation gradients only, no weight gradients), and the CPU's
//! reference implementation of them. With `dY` the gradient of an op's
//! output:
//!
//! ```text
//! linear:    dX = dY W            (W `[out, in]`; the bias does not matter)
//! rms_norm:  y_j = w_j x_j r, r = (mean(x^2) + eps)^-1/2
//!            dx_j = r w_j dy_j - r^3 x_j / c * sum_i dy_i w_i x_i
//! gated:     y = act(g) u:  dg = dy u act'(g),  du = dy act(g)
//! rope:      (a, b) -> (a c - b s, b c + a s)  (rotate_half, angle pos*f);
//!            transpose: da = ga c + gb s,  db = gb c - ga s
//! attention: per head, query r over keys j <= r, s_j = scale q_r.k_j,
//!            p = softmax(s), o_r = sum_j p_j v_j;
//!            dP_j = do_r.v_j,  dS_j = p_j (dP_j - do_r.o_r),
//!            dq_r = scale sum_j dS_j k_j,  dk_j += scale dS_j q_r,
//!            dv_j += p_j do_r  (kv heads shared by a query group sum the
//!            contributions of the group's query heads)
//! CE:        dl_p = (softmax(l_p) - onehot(label_p)) / N
//! ```
//!
//! These CPU functions are the reference: wgpu (`wgpu/backward.rs`) and
//! CUDA (`cuda/backward.rs`) implement the same trait, tested against them
//! (`verify/ops/backward.rs`).

use rayon::prelude::*;

use super::cpu::{act_fn, dot, Cpu, CpuWeight};
use super::{AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The backward ops the sensitivity pass needs, on the backend's tensors.
/// Each op's shapes are checked once, here (the provided methods), before
/// a backend's `*_unchecked` implementation sees them.
pub trait Grad: Backend {
    /// dX `[rows, in]` of `y = x W^T + b` from dY `[rows, out]`.
    fn linear_backward(&self, dy: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor> {
        let (out, inp) = self.weight_shape(w);
        let (r, c) = self.dims(dy);
        shapes(self, "linear_backward", c == out, || {
            format!("dy [{r}, {c}] for a weight [{out}, {inp}]")
        })?;
        self.linear_backward_unchecked(dy, w)
    }
    fn linear_backward_unchecked(
        &self,
        dy: &Self::Tensor,
        w: &Self::Weight,
    ) -> Result<Self::Tensor>;

    /// dX of `y = rms_norm(x) * w` (the mean square in f32, as the forward).
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (xd, wd, dyd) = (self.dims(x), self.dims(w), self.dims(dy));
        shapes(
            self,
            "rms_norm_backward",
            xd == dyd && wd.0 * wd.1 == xd.1,
            || format!("x {xd:?}, w of {} values, dy {dyd:?}", wd.0 * wd.1),
        )?;
        self.rms_norm_backward_unchecked(x, w, eps, dy)
    }
    fn rms_norm_backward_unchecked(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// dX of [`Backend::rope`] (rotation by minus the angle).
    fn rope_backward(
        &self,
        dy: &Self::Tensor,
        heads: usize,
        rope: &Rope,
        pos0: usize,
    ) -> Result<Self::Tensor> {
        let c = self.dims(dy).1;
        shapes(self, "rope_backward", c == heads * rope.head_dim, || {
            format!("{c} features for {heads} heads of {}", rope.head_dim)
        })?;
        self.rope_backward_unchecked(dy, heads, rope, pos0)
    }
    /// The default is [`Backend::rope`] with negated inverse frequencies:
    /// sin is odd, so that is the rotation by minus the angle, bit for bit.
    fn rope_backward_unchecked(
        &self,
        dy: &Self::Tensor,
        heads: usize,
        rope: &Rope,
        pos0: usize,
    ) -> Result<Self::Tensor> {
        let neg = Rope {
            inv_freq: rope.inv_freq.iter().map(|f| -f).collect(),
            head_dim: rope.head_dim,
        };
        self.rope(dy, heads, &neg, pos0)
    }

    /// (d gate, d up) of [`Backend::gated`].
    fn gated_backward(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        dy: &Self::Tensor,
        act: Act,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (g, u, d) = (self.dims(gate), self.dims(up), self.dims(dy));
        shapes(self, "gated_backward", g == u && u == d, || {
            format!("gate {g:?}, up {u:?}, dy {d:?}")
        })?;
        self.gated_backward_unchecked(gate, up, dy, act)
    }
    fn gated_backward_unchecked(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        dy: &Self::Tensor,
        act: Act,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// (dq, dk, dv) of causal grouped-query attention at positions `0..n`
    /// (query r sees keys `0..=r`): q `[n, heads*d]`, k, v `[n, kv_heads*d]`,
    /// dout `[n, heads*d]`.
    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let (qd, kd, vd, od) = (self.dims(q), self.dims(k), self.dims(v), self.dims(dout));
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = shape;
        shapes(
            self,
            "attention_backward",
            kv_heads > 0
                && heads.is_multiple_of(kv_heads)
                && qd.1 == heads * d
                && kd == (qd.0, kv_heads * d)
                && vd == kd
                && od == qd,
            || {
                format!(
                    "q {qd:?}, k {kd:?}, v {vd:?}, dout {od:?} for {heads} heads / {kv_heads} kv \
                     heads of {d}"
                )
            },
        )?;
        self.attention_backward_unchecked(q, k, v, dout, shape)
    }
    fn attention_backward_unchecked(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;

    /// Mean cross-entropy of logits `[labels.len(), vocab]` against `labels`
    /// (f64 log-sum-exp) and its gradient `(softmax - onehot) / rows`.
    fn cross_entropy(&self, logits: &Self::Tensor, labels: &[u32]) -> Result<(f64, Self::Tensor)> {
        let (rows, vocab) = self.dims(logits);
        shapes(
            self,
            "cross_entropy",
            rows == labels.len() && !labels.is_empty(),
            || format!("logits [{rows}, {vocab}] for {} labels", labels.len()),
        )?;
        if let Some(l) = labels.iter().find(|&&l| l as usize >= vocab) {
            return Err(Error::invalid(format!(
                "{} cross_entropy: label {l} >= vocabulary size {vocab}",
                self.name()
            )));
        }
        self.cross_entropy_unchecked(logits, labels)
    }
    fn cross_entropy_unchecked(
        &self,
        logits: &Self::Tensor,
        labels: &[u32],
    ) -> Result<(f64, Self::Tensor)>;
}

/// An invalid-input error naming the backend and the op unless `ok`.
fn shapes<B: Backend + ?Sized>(
    be: &B,
    op: &str,
    ok: bool,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("{} {op}: {}", be.name(), what())))
    }
}

/// The weight as f32 (converted from f16 / bf16 for the pass); packed
/// weights have no backward.
fn dense(w: &CpuWeight) -> Result<std::borrow::Cow<'_, Tensor>> {
    match w {
        CpuWeight::Packed(_) => Err(Error::invalid(
            "backward: needs an unquantized model (dense weights), found packed weights",
        )),
        w => Ok(w.to_dense()),
    }
}

impl Grad for Cpu {
    fn linear_backward_unchecked(&self, dy: &Tensor, w: &CpuWeight) -> Result<Tensor> {
        let w = dense(w)?;
        let (out, inp) = (w.shape[0], w.shape[1]);
        Tensor::new(
            vec![dy.rows(), inp],
            matmul_nn(&dy.data, dy.rows(), &w.data, out, inp),
        )
    }

    fn rms_norm_backward_unchecked(
        &self,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        dy: &Tensor,
    ) -> Result<Tensor> {
        Tensor::new(
            x.shape.clone(),
            rms_norm_backward(&x.data, &w.data, eps, &dy.data),
        )
    }

    fn gated_backward_unchecked(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
        act: Act,
    ) -> Result<(Tensor, Tensor)> {
        let (dg, du) = gated_backward(&gate.data, &up.data, &dy.data, act);
        Ok((
            Tensor::new(gate.shape.clone(), dg)?,
            Tensor::new(up.shape.clone(), du)?,
        ))
    }

    fn attention_backward_unchecked(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
        shape: AttnShape,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = q.rows();
        let (dq, dk, dv) = attention_backward(&q.data, &k.data, &v.data, &dout.data, n, shape);
        Ok((
            Tensor::new(q.shape.clone(), dq)?,
            Tensor::new(k.shape.clone(), dk)?,
            Tensor::new(v.shape.clone(), dv)?,
        ))
    }

    fn cross_entropy_unchecked(&self, logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)> {
        let (loss, grad) = cross_entropy(&logits.data, logits.cols(), labels);
        Ok((loss, Tensor::new(logits.shape.clone(), grad)?))
    }
}

fn add_assign(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

/// x `[rows, inp]` = dy `[rows, out]` . w `[out, inp]` (w NOT transposed):
/// the input gradient of a linear layer. Work is split over chunks of input
/// features; each task reads its column block of `w` once and accumulates
/// `dy[r, o] * w[o, block]` into a `[rows, block]` tile (zero `dy` entries,
/// common past the last caption, are skipped).
pub fn matmul_nn(dy: &[f32], rows: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    const COLS: usize = 64;
    let tiles: Vec<Vec<f32>> = (0..inp.div_ceil(COLS))
        .into_par_iter()
        .map(|ci| {
            let i0 = ci * COLS;
            let cw = COLS.min(inp - i0);
            let mut acc = vec![0.0f32; rows * cw];
            for o in 0..out {
                let wr = &w[o * inp + i0..o * inp + i0 + cw];
                for r in 0..rows {
                    let g = dy[r * out + o];
                    if g == 0.0 {
                        continue;
                    }
                    for (a, &wv) in acc[r * cw..(r + 1) * cw].iter_mut().zip(wr) {
                        *a += g * wv;
                    }
                }
            }
            acc
        })
        .collect();
    let mut x = vec![0.0f32; rows * inp];
    for (ci, tile) in tiles.iter().enumerate() {
        let i0 = ci * COLS;
        let cw = COLS.min(inp - i0);
        for r in 0..rows {
            x[r * inp + i0..r * inp + i0 + cw].copy_from_slice(&tile[r * cw..(r + 1) * cw]);
        }
    }
    x
}

/// Mean cross-entropy over rows of `logits` `[labels.len(), vocab]` (f64
/// log-sum-exp) and its gradient `(softmax - onehot) / rows`.
fn cross_entropy(logits: &[f32], vocab: usize, labels: &[u32]) -> (f64, Vec<f32>) {
    let m = labels.len();
    let mut loss = 0.0f64;
    let mut grad = vec![0.0f32; logits.len()];
    for (r, &label) in labels.iter().enumerate() {
        let l = &logits[r * vocab..(r + 1) * vocab];
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        loss += lse - l[label as usize] as f64;
        let g = &mut grad[r * vocab..(r + 1) * vocab];
        for (gi, &v) in g.iter_mut().zip(l) {
            *gi = ((v as f64 - lse).exp() / m as f64) as f32;
        }
        g[label as usize] -= 1.0 / m as f32;
    }
    (loss / m as f64, grad)
}

/// Backward of `y = w * x * rsqrt(mean(x^2) + eps)` per row (`cols =
/// w.len()`), the mean square in f32 as the forward computes it.
fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let c = w.len();
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
        let xr = &x[r * c..(r + 1) * c];
        let dyr = &dy[r * c..(r + 1) * c];
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        let s: f64 = (0..c)
            .map(|i| dyr[i] as f64 * w[i] as f64 * xr[i] as f64)
            .sum();
        let k = (inv as f64).powi(3) * s / c as f64;
        for i in 0..c {
            dxr[i] = ((inv * w[i] * dyr[i]) as f64 - k * xr[i] as f64) as f32;
        }
    });
    dx
}

/// d act(x) / dx.
fn act_grad(x: f32, act: Act) -> f32 {
    let sigmoid = |z: f32| 1.0 / (1.0 + (-z).exp());
    match act {
        Act::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Act::Gelu => {
            // Phi(x) + x phi(x).
            let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            cdf + x * pdf
        }
        Act::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            let t = (c * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Act::QuickGelu => {
            let s = sigmoid(1.702 * x);
            s + 1.702 * x * s * (1.0 - s)
        }
        Act::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Backward of `y = act(gate) * up`: `(d gate, d up)`.
fn gated_backward(gate: &[f32], up: &[f32], dy: &[f32], act: Act) -> (Vec<f32>, Vec<f32>) {
    let (dg, du): (Vec<f32>, Vec<f32>) = gate
        .par_iter()
        .zip(up)
        .zip(dy)
        .map(|((&g, &u), &d)| (d * u * act_grad(g, act), d * act_fn(g, act)))
        .unzip();
    (dg, du)
}

/// Backward of causal grouped-query attention at positions `0..n` (query
/// `r` sees keys `0..=r`), q `[n, heads*d]`, k, v `[n, kv_heads*d]`, dout
/// `[n, heads*d]` -> `(dq, dk, dv)`. The probabilities are recomputed as
/// the forward computes them. Parallel over query heads; each head's key
/// and value gradients are then summed into its kv head.
fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    n: usize,
    shape: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale,
    } = shape;
    let group = heads / kv_heads;
    let qs = heads * d;
    let kvs = kv_heads * d;
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let qo = h * d;
            let ko = (h / group) * d;
            let kj = |j: usize| &k[j * kvs + ko..j * kvs + ko + d];
            let vj = |j: usize| &v[j * kvs + ko..j * kvs + ko + d];
            let mut dq = vec![0.0f32; n * d];
            let mut dk = vec![0.0f32; n * d];
            let mut dv = vec![0.0f32; n * d];
            let mut p = vec![0.0f32; n];
            let mut dp = vec![0.0f32; n];
            for r in 0..n {
                let dor = &dout[r * qs + qo..r * qs + qo + d];
                if dor.iter().all(|&g| g == 0.0) {
                    continue;
                }
                let qr = &q[r * qs + qo..r * qs + qo + d];
                let len = r + 1;
                for (j, pj) in p[..len].iter_mut().enumerate() {
                    *pj = dot(qr, kj(j)) * scale;
                }
                let max = p[..len].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in p[..len].iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                // D = sum_j p_j dP_j = do_r . o_r.
                let mut dsum = 0.0f32;
                for j in 0..len {
                    p[j] /= sum;
                    dp[j] = dot(dor, vj(j));
                    dsum += p[j] * dp[j];
                }
                let dqr = &mut dq[r * d..(r + 1) * d];
                for j in 0..len {
                    let ds = p[j] * (dp[j] - dsum) * scale;
                    let (kr, dkr) = (kj(j), &mut dk[j * d..(j + 1) * d]);
                    for t in 0..d {
                        dqr[t] += ds * kr[t];
                        dkr[t] += ds * qr[t];
                    }
                    let dvr = &mut dv[j * d..(j + 1) * d];
                    for t in 0..d {
                        dvr[t] += p[j] * dor[t];
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; n * qs];
    let mut dk = vec![0.0f32; n * kvs];
    let mut dv = vec![0.0f32; n * kvs];
    for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
        let qo = h * d;
        let ko = (h / group) * d;
        for r in 0..n {
            dq[r * qs + qo..r * qs + qo + d].copy_from_slice(&dqh[r * d..(r + 1) * d]);
            add_assign(
                &mut dk[r * kvs + ko..r * kvs + ko + d],
                &dkh[r * d..(r + 1) * d],
            );
            add_assign(
                &mut dv[r * kvs + ko..r * kvs + ko + d],
                &dvh[r * d..(r + 1) * d],
            );
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::nll;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Relative tolerance of an analytic gradient against a central finite
    /// difference (f32 forward, f64 objective).
    const FD_RTOL: f64 = 2e-2;
    /// Absolute floor, as a fraction of the largest gradient of the check.
    const FD_ATOL_FRAC: f64 = 2e-3;
    /// Step of the op-level finite differences (inputs are O(1)).
    const FD_EPS: f32 = 1e-3;

    fn rand_vec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-amp..amp)).collect()
    }

    fn weighted_sum(y: &[f32], r: &[f32]) -> f64 {
        y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    /// Compares `analytic` with central differences of `f` at `x`, every
    /// element; panics naming `what` and the worst element.
    fn fd_check(what: &str, x: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> f64) {
        assert_eq!(x.len(), analytic.len(), "{what}: gradient size");
        let scale = analytic.iter().fold(0.0f64, |m, &g| m.max(g.abs() as f64));
        assert!(scale > 0.0, "{what}: gradient is identically zero");
        let atol = FD_ATOL_FRAC * scale;
        let mut xp = x.to_vec();
        for i in 0..x.len() {
            xp[i] = x[i] + FD_EPS;
            let up = f(&xp);
            xp[i] = x[i] - FD_EPS;
            let dn = f(&xp);
            xp[i] = x[i];
            // The step actually taken in f32.
            let h = (x[i] + FD_EPS) as f64 - (x[i] - FD_EPS) as f64;
            let fd = (up - dn) / h;
            let an = analytic[i] as f64;
            assert!(
                (fd - an).abs() <= FD_RTOL * an.abs() + atol,
                "{what}: element {i}: analytic {an:.6e}, finite difference {fd:.6e}"
            );
        }
    }

    fn test_rope(head_dim: usize) -> Rope {
        Rope {
            inv_freq: (0..head_dim / 2)
                .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / head_dim as f32))
                .collect(),
            head_dim,
        }
    }

    #[test]
    fn matmul_nn_matches_naive() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(rows, out, inp) in &[(7, 10, 13), (3, 5, 130), (1, 1, 1), (5, 70, 64)] {
            let mut dy = rand_vec(&mut rng, rows * out, 1.0);
            dy[0] = 0.0; // the zero-skip path
            let w = rand_vec(&mut rng, out * inp, 1.0);
            let x = matmul_nn(&dy, rows, &w, out, inp);
            for r in 0..rows {
                for i in 0..inp {
                    let want: f64 = (0..out)
                        .map(|o| dy[r * out + o] as f64 * w[o * inp + i] as f64)
                        .sum();
                    let got = x[r * inp + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{rows},{out},{inp}] ({r},{i}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rms_norm_backward_matches_fd() {
        let mut rng = StdRng::seed_from_u64(2);
        let (n, c, eps) = (7, 10, 1e-6f32);
        let x = rand_vec(&mut rng, n * c, 1.0);
        let w = Tensor::new(vec![c], rand_vec(&mut rng, c, 2.0)).unwrap();
        let r = rand_vec(&mut rng, n * c, 1.0);
        let an = rms_norm_backward(&x, &w.data, eps, &r);
        fd_check("rms_norm", &x, &an, |xp| {
            let xt = Tensor::new(vec![n, c], xp.to_vec()).unwrap();
            weighted_sum(&Cpu.rms_norm(&xt, &w, eps).unwrap().data, &r)
        });
    }

    #[test]
    fn rope_backward_matches_fd() {
        let mut rng = StdRng::seed_from_u64(3);
        let (n, heads, d) = (7, 3, 6);
        let rope = test_rope(d);
        for pos0 in [0, 5] {
            let x = rand_vec(&mut rng, n * heads * d, 1.0);
            let r = rand_vec(&mut rng, n * heads * d, 1.0);
            let rt = Tensor::new(vec![n, heads * d], r.clone()).unwrap();
            let an = Cpu.rope_backward(&rt, heads, &rope, pos0).unwrap().data;
            fd_check(&format!("rope (pos0 {pos0})"), &x, &an, |xp| {
                let xt = Tensor::new(vec![n, heads * d], xp.to_vec()).unwrap();
                weighted_sum(&Cpu.rope(&xt, heads, &rope, pos0).unwrap().data, &r)
            });
        }
    }

    /// Causal attention at positions 0..n through the backend's cached path
    /// (what the decoder runs).
    fn causal_attention(q: &[f32], k: &[f32], v: &[f32], n: usize, shape: AttnShape) -> Vec<f32> {
        let kvd = shape.kv_heads * shape.head_dim;
        let mut cache = Cpu.new_cache(1, kvd, n).unwrap();
        let t = |x: &[f32], c: usize| Tensor::new(vec![n, c], x.to_vec()).unwrap();
        let qd = shape.heads * shape.head_dim;
        Cpu.attention_cached(&t(q, qd), &t(k, kvd), &t(v, kvd), &mut cache, 0, 0, shape)
            .unwrap()
            .data
    }

    #[test]
    fn attention_backward_matches_fd() {
        let mut rng = StdRng::seed_from_u64(4);
        let n = 7;
        for &(heads, kv_heads, d) in &[(3, 1, 6), (4, 2, 6), (2, 2, 5)] {
            let shape = AttnShape {
                heads,
                kv_heads,
                head_dim: d,
                scale: (d as f32).powf(-0.5),
            };
            let (qd, kvd) = (heads * d, kv_heads * d);
            let q = rand_vec(&mut rng, n * qd, 1.5);
            let k = rand_vec(&mut rng, n * kvd, 1.5);
            let v = rand_vec(&mut rng, n * kvd, 1.0);
            let mut r = rand_vec(&mut rng, n * qd, 1.0);
            // One query row with zero upstream gradient (the skipped path).
            r[2 * qd..3 * qd].iter_mut().for_each(|g| *g = 0.0);
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &r, n, shape);
            let tag = format!("heads {heads} / kv {kv_heads}, d {d}");
            fd_check(&format!("attention dq ({tag})"), &q, &dq, |qp| {
                weighted_sum(&causal_attention(qp, &k, &v, n, shape), &r)
            });
            fd_check(&format!("attention dk ({tag})"), &k, &dk, |kp| {
                weighted_sum(&causal_attention(&q, kp, &v, n, shape), &r)
            });
            fd_check(&format!("attention dv ({tag})"), &v, &dv, |vp| {
                weighted_sum(&causal_attention(&q, &k, vp, n, shape), &r)
            });
            // Causality: the last key/value gets gradient only from the last query.
            let r_last_zero: Vec<f32> = r
                .iter()
                .enumerate()
                .map(|(i, &g)| if i >= (n - 1) * qd { 0.0 } else { g })
                .collect();
            let (_, dk, dv) = attention_backward(&q, &k, &v, &r_last_zero, n, shape);
            assert!(dk[(n - 1) * kvd..].iter().all(|&g| g == 0.0), "{tag}: dk");
            assert!(dv[(n - 1) * kvd..].iter().all(|&g| g == 0.0), "{tag}: dv");
        }
    }

    #[test]
    fn gated_backward_matches_fd() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, c) = (7, 10);
        for act in [
            Act::Silu,
            Act::Gelu,
            Act::GeluTanh,
            Act::QuickGelu,
            Act::Relu,
        ] {
            let mut g = rand_vec(&mut rng, n * c, 3.0);
            // Keep ReLU's kink out of the finite-difference stencil.
            g.iter_mut()
                .filter(|v| v.abs() < 0.01)
                .for_each(|v| *v += 0.05);
            let u = rand_vec(&mut rng, n * c, 1.0);
            let r = rand_vec(&mut rng, n * c, 1.0);
            let (dg, du) = gated_backward(&g, &u, &r, act);
            let t = |x: &[f32]| Tensor::new(vec![n, c], x.to_vec()).unwrap();
            fd_check(&format!("gated d gate ({act:?})"), &g, &dg, |gp| {
                weighted_sum(&Cpu.gated(&t(gp), &t(&u), act).unwrap().data, &r)
            });
            fd_check(&format!("gated d up ({act:?})"), &u, &du, |up| {
                weighted_sum(&Cpu.gated(&t(&g), &t(up), act).unwrap().data, &r)
            });
        }
    }

    #[test]
    fn cross_entropy_matches_fd_and_nll() {
        let mut rng = StdRng::seed_from_u64(6);
        let (rows, vocab) = (5, 11);
        let logits = rand_vec(&mut rng, rows * vocab, 3.0);
        let labels: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let (loss, grad) = cross_entropy(&logits, vocab, &labels);
        let want: f64 = logits
            .chunks(vocab)
            .zip(&labels)
            .map(|(l, &t)| nll(l, t))
            .sum::<f64>()
            / rows as f64;
        assert!(
            (loss - want).abs() <= 1e-12 * want.abs(),
            "{loss} vs {want}"
        );
        fd_check("cross_entropy", &logits, &grad, |lp| {
            cross_entropy(lp, vocab, &labels).0
        });
    }
}
