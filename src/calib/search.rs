//! The per-layer scale search of MBQ and AWQ, and SmoothQuant's fixed
//! scales (see docs/MBQ.md), on any [`Backend`]: the model's weights stay
//! on the host in f32 (`TextModel<Cpu>`, where the chosen scales are
//! folded in); the layer's activations live on the backend, each grid
//! point's fake-quantized linears are uploaded to it, and the outputs come
//! back to the host for the loss (in f64). Every backend keeps f32 weights
//! that f16 cannot hold exactly, so the backends differ only by f32
//! summation order and the odd weight code or INT8 activation that this
//! moves across a rounding boundary (tests/calibrate_backends.rs).
//!
//! For decoder layer `i` and its inputs `X` (one matrix per calibration
//! sample), four groups of linears share a per-input-channel scale `s`:
//!
//! | group    | scaled linears | `s` folded into          | output compared    |
//! |----------|----------------|--------------------------|--------------------|
//! | attn_in  | q, k, v        | input_layernorm          | self-attention out |
//! | attn_out | o              | v_proj rows (same shape) | o_proj out         |
//! | mlp_in   | gate, up       | post_attention_layernorm | MLP out            |
//! | mlp_out  | down           | up_proj rows             | down_proj out      |
//!
//! For `alpha` in `0, 0.05, ..., 0.95`: `s = mean_tokens(|X|)^alpha`,
//! clamped to `>= 1e-4`, divided by `sqrt(max(s) min(s))`. The scaled
//! linears are replaced by their quantized form (weight-only: `Q(W s) / s`
//! on `X`; W4A8: `Q(W s)` on `Qa(X / s)`), the other linears of the module
//! stay FP, and the module's output is compared with its FP output:
//! - MBQ, MAE: `(sum_cap |d| + r sum_vis |d|) / (n_cap + n_vis)` (elements);
//! - MBQ, MSE: `mean_cap(d^2) + r mean_vis(d^2)`;
//! - AWQ (plain): `mean(|d|)` or `mean(d^2)` over every token.
//!
//! All four groups are searched on the FP layer's own features; then every
//! chosen scale is folded in (the layer's FP output is unchanged).

use crate::backend::cpu::{Cpu, CpuWeight};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::text::TextModel;
use crate::model::Linear;
use crate::quant::{pseudo, w4a8};
use crate::tensor::Tensor;

/// Grid points of alpha: `k / GRID` for `k in 0..GRID`.
pub const GRID: usize = 20;
/// SmoothQuant's migration strength.
pub const SMOOTHQUANT_ALPHA: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Mae,
    Mse,
}

/// How the linears are quantized inside the search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    /// Group-wise asymmetric weights (the MBQ reference quantizer).
    Weight { bits: u32, group_size: usize },
    /// Per-output-channel symmetric INT4 weights, per-token INT8 activations.
    W4A8,
}

/// How the reconstruction error of the tokens is weighted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weighting {
    /// AWQ: every token alike.
    Plain,
    /// MBQ: caption tokens weight 1, vision tokens `ratio`, others 0.
    Modality { ratio: f64 },
}

/// Per-sample token masks.
#[derive(Clone, Debug)]
pub struct TokenMasks {
    pub vision: Vec<bool>,
    pub caption: Vec<bool>,
}

/// The four groups, in search order.
pub const GROUPS: [&str; 4] = ["attn_in", "attn_out", "mlp_in", "mlp_out"];

/// The outcome of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupResult {
    pub name: &'static str,
    pub alpha: f64,
    pub loss: f64,
    pub losses: Vec<f64>,
    pub scales: Vec<f32>,
}

/// Sums of the output error over the calibration samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossAcc {
    cap: f64,
    vis: f64,
    all: f64,
    n_cap: usize,
    n_vis: usize,
    n_all: usize,
}

impl LossAcc {
    /// Adds the error between `fp` and `q` (`[n, d]`) of one sample.
    pub fn add(&mut self, fp: &Tensor, q: &Tensor, m: &TokenMasks, kind: LossKind) {
        let d = fp.cols();
        for t in 0..fp.rows() {
            let e: f64 = fp.data[t * d..(t + 1) * d]
                .iter()
                .zip(&q.data[t * d..(t + 1) * d])
                .map(|(a, b)| {
                    let x = (*a as f64) - (*b as f64);
                    match kind {
                        LossKind::Mae => x.abs(),
                        LossKind::Mse => x * x,
                    }
                })
                .sum();
            self.all += e;
            self.n_all += d;
            if m.caption[t] {
                self.cap += e;
                self.n_cap += d;
            }
            if m.vision[t] {
                self.vis += e;
                self.n_vis += d;
            }
        }
    }

    /// The loss as the official code computes it (see the module doc).
    /// With no vision tokens at all MBQ's loss is the caption term alone.
    pub fn value(&self, kind: LossKind, w: Weighting) -> f64 {
        let mean = |s: f64, n: usize| if n == 0 { 0.0 } else { s / n as f64 };
        match w {
            Weighting::Plain => mean(self.all, self.n_all),
            Weighting::Modality { ratio } => match kind {
                LossKind::Mae => mean(self.cap + ratio * self.vis, self.n_cap + self.n_vis),
                LossKind::Mse => mean(self.cap, self.n_cap) + ratio * mean(self.vis, self.n_vis),
            },
        }
    }
}

/// Per-column mean and max of |x| over every row of every sample, added
/// one sample at a time.
#[derive(Clone, Debug, Default)]
pub struct ColStats {
    sum: Vec<f64>,
    max: Vec<f32>,
    rows: usize,
}

impl ColStats {
    pub fn add(&mut self, x: &Tensor) {
        let d = x.cols();
        if self.sum.is_empty() {
            self.sum = vec![0.0; d];
            self.max = vec![0.0; d];
        }
        for r in x.data.chunks_exact(d) {
            for ((s, m), v) in self.sum.iter_mut().zip(self.max.iter_mut()).zip(r) {
                *s += v.abs() as f64;
                *m = m.max(v.abs());
            }
        }
        self.rows += x.rows();
    }

    /// Mean of |x| per column.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum.iter().map(|v| (v / n) as f32).collect()
    }

    /// Max of |x| per column.
    pub fn max(&self) -> Vec<f32> {
        self.max.clone()
    }
}

/// Mean of |x| per column over every row of every sample.
pub fn mean_abs(xs: &[Tensor]) -> Vec<f32> {
    let mut s = ColStats::default();
    xs.iter().for_each(|x| s.add(x));
    s.mean()
}

/// Max of |x| per column over every row of every sample.
pub fn max_abs(xs: &[Tensor]) -> Vec<f32> {
    let mut s = ColStats::default();
    xs.iter().for_each(|x| s.add(x));
    s.max()
}

/// The grid point's scales: `x_mean^alpha`, clamped, normalised.
pub fn grid_scales(x_mean: &[f32], alpha: f64) -> Vec<f32> {
    let s: Vec<f32> = x_mean
        .iter()
        .map(|&m| (m.powf(alpha as f32)).max(1e-4))
        .collect();
    let max = s.iter().copied().fold(f32::MIN, f32::max);
    let min = s.iter().copied().fold(f32::MAX, f32::min);
    let norm = (max * min).sqrt();
    s.iter().map(|v| v / norm).collect()
}

/// SmoothQuant's scales: `max|X|^a / max|W|^(1-a)` per input channel, the
/// weight maximum taken over the rows of every linear of the group.
pub fn smoothquant_scales(x_max: &[f32], ws: &[&Tensor], alpha: f64) -> Vec<f32> {
    let d = x_max.len();
    let mut w_max = vec![0.0f32; d];
    for w in ws {
        for r in w.data.chunks_exact(d) {
            for (a, v) in w_max.iter_mut().zip(r) {
                *a = a.max(v.abs());
            }
        }
    }
    x_max
        .iter()
        .zip(&w_max)
        .map(|(&x, &w)| (x.powf(alpha as f32) / w.max(1e-5).powf(1.0 - alpha as f32)).max(1e-5))
        .collect()
}

fn dense(l: &Linear<Cpu>) -> Result<&Tensor> {
    match &l.w {
        CpuWeight::Dense(t) => Ok(t),
        CpuWeight::Packed(_) => Err(Error::invalid(
            "calibration needs an unquantized model (found packed weights)",
        )),
    }
}

/// A linear as the search runs it, on the backend: an effective weight,
/// its bias, and (for W4A8) the per-channel scales the input is divided by
/// before the per-token activation quantization.
struct QLinear<B: Backend> {
    w: B::Weight,
    b: Option<B::Tensor>,
    act_div: Option<B::Tensor>,
}

impl<B: Backend> QLinear<B> {
    fn new(be: &B, w: &Tensor, b: Option<&Tensor>, act_div: Option<&[f32]>) -> Result<Self> {
        Ok(QLinear {
            w: be.weight(w)?,
            b: b.map(|b| be.upload(b)).transpose()?,
            act_div: act_div
                .map(|s| be.upload(&Tensor::new(vec![s.len()], s.to_vec())?))
                .transpose()?,
        })
    }

    fn fp(be: &B, l: &Linear<Cpu>) -> Result<Self> {
        Self::new(be, dense(l)?, l.b.as_ref(), None)
    }

    /// The quantized form of `l` with its input channels scaled by `s`.
    fn quantized(be: &B, l: &Linear<Cpu>, s: &[f32], q: QuantKind) -> Result<Self> {
        let w = dense(l)?;
        let (out, inp) = (w.shape[0], w.shape[1]);
        let mut ws = w.data.clone();
        for r in ws.chunks_exact_mut(inp) {
            for (v, k) in r.iter_mut().zip(s) {
                *v *= k;
            }
        }
        let (data, act_div) = match q {
            QuantKind::Weight { bits, group_size } => {
                let mut d = pseudo::fake_quantize(&ws, out, inp, bits, group_size)?;
                for r in d.chunks_exact_mut(inp) {
                    for (v, k) in r.iter_mut().zip(s) {
                        *v /= k;
                    }
                }
                (d, None)
            }
            QuantKind::W4A8 => (w4a8::fake_quantize_w4_per_channel(&ws, out, inp), Some(s)),
        };
        Self::new(
            be,
            &Tensor::new(vec![out, inp], data)?,
            l.b.as_ref(),
            act_div,
        )
    }

    /// W4A8 divides the input by the scales and fake-quantizes it per token
    /// on the device (`div_cols`, `quant_act_int8`), then the float product.
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match &self.act_div {
            None => be.linear(x, &self.w, self.b.as_ref()),
            Some(s) => {
                let xq = be.quant_act_int8(&be.div_cols(x, s)?)?;
                be.linear(&xq, &self.w, self.b.as_ref())
            }
        }
    }
}

/// Everything a layer's search needs from its FP forward, per sample.
pub struct LayerFeatures<B: Backend> {
    /// Inputs of q/k/v (after input_layernorm), of o, of gate/up (after
    /// post_attention_layernorm), of down; on the backend.
    pub attn_in: Vec<B::Tensor>,
    pub attn_out: Vec<B::Tensor>,
    pub mlp_in: Vec<B::Tensor>,
    pub mlp_out: Vec<B::Tensor>,
    /// FP outputs of the self-attention (= o_proj) and the MLP (= down_proj),
    /// on the host (the loss is computed there).
    pub attn_y: Vec<Tensor>,
    pub mlp_y: Vec<Tensor>,
    /// The layer's outputs, on the backend.
    pub out: Vec<B::Tensor>,
    /// |x| statistics of the four groups' inputs, in [`GROUPS`] order.
    pub stats: [ColStats; 4],
}

impl<B: Backend> LayerFeatures<B> {
    /// The |x| statistics of a group's input.
    pub fn stats(&self, group: &str) -> Result<&ColStats> {
        GROUPS
            .iter()
            .position(|g| *g == group)
            .map(|k| &self.stats[k])
            .ok_or_else(|| Error::invalid(format!("unknown scale group {group}")))
    }
}

/// Self-attention of a layer on its normed input `h` with the given q, k,
/// v, o linears, causal over the sample's positions `0..n` (a one-layer
/// cache of exactly `n` positions).
fn attention<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    h: &B::Tensor,
    [q, k, v, o]: [&QLinear<B>; 4],
) -> Result<(B::Tensor, B::Tensor)> {
    let c = &text.cfg;
    let qh = be.rope(&q.forward(be, h)?, c.num_attention_heads, &text.rope, 0)?;
    let kh = be.rope(&k.forward(be, h)?, c.num_key_value_heads, &text.rope, 0)?;
    let vh = v.forward(be, h)?;
    let mut cache = be.new_cache(1, text.kv_dim(), be.dims(h).0)?;
    let a = be.attention_cached(&qh, &kh, &vh, &mut cache, 0, 0, text.attn_shape())?;
    let y = o.forward(be, &a)?;
    Ok((a, y))
}

fn mlp<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    h: &B::Tensor,
    gate: &QLinear<B>,
    up: &QLinear<B>,
    down: &QLinear<B>,
) -> Result<(B::Tensor, B::Tensor)> {
    let g = be.gated(
        &gate.forward(be, h)?,
        &up.forward(be, h)?,
        text.cfg.hidden_act,
    )?;
    let y = down.forward(be, &g)?;
    Ok((g, y))
}

/// The FP forward of layer `i` on every sample (its inputs `xs` on the
/// backend), keeping the search's features.
pub fn layer_features<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    i: usize,
    xs: &[B::Tensor],
) -> Result<LayerFeatures<B>> {
    let l = &text.layers[i];
    let eps = text.cfg.rms_norm_eps;
    let fp = |l: &Linear<Cpu>| QLinear::fp(be, l);
    let (q, k, v, o) = (fp(&l.q)?, fp(&l.k)?, fp(&l.v)?, fp(&l.o)?);
    let (gate, up, down) = (fp(&l.gate)?, fp(&l.up)?, fp(&l.down)?);
    let ln1 = be.upload(&l.input_layernorm)?;
    let ln2 = be.upload(&l.post_attention_layernorm)?;
    let mut f = LayerFeatures {
        attn_in: vec![],
        attn_out: vec![],
        mlp_in: vec![],
        mlp_out: vec![],
        attn_y: vec![],
        mlp_y: vec![],
        out: vec![],
        stats: Default::default(),
    };
    for x in xs {
        let h = be.rms_norm(x, &ln1, eps)?;
        let (a, ay) = attention(be, text, &h, [&q, &k, &v, &o])?;
        let x1 = be.add(x, &ay)?;
        let h2 = be.rms_norm(&x1, &ln2, eps)?;
        let (g, my) = mlp(be, text, &h2, &gate, &up, &down)?;
        f.out.push(be.add(&x1, &my)?);
        for (st, t) in f.stats.iter_mut().zip([&h, &a, &h2, &g]) {
            st.add(&be.download(t)?);
        }
        f.attn_in.push(h);
        f.attn_out.push(a);
        f.mlp_in.push(h2);
        f.mlp_out.push(g);
        f.attn_y.push(be.download(&ay)?);
        f.mlp_y.push(be.download(&my)?);
    }
    Ok(f)
}

/// Whether the attn_out group applies: v and o of the same shape (no GQA).
pub fn has_attn_out(text: &TextModel<Cpu>, i: usize) -> Result<bool> {
    let l = &text.layers[i];
    Ok(dense(&l.v)?.shape == dense(&l.o)?.shape)
}

/// The loss of one group of layer `i` with scales `s`.
#[allow(clippy::too_many_arguments)]
pub fn group_loss<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    i: usize,
    group: &str,
    f: &LayerFeatures<B>,
    masks: &[TokenMasks],
    s: &[f32],
    q: QuantKind,
    kind: LossKind,
    w: Weighting,
) -> Result<f64> {
    let l = &text.layers[i];
    let mut acc = LossAcc::default();
    match group {
        "attn_in" => {
            let (lq, lk, lv) = (
                QLinear::quantized(be, &l.q, s, q)?,
                QLinear::quantized(be, &l.k, s, q)?,
                QLinear::quantized(be, &l.v, s, q)?,
            );
            let o = QLinear::fp(be, &l.o)?;
            for (n, h) in f.attn_in.iter().enumerate() {
                let (_, y) = attention(be, text, h, [&lq, &lk, &lv, &o])?;
                acc.add(&f.attn_y[n], &be.download(&y)?, &masks[n], kind);
            }
        }
        "attn_out" => {
            let o = QLinear::quantized(be, &l.o, s, q)?;
            for (n, a) in f.attn_out.iter().enumerate() {
                let y = o.forward(be, a)?;
                acc.add(&f.attn_y[n], &be.download(&y)?, &masks[n], kind);
            }
        }
        "mlp_in" => {
            let (g, u) = (
                QLinear::quantized(be, &l.gate, s, q)?,
                QLinear::quantized(be, &l.up, s, q)?,
            );
            let d = QLinear::fp(be, &l.down)?;
            for (n, h) in f.mlp_in.iter().enumerate() {
                let (_, y) = mlp(be, text, h, &g, &u, &d)?;
                acc.add(&f.mlp_y[n], &be.download(&y)?, &masks[n], kind);
            }
        }
        "mlp_out" => {
            let d = QLinear::quantized(be, &l.down, s, q)?;
            for (n, g) in f.mlp_out.iter().enumerate() {
                let y = d.forward(be, g)?;
                acc.add(&f.mlp_y[n], &be.download(&y)?, &masks[n], kind);
            }
        }
        other => return Err(Error::invalid(format!("unknown scale group {other}"))),
    }
    Ok(acc.value(kind, w))
}

/// The group's input features.
pub fn group_inputs<'a, B: Backend>(f: &'a LayerFeatures<B>, group: &str) -> &'a [B::Tensor] {
    match group {
        "attn_in" => &f.attn_in,
        "attn_out" => &f.attn_out,
        "mlp_in" => &f.mlp_in,
        _ => &f.mlp_out,
    }
}

/// Searches alpha for one group (MBQ / AWQ): the grid point with the lowest
/// loss (the first on ties, as the official `<` comparison).
#[allow(clippy::too_many_arguments)]
pub fn search_group<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    i: usize,
    group: &'static str,
    f: &LayerFeatures<B>,
    masks: &[TokenMasks],
    q: QuantKind,
    kind: LossKind,
    w: Weighting,
    mut on_point: impl FnMut(),
) -> Result<GroupResult> {
    let x_mean = f.stats(group)?.mean();
    let mut best: Option<(usize, f64, Vec<f32>)> = None;
    let mut losses = Vec::with_capacity(GRID);
    for k in 0..GRID {
        let alpha = k as f64 / GRID as f64;
        let s = grid_scales(&x_mean, alpha);
        let loss = group_loss(be, text, i, group, f, masks, &s, q, kind, w)?;
        if !loss.is_finite() {
            return Err(Error::invalid(format!(
                "layer {i} {group}: the loss at alpha {alpha} is not finite ({loss})"
            )));
        }
        if best.as_ref().is_none_or(|b| loss < b.1) {
            best = Some((k, loss, s));
        }
        losses.push(loss);
        on_point();
    }
    let (k, loss, scales) =
        best.ok_or_else(|| Error::invalid(format!("layer {i} {group}: empty alpha grid")))?;
    Ok(GroupResult {
        name: group,
        alpha: k as f64 / GRID as f64,
        loss,
        losses,
        scales,
    })
}

/// SmoothQuant's fixed scales for the two groups it smooths (attn_in,
/// mlp_in), with their loss for the report.
#[allow(clippy::too_many_arguments)]
pub fn smoothquant_group<B: Backend>(
    be: &B,
    text: &TextModel<Cpu>,
    i: usize,
    group: &'static str,
    f: &LayerFeatures<B>,
    masks: &[TokenMasks],
    kind: LossKind,
) -> Result<GroupResult> {
    let l = &text.layers[i];
    let ws: Vec<&Tensor> = match group {
        "attn_in" => vec![dense(&l.q)?, dense(&l.k)?, dense(&l.v)?],
        "mlp_in" => vec![dense(&l.gate)?, dense(&l.up)?],
        other => {
            return Err(Error::invalid(format!(
                "SmoothQuant smooths attn_in and mlp_in only, not {other}"
            )))
        }
    };
    let s = smoothquant_scales(&f.stats(group)?.max(), &ws, SMOOTHQUANT_ALPHA);
    let loss = group_loss(
        be,
        text,
        i,
        group,
        f,
        masks,
        &s,
        QuantKind::W4A8,
        kind,
        Weighting::Plain,
    )?;
    Ok(GroupResult {
        name: group,
        alpha: SMOOTHQUANT_ALPHA,
        loss,
        losses: vec![loss],
        scales: s,
    })
}

fn scale_cols(w: &mut Tensor, s: &[f32]) {
    let d = w.cols();
    for r in w.data.chunks_exact_mut(d) {
        for (v, k) in r.iter_mut().zip(s) {
            *v *= k;
        }
    }
}

fn div_rows(l: &mut Linear<Cpu>, s: &[f32]) -> Result<()> {
    let CpuWeight::Dense(w) = &mut l.w else {
        return Err(Error::invalid("calibration needs an unquantized model"));
    };
    let d = w.cols();
    // With GQA, v has fewer rows than o has columns: the last rows are
    // the ones that feed o's scaled columns (official `fc1.weight[-n:]`).
    let r0 = w.rows() - s.len();
    for (k, r) in w.data.chunks_exact_mut(d).skip(r0).enumerate() {
        r.iter_mut().for_each(|v| *v /= s[k]);
    }
    if let Some(b) = &mut l.b {
        let n = b.data.len();
        for (k, v) in b.data[n - s.len()..].iter_mut().enumerate() {
            *v /= s[k];
        }
    }
    Ok(())
}

fn mul_cols(l: &mut Linear<Cpu>, s: &[f32]) -> Result<()> {
    let CpuWeight::Dense(w) = &mut l.w else {
        return Err(Error::invalid("calibration needs an unquantized model"));
    };
    scale_cols(w, s);
    Ok(())
}

/// Folds a group's scales into layer `i`: the previous op divided, the
/// group's linears multiplied (the FP function is unchanged).
pub fn apply_scales(text: &mut TextModel<Cpu>, i: usize, group: &str, s: &[f32]) -> Result<()> {
    let l = &mut text.layers[i];
    let div_norm = |n: &mut Tensor| n.data.iter_mut().zip(s).for_each(|(v, k)| *v /= k);
    match group {
        "attn_in" => {
            div_norm(&mut l.input_layernorm);
            mul_cols(&mut l.q, s)?;
            mul_cols(&mut l.k, s)?;
            mul_cols(&mut l.v, s)?;
        }
        "attn_out" => {
            div_rows(&mut l.v, s)?;
            mul_cols(&mut l.o, s)?;
        }
        "mlp_in" => {
            div_norm(&mut l.post_attention_layernorm);
            mul_cols(&mut l.gate, s)?;
            mul_cols(&mut l.up, s)?;
        }
        "mlp_out" => {
            div_rows(&mut l.up, s)?;
            mul_cols(&mut l.down, s)?;
        }
        other => return Err(Error::invalid(format!("unknown scale group {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llava::Vlm;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn fixture() -> Vlm<Cpu> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/llava_qwen128");
        Vlm::<Cpu>::load(&Cpu, &dir).unwrap()
    }

    fn random(rng: &mut StdRng, rows: usize, cols: usize, amp: f32) -> Tensor {
        // Channels of very different magnitude, as in real activations.
        let data = (0..rows * cols)
            .map(|k| {
                let c = k % cols;
                let mag = if c.is_multiple_of(7) { 8.0 } else { 1.0 };
                amp * mag * (rng.random::<f32>() * 2.0 - 1.0)
            })
            .collect();
        Tensor::new(vec![rows, cols], data).unwrap()
    }

    fn inputs(h: usize) -> (Vec<Tensor>, Vec<TokenMasks>) {
        let mut rng = StdRng::seed_from_u64(7);
        let lens = [13, 9];
        let xs = lens.iter().map(|&n| random(&mut rng, n, h, 0.5)).collect();
        let masks = lens
            .iter()
            .map(|&n| TokenMasks {
                vision: (0..n).map(|t| (2..6).contains(&t)).collect(),
                caption: (0..n).map(|t| t >= n - 3).collect(),
            })
            .collect();
        (xs, masks)
    }

    /// Folding any scales into any group leaves the FP layer's outputs as
    /// they were, within f32 rounding.
    #[test]
    fn folding_scales_keeps_the_fp_output() {
        let be = Cpu;
        let mut vlm = fixture();
        let h = vlm.text.cfg.hidden_size;
        let (xs, _) = inputs(h);
        let before = layer_features(&be, &vlm.text, 0, &xs).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for group in GROUPS {
            let d = group_inputs(&before, group)[0].cols();
            let s: Vec<f32> = (0..d).map(|_| 0.25 + 3.0 * rng.random::<f32>()).collect();
            if group == "attn_out" {
                // GQA fixture: v has fewer rows than o has columns; the fold
                // is the official one only for equal shapes.
                assert!(!has_attn_out(&vlm.text, 0).unwrap());
                continue;
            }
            apply_scales(&mut vlm.text, 0, group, &s).unwrap();
        }
        let after = layer_features(&be, &vlm.text, 0, &xs).unwrap();
        const FOLD_RTOL: f32 = 1e-5;
        let check = |what: &str, xs: &[Tensor], ys: &[Tensor]| {
            for (a, b) in xs.iter().zip(ys) {
                let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a
                    .data
                    .iter()
                    .zip(&b.data)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(diff <= FOLD_RTOL * scale, "{what}: {diff} vs {scale}");
            }
        };
        check("layer output", &before.out, &after.out);
        // The attention and MLP outputs too (the inputs of the scaled
        // linears are divided by s: not compared).
        check("attention output", &before.attn_y, &after.attn_y);
        check("mlp output", &before.mlp_y, &after.mlp_y);
    }

    /// The attn_out fold (v rows / s, o columns * s) on a model without
    /// GQA: v and o made square by using the q projection's shape.
    #[test]
    fn attn_out_fold_keeps_the_attention_output() {
        let be = Cpu;
        let mut rng = StdRng::seed_from_u64(11);
        let (n, d) = (6, 12);
        let a = random(&mut rng, n, d, 1.0);
        let mut v = Linear::<Cpu> {
            w: CpuWeight::Dense(random(&mut rng, d, d, 0.3)),
            b: Some(random(&mut rng, 1, d, 0.1).reshape(vec![d]).unwrap()),
            act_quant: false,
        };
        let mut o = Linear::<Cpu> {
            w: CpuWeight::Dense(random(&mut rng, d, d, 0.3)),
            b: None,
            act_quant: false,
        };
        let y0 = o.forward(&be, &v.forward(&be, &a).unwrap()).unwrap();
        let s: Vec<f32> = (0..d).map(|_| 0.5 + rng.random::<f32>()).collect();
        div_rows(&mut v, &s).unwrap();
        mul_cols(&mut o, &s).unwrap();
        let y1 = o.forward(&be, &v.forward(&be, &a).unwrap()).unwrap();
        for (x, y) in y0.data.iter().zip(&y1.data) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// alpha = 0 gives s = 1: the quantized module is plain RTN, and the
    /// grid point's loss equals the loss of RTN-quantized weights.
    #[test]
    fn alpha_zero_is_rtn() {
        let be = Cpu;
        let vlm = fixture();
        let text = &vlm.text;
        let (xs, masks) = inputs(text.cfg.hidden_size);
        let f = layer_features(&be, text, 0, &xs).unwrap();
        let s = grid_scales(&mean_abs(&f.mlp_out), 0.0);
        assert!(s.iter().all(|&v| v == 1.0));
        let q = QuantKind::Weight {
            bits: 3,
            group_size: 128,
        };
        let r = search_group(
            &be,
            text,
            0,
            "mlp_out",
            &f,
            &masks,
            q,
            LossKind::Mae,
            Weighting::Plain,
            || {},
        )
        .unwrap();
        // RTN by hand: fake-quantize down_proj, run it, mean |diff|.
        let w = dense(&text.layers[0].down).unwrap();
        let wq = pseudo::fake_quantize(&w.data, w.shape[0], w.shape[1], 3, 128).unwrap();
        let wq = CpuWeight::Dense(Tensor::new(w.shape.clone(), wq).unwrap());
        let (mut sum, mut n) = (0f64, 0usize);
        for (g, y) in f.mlp_out.iter().zip(&f.mlp_y) {
            let yq = be.linear(g, &wq, None).unwrap();
            for (a, b) in y.data.iter().zip(&yq.data) {
                sum += (*a as f64 - *b as f64).abs();
                n += 1;
            }
        }
        assert_eq!(r.losses[0], sum / n as f64);
        assert_eq!(r.losses.len(), GRID);
    }

    /// The features' |x| statistics are those of the groups' own inputs.
    #[test]
    fn feature_stats_follow_the_group_inputs() {
        let be = Cpu;
        let vlm = fixture();
        let (xs, _) = inputs(vlm.text.cfg.hidden_size);
        let f = layer_features(&be, &vlm.text, 0, &xs).unwrap();
        for group in GROUPS {
            let st = f.stats(group).unwrap();
            assert_eq!(st.mean(), mean_abs(group_inputs(&f, group)), "{group}");
            assert_eq!(st.max(), max_abs(group_inputs(&f, group)), "{group}");
        }
        assert!(f.stats("qkv").is_err());
    }

    /// The weighted losses on a hand-computed case.
    #[test]
    fn weighted_loss_by_hand() {
        // Three tokens x 2 features: token 0 caption, 1 vision, 2 neither.
        let fp = Tensor::new(vec![3, 2], vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        let q = Tensor::new(vec![3, 2], vec![1.0, -1.0, 2.0, 4.0, 10.0, 10.0]).unwrap();
        let m = TokenMasks {
            caption: vec![true, false, false],
            vision: vec![false, true, false],
        };
        let mut mae = LossAcc::default();
        mae.add(&fp, &q, &m, LossKind::Mae);
        let r = 0.25;
        // (|1|+|-1| + 0.25 (2+4)) / (2 + 2) = 3.5 / 4
        assert_eq!(
            mae.value(LossKind::Mae, Weighting::Modality { ratio: r }),
            0.875
        );
        // plain: (1+1+2+4+10+10)/6
        assert_eq!(mae.value(LossKind::Mae, Weighting::Plain), 28.0 / 6.0);
        let mut mse = LossAcc::default();
        mse.add(&fp, &q, &m, LossKind::Mse);
        // (1+1)/2 + 0.25 (4+16)/2 = 1 + 2.5
        assert_eq!(
            mse.value(LossKind::Mse, Weighting::Modality { ratio: r }),
            3.5
        );
        assert_eq!(mse.value(LossKind::Mse, Weighting::Plain), 222.0 / 6.0);
    }

    /// The search lowers the loss below RTN's on inputs with outlier
    /// channels, and the grid's scales are normalised.
    #[test]
    fn search_beats_rtn_on_outlier_channels() {
        let be = Cpu;
        let vlm = fixture();
        let text = &vlm.text;
        let (xs, masks) = inputs(text.cfg.hidden_size);
        let f = layer_features(&be, text, 0, &xs).unwrap();
        let s = grid_scales(&mean_abs(&f.attn_in), 0.5);
        let max = s.iter().copied().fold(f32::MIN, f32::max);
        let min = s.iter().copied().fold(f32::MAX, f32::min);
        assert!((max * min - 1.0).abs() < 1e-4);
        for q in [
            QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            QuantKind::W4A8,
        ] {
            let r = search_group(
                &be,
                text,
                0,
                "attn_in",
                &f,
                &masks,
                q,
                LossKind::Mae,
                Weighting::Modality { ratio: 0.3 },
                || {},
            )
            .unwrap();
            assert!(r.loss <= r.losses[0], "{q:?}: {r:?}");
            assert_eq!(r.loss, r.losses.iter().copied().fold(f64::MAX, f64::min));
        }
    }
}
