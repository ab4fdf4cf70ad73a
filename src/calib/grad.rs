//! MBQ step 1, the sensitivity pass: the gradient of the caption loss with
//! respect to the output of `o_proj` and of `down_proj` in every decoder
//! layer, for one calibration sample (see `MBQ-NOTES.md`, "Step 1").
//!
//! Forward (f32, the ops of [`TextModel::layer_forward`] on the CPU
//! backend, at positions `0..n`), for each layer i with input `x`:
//!
//! ```text
//! h  = rms_norm(x) * w_in            q = rope(h Wq^T + bq)   k = rope(h Wk^T + bk)
//! v  = h Wv^T + bv                   a = causal_gqa_attention(q, k, v)
//! m  = x + a Wo^T (+ bo)             <- g_attn = dL/dm = dL/d(o_proj output)
//! h2 = rms_norm(m) * w_post          u = act(h2 Wg^T) * (h2 Wu^T)
//! y  = m + u Wd^T                    <- g_mlp  = dL/dy = dL/d(down_proj output)
//! ```
//!
//! then `z = rms_norm(y_last) * w_norm` and logits `l_p = z_p W_lm^T` only
//! at the rows `p = t - 1` that predict a caption token `t >= 1`. The loss is
//! HF's causal-LM cross-entropy with labels `ids[t]` where `caption[t]`
//! (shifted, mean over the labelled tokens):
//!
//! ```text
//! L = (1/N) sum_{t: caption[t], t>=1} (logsumexp(l_{t-1}) - l_{t-1}[ids[t]])
//! ```
//!
//! Backward (activation gradients only, no weight gradients), with `dY` the
//! gradient of an op's output:
//!
//! ```text
//! CE:        dl_p = (softmax(l_p) - onehot(label_p)) / N
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
//! residual:  the gradient passes to both branches.
//! ```
//!
//! Per layer, [`LayerGrad`] holds the mean of `|g|` over all elements
//! (tokens x hidden) of the vision positions and of the caption positions
//! (f64 accumulation). Because attention is causal, a position after the
//! last caption-predicting position (`last caption t - 1`) gets exactly
//! zero gradient in every layer; in the last layer a position whose next
//! token is not a caption token also gets exactly zero (nothing after the
//! last layer mixes positions), which is why vision positions usually read
//! 0 there.
//!
//! Memory: the forward keeps only each layer's input and its post-attention
//! residual; the backward recomputes the rest of a layer (norms, q/k/v,
//! gate/up, the attention probabilities) from them.

use rayon::prelude::*;

use crate::backend::cpu::{act_fn, dot, Cpu, CpuWeight};
use crate::backend::{AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::model::text::TextModel;
use crate::model::Linear;
use crate::tensor::Tensor;

/// Mean |dL/dy| of one decoder layer over vision and caption positions, for one sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerGrad {
    /// At the output of `o_proj`, vision positions.
    pub attn_vision: f64,
    /// At the output of `o_proj`, caption positions.
    pub attn_caption: f64,
    /// At the output of `down_proj`, vision positions.
    pub mlp_vision: f64,
    /// At the output of `down_proj`, caption positions.
    pub mlp_caption: f64,
}

/// The result of one sample's sensitivity pass.
pub struct SampleSensitivity {
    /// The caption cross-entropy (natural log, mean over caption tokens).
    pub loss: f64,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerGrad>,
    /// Whether any position is marked vision (else the `*_vision` are 0).
    pub has_vision: bool,
}

/// x0: the decoder's input embeddings [n, hidden] (image features already in place),
/// ids: the n token ids, vision[t]/caption[t]: masks of length n.
pub fn sample_sensitivity(
    text: &TextModel<Cpu>,
    x0: &Tensor,
    ids: &[u32],
    vision: &[bool],
    caption: &[bool],
) -> Result<SampleSensitivity> {
    if vision.len() != ids.len() {
        return Err(Error::invalid(format!(
            "sensitivity: vision mask of {} for {} tokens",
            vision.len(),
            ids.len()
        )));
    }
    let targets = check_inputs(text, x0, ids, caption)?;
    let hidden = text.cfg.hidden_size;
    let mean_abs = |g: &[f32], mask: &[bool]| -> f64 {
        let rows = mask.iter().filter(|&&m| m).count();
        if rows == 0 {
            return 0.0;
        }
        let sum: f64 = g
            .chunks(hidden)
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(r, _)| r.iter().map(|&v| v.abs() as f64).sum::<f64>())
            .sum();
        sum / (rows * hidden) as f64
    };
    let mut layers = vec![LayerGrad::default(); text.layers.len()];
    let loss = loss_and_grads(text, x0, &targets, &mut |i, site, g| match site {
        Site::Attn => {
            layers[i].attn_vision = mean_abs(g, vision);
            layers[i].attn_caption = mean_abs(g, caption);
        }
        Site::Mlp => {
            layers[i].mlp_vision = mean_abs(g, vision);
            layers[i].mlp_caption = mean_abs(g, caption);
        }
    })?;
    Ok(SampleSensitivity {
        loss,
        layers,
        has_vision: vision.iter().any(|&v| v),
    })
}

/// Where a gradient is captured (or, in tests, a perturbation added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    /// The output of `o_proj`.
    Attn,
    /// The output of `down_proj`.
    Mlp,
}

/// `eps` added to element `(t, j)` of a site's output in layer `layer`
/// (the finite-difference tests' hook).
#[derive(Clone, Copy, Debug)]
struct Perturb {
    layer: usize,
    site: Site,
    t: usize,
    j: usize,
    eps: f32,
}

/// Checks shapes, masks and weights; returns the `(row, label)` pairs: row
/// `t - 1` predicts `ids[t]` for each caption position `t >= 1`.
fn check_inputs(
    text: &TextModel<Cpu>,
    x0: &Tensor,
    ids: &[u32],
    caption: &[bool],
) -> Result<Vec<(usize, u32)>> {
    let n = ids.len();
    let hidden = text.cfg.hidden_size;
    if x0.shape != [n, hidden] {
        return Err(Error::invalid(format!(
            "sensitivity: embeddings of shape {:?} for {n} tokens of hidden size {hidden}",
            x0.shape
        )));
    }
    if caption.len() != n {
        return Err(Error::invalid(format!(
            "sensitivity: caption mask of {} for {n} tokens",
            caption.len()
        )));
    }
    let vocab = text.cfg.vocab_size;
    let mut targets = Vec::new();
    for t in 1..n {
        if caption[t] {
            if ids[t] as usize >= vocab {
                return Err(Error::invalid(format!(
                    "sensitivity: caption token {} at position {t} >= vocabulary size {vocab}",
                    ids[t]
                )));
            }
            targets.push((t - 1, ids[t]));
        }
    }
    if targets.is_empty() {
        return Err(Error::invalid(
            "sensitivity: the sample has no caption token to predict (no caption position \
             after the first token), so the loss is undefined",
        ));
    }
    let unquantized = || {
        Error::invalid(
            "sensitivity: calibration needs an unquantized model (dense f32 weights), \
             this one has packed (quantized) linear weights",
        )
    };
    for l in &text.layers {
        for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
            if matches!(lin.w, CpuWeight::Packed(_)) {
                return Err(unquantized());
            }
        }
    }
    if matches!(lm_head(text), CpuWeight::Packed(_)) {
        return Err(unquantized());
    }
    Ok(targets)
}

fn lm_head(text: &TextModel<Cpu>) -> &CpuWeight {
    text.lm_head.as_ref().unwrap_or(&text.embed_tokens)
}

fn dense(w: &CpuWeight) -> Result<&Tensor> {
    match w {
        CpuWeight::Dense(t) => Ok(t),
        CpuWeight::Packed(_) => Err(Error::invalid(
            "sensitivity: calibration needs an unquantized model (dense f32 weights)",
        )),
    }
}

/// What the backward needs from the forward: per layer its input `x` and
/// the residual after attention `m`, and the final hidden states.
struct Saved {
    x_in: Vec<Tensor>,
    x_mid: Vec<Tensor>,
    out: Tensor,
}

fn add_perturb(y: &mut Tensor, p: Option<Perturb>, layer: usize, site: Site) {
    if let Some(p) = p {
        if p.layer == layer && p.site == site {
            let c = y.cols();
            y.data[p.t * c + p.j] += p.eps;
        }
    }
}

/// The decoder layers as [`TextModel::layer_forward`] runs them (same
/// backend ops), with the optional perturbation.
fn forward(text: &TextModel<Cpu>, x0: &Tensor, perturb: Option<Perturb>) -> Result<Saved> {
    let be = Cpu;
    let c = &text.cfg;
    let n = x0.rows();
    let mut cache = be.new_cache(text.layers.len(), text.kv_dim(), n)?;
    let mut x_in = Vec::with_capacity(text.layers.len());
    let mut x_mid = Vec::with_capacity(text.layers.len());
    let mut x = x0.clone();
    for (i, l) in text.layers.iter().enumerate() {
        let h = be.rms_norm(&x, &l.input_layernorm, c.rms_norm_eps)?;
        let q = be.rope(&l.q.forward(&be, &h)?, c.num_attention_heads, &text.rope, 0)?;
        let k = be.rope(&l.k.forward(&be, &h)?, c.num_key_value_heads, &text.rope, 0)?;
        let v = l.v.forward(&be, &h)?;
        let a = be.attention_cached(&q, &k, &v, &mut cache, i, 0, text.attn_shape())?;
        let mut o = l.o.forward(&be, &a)?;
        add_perturb(&mut o, perturb, i, Site::Attn);
        let m = be.add(&x, &o)?;
        let h2 = be.rms_norm(&m, &l.post_attention_layernorm, c.rms_norm_eps)?;
        let u = be.gated(
            &l.gate.forward(&be, &h2)?,
            &l.up.forward(&be, &h2)?,
            c.hidden_act,
        )?;
        let mut d = l.down.forward(&be, &u)?;
        add_perturb(&mut d, perturb, i, Site::Mlp);
        let y = be.add(&m, &d)?;
        x_in.push(std::mem::replace(&mut x, y));
        x_mid.push(m);
    }
    Ok(Saved {
        x_in,
        x_mid,
        out: x,
    })
}

/// Final norm + lm_head at the predicting rows + cross-entropy: the loss
/// and its gradient w.r.t. the last layer's output `[n, hidden]`.
fn head_loss(
    text: &TextModel<Cpu>,
    y: &Tensor,
    targets: &[(usize, u32)],
) -> Result<(f64, Vec<f32>)> {
    let be = Cpu;
    let hidden = y.cols();
    let vocab = text.cfg.vocab_size;
    let mut rows = Vec::with_capacity(targets.len() * hidden);
    for &(p, _) in targets {
        rows.extend_from_slice(y.row(p));
    }
    let rows = Tensor::new(vec![targets.len(), hidden], rows)?;
    let z = be.rms_norm(&rows, &text.norm, text.cfg.rms_norm_eps)?;
    let w = lm_head(text);
    let logits = be.linear(&z, w, None)?;
    let labels: Vec<u32> = targets.iter().map(|&(_, l)| l).collect();
    let (loss, dlogits) = cross_entropy(&logits.data, vocab, &labels);
    let dz = matmul_nn(&dlogits, targets.len(), &dense(w)?.data, vocab, hidden);
    let drows = rms_norm_backward(&rows.data, &text.norm.data, text.cfg.rms_norm_eps, &dz);
    let mut dy = vec![0.0f32; y.numel()];
    for (k, &(p, _)) in targets.iter().enumerate() {
        // Rows are distinct (one per caption position), so no accumulation.
        dy[p * hidden..(p + 1) * hidden].copy_from_slice(&drows[k * hidden..(k + 1) * hidden]);
    }
    Ok((loss, dy))
}

/// The loss alone (the finite-difference tests' objective).
#[cfg(test)]
fn forward_loss(
    text: &TextModel<Cpu>,
    x0: &Tensor,
    targets: &[(usize, u32)],
    perturb: Option<Perturb>,
) -> Result<f64> {
    let saved = forward(text, x0, perturb)?;
    Ok(head_loss(text, &saved.out, targets)?.0)
}

/// Forward, loss, then backward through every layer; `on_grad(layer, site,
/// g)` receives each captured gradient `[n, hidden]` (row-major), layers
/// from last to first, `Mlp` before `Attn`. Returns the loss.
fn loss_and_grads(
    text: &TextModel<Cpu>,
    x0: &Tensor,
    targets: &[(usize, u32)],
    on_grad: &mut dyn FnMut(usize, Site, &[f32]),
) -> Result<f64> {
    let be = Cpu;
    let c = &text.cfg;
    let eps = c.rms_norm_eps;
    let n = x0.rows();
    let saved = forward(text, x0, None)?;
    let (loss, mut dx) = head_loss(text, &saved.out, targets)?;
    for i in (0..text.layers.len()).rev() {
        let l = &text.layers[i];
        // MLP: y = m + down(act(gate(h2)) * up(h2)), h2 = rms_norm(m).
        on_grad(i, Site::Mlp, &dx);
        let m = &saved.x_mid[i];
        let h2 = be.rms_norm(m, &l.post_attention_layernorm, eps)?;
        let gate = l.gate.forward(&be, &h2)?;
        let up = l.up.forward(&be, &h2)?;
        let du = linear_backward(&dx, n, &l.down)?;
        let (dgate, dup) = gated_backward(&gate.data, &up.data, &du, c.hidden_act);
        let mut dh2 = linear_backward(&dgate, n, &l.gate)?;
        add_assign(&mut dh2, &linear_backward(&dup, n, &l.up)?);
        let dm = rms_norm_backward(&m.data, &l.post_attention_layernorm.data, eps, &dh2);
        add_assign(&mut dx, &dm);
        // Attention: m = x + o(attn(rope(q(h)), rope(k(h)), v(h))), h = rms_norm(x).
        on_grad(i, Site::Attn, &dx);
        if i == 0 {
            break; // nothing below layer 0's attention output is captured
        }
        let x = &saved.x_in[i];
        let h = be.rms_norm(x, &l.input_layernorm, eps)?;
        let q = be.rope(&l.q.forward(&be, &h)?, c.num_attention_heads, &text.rope, 0)?;
        let k = be.rope(&l.k.forward(&be, &h)?, c.num_key_value_heads, &text.rope, 0)?;
        let v = l.v.forward(&be, &h)?;
        let da = linear_backward(&dx, n, &l.o)?;
        let (dq, dk, dv) = attention_backward(&q.data, &k.data, &v.data, &da, n, text.attn_shape());
        let dq = rope_backward(&dq, c.num_attention_heads, &text.rope, 0);
        let dk = rope_backward(&dk, c.num_key_value_heads, &text.rope, 0);
        let mut dh = linear_backward(&dq, n, &l.q)?;
        add_assign(&mut dh, &linear_backward(&dk, n, &l.k)?);
        add_assign(&mut dh, &linear_backward(&dv, n, &l.v)?);
        let dxa = rms_norm_backward(&x.data, &l.input_layernorm.data, eps, &dh);
        add_assign(&mut dx, &dxa);
    }
    Ok(loss)
}

fn add_assign(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

/// dX `[rows, in]` of a linear layer from dY `[rows, out]`.
fn linear_backward(dy: &[f32], rows: usize, lin: &Linear<Cpu>) -> Result<Vec<f32>> {
    let w = dense(&lin.w)?;
    Ok(matmul_nn(dy, rows, &w.data, w.shape[0], w.shape[1]))
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

/// Transpose of [`Cpu::rope`](crate::backend::Backend::rope) (rotation by
/// minus the angle): `da = ga c + gb s`, `db = gb c - ga s`.
fn rope_backward(dy: &[f32], heads: usize, rope: &Rope, pos0: usize) -> Vec<f32> {
    let d = rope.head_dim;
    let half = d / 2;
    let mut dx = dy.to_vec();
    dx.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(r, row)| {
            let pos = (pos0 + r) as f32;
            for i in 0..half {
                // The same angle as the forward (f32 product, then sin/cos).
                let f = rope.inv_freq[i] * pos;
                let (s, c) = f.sin_cos();
                for h in 0..heads {
                    let ga = row[h * d + i];
                    let gb = row[h * d + i + half];
                    row[h * d + i] = ga * c + gb * s;
                    row[h * d + i + half] = gb * c - ga * s;
                }
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
    use crate::generate::{nll, target_logits, Prompt};
    use crate::model::llava::Vlm;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

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
            let an = rope_backward(&r, heads, &rope, pos0);
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

    fn fixture() -> Vlm<Cpu> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llava_qwen128");
        Vlm::<Cpu>::load(&Cpu, &dir).unwrap()
    }

    /// A 20-token sample: text 0..3, vision 3..9 (random features in place
    /// of the image tokens), text 9..12, caption 12..18, text 18..20.
    struct Sample {
        ids: Vec<u32>,
        x0: Tensor,
        features: Tensor,
        vision: Vec<bool>,
        caption: Vec<bool>,
    }

    const VISION: std::ops::Range<usize> = 3..9;
    const CAPTION: std::ops::Range<usize> = 12..18;
    const N: usize = 20;

    fn sample(m: &Vlm<Cpu>, seed: u64) -> Sample {
        let mut rng = StdRng::seed_from_u64(seed);
        let vocab = m.cfg.text.vocab_size as u32;
        let hidden = m.cfg.text.hidden_size;
        let ids: Vec<u32> = (0..N).map(|_| rng.random_range(0..vocab)).collect();
        let mut x0 = m.text.embed(&Cpu, &ids).unwrap();
        // Features with the embeddings' scale.
        let amp = x0.data.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let features = Tensor::new(
            vec![VISION.len(), hidden],
            rand_vec(&mut rng, VISION.len() * hidden, amp),
        )
        .unwrap();
        Cpu.set_rows(&mut x0, VISION.start, &features).unwrap();
        Sample {
            ids,
            x0,
            features,
            vision: (0..N).map(|t| VISION.contains(&t)).collect(),
            caption: (0..N).map(|t| CAPTION.contains(&t)).collect(),
        }
    }

    /// Every captured gradient, `[layer][site]`.
    fn all_grads(m: &Vlm<Cpu>, s: &Sample) -> (f64, Vec<[Vec<f32>; 2]>) {
        let targets = check_inputs(&m.text, &s.x0, &s.ids, &s.caption).unwrap();
        let mut g = vec![[Vec::new(), Vec::new()]; m.text.layers.len()];
        let loss = loss_and_grads(&m.text, &s.x0, &targets, &mut |i, site, gr| {
            g[i][site as usize] = gr.to_vec();
        })
        .unwrap();
        (loss, g)
    }

    #[test]
    fn fixture_loss_matches_target_logits() {
        let m = fixture();
        let s = sample(&m, 7);
        let sens = sample_sensitivity(&m.text, &s.x0, &s.ids, &s.vision, &s.caption).unwrap();
        // The generate path: prompt = tokens before the caption with the
        // image features in place, target = the caption.
        let prompt = Prompt {
            ids: s.ids[..CAPTION.start].to_vec(),
            image_span: Some((VISION.start, VISION.len())),
        };
        let target = &s.ids[CAPTION];
        let logits = target_logits(&Cpu, &m, &prompt, Some(&s.features), target).unwrap();
        let want = logits
            .iter()
            .zip(target)
            .map(|(l, &t)| nll(l, t))
            .sum::<f64>()
            / target.len() as f64;
        assert!(
            (sens.loss - want).abs() <= 1e-5 * want.abs(),
            "loss {} vs target_logits {want}",
            sens.loss
        );
        assert_eq!(sens.layers.len(), m.text.layers.len());
        assert!(sens.has_vision);
    }

    #[test]
    fn fixture_gradients_match_fd() {
        let m = fixture();
        let s = sample(&m, 8);
        let targets = check_inputs(&m.text, &s.x0, &s.ids, &s.caption).unwrap();
        let (_, g) = all_grads(&m, &s);
        let hidden = m.cfg.text.hidden_size;
        let mut rng = StdRng::seed_from_u64(9);
        let eps = 1e-2f32;
        for (layer, sites) in g.iter().enumerate() {
            for site in [Site::Attn, Site::Mlp] {
                let gs = &sites[site as usize];
                let scale = gs.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
                let atol = FD_ATOL_FRAC * scale;
                // Vision, text and caption rows; the largest element of each.
                for t in [4, 8, 10, 11, 12, 15, 16] {
                    let row = &gs[t * hidden..(t + 1) * hidden];
                    let jmax = (0..hidden)
                        .max_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()))
                        .unwrap();
                    for j in [jmax, rng.random_range(0..hidden)] {
                        let at = |eps| {
                            let p = Perturb {
                                layer,
                                site,
                                t,
                                j,
                                eps,
                            };
                            forward_loss(&m.text, &s.x0, &targets, Some(p)).unwrap()
                        };
                        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                        let an = row[j] as f64;
                        assert!(
                            (fd - an).abs() <= FD_RTOL * an.abs() + atol,
                            "layer {layer} {site:?} ({t}, {j}): analytic {an:.6e}, \
                             finite difference {fd:.6e} (largest |g| {scale:.3e})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fixture_zero_gradients_and_means() {
        let m = fixture();
        let s = sample(&m, 10);
        let hidden = m.cfg.text.hidden_size;
        let (loss, g) = all_grads(&m, &s);
        // The last caption-predicting row is CAPTION.end - 2: every later
        // row is exactly zero in every layer, that row is not.
        let last_pred = CAPTION.end - 2;
        let last = m.text.layers.len() - 1;
        for (i, sites) in g.iter().enumerate() {
            for (k, gs) in sites.iter().enumerate() {
                assert_eq!(gs.len(), N * hidden);
                let row = |t: usize| &gs[t * hidden..(t + 1) * hidden];
                for t in last_pred + 1..N {
                    assert!(
                        row(t).iter().all(|&v| v == 0.0),
                        "layer {i} site {k} row {t}"
                    );
                }
                assert!(
                    row(last_pred).iter().any(|&v| v != 0.0),
                    "layer {i} site {k}"
                );
                // Last layer: only predicting rows carry gradient.
                if i == last {
                    for t in 0..N {
                        let predicts = t + 1 < N && CAPTION.contains(&(t + 1));
                        assert_eq!(
                            row(t).iter().any(|&v| v != 0.0),
                            predicts,
                            "last layer site {k} row {t}"
                        );
                    }
                }
            }
        }
        let sens = sample_sensitivity(&m.text, &s.x0, &s.ids, &s.vision, &s.caption).unwrap();
        assert_eq!(sens.loss, loss);
        let mean = |gs: &[f32], rows: std::ops::Range<usize>| {
            let n = (rows.len() * hidden) as f64;
            gs[rows.start * hidden..rows.end * hidden]
                .iter()
                .map(|&v| v.abs() as f64)
                .sum::<f64>()
                / n
        };
        for (i, lg) in sens.layers.iter().enumerate() {
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
            assert!(close(lg.attn_vision, mean(&g[i][0], VISION)), "layer {i}");
            assert!(close(lg.attn_caption, mean(&g[i][0], CAPTION)), "layer {i}");
            assert!(close(lg.mlp_vision, mean(&g[i][1], VISION)), "layer {i}");
            assert!(close(lg.mlp_caption, mean(&g[i][1], CAPTION)), "layer {i}");
            assert!(lg.attn_caption > 0.0 && lg.mlp_caption > 0.0, "layer {i}");
        }
        assert_eq!(sens.layers[last].attn_vision, 0.0);
        assert_eq!(sens.layers[last].mlp_vision, 0.0);
        assert!(sens.layers[0].attn_vision > 0.0 && sens.layers[0].mlp_vision > 0.0);
        // No vision positions: zero means, has_vision false.
        let none = vec![false; N];
        let sens = sample_sensitivity(&m.text, &s.x0, &s.ids, &none, &s.caption).unwrap();
        assert!(!sens.has_vision);
        assert!(sens
            .layers
            .iter()
            .all(|l| l.attn_vision == 0.0 && l.mlp_vision == 0.0));
    }

    #[test]
    fn rejects_bad_samples_and_packed_weights() {
        let mut m = fixture();
        let s = sample(&m, 11);
        let err = |caption: &[bool], m: &Vlm<Cpu>| {
            sample_sensitivity(&m.text, &s.x0, &s.ids, &s.vision, caption)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&[false; N], &m).contains("no caption token"));
        // A caption only at position 0 predicts nothing (HF shifts labels).
        let mut first = [false; N];
        first[0] = true;
        assert!(err(&first, &m).contains("no caption token"));
        assert!(err(&[true; 3], &m).contains("caption mask"));
        let (out, inp) = m.text.layers[1].gate.w.shape();
        let dense = dense(&m.text.layers[1].gate.w).unwrap().data.clone();
        let packed =
            crate::quant::pseudo::quantize_linear("gate", &dense, out, inp, 4, 128).unwrap();
        m.text.layers[1].gate.w = CpuWeight::Packed(packed);
        assert!(err(&s.caption, &m).contains("unquantized"));
    }

    /// Not a pass/fail check: prints the time of one sensitivity pass on the
    /// fixture at 150 tokens (`--nocapture`).
    #[test]
    fn fixture_timing() {
        let m = fixture();
        let mut rng = StdRng::seed_from_u64(12);
        let n = 150;
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..448)).collect();
        let x0 = m.text.embed(&Cpu, &ids).unwrap();
        let vision: Vec<bool> = (0..n).map(|t| (10..74).contains(&t)).collect();
        let caption: Vec<bool> = (0..n).map(|t| t >= 90).collect();
        let t0 = std::time::Instant::now();
        let sens = sample_sensitivity(&m.text, &x0, &ids, &vision, &caption).unwrap();
        eprintln!(
            "sample_sensitivity: {n} tokens, {} layers: {:.1} ms (loss {:.4})",
            sens.layers.len(),
            t0.elapsed().as_secs_f64() * 1e3,
            sens.loss
        );
        assert!(sens.loss.is_finite());
    }
}
