//! What the scale search needs from a layer's FP forward: each group's
//! input and the module outputs its loss compares with ([`LayerFeatures`]),
//! and the |x| statistics of the groups' inputs ([`ColStats`]), all made
//! on the backend by the model's own forward with a tap.
//!
//! Features are made a chunk of samples at a time ([`chunks`]): at 7B one
//! token's features are about 150 KB in f32, 75 KB in f16 (three
//! hidden-size inputs, the intermediate-size input of down_proj, two
//! hidden-size outputs), so 128 samples of ~2,300 tokens would need ~44 GB
//! (f32) at once. They, and the samples' layer inputs, are kept as
//! [`Kept`] says (f16 where the model is f16). The statistics need
//! every sample before the first grid point, so with more than one chunk a
//! first pass over all samples keeps statistics only
//! ([`layer_stats`]), and each chunk's features are made again when the
//! search evaluates it.

use std::ops::Range;

use super::group::Group;
use super::kept::{KeepDtype, Kept};
use super::search::TokenMasks;
use crate::backend::{Backend, Search};
use crate::error::{Error, Result};
use crate::model::decoder::{DecoderSpec, Kv, Layer, NoTap, Site, Tap};
use crate::model::rope::RopePos;
use crate::tensor::Tensor;

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

/// The |x| statistics of each group's input, in [`Group::ALL`] order.
pub type GroupStats = [ColStats; 4];

/// A group's place in [`Group::ALL`] (the index of its features).
pub fn slot(g: Group) -> usize {
    Group::ALL.iter().position(|x| *x == g).unwrap_or(0)
}

/// The search's features of a run of samples.
pub struct LayerFeatures<B: Search> {
    /// Each group's input, per sample, on the backend (in [`Group::ALL`] order).
    pub inputs: [Vec<Kept<B>>; 4],
    /// FP outputs of the self-attention (= o_proj) and the MLP (= down_proj),
    /// on the backend.
    pub attn_y: Vec<Kept<B>>,
    pub mlp_y: Vec<Kept<B>>,
}

impl<B: Search> LayerFeatures<B> {
    fn empty() -> LayerFeatures<B> {
        LayerFeatures {
            inputs: Default::default(),
            attn_y: vec![],
            mlp_y: vec![],
        }
    }

    /// The group's input features.
    pub fn inputs(&self, g: Group) -> &[Kept<B>] {
        &self.inputs[slot(g)]
    }

    /// The FP outputs the group's loss compares with.
    pub fn outputs(&self, g: Group) -> &[Kept<B>] {
        if g.is_attention() {
            &self.attn_y
        } else {
            &self.mlp_y
        }
    }
}

/// The running device sums of [`Search::abs_col_stats`] per group, with
/// their row counts.
type DeviceStats<B> = [(Option<<B as Backend>::Tensor>, usize); 4];

/// The tap of the search's FP forward: keeps the features as `dtype` (when
/// `f` is given) and adds each group input into the statistics (when
/// `stats` is; from the f32 values).
struct Record<'a, B: Search> {
    be: &'a B,
    dtype: KeepDtype,
    f: Option<&'a mut LayerFeatures<B>>,
    stats: Option<&'a mut DeviceStats<B>>,
}

impl<B: Search> Tap<B> for Record<'_, B> {
    fn keep(&mut self, site: Site, t: B::Tensor) -> Result<()> {
        let (be, dtype) = (self.be, self.dtype);
        match site {
            Site::AttnOut => {
                if let Some(f) = self.f.as_deref_mut() {
                    f.attn_y.push(Kept::new(be, t, dtype)?)
                }
            }
            Site::MlpOut => {
                if let Some(f) = self.f.as_deref_mut() {
                    f.mlp_y.push(Kept::new(be, t, dtype)?)
                }
            }
            _ => {
                if let Some(g) = Group::ALL.into_iter().find(|g| g.input() == site) {
                    let k = slot(g);
                    if let Some(stats) = self.stats.as_deref_mut() {
                        let (acc, rows) = &mut stats[k];
                        *acc = Some(self.be.abs_col_stats(&t, acc.as_ref())?);
                        *rows += self.be.dims(&t).0;
                    }
                    if let Some(f) = self.f.as_deref_mut() {
                        f.inputs[k].push(Kept::new(be, t, dtype)?);
                    }
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
    Kv::whole_sample(be, spec, be.dims(x).0, rope, |kv| {
        layer.forward(spec, be, x, kv, tap)
    })
}

/// The FP forward of a layer on the samples `xs` (on the backend; their
/// tokens `masks`), keeping the features in `f` (as `xs` are kept) and
/// adding the |x| statistics into `stats`, each where given.
fn record<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[Kept<B>],
    masks: &[TokenMasks],
    mut f: Option<&mut LayerFeatures<B>>,
    mut stats: Option<&mut DeviceStats<B>>,
) -> Result<()> {
    for (x, m) in xs.iter().zip(masks) {
        let mut tap = Record {
            be,
            dtype: x.dtype(),
            f: f.as_deref_mut(),
            stats: stats.as_deref_mut(),
        };
        run_layer(be, spec, layer, &*x.get(be)?, m.rope(), &mut tap)?;
    }
    Ok(())
}

/// The device statistics brought to the host (`[3, cols]` a group, once).
fn download_stats<B: Search>(be: &B, dev: DeviceStats<B>) -> Result<GroupStats> {
    let mut host: GroupStats = Default::default();
    for (k, (acc, rows)) in dev.into_iter().enumerate() {
        if let Some(t) = acc {
            host[k] = ColStats::from_device(&be.download(&t)?, rows)?;
        }
    }
    Ok(host)
}

/// The features of the samples `xs` and their |x| statistics.
pub fn layer_features<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[Kept<B>],
    masks: &[TokenMasks],
) -> Result<(LayerFeatures<B>, GroupStats)> {
    let mut f = LayerFeatures::empty();
    let mut stats = DeviceStats::<B>::default();
    record(be, spec, layer, xs, masks, Some(&mut f), Some(&mut stats))?;
    Ok((f, download_stats(be, stats)?))
}

/// The features of the samples `xs` (a chunk), without statistics.
pub fn chunk_features<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[Kept<B>],
    masks: &[TokenMasks],
) -> Result<LayerFeatures<B>> {
    let mut f = LayerFeatures::empty();
    record(be, spec, layer, xs, masks, Some(&mut f), None)?;
    Ok(f)
}

/// The |x| statistics of the samples `xs`, keeping no features.
pub fn layer_stats<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[Kept<B>],
    masks: &[TokenMasks],
) -> Result<GroupStats> {
    let mut stats = DeviceStats::<B>::default();
    record(be, spec, layer, xs, masks, None, Some(&mut stats))?;
    download_stats(be, stats)
}

/// The layer's outputs on every sample (the next layer's inputs), kept as
/// the inputs are.
pub fn layer_outputs<B: Search>(
    be: &B,
    spec: &DecoderSpec,
    layer: &Layer<B>,
    xs: &[Kept<B>],
    masks: &[TokenMasks],
) -> Result<Vec<Kept<B>>> {
    xs.iter()
        .zip(masks)
        .map(|(x, m)| {
            let y = run_layer(be, spec, layer, &*x.get(be)?, m.rope(), &mut NoTap)?;
            Kept::new(be, y, x.dtype())
        })
        .collect()
}

/// The samples split into runs of consecutive samples of at most
/// `max_tokens` tokens each (a sample longer than that is a run of its
/// own; a sample is never split: its attention needs all of it).
pub fn chunks(masks: &[TokenMasks], max_tokens: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, m) in masks.iter().enumerate() {
        let n = m.caption.len();
        if i > start && tokens + n > max_tokens {
            out.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += n;
    }
    if start < masks.len() {
        out.push(start..masks.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks(lens: &[usize]) -> Vec<TokenMasks> {
        lens.iter()
            .map(|&n| TokenMasks {
                vision: vec![false; n],
                caption: vec![true; n],
                mrope: None,
            })
            .collect()
    }

    #[test]
    fn chunks_hold_whole_samples_within_the_budget() {
        let m = masks(&[5, 3, 4, 10, 1, 1]);
        assert_eq!(chunks(&m, 100), vec![0..6]);
        assert_eq!(chunks(&m, 8), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(chunks(&m, 9), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(chunks(&m, 12), vec![0..3, 3..6]);
        // Each sample alone.
        assert_eq!(chunks(&m, 1), (0..6).map(|i| i..i + 1).collect::<Vec<_>>());
        assert!(chunks(&[], 8).is_empty());
    }
}
