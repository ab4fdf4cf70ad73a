//! MBQ step 1, the sensitivity pass: the gradient of the caption loss with
//! respect to the output of `o_proj` and of `down_proj` in every decoder
//! layer, for one calibration sample (docs/MBQ.md, section 2).
//!
//! The forward is the model's own ([`TextModel`]'s layers through
//! [`DecoderLayer::forward`], at positions `0..n`), then the final norm
//! and lm_head ([`TextModel::logits`]) only at the rows `p = t - 1` that
//! predict a caption token `t >= 1`. The loss is HF's causal-LM
//! cross-entropy with labels `ids[t]` where `caption[t]` (shifted, mean
//! over the labelled tokens):
//!
//! ```text
//! L = (1/N) sum_{t: caption[t], t>=1} (logsumexp(l_{t-1}) - l_{t-1}[ids[t]])
//! ```
//!
//! The backward is [`DecoderLayer::mlp_backward`] and
//! [`DecoderLayer::attn_backward`], beside the forward, made of
//! the ops of [`Grad`] (activation gradients only, no weight gradients).
//!
//! Per layer, [`LayerGrad`] holds the mean of `|g|` over all elements
//! (tokens x hidden) of the vision positions and of the caption positions
//! (`Search::abs_terms` on the backend: f32 sums, per sample). Because
//! attention is causal, a position after the last caption-predicting
//! position (`last caption t - 1`) gets exactly
//! zero gradient in every layer; in the last layer a position whose next
//! token is not a caption token also gets exactly zero (nothing after the
//! last layer mixes positions), which is why vision positions usually read
//! 0 there.
//!
//! Memory: the forward keeps only each layer's input and its post-attention
//! residual; the backward recomputes the rest of a layer from them. Nothing
//! of the size of an activation crosses to the host: the caption rows are
//! gathered for the head and the gradient scattered back on the backend,
//! and a sample returns its loss and `2 x layers x 3` sums.

use crate::backend::{Backend, Grad, Search};
use crate::error::{Error, Result};
use crate::model::decoder::{DecoderLayer, Kv, NoTap, RopePos, Site, Tap};
use crate::model::text::TextModel;
use crate::tensor::Tensor;

/// Mean |gradient| over the vision and over the caption positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModalityGrad {
    pub vision: f64,
    pub caption: f64,
}

/// Mean |dL/dy| of one decoder layer at the output of `o_proj` (attn) and
/// of `down_proj` (mlp): per sample, or averaged over the calibration set.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerGrad {
    pub attn: ModalityGrad,
    pub mlp: ModalityGrad,
}

impl LayerGrad {
    /// The (attention, MLP) vision/caption ratios, before the median clamp.
    pub fn ratios(&self) -> (f64, f64) {
        (
            self.attn.vision / self.attn.caption,
            self.mlp.vision / self.mlp.caption,
        )
    }
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

/// x0: the decoder's input embeddings [n, hidden] on the backend (image
/// features already in place), ids: the n token ids, vision[t]/caption[t]:
/// masks of length n, rope: the tokens' RoPE positions (M-RoPE models: the
/// sample's own); `tick` is called after each layer's forward and each
/// layer's backward (progress). Everything stays on the backend: each
/// captured gradient is reduced there ([`Search::abs_terms`]) and the
/// sample's sums come back once, `[2 layers, 3]`, with the loss.
#[allow(clippy::too_many_arguments)]
pub fn sample_sensitivity<B: Grad + Search>(
    be: &B,
    text: &TextModel<B>,
    x0: &B::Tensor,
    ids: &[u32],
    vision: &[bool],
    caption: &[bool],
    rope: RopePos<'_>,
    tick: &mut dyn FnMut(),
) -> Result<SampleSensitivity> {
    if vision.len() != ids.len() {
        return Err(Error::invalid(format!(
            "sensitivity: vision mask of {} for {} tokens",
            vision.len(),
            ids.len()
        )));
    }
    let targets = check_inputs(text, be.dims(x0), ids, caption)?;
    let hidden = text.cfg.hidden_size;
    let flags = caption
        .iter()
        .zip(vision)
        .flat_map(|(&c, &v)| [c as u8 as f32, v as u8 as f32])
        .collect();
    let masks = be.upload(&Tensor::new(vec![ids.len(), 2], flags)?)?;
    let layers = text.layers.len();
    // Row 2 i + 0: layer i's attention-output sums, 2 i + 1: its MLP's.
    let mut sums: Vec<Option<B::Tensor>> = (0..2 * layers).map(|_| None).collect();
    let loss = loss_and_grads(be, text, x0, rope, tick, &targets, |i, site, g| {
        let row = 2 * i + (site == GradSite::MlpOut) as usize;
        sums[row] = Some(be.abs_terms(g, &masks)?);
        Ok(())
    })?;
    // Layer 0's MLP and attention are captured like every other layer's.
    let sums = sums
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::invalid("sensitivity: a layer's gradient was not captured"))?;
    let sums = be.download(&be.concat_all(sums)?)?;
    let mean = |sum: f32, mask: &[bool]| -> f64 {
        let rows = mask.iter().filter(|&&m| m).count();
        if rows == 0 {
            0.0
        } else {
            sum as f64 / (rows * hidden) as f64
        }
    };
    let grad = |r: &[f32]| ModalityGrad {
        caption: mean(r[0], caption),
        vision: mean(r[1], vision),
    };
    let layers = sums
        .data
        .chunks_exact(6)
        .map(|l| LayerGrad {
            attn: grad(&l[0..3]),
            mlp: grad(&l[3..6]),
        })
        .collect();
    Ok(SampleSensitivity {
        loss,
        layers,
        has_vision: vision.iter().any(|&v| v),
    })
}

/// Checks shapes and masks; returns the `(row, label)` pairs: row `t - 1`
/// predicts `ids[t]` for each caption position `t >= 1`.
fn check_inputs<B: Backend>(
    text: &TextModel<B>,
    x0: (usize, usize),
    ids: &[u32],
    caption: &[bool],
) -> Result<Vec<(usize, u32)>> {
    let n = ids.len();
    let hidden = text.cfg.hidden_size;
    if x0 != (n, hidden) {
        return Err(Error::invalid(format!(
            "sensitivity: embeddings of shape [{}, {}] for {n} tokens of hidden size {hidden}",
            x0.0, x0.1
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
    Ok(targets)
}

/// What the backward needs from the forward: per layer its input `x` and
/// the residual after attention `m`, and the final hidden states.
struct Saved<T> {
    x_in: Vec<T>,
    x_mid: Vec<T>,
    out: T,
}

/// Keeps the residual after attention, passing everything to `inner`.
struct KeepMid<'t, B: Backend, T: Tap<B>> {
    mid: Option<B::Tensor>,
    inner: &'t mut T,
}

impl<B: Backend, T: Tap<B>> Tap<B> for KeepMid<'_, B, T> {
    fn at(&mut self, site: Site, t: &mut B::Tensor) -> Result<()> {
        self.inner.at(site, t)
    }
    fn keep(&mut self, site: Site, t: B::Tensor) -> Result<()> {
        if site == Site::Mid {
            self.mid = Some(t);
            Ok(())
        } else {
            self.inner.keep(site, t)
        }
    }
}

/// The decoder layers at positions `0..n` with `tap(i)` on layer `i` (the
/// finite-difference tests perturb through it).
fn forward<B: Backend, T: Tap<B>>(
    be: &B,
    text: &TextModel<B>,
    x0: &B::Tensor,
    rope: RopePos<'_>,
    tick: &mut dyn FnMut(),
    mut tap: impl FnMut(usize) -> T,
) -> Result<Saved<B::Tensor>> {
    let n = be.dims(x0).0;
    let mut cache = be.new_cache(text.layers.len(), text.kv_dim(), n)?;
    let mut x_in = Vec::with_capacity(text.layers.len());
    let mut x_mid = Vec::with_capacity(text.layers.len());
    let mut x = be.rows(x0, 0, n)?;
    for (i, l) in text.layers.iter().enumerate() {
        let kv = Kv {
            cache: &mut cache,
            layer: i,
            pos0: 0,
            rope,
        };
        let mut inner = tap(i);
        let mut keep = KeepMid {
            mid: None,
            inner: &mut inner,
        };
        let y = DecoderLayer::forward(l, &text.spec, be, &x, kv, &mut keep)?;
        let m = keep
            .mid
            .ok_or_else(|| Error::invalid("sensitivity: the forward kept no residual"))?;
        x_in.push(std::mem::replace(&mut x, y));
        x_mid.push(m);
        tick();
    }
    Ok(Saved {
        x_in,
        x_mid,
        out: x,
    })
}

/// Final norm + lm_head at the predicting rows + cross-entropy: the loss
/// and its gradient w.r.t. the last layer's output `[n, hidden]`. The rows
/// are gathered and scattered on the backend, one copy per run of
/// consecutive positions (a caption is one run).
fn head_loss<B: Grad>(
    be: &B,
    text: &TextModel<B>,
    y: &B::Tensor,
    targets: &[(usize, u32)],
) -> Result<(f64, B::Tensor)> {
    let runs = runs(targets.iter().map(|&(p, _)| p));
    let parts = runs
        .iter()
        .map(|&(p, n)| be.rows(y, p, n))
        .collect::<Result<Vec<_>>>()?;
    let rows = be.concat_all(parts)?;
    let logits = text.logits(be, &rows)?;
    let labels: Vec<u32> = targets.iter().map(|&(_, l)| l).collect();
    let (loss, dlogits) = be.cross_entropy(&logits, &labels)?;
    let dz = be.linear_backward(&dlogits, text.lm_head_weight())?;
    let drows = be.rms_norm_backward(&rows, &text.norm, text.spec.eps, &dz)?;
    let (n, hidden) = be.dims(y);
    let mut dy = be.zeros(n, hidden)?;
    let mut k = 0;
    for &(p, len) in &runs {
        // Rows are distinct (one per caption position), so no accumulation.
        be.set_rows(&mut dy, p, &be.rows(&drows, k, len)?)?;
        k += len;
    }
    Ok((loss, dy))
}

/// Ascending positions as `(start, length)` runs of consecutive ones.
fn runs(positions: impl Iterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for p in positions {
        match out.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Where a gradient is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradSite {
    /// dL/d(o_proj output) (= dL/dm, the residual after attention).
    AttnOut,
    /// dL/d(down_proj output) (= dL/dy, the layer's output).
    MlpOut,
}

/// Forward, loss, then backward through every layer; `on_grad(layer, site,
/// g)` receives each captured gradient `[n, hidden]`, layers from last to
/// first, `MlpOut` before `AttnOut`. Returns the loss.
fn loss_and_grads<B: Grad>(
    be: &B,
    text: &TextModel<B>,
    x0: &B::Tensor,
    rope: RopePos<'_>,
    tick: &mut dyn FnMut(),
    targets: &[(usize, u32)],
    mut on_grad: impl FnMut(usize, GradSite, &B::Tensor) -> Result<()>,
) -> Result<f64> {
    let saved = forward(be, text, x0, rope, &mut *tick, |_| NoTap)?;
    let (loss, mut dy) = head_loss(be, text, &saved.out, targets)?;
    for i in (0..text.layers.len()).rev() {
        let layer = &text.layers[i];
        on_grad(i, GradSite::MlpOut, &dy)?;
        let dm = layer.mlp_backward(&text.spec, be, &saved.x_mid[i], &dy)?;
        on_grad(i, GradSite::AttnOut, &dm)?;
        tick();
        if i == 0 {
            break; // nothing below layer 0's attention output is captured
        }
        dy = layer.attn_backward(&text.spec, be, &saved.x_in[i], &dm, rope)?;
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{Cpu, CpuWeight};
    use crate::generate::{nll, target_logits, Prompt};
    use crate::model::rope::{rope_pos, Mrope};
    use crate::model::Vlm;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

    /// Relative tolerance of an analytic gradient against a central finite
    /// difference (f32 forward, f64 objective).
    const FD_RTOL: f64 = 2e-2;
    /// Absolute floor, as a fraction of the largest gradient of the check.
    const FD_ATOL_FRAC: f64 = 2e-3;

    fn rand_vec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-amp..amp)).collect()
    }

    /// Adds `eps` to element `(t, j)` of a site's output in `layer`.
    #[derive(Clone, Copy, Debug)]
    struct Perturb {
        layer: usize,
        site: GradSite,
        t: usize,
        j: usize,
        eps: f32,
    }

    /// The tap of layer `at` that applies `p`.
    struct PerturbTap {
        p: Perturb,
        at: usize,
    }

    impl Tap<Cpu> for PerturbTap {
        fn at(&mut self, site: Site, y: &mut Tensor) -> Result<()> {
            let hit = match self.p.site {
                GradSite::AttnOut => site == Site::AttnOut,
                GradSite::MlpOut => site == Site::MlpOut,
            };
            if hit && self.at == self.p.layer {
                let c = y.cols();
                y.data[self.p.t * c + self.p.j] += self.p.eps;
            }
            Ok(())
        }
    }

    /// The loss alone with a perturbation (the finite-difference objective).
    fn forward_loss(
        text: &TextModel<Cpu>,
        x0: &Tensor,
        rope: RopePos<'_>,
        targets: &[(usize, u32)],
        p: Perturb,
    ) -> Result<f64> {
        let saved = forward(&Cpu, text, x0, rope, &mut || {}, |at| PerturbTap { p, at })?;
        Ok(head_loss(&Cpu, text, &saved.out, targets)?.0)
    }

    fn fixture() -> Vlm<Cpu> {
        model("llava_qwen128")
    }

    fn model(name: &str) -> Vlm<Cpu> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
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
        /// M-RoPE models: the vision run is a 2 x 3 merged grid.
        mrope: Option<Mrope>,
    }

    impl Sample {
        fn rope(&self) -> RopePos<'_> {
            rope_pos(self.mrope.as_ref())
        }
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
        let mrope = m
            .cfg
            .text
            .mrope_section
            .as_ref()
            .map(|_| Mrope::new(N, &[(VISION.start, VISION.len())], &[(2, 3)]).unwrap());
        Sample {
            ids,
            x0,
            features,
            vision: (0..N).map(|t| VISION.contains(&t)).collect(),
            caption: (0..N).map(|t| CAPTION.contains(&t)).collect(),
            mrope,
        }
    }

    /// Every captured gradient, `[layer][site]` (site 0: o_proj, 1: down_proj).
    fn all_grads(m: &Vlm<Cpu>, s: &Sample) -> (f64, Vec<[Vec<f32>; 2]>) {
        let targets = check_inputs(&m.text, Cpu.dims(&s.x0), &s.ids, &s.caption).unwrap();
        let mut g = vec![[Vec::new(), Vec::new()]; m.text.layers.len()];
        let loss = loss_and_grads(
            &Cpu,
            &m.text,
            &s.x0,
            s.rope(),
            &mut || {},
            &targets,
            |i, site, gr| {
                g[i][slot(site)] = gr.data.clone();
                Ok(())
            },
        )
        .unwrap();
        (loss, g)
    }

    fn slot(site: GradSite) -> usize {
        match site {
            GradSite::AttnOut => 0,
            GradSite::MlpOut => 1,
        }
    }

    #[test]
    fn runs_of_consecutive_positions() {
        assert_eq!(runs([].into_iter()), vec![]);
        assert_eq!(runs([4].into_iter()), vec![(4, 1)]);
        assert_eq!(
            runs([2, 3, 4, 7, 9, 10].into_iter()),
            vec![(2, 3), (7, 1), (9, 2)]
        );
    }

    #[test]
    fn fixture_loss_matches_target_logits() {
        loss_matches_target_logits(&fixture());
    }

    /// M-RoPE: the sample's own positions in the forward and the backward.
    #[test]
    fn mrope_loss_matches_target_logits() {
        loss_matches_target_logits(&model("qwen2vl"));
    }

    fn loss_matches_target_logits(m: &Vlm<Cpu>) {
        let s = sample(m, 7);
        let sens = sample_sensitivity(
            &Cpu,
            &m.text,
            &s.x0,
            &s.ids,
            &s.vision,
            &s.caption,
            s.rope(),
            &mut || {},
        )
        .unwrap();
        // The generate path: prompt = tokens before the caption with the
        // image features in place, target = the caption.
        let prompt = Prompt {
            ids: s.ids[..CAPTION.start].to_vec(),
            image_spans: vec![(VISION.start, VISION.len())],
            mrope: s.mrope.as_ref().map(|r| Mrope {
                thw: r.thw[..CAPTION.start].to_vec(),
                delta: r.delta,
            }),
        };
        let target = &s.ids[CAPTION];
        let logits = target_logits(&Cpu, m, &prompt, Some(&s.features), target).unwrap();
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
        gradients_match_fd(&fixture());
    }

    /// M-RoPE: the backward through the three rotation parts (negated
    /// frequencies at the sample's own positions).
    #[test]
    fn mrope_gradients_match_fd() {
        gradients_match_fd(&model("qwen2vl"));
    }

    fn gradients_match_fd(m: &Vlm<Cpu>) {
        let s = sample(m, 8);
        let targets = check_inputs(&m.text, Cpu.dims(&s.x0), &s.ids, &s.caption).unwrap();
        let (_, g) = all_grads(m, &s);
        let hidden = m.cfg.text.hidden_size;
        let mut rng = StdRng::seed_from_u64(9);
        let eps = 1e-2f32;
        for (layer, sites) in g.iter().enumerate() {
            for site in [GradSite::AttnOut, GradSite::MlpOut] {
                let gs = &sites[slot(site)];
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
                            forward_loss(&m.text, &s.x0, s.rope(), &targets, p).unwrap()
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
        let sens = sample_sensitivity(
            &Cpu,
            &m.text,
            &s.x0,
            &s.ids,
            &s.vision,
            &s.caption,
            RopePos::Sequential,
            &mut || {},
        )
        .unwrap();
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
            // The sums come back as f32 (`Search::abs_terms`; the CPU's
            // are f64 sums rounded once): within f32's half ulp.
            let close = |a: f64, b: f64| (a - b).abs() <= 6e-8 * b.abs();
            assert!(close(lg.attn.vision, mean(&g[i][0], VISION)), "layer {i}");
            assert!(close(lg.attn.caption, mean(&g[i][0], CAPTION)), "layer {i}");
            assert!(close(lg.mlp.vision, mean(&g[i][1], VISION)), "layer {i}");
            assert!(close(lg.mlp.caption, mean(&g[i][1], CAPTION)), "layer {i}");
            assert!(lg.attn.caption > 0.0 && lg.mlp.caption > 0.0, "layer {i}");
        }
        assert_eq!(sens.layers[last].attn.vision, 0.0);
        assert_eq!(sens.layers[last].mlp.vision, 0.0);
        assert!(sens.layers[0].attn.vision > 0.0 && sens.layers[0].mlp.vision > 0.0);
        // No vision positions: zero means, has_vision false.
        let none = vec![false; N];
        let sens = sample_sensitivity(
            &Cpu,
            &m.text,
            &s.x0,
            &s.ids,
            &none,
            &s.caption,
            RopePos::Sequential,
            &mut || {},
        )
        .unwrap();
        assert!(!sens.has_vision);
        assert!(sens
            .layers
            .iter()
            .all(|l| l.attn.vision == 0.0 && l.mlp.vision == 0.0));
    }

    #[test]
    fn rejects_bad_samples_and_packed_weights() {
        let mut m = fixture();
        let s = sample(&m, 11);
        let err = |caption: &[bool], m: &Vlm<Cpu>| {
            sample_sensitivity(
                &Cpu,
                &m.text,
                &s.x0,
                &s.ids,
                &s.vision,
                caption,
                RopePos::Sequential,
                &mut || {},
            )
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
        let gate = &mut m.text.layers[1].mlp.gate.w;
        let (out, inp) = gate.shape();
        let dense = gate.to_dense();
        let packed =
            crate::quant::pseudo::quantize_linear("gate", &dense.data, out, inp, 4, 128).unwrap();
        *gate = CpuWeight::Packed(packed);
        assert!(err(&s.caption, &m).contains("unquantized"));
    }
}
