//! The per-layer scale search of MBQ and AWQ, and SmoothQuant's fixed
//! scales (docs/MBQ.md), on any backend with the [`Search`] ops: the
//! layer's f32 weights stay on the host ([`HostLayer`], where the chosen
//! scales are folded in) and are uploaded once; the layer runs on the
//! backend through the model's own forward ([`DecoderLayer::forward`] with
//! a tap that keeps each group's input and output there). A grid point
//! sends `s` (one value an input channel): the device makes each linear's
//! fake-quantized weight from the uploaded one ([`Search::fake_quant`], the
//! reference's codes exactly), runs the same module forwards
//! ([`Group::forward`]) and reduces each sample's error there
//! ([`Search::loss_terms`]); three numbers come back per grid point. The
//! backends differ only by f32 summation order and the odd INT8
//! activation that this moves across a rounding boundary
//! (tests/calibrate_backends.rs).
//!
//! For `alpha` in `0, 0.05, ..., 0.95`: `s = mean_tokens(|X|)^alpha`,
//! clamped to `>= 1e-4`, divided by `sqrt(max(s) min(s))`. The group's
//! linears are replaced by their quantized form (weight-only: `Q(W s) / s`
//! on `X`; W4A8: `Q(W s)` on `Qa(X / s)`), the other linears of the module
//! stay FP, and the module's output is compared with its FP output:
//! - MBQ, MAE: `(sum_cap |d| + r sum_vis |d|) / (n_cap + n_vis)` (elements);
//! - MBQ, MSE: `mean_cap(d^2) + r mean_vis(d^2)`;
//! - AWQ (plain): `mean(|d|)` or `mean(d^2)` over every token.
//!
//! All groups are searched on the FP layer's own features; then every
//! chosen scale is folded in (the layer's FP output is unchanged).

use super::group::{Group, HostLayer};
use super::method::{LossKind, QuantKind, Weighting};
use crate::backend::{Backend, Distance, Search};
use crate::error::{Error, Result};
use crate::model::decoder::{DecoderSpec, Kv, Layer, LinearOp, NoTap, Site, Tap};
use crate::model::rope::{rope_pos, Mrope, RopePos};
use crate::model::Linear;
use crate::quant::pseudo::FakeQuant;
use crate::tensor::Tensor;

/// Grid points of alpha: `k / GRID` for `k in 0..GRID`.
pub const GRID: usize = 20;
/// SmoothQuant's migration strength.
pub const SMOOTHQUANT_ALPHA: f64 = 0.5;

/// What the search knows of each sample's tokens: the loss masks and
/// (M-RoPE models) the tokens' RoPE positions.
#[derive(Clone, Debug)]
pub struct TokenMasks {
    pub vision: Vec<bool>,
    pub caption: Vec<bool>,
    pub mrope: Option<Mrope>,
}

impl TokenMasks {
    pub fn rope(&self) -> RopePos<'_> {
        rope_pos(self.mrope.as_ref())
    }
}

/// The outcome of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupResult {
    pub group: Group,
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

    /// The sums of a whole grid point from the device's [`Search::loss_terms`]
    /// (caption, vision, all) and the samples' token masks, for `cols`
    /// outputs a token.
    pub fn from_terms(t: &[f32], masks: &[TokenMasks], cols: usize) -> LossAcc {
        let count = |f: &dyn Fn(&TokenMasks) -> usize| masks.iter().map(f).sum::<usize>() * cols;
        let rows = |v: &[bool]| v.iter().filter(|&&b| b).count();
        LossAcc {
            cap: t[0] as f64,
            vis: t[1] as f64,
            all: t[2] as f64,
            n_cap: count(&|m| rows(&m.caption)),
            n_vis: count(&|m| rows(&m.vision)),
            n_all: count(&|m| m.caption.len()),
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

    /// The statistics [`Search::abs_col_stats`] added up on a backend
    /// (`[3, cols]`: the sum as `hi + lo`, then the max) over `rows` rows.
    pub fn from_device(t: &Tensor, rows: usize) -> Result<ColStats> {
        if t.rows() != 3 {
            return Err(Error::invalid(format!(
                "column statistics of shape {:?}, expected [3, cols]",
                t.shape
            )));
        }
        let d = t.cols();
        let (hi, rest) = t.data.split_at(d);
        let (lo, max) = rest.split_at(d);
        Ok(ColStats {
            sum: hi
                .iter()
                .zip(lo)
                .map(|(&h, &l)| h as f64 + l as f64)
                .collect(),
            max: max.to_vec(),
            rows,
        })
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

/// A linear as the search runs it, on the backend: the effective weight
/// the device made from the layer's own, its bias, and (for W4A8) the
/// per-channel scales the input is divided by before the per-token
/// activation quantization.
pub struct QLinear<'a, B: Backend> {
    w: B::Weight,
    b: Option<&'a B::Tensor>,
    act_div: Option<&'a B::Tensor>,
}

impl<'a, B: Search> QLinear<'a, B> {
    /// The quantized form of `l` with its input channels scaled by `s`
    /// (`[1, in]` on the device).
    pub fn new(be: &B, l: &'a Linear<B>, s: &'a B::Tensor, q: QuantKind) -> Result<Self> {
        let (fq, act_div) = match q {
            QuantKind::Weight { bits, group_size } => (FakeQuant::Group { bits, group_size }, None),
            QuantKind::W4A8 => (FakeQuant::W4PerChannel, Some(s)),
        };
        Ok(QLinear {
            w: be.fake_quant(&l.w, s, fq)?,
            b: l.b.as_ref(),
            act_div,
        })
    }
}

impl<B: Backend> LinearOp<B> for QLinear<'_, B> {
    /// W4A8 divides the input by the scales and fake-quantizes it per token
    /// on the device (`div_cols`, `quant_act_int8`), then the float product.
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self.act_div {
            None => be.linear(x, &self.w, self.b),
            Some(s) => {
                let xq = be.quant_act_int8(&be.div_cols(x, s)?)?;
                be.linear(&xq, &self.w, self.b)
            }
        }
    }
}

/// Everything a layer's search needs from its FP forward, per sample.
pub struct LayerFeatures<B: Backend> {
    /// Each group's input, per sample, on the backend (in [`Group::ALL`] order).
    pub inputs: [Vec<B::Tensor>; 4],
    /// FP outputs of the self-attention (= o_proj) and the MLP (= down_proj),
    /// on the backend.
    pub attn_y: Vec<B::Tensor>,
    pub mlp_y: Vec<B::Tensor>,
    /// The layer's outputs, on the backend.
    pub out: Vec<B::Tensor>,
    /// |x| statistics of the groups' inputs, in [`Group::ALL`] order.
    pub stats: [ColStats; 4],
}

impl<B: Backend> LayerFeatures<B> {
    fn slot(g: Group) -> usize {
        Group::ALL.iter().position(|x| *x == g).unwrap_or(0)
    }

    /// The group's input features.
    pub fn inputs(&self, g: Group) -> &[B::Tensor] {
        &self.inputs[Self::slot(g)]
    }

    /// The |x| statistics of a group's input.
    pub fn stats(&self, g: Group) -> &ColStats {
        &self.stats[Self::slot(g)]
    }

    /// The FP outputs the group's loss compares with.
    pub fn outputs(&self, g: Group) -> &[B::Tensor] {
        if g.is_attention() {
            &self.attn_y
        } else {
            &self.mlp_y
        }
    }
}

/// The tap that fills [`LayerFeatures`] from the layer's forward; the |x|
/// statistics of each group's input are added up on the backend
/// ([`Search::abs_col_stats`]), with their row counts.
struct Record<'a, B: Backend> {
    be: &'a B,
    f: &'a mut LayerFeatures<B>,
    stats: &'a mut [(Option<B::Tensor>, usize); 4],
}

impl<B: Search> Tap<B> for Record<'_, B> {
    fn keep(&mut self, site: Site, t: B::Tensor) -> Result<()> {
        match site {
            Site::AttnOut => self.f.attn_y.push(t),
            Site::MlpOut => self.f.mlp_y.push(t),
            _ => {
                if let Some(g) = Group::ALL.into_iter().find(|g| g.input() == site) {
                    let k = LayerFeatures::<B>::slot(g);
                    let (acc, rows) = &mut self.stats[k];
                    *acc = Some(self.be.abs_col_stats(&t, acc.as_ref())?);
                    *rows += self.be.dims(&t).0;
                    self.f.inputs[k].push(t);
                }
            }
        }
        Ok(())
    }
}

/// Layer `layer` at positions `0..n` of one sample (a one-layer cache of
/// exactly `n` positions).
fn run_layer<B: Backend>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    x: &B::Tensor,
    rope: RopePos<'_>,
    tap: &mut impl Tap<B>,
) -> Result<B::Tensor> {
    let mut cache = be.new_cache(1, spec.kv_dim(), be.dims(x).0)?;
    let kv = Kv {
        cache: &mut cache,
        layer: 0,
        pos0: 0,
        rope,
    };
    layer.forward(spec, be, x, kv, tap)
}

/// The FP forward of a layer on every sample (its inputs `xs` on the
/// backend, its tokens `masks`), keeping the search's features; the |x|
/// statistics come to the host once, `[3, cols]` a group.
pub fn layer_features<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[B::Tensor],
    masks: &[TokenMasks],
) -> Result<LayerFeatures<B>> {
    let mut f = LayerFeatures {
        inputs: Default::default(),
        attn_y: vec![],
        mlp_y: vec![],
        out: vec![],
        stats: Default::default(),
    };
    let mut stats: [(Option<B::Tensor>, usize); 4] = Default::default();
    for (x, m) in xs.iter().zip(masks) {
        let mut tap = Record {
            be,
            f: &mut f,
            stats: &mut stats,
        };
        let y = run_layer(be, spec, layer, x, m.rope(), &mut tap)?;
        f.out.push(y);
    }
    for (k, (acc, rows)) in stats.into_iter().enumerate() {
        if let Some(t) = acc {
            f.stats[k] = ColStats::from_device(&be.download(&t)?, rows)?;
        }
    }
    Ok(f)
}

/// The layer's outputs on every sample (the next layer's inputs).
pub fn layer_outputs<B: Backend>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[B::Tensor],
    masks: &[TokenMasks],
) -> Result<Vec<B::Tensor>> {
    xs.iter()
        .zip(masks)
        .map(|(x, m)| run_layer(be, spec, layer, x, m.rope(), &mut NoTap))
        .collect()
}

/// How the search quantizes and compares.
#[derive(Clone, Copy, Debug)]
pub struct SearchSettings {
    pub quant: QuantKind,
    pub loss: LossKind,
}

/// One layer's search: its host weights, the same layer on the backend,
/// and its FP features on the calibration samples.
pub struct LayerSearch<'a, B: Backend> {
    /// The layer's index (for messages).
    pub index: usize,
    pub be: &'a B,
    pub spec: &'a DecoderSpec,
    pub host: &'a HostLayer,
    pub fp: Layer<B>,
    pub features: LayerFeatures<B>,
    pub masks: &'a [TokenMasks],
    /// Each sample's masks on the device, `[rows, 2]` (caption, vision).
    mask_t: Vec<B::Tensor>,
}

impl<'a, B: Search> LayerSearch<'a, B> {
    /// Uploads `host` and runs it on the inputs `xs`.
    pub fn new(
        index: usize,
        be: &'a B,
        spec: &'a DecoderSpec,
        host: &'a HostLayer,
        xs: &[B::Tensor],
        masks: &'a [TokenMasks],
    ) -> Result<Self> {
        let fp = host.upload(be)?;
        if masks.len() != xs.len() {
            return Err(Error::invalid(format!(
                "layer {index}: {} samples but {} token masks",
                xs.len(),
                masks.len()
            )));
        }
        let features = layer_features(be, spec, &fp, xs, masks)?;
        let mask_t = masks
            .iter()
            .map(|m| {
                let flags = m
                    .caption
                    .iter()
                    .zip(&m.vision)
                    .flat_map(|(&c, &v)| [c as u8 as f32, v as u8 as f32])
                    .collect();
                be.upload(&Tensor::new(vec![m.caption.len(), 2], flags)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerSearch {
            index,
            be,
            spec,
            host,
            fp,
            features,
            masks,
            mask_t,
        })
    }

    /// The loss of `group` with scales `s`: one upload of `s`, the
    /// samples' error sums added on the device, three numbers back.
    pub fn loss(&self, group: Group, s: &[f32], set: SearchSettings, w: Weighting) -> Result<f64> {
        let s_dev = self
            .be
            .upload(&Tensor::new(vec![1, s.len()], s.to_vec())?)?;
        let q = group
            .linears(&self.fp)
            .into_iter()
            .map(|l| QLinear::new(self.be, l, &s_dev, set.quant))
            .collect::<Result<Vec<_>>>()?;
        let dist = match set.loss {
            LossKind::Mae => Distance::Abs,
            LossKind::Mse => Distance::Squared,
        };
        let want = self.features.outputs(group);
        let mut total: Option<B::Tensor> = None;
        for (n, x) in self.features.inputs(group).iter().enumerate() {
            let y = group.forward(self.spec, self.be, &self.fp, &q, x, self.masks[n].rope())?;
            let t = self.be.loss_terms(&want[n], &y, &self.mask_t[n], dist)?;
            total = Some(match total {
                None => t,
                Some(acc) => self.be.add(&acc, &t)?,
            });
        }
        let terms = match &total {
            Some(t) => self.be.download(t)?.data,
            None => vec![0.0; 3],
        };
        let cols = want.first().map_or(0, |y| self.be.dims(y).1);
        Ok(LossAcc::from_terms(&terms, self.masks, cols).value(set.loss, w))
    }

    /// Searches alpha for one group (MBQ / AWQ): the grid point with the
    /// lowest loss (the first on ties, as the official `<` comparison).
    pub fn search(
        &self,
        group: Group,
        set: SearchSettings,
        w: Weighting,
        mut on_point: impl FnMut(),
    ) -> Result<GroupResult> {
        let x_mean = self.features.stats(group).mean();
        let mut best: Option<(usize, f64, Vec<f32>)> = None;
        let mut losses = Vec::with_capacity(GRID);
        for k in 0..GRID {
            let alpha = k as f64 / GRID as f64;
            let s = grid_scales(&x_mean, alpha);
            let loss = self.loss(group, &s, set, w)?;
            if !loss.is_finite() {
                return Err(Error::invalid(format!(
                    "layer {} {}: the loss at alpha {alpha} is not finite ({loss})",
                    self.index,
                    group.name()
                )));
            }
            if best.as_ref().is_none_or(|b| loss < b.1) {
                best = Some((k, loss, s));
            }
            losses.push(loss);
            on_point();
        }
        let (k, loss, scales) = best.ok_or_else(|| {
            Error::invalid(format!(
                "layer {} {}: empty alpha grid",
                self.index,
                group.name()
            ))
        })?;
        Ok(GroupResult {
            group,
            alpha: k as f64 / GRID as f64,
            loss,
            losses,
            scales,
        })
    }

    /// SmoothQuant's fixed scales for a group, with their (plain, W4A8) loss
    /// for the report.
    pub fn smoothquant(&self, group: Group, loss: LossKind) -> Result<GroupResult> {
        let ws: Vec<&Tensor> = group.linears(self.host).iter().map(|l| &l.w).collect();
        let s = smoothquant_scales(&self.features.stats(group).max(), &ws, SMOOTHQUANT_ALPHA);
        let set = SearchSettings {
            quant: QuantKind::W4A8,
            loss,
        };
        let loss = self.loss(group, &s, set, Weighting::Plain)?;
        Ok(GroupResult {
            group,
            alpha: SMOOTHQUANT_ALPHA,
            loss,
            losses: vec![loss],
            scales: s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::calib::run::load_host_layers;
    use crate::config::VlmConfig;
    use crate::model::decoder::HostLinear;
    use crate::quant::pseudo;
    use crate::weights::{Prefixes, WeightFiles};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Layer 0 of the GQA fixture as host tensors, and its spec.
    fn fixture() -> (DecoderSpec, HostLayer) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/llava_qwen128");
        let cfg = VlmConfig::load(&dir).unwrap();
        let w = WeightFiles::open(&dir).unwrap();
        let prefix = Prefixes::detect(&w).unwrap().text;
        let mut layers = load_host_layers(&w, &prefix, &cfg).unwrap();
        (DecoderSpec::new(&cfg.text), layers.swap_remove(0))
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
                mrope: None,
            })
            .collect();
        (xs, masks)
    }

    fn features(spec: &DecoderSpec, l: &HostLayer, xs: &[Tensor]) -> LayerFeatures<Cpu> {
        let masks: Vec<TokenMasks> = xs
            .iter()
            .map(|x| TokenMasks {
                vision: vec![false; x.rows()],
                caption: vec![true; x.rows()],
                mrope: None,
            })
            .collect();
        layer_features(&Cpu, spec, &l.upload(&Cpu).unwrap(), xs, &masks).unwrap()
    }

    /// Folding any scales into any group leaves the FP layer's outputs as
    /// they were, within f32 rounding.
    #[test]
    fn folding_scales_keeps_the_fp_output() {
        let (spec, mut layer) = fixture();
        let (xs, _) = inputs(layer.input_layernorm.numel());
        let before = features(&spec, &layer, &xs);
        let mut rng = StdRng::seed_from_u64(3);
        for group in Group::ALL {
            let d = before.inputs(group)[0].cols();
            let s: Vec<f32> = (0..d).map(|_| 0.25 + 3.0 * rng.random::<f32>()).collect();
            if group == Group::AttnOut {
                // GQA fixture: v has fewer rows than o has columns; the fold
                // is the official one only for equal shapes.
                assert!(!group.applies(&layer));
                continue;
            }
            group.fold(&mut layer, &s).unwrap();
        }
        let after = features(&spec, &layer, &xs);
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

    /// The attn_out fold (v rows / s, o columns * s) on a layer without
    /// GQA: v and o made square.
    #[test]
    fn attn_out_fold_keeps_the_attention_output() {
        let be = Cpu;
        let mut rng = StdRng::seed_from_u64(11);
        let (n, d) = (6, 12);
        let a = random(&mut rng, n, d, 1.0);
        let (_, mut layer) = fixture();
        layer.attn.v = HostLinear {
            w: random(&mut rng, d, d, 0.3),
            b: Some(random(&mut rng, 1, d, 0.1).reshape(vec![d]).unwrap()),
        };
        layer.attn.o = HostLinear {
            w: random(&mut rng, d, d, 0.3),
            b: None,
        };
        assert!(Group::AttnOut.applies(&layer));
        let run = |l: &HostLayer| {
            let (v, o) = (l.attn.v.upload(&be).unwrap(), l.attn.o.upload(&be).unwrap());
            o.forward(&be, &v.forward(&be, &a).unwrap()).unwrap()
        };
        let y0 = run(&layer);
        let s: Vec<f32> = (0..d).map(|_| 0.5 + rng.random::<f32>()).collect();
        Group::AttnOut.fold(&mut layer, &s).unwrap();
        let y1 = run(&layer);
        for (x, y) in y0.data.iter().zip(&y1.data) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// alpha = 0 gives s = 1: the quantized module is plain RTN, and the
    /// grid point's loss equals the loss of RTN-quantized weights.
    #[test]
    fn alpha_zero_is_rtn() {
        let be = Cpu;
        let (spec, layer) = fixture();
        let (xs, masks) = inputs(layer.input_layernorm.numel());
        let search = LayerSearch::new(0, &be, &spec, &layer, &xs, &masks).unwrap();
        let f = &search.features;
        let s = grid_scales(&mean_abs(f.inputs(Group::MlpOut)), 0.0);
        assert!(s.iter().all(|&v| v == 1.0));
        let set = SearchSettings {
            quant: QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            loss: LossKind::Mae,
        };
        let r = search
            .search(Group::MlpOut, set, Weighting::Plain, || {})
            .unwrap();
        // RTN by hand: fake-quantize down_proj, run it, mean |diff|.
        let w = &layer.mlp.down.w;
        let wq = pseudo::fake_quantize(&w.data, w.shape[0], w.shape[1], 3, 128).unwrap();
        let wq = be
            .weight(&Tensor::new(w.shape.clone(), wq).unwrap())
            .unwrap();
        let (mut sum, mut n) = (0f64, 0usize);
        for (g, y) in f.inputs(Group::MlpOut).iter().zip(&f.mlp_y) {
            let yq = be.linear(g, &wq, None).unwrap();
            for (a, b) in y.data.iter().zip(&yq.data) {
                sum += (*a as f64 - *b as f64).abs();
                n += 1;
            }
        }
        // The backend's error sums come back as f32 (`Search::loss_terms`).
        let want = sum / n as f64;
        assert!(
            (r.losses[0] - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            r.losses[0]
        );
        assert_eq!(r.losses.len(), GRID);
    }

    /// The features' |x| statistics are those of the groups' own inputs.
    #[test]
    fn feature_stats_follow_the_group_inputs() {
        let (spec, layer) = fixture();
        let (xs, _) = inputs(layer.input_layernorm.numel());
        let f = features(&spec, &layer, &xs);
        for group in Group::ALL {
            let st = f.stats(group);
            assert_eq!(st.mean(), mean_abs(f.inputs(group)), "{group:?}");
            assert_eq!(st.max(), max_abs(f.inputs(group)), "{group:?}");
            assert_eq!(f.inputs(group).len(), xs.len(), "{group:?}");
        }
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
            mrope: None,
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
        let (spec, layer) = fixture();
        let (xs, masks) = inputs(layer.input_layernorm.numel());
        let search = LayerSearch::new(0, &be, &spec, &layer, &xs, &masks).unwrap();
        let s = grid_scales(&mean_abs(search.features.inputs(Group::AttnIn)), 0.5);
        let max = s.iter().copied().fold(f32::MIN, f32::max);
        let min = s.iter().copied().fold(f32::MAX, f32::min);
        assert!((max * min - 1.0).abs() < 1e-4);
        for quant in [
            QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            QuantKind::W4A8,
        ] {
            let set = SearchSettings {
                quant,
                loss: LossKind::Mae,
            };
            let r = search
                .search(
                    Group::AttnIn,
                    set,
                    Weighting::Modality { ratio: 0.3 },
                    || {},
                )
                .unwrap();
            assert!(r.loss <= r.losses[0], "{quant:?}: {r:?}");
            assert_eq!(r.loss, r.losses.iter().copied().fold(f64::MAX, f64::min));
        }
    }
}
