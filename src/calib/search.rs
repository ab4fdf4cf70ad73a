//! The per-layer scale search of MBQ and AWQ, and SmoothQuant's fixed
//! scales (docs/MBQ.md), on any backend with the [`Search`] ops: the
//! layer's f32 weights stay on the host ([`HostLayer`], where the chosen
//! scales are folded in) and are uploaded once; the layer runs on the
//! backend through the model's own forward with a tap that keeps each
//! group's input and output there (`features.rs`), a chunk of samples at a
//! time. A grid point sends `s` (one value an input channel): the device
//! makes each linear's fake-quantized weight from the uploaded one
//! ([`Search::fake_quant`], the reference's codes exactly), runs the same
//! module forwards ([`Group::forward`]; the products in the dtype the
//! samples are kept in, `qlinear.rs`) and reduces each sample's error
//! there ([`Search::loss_terms`]), adding it to the grid point's running
//! sums over the chunks; three numbers come back per grid point. The
//! backends differ only by f32 summation order and what this moves across
//! a rounding boundary (the odd INT8 activation, weight code or f16
//! operand; tests/calibrate_backends.rs).
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

use std::ops::Range;

use super::features::{
    self, chunk_features, layer_features, layer_stats, slot, ColStats, GroupStats, LayerFeatures,
};
use super::group::{Fixed, Group, HostLayer};
use super::kept::{KeepDtype, Kept};
use super::method::{LossKind, QuantKind, Weighting};
use super::qlinear::{FixedLinear, QLinear};
use crate::backend::{Distance, Search};
use crate::error::{Error, Result};
use crate::model::decoder::{DecoderSpec, Layer};
use crate::model::rope::{rope_pos, Mrope, RopePos};
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

/// How the search quantizes and compares.
#[derive(Clone, Copy, Debug)]
pub struct SearchSettings {
    pub quant: QuantKind,
    pub loss: LossKind,
}

/// One group's candidates: the scales tried, and how their loss is taken.
pub struct Trial {
    pub group: Group,
    pub set: SearchSettings,
    pub weighting: Weighting,
    /// One scale vector (a value an input channel) per candidate.
    pub scales: Vec<Vec<f32>>,
}

/// One layer's search: its host weights, the same layer on the backend,
/// the samples' inputs and the |x| statistics of its groups' inputs. The
/// FP features are made a chunk of samples at a time
/// ([`features::chunks`]): with one chunk once, and kept; with more, again
/// for each chunk of each evaluation, so that no step holds more than one
/// chunk's features.
pub struct LayerSearch<'a, B: Search> {
    /// The layer's index (for messages).
    pub index: usize,
    pub be: &'a B,
    pub spec: &'a DecoderSpec,
    pub host: &'a HostLayer,
    pub fp: Layer<B>,
    xs: &'a [Kept<B>],
    pub masks: &'a [TokenMasks],
    /// Each sample's masks on the device, `[rows, 2]` (caption, vision).
    mask_t: Vec<B::Tensor>,
    stats: GroupStats,
    chunks: Vec<Range<usize>>,
    /// The features of the only chunk, when all samples are one.
    resident: Option<LayerFeatures<B>>,
    /// The dtype of the grid points' products: the samples' (`qlinear.rs`).
    dtype: KeepDtype,
    /// For f16 products, o_proj's and down_proj's weights as f16 (the
    /// linears a module runs unquantized beside the group's).
    half_fixed: Option<[B::Weight; 2]>,
}

impl<'a, B: Search> LayerSearch<'a, B> {
    /// Uploads `host` and runs it on the inputs `xs` (the statistics, and
    /// the features when the samples fit in one chunk of `chunk_tokens`).
    pub fn new(
        index: usize,
        be: &'a B,
        spec: &'a DecoderSpec,
        host: &'a HostLayer,
        xs: &'a [Kept<B>],
        masks: &'a [TokenMasks],
        chunk_tokens: usize,
    ) -> Result<Self> {
        let fp = host.upload(be)?;
        if masks.len() != xs.len() {
            return Err(Error::invalid(format!(
                "layer {index}: {} samples but {} token masks",
                xs.len(),
                masks.len()
            )));
        }
        let dtype = xs.first().map_or(KeepDtype::F32, |k| k.dtype());
        let half_fixed = match dtype {
            KeepDtype::F32 => None,
            KeepDtype::F16 => Some([
                be.weight_to_half(&fp.attn.o.w)?,
                be.weight_to_half(&fp.mlp.down.w)?,
            ]),
        };
        let chunks = features::chunks(masks, chunk_tokens);
        let (resident, stats) = if chunks.len() <= 1 {
            let (f, stats) = layer_features(be, spec, &fp, xs, masks)?;
            (Some(f), stats)
        } else {
            (None, layer_stats(be, spec, &fp, xs, masks)?)
        };
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
            xs,
            masks,
            mask_t,
            stats,
            chunks,
            resident,
            dtype,
            half_fixed,
        })
    }

    /// The |x| statistics of a group's input over every sample.
    pub fn stats(&self, g: Group) -> &ColStats {
        &self.stats[slot(g)]
    }

    /// How many chunks of samples each evaluation goes through.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The loss of every candidate of every trial, `[trial][candidate]`.
    /// For each chunk of samples (its features made once), each candidate:
    /// one upload of `s`, the quantized modules run on the chunk's samples,
    /// their error sums added on the device into the candidate's running
    /// `[1, 3]`; three numbers a candidate come back at the end.
    /// `on_point` is called after each candidate on each chunk.
    pub fn evaluate<'s>(
        &'s self,
        trials: &[Trial],
        mut on_point: impl FnMut(),
    ) -> Result<Vec<Vec<f64>>> {
        let be = self.be;
        let mut totals: Vec<Vec<Option<B::Tensor>>> = trials
            .iter()
            .map(|t| t.scales.iter().map(|_| None).collect())
            .collect();
        let mut cols = vec![0; trials.len()];
        let fixed = |i: usize, own: &'s crate::model::Linear<B>| FixedLinear {
            w: self.half_fixed.as_ref().map_or(&own.w, |h| &h[i]),
            b: own.b.as_ref(),
            dtype: self.dtype,
        };
        let (o, down) = (fixed(0, &self.fp.attn.o), fixed(1, &self.fp.mlp.down));
        let rest = Fixed { o: &o, down: &down };
        for chunk in &self.chunks {
            let made;
            let f = match &self.resident {
                Some(f) => f,
                None => {
                    made = chunk_features(
                        be,
                        self.spec,
                        &self.fp,
                        &self.xs[chunk.clone()],
                        &self.masks[chunk.clone()],
                    )?;
                    &made
                }
            };
            for ((trial, acc), cols) in trials.iter().zip(&mut totals).zip(&mut cols) {
                let (group, set) = (trial.group, trial.set);
                let dist = match set.loss {
                    LossKind::Mae => Distance::Abs,
                    LossKind::Mse => Distance::Squared,
                };
                let want = f.outputs(group);
                for (s, total) in trial.scales.iter().zip(acc.iter_mut()) {
                    let s_dev = be.upload(&Tensor::new(vec![1, s.len()], s.to_vec())?)?;
                    let q = group
                        .linears(&self.fp)
                        .into_iter()
                        .map(|l| QLinear::new(be, l, &s_dev, set.quant, self.dtype))
                        .collect::<Result<Vec<_>>>()?;
                    for (k, x) in f.inputs(group).iter().enumerate() {
                        let n = chunk.start + k;
                        let rope = self.masks[n].rope();
                        let y = group.forward(self.spec, be, rest, &q, &*x.get(be)?, rope)?;
                        *cols = be.dims(&y).1;
                        let t = be.loss_terms(&*want[k].get(be)?, &y, &self.mask_t[n], dist)?;
                        *total = Some(match total.take() {
                            None => t,
                            Some(a) => be.add(&a, &t)?,
                        });
                    }
                    on_point();
                }
            }
        }
        trials
            .iter()
            .zip(totals)
            .zip(cols)
            .map(|((trial, acc), cols)| {
                acc.into_iter()
                    .map(|total| {
                        let terms = match &total {
                            Some(t) => be.download(t)?.data,
                            None => vec![0.0; 3],
                        };
                        let sums = LossAcc::from_terms(&terms, self.masks, cols);
                        Ok(sums.value(trial.set.loss, trial.weighting))
                    })
                    .collect()
            })
            .collect()
    }

    /// Searches alpha for each group (MBQ / AWQ) with its weighting: the
    /// grid point with the lowest loss (the first on ties, as the official
    /// `<` comparison).
    pub fn search(
        &self,
        groups: &[(Group, Weighting)],
        set: SearchSettings,
        on_point: impl FnMut(),
    ) -> Result<Vec<GroupResult>> {
        let trials: Vec<Trial> = groups
            .iter()
            .map(|&(group, weighting)| {
                let x_mean = self.stats(group).mean();
                Trial {
                    group,
                    set,
                    weighting,
                    scales: (0..GRID)
                        .map(|k| grid_scales(&x_mean, k as f64 / GRID as f64))
                        .collect(),
                }
            })
            .collect();
        let losses = self.evaluate(&trials, on_point)?;
        trials
            .into_iter()
            .zip(losses)
            .map(|(trial, losses)| self.pick(trial, losses, |k| k as f64 / GRID as f64))
            .collect()
    }

    /// SmoothQuant's fixed scales for each group, with their (plain, W4A8)
    /// loss for the report.
    pub fn smoothquant(
        &self,
        groups: &[Group],
        loss: LossKind,
        on_point: impl FnMut(),
    ) -> Result<Vec<GroupResult>> {
        let set = SearchSettings {
            quant: QuantKind::W4A8,
            loss,
        };
        let trials: Vec<Trial> = groups
            .iter()
            .map(|&group| {
                let ws: Vec<&Tensor> = group.linears(self.host).iter().map(|l| &l.w).collect();
                Trial {
                    group,
                    set,
                    weighting: Weighting::Plain,
                    scales: vec![smoothquant_scales(
                        &self.stats(group).max(),
                        &ws,
                        SMOOTHQUANT_ALPHA,
                    )],
                }
            })
            .collect();
        let losses = self.evaluate(&trials, on_point)?;
        trials
            .into_iter()
            .zip(losses)
            .map(|(trial, losses)| self.pick(trial, losses, |_| SMOOTHQUANT_ALPHA))
            .collect()
    }

    /// The candidate of `trial` with the lowest loss (the first on ties);
    /// `alpha(k)` is candidate `k`'s alpha for the report.
    fn pick(
        &self,
        trial: Trial,
        losses: Vec<f64>,
        alpha: impl Fn(usize) -> f64,
    ) -> Result<GroupResult> {
        let name = trial.group.name();
        let mut best: Option<(usize, f64)> = None;
        for (k, &loss) in losses.iter().enumerate() {
            if !loss.is_finite() {
                return Err(Error::invalid(format!(
                    "layer {} {name}: the loss at alpha {} is not finite ({loss})",
                    self.index,
                    alpha(k)
                )));
            }
            if best.is_none_or(|b| loss < b.1) {
                best = Some((k, loss));
            }
        }
        let (k, loss) = best.ok_or_else(|| {
            Error::invalid(format!("layer {} {name}: no candidate scales", self.index))
        })?;
        let mut scales = trial.scales;
        Ok(GroupResult {
            group: trial.group,
            alpha: alpha(k),
            loss,
            losses,
            scales: scales.swap_remove(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::backend::Backend;
    use crate::calib::features::{layer_outputs, max_abs, mean_abs};
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

    /// `xs` kept as f32 (exactly as they are).
    fn kept(xs: &[Tensor]) -> Vec<Kept<Cpu>> {
        Kept::all(&Cpu, xs.to_vec(), KeepDtype::F32).unwrap()
    }

    /// Kept values as f32 tensors.
    fn host(ks: &[Kept<Cpu>]) -> Vec<Tensor> {
        ks.iter().map(|k| k.get(&Cpu).unwrap().clone()).collect()
    }

    /// The features, statistics and outputs of layer `l` on `xs`.
    fn features(
        spec: &DecoderSpec,
        l: &HostLayer,
        xs: &[Tensor],
    ) -> (LayerFeatures<Cpu>, GroupStats, Vec<Tensor>) {
        let masks: Vec<TokenMasks> = xs
            .iter()
            .map(|x| TokenMasks {
                vision: vec![false; x.rows()],
                caption: vec![true; x.rows()],
                mrope: None,
            })
            .collect();
        let layer = l.upload(&Cpu).unwrap();
        let (f, stats) = layer_features(&Cpu, spec, &layer, &kept(xs), &masks).unwrap();
        let out = layer_outputs(&Cpu, spec, &layer, &kept(xs), &masks).unwrap();
        (f, stats, host(&out))
    }

    /// Folding any scales into any group leaves the FP layer's outputs as
    /// they were, within f32 rounding.
    #[test]
    fn folding_scales_keeps_the_fp_output() {
        let (spec, mut layer) = fixture();
        let (xs, _) = inputs(layer.input_layernorm.numel());
        let (before, _, before_out) = features(&spec, &layer, &xs);
        let mut rng = StdRng::seed_from_u64(3);
        for group in Group::ALL {
            let d = host(before.inputs(group))[0].cols();
            let s: Vec<f32> = (0..d).map(|_| 0.25 + 3.0 * rng.random::<f32>()).collect();
            if group == Group::AttnOut {
                // GQA fixture: v has fewer rows than o has columns; the fold
                // is the official one only for equal shapes.
                assert!(!group.applies(&layer));
                continue;
            }
            group.fold(&mut layer, &s).unwrap();
        }
        let (after, _, after_out) = features(&spec, &layer, &xs);
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
        check("layer output", &before_out, &after_out);
        // The attention and MLP outputs too (the inputs of the scaled
        // linears are divided by s: not compared).
        check(
            "attention output",
            &host(&before.attn_y),
            &host(&after.attn_y),
        );
        check("mlp output", &host(&before.mlp_y), &host(&after.mlp_y));
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
        let xk = kept(&xs);
        let search = LayerSearch::new(0, &be, &spec, &layer, &xk, &masks, usize::MAX).unwrap();
        let (f, _, _) = features(&spec, &layer, &xs);
        let s = grid_scales(&mean_abs(&host(f.inputs(Group::MlpOut))), 0.0);
        assert!(s.iter().all(|&v| v == 1.0));
        let set = SearchSettings {
            quant: QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            loss: LossKind::Mae,
        };
        let r = search
            .search(&[(Group::MlpOut, Weighting::Plain)], set, || {})
            .unwrap()
            .remove(0);
        // RTN by hand: fake-quantize down_proj, run it, mean |diff|.
        let w = &layer.mlp.down.w;
        let wq = pseudo::fake_quantize(&w.data, w.shape[0], w.shape[1], 3, 128).unwrap();
        let wq = be
            .weight(&Tensor::new(w.shape.clone(), wq).unwrap())
            .unwrap();
        let (mut sum, mut n) = (0f64, 0usize);
        for (g, y) in host(f.inputs(Group::MlpOut)).iter().zip(&host(&f.mlp_y)) {
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
        let (f, stats, _) = features(&spec, &layer, &xs);
        for group in Group::ALL {
            let st = &stats[slot(group)];
            assert_eq!(st.mean(), mean_abs(&host(f.inputs(group))), "{group:?}");
            assert_eq!(st.max(), max_abs(&host(f.inputs(group))), "{group:?}");
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
        let xk = kept(&xs);
        let search = LayerSearch::new(0, &be, &spec, &layer, &xk, &masks, usize::MAX).unwrap();
        let s = grid_scales(&search.stats(Group::AttnIn).mean(), 0.5);
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
                    &[(Group::AttnIn, Weighting::Modality { ratio: 0.3 })],
                    set,
                    || {},
                )
                .unwrap()
                .remove(0);
            assert!(r.loss <= r.losses[0], "{quant:?}: {r:?}");
            assert_eq!(r.loss, r.losses.iter().copied().fold(f64::MAX, f64::min));
        }
    }

    /// Features made one chunk of samples at a time give the very same
    /// losses and scales as all samples' features at once (the error sums
    /// are added in the same order), for the grid search and SmoothQuant.
    #[test]
    fn chunked_features_give_the_same_search() {
        let be = Cpu;
        let (spec, layer) = fixture();
        let (mut xs, mut masks) = inputs(layer.input_layernorm.numel());
        // A third sample, so that a budget of 25 tokens makes two chunks
        // of unequal size (13 + 9, then 7).
        let mut rng = StdRng::seed_from_u64(19);
        xs.push(random(&mut rng, 7, layer.input_layernorm.numel(), 0.5));
        masks.push(TokenMasks {
            vision: (0..7).map(|t| t < 3).collect(),
            caption: (0..7).map(|t| t >= 4).collect(),
            mrope: None,
        });
        let groups = [
            (Group::AttnIn, Weighting::Modality { ratio: 0.3 }),
            (Group::MlpIn, Weighting::Plain),
            (Group::MlpOut, Weighting::Modality { ratio: 2.0 }),
        ];
        let set = SearchSettings {
            quant: QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            loss: LossKind::Mae,
        };
        let run = |chunk_tokens: usize, dtype: KeepDtype| {
            let xk = Kept::all(&be, xs.clone(), dtype).unwrap();
            let s = LayerSearch::new(0, &be, &spec, &layer, &xk, &masks, chunk_tokens).unwrap();
            let mut points = 0;
            let grid = s.search(&groups, set, || points += 1).unwrap();
            let sq = s
                .smoothquant(&[Group::AttnIn, Group::MlpOut], LossKind::Mse, || {})
                .unwrap();
            (s.chunk_count(), points, grid, sq)
        };
        for dtype in [KeepDtype::F32, KeepDtype::F16] {
            let (n1, p1, grid1, sq1) = run(usize::MAX, dtype);
            for budget in [25, 1] {
                let (n, p, grid, sq) = run(budget, dtype);
                assert_eq!((n1, n), (1, if budget == 1 { 3 } else { 2 }));
                assert_eq!((p1, p), (groups.len() * GRID, groups.len() * GRID * n));
                assert_eq!(grid, grid1, "{dtype:?}, chunks of {budget} tokens");
                assert_eq!(sq, sq1, "{dtype:?}, chunks of {budget} tokens");
            }
        }
    }

    /// Features and layer inputs kept in f16 change the losses by about
    /// f16's rounding of the activations (2^-11 relative), not more.
    #[test]
    fn f16_kept_features_give_nearly_the_f32_losses() {
        let be = Cpu;
        let (spec, layer) = fixture();
        let (xs, masks) = inputs(layer.input_layernorm.numel());
        let set = SearchSettings {
            quant: QuantKind::Weight {
                bits: 3,
                group_size: 128,
            },
            loss: LossKind::Mae,
        };
        let groups = [
            (Group::AttnIn, Weighting::Modality { ratio: 0.3 }),
            (Group::MlpOut, Weighting::Plain),
        ];
        let run = |dtype| {
            let xk = Kept::all(&be, xs.clone(), dtype).unwrap();
            let s = LayerSearch::new(0, &be, &spec, &layer, &xk, &masks, usize::MAX).unwrap();
            s.search(&groups, set, || {}).unwrap()
        };
        let (a, b) = (run(KeepDtype::F32), run(KeepDtype::F16));
        // The fixture's activations are O(1): f16 keeps them (and the
        // products' operands) to ~5e-4.
        const F16_LOSS_RTOL: f64 = 1e-2;
        let mut differs = false;
        for (a, b) in a.iter().zip(&b) {
            for (x, y) in a.losses.iter().zip(&b.losses) {
                assert!(
                    (x - y).abs() <= F16_LOSS_RTOL * x,
                    "{:?}: {x} vs {y}",
                    a.group
                );
                differs |= x != y;
            }
        }
        assert!(
            differs,
            "f16 features changed no loss: were they kept in f16?"
        );
    }
}
