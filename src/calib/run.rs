//! `mbq quantize`: one entry point for every method, in stages. RTN
//! quantizes directly; MBQ, AWQ and SmoothQuant go through
//!
//! 1. the plan ([`Plan`]): the options checked once;
//! 2. the calibration set ([`super::data`]): samples embedded by the VLM
//!    loaded on `--backend` (CPU, wgpu or CUDA; the image encoding runs
//!    there);
//! 3. MBQ's sensitivity ([`super::sensitivity`]) on the same backend (the
//!    VLM's language model, the backward ops of `backend::Grad`): per layer
//!    the vision/caption gradient ratios;
//! 4. the layer-by-layer scale search ([`super::search`]) there too, with
//!    a checkpoint per layer ([`super::checkpoint`]), the chosen scales
//!    folded into the host weights;
//! 5. export: the folded weights quantized and written by
//!    [`crate::quant::writer`], with the report (JSON and SVG).

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::checkpoint::{self, State};
use super::data::{embed_sample, load_calib_set, CalibItemError, CalibSample};
use super::features::layer_outputs;
use super::group::HostLayer;
use super::kept::{KeepDtype, Kept};
use super::method::{QuantKind, Scales};
use super::plan::{settings, Plan, QuantizeOptions};
use super::report::{CalibReport, GroupReport, LayerReport, Ratio};
use super::report_svg;
use super::search::{LayerSearch, SearchSettings, TokenMasks, GRID};
use super::sensitivity::{sample_sensitivity, LayerGrad, ModalityGrad};
use crate::backend::{Backend, BackendJob, BackendKind, BackendOptions, Grad, Search as SearchOps};
use crate::config::{TextConfig, VlmConfig};
use crate::error::{Error, Result};
use crate::image_processor::ImageProcessor;
use crate::model::decoder::DecoderSpec;
use crate::model::llava::check_config_against_weights;
use crate::model::rope::rope_pos;
use crate::model::text::TextModel;
use crate::model::Vlm;
use crate::processor::Processor;
use crate::quant::outdir::check_output;
use crate::quant::writer::{self, QuantSpec, Replacements};
use crate::weights::{Prefixed, Prefixes, WeightFiles};

/// What the run reports while it works.
#[derive(Debug)]
pub enum CalibProgress<'a> {
    /// Something to tell the user (skipped items, resume, ...).
    Note(String),
    /// Image encoding / embedding of the calibration samples.
    Loading { done: usize, total: usize },
    /// MBQ's gradient pass, in layer passes (each sample's forward through
    /// every layer, then its backward); `tokens`: a pass's tokens on
    /// average (for a rate in tokens/s).
    Sensitivity {
        done: usize,
        total: usize,
        tokens: usize,
    },
    /// Search of one layer: `done` of `total` loss evaluations (a
    /// candidate's scales on a chunk of samples), each over `tokens`
    /// calibration tokens (on average); the samples are in `chunks` chunks.
    Layer {
        layer: usize,
        layers: usize,
        done: usize,
        total: usize,
        tokens: usize,
        chunks: usize,
    },
    /// Packing and writing the output.
    Write(writer::Progress<'a>),
}

/// What was written.
pub struct QuantizeOutcome {
    pub written: writer::Report,
    pub calibration: Option<CalibReport>,
    pub skipped: Vec<CalibItemError>,
}

/// Quantizes `o.model` into `o.out` by `o.method`.
pub fn quantize_model(
    o: &QuantizeOptions,
    mut progress: impl FnMut(CalibProgress<'_>),
) -> Result<QuantizeOutcome> {
    let plan = Plan::new(o)?;
    // config.json against the tensors present, before anything is sized
    // from it (a huge layer count is an error naming the key, not an abort).
    let weights = WeightFiles::open(&o.model)?;
    let prefixes = Prefixes::detect(&weights)?;
    check_config_against_weights(&VlmConfig::load(&o.model)?, &weights, &prefixes)?;
    let packer = plan.clone();
    let pack = move |name: &str, w: &[f32], out: usize, inp: usize| packer.pack(name, w, out, inp);
    let spec = QuantSpec {
        method: o.method.name(),
        bits: plan.bits,
        group_size: plan.group_size,
        quantize: &pack,
        extra_meta: plan.extra_meta(),
    };
    if let Some(f) = crate::quant::import::foreign_format(weights.quantization_config.as_ref())? {
        // A GPTQ / AWQ / compressed-tensors input is only repacked.
        writer::check_repack(&o.model, &f, &spec)?;
    }
    let Some(calib) = plan.calib.as_deref() else {
        let written =
            writer::write_quantized_dir(&o.model, &o.out, &spec, &Replacements::default(), |p| {
                progress(CalibProgress::Write(p))
            })?;
        return Ok(QuantizeOutcome {
            written,
            calibration: None,
            skipped: Vec::new(),
        });
    };
    check_output(&o.model, &o.out)?;
    let search_backend = crate::backend::resolve(o.backend, &BackendOptions::default(), |m| {
        progress(CalibProgress::Note(m.to_string()))
    })?;
    let ckpt = checkpoint::dir(&o.out);
    if ckpt.exists() && !o.resume {
        return Err(Error::invalid(format!(
            "{}: a checkpoint of an interrupted calibration exists; pass --resume to continue it, or remove it to start over",
            ckpt.display()
        )));
    }

    // Stages 2-4 in one job on `--backend`: the samples' embeddings stay
    // there from the image encoding to the last layer's search.
    let Calibrated {
        state,
        cfg,
        sample_ids,
        skipped,
    } = crate::backend::with_backend(
        search_backend,
        &BackendOptions::default(),
        |_| {},
        CalibJob {
            o,
            calib,
            quant: plan.quant,
            weights: &weights,
            prefixes: &prefixes,
            ckpt: &ckpt,
            backend: search_backend,
            progress: &mut progress,
        },
    )?;
    let settings = state.settings.clone();
    let text_prefix = prefixes.text.clone();

    // Stage 5: the report, then the output directory.
    let calib_report = report(settings, &state, &sample_ids, &skipped);
    // The folded layers are read back from the checkpoint as they are written.
    let mut repl = Replacements::default();
    for i in 0..cfg.text.num_hidden_layers {
        let file = WeightFiles::open_file(&checkpoint::layer_file(&ckpt, i))?;
        let (prefix, inner) = (
            format!("{text_prefix}.layers.{i}."),
            format!("model.layers.{i}."),
        );
        repl.sources.push((prefix, file, inner));
    }
    let json_text = serde_json::to_string_pretty(&calib_report)
        .map_err(|e| Error::invalid(format!("calibration report: {e}")))?;
    repl.files.push((
        "calibration_report.json".into(),
        format!("{json_text}\n").into_bytes(),
    ));
    repl.files.push((
        "calibration_report.svg".into(),
        report_svg::to_svg(&calib_report).into_bytes(),
    ));
    let written = writer::write_quantized_dir(&o.model, &o.out, &spec, &repl, |p| {
        progress(CalibProgress::Write(p))
    })?;
    let _ = std::fs::remove_dir_all(&ckpt);
    Ok(QuantizeOutcome {
        written,
        calibration: Some(calib_report),
        skipped,
    })
}

/// Every sample's decoder input (image features in place of its image
/// tokens), on the backend, kept as `dtype`.
fn embed_all<B: SearchOps>(
    be: &B,
    vlm: &Vlm<B>,
    set: &CalibSet,
    dtype: KeepDtype,
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<Vec<Kept<B>>> {
    let mut xs = Vec::with_capacity(set.samples.len());
    for (k, s) in set.samples.iter().enumerate() {
        xs.push(Kept::new(
            be,
            embed_sample(be, vlm, &set.img_cfg, s)?,
            dtype,
        )?);
        progress(CalibProgress::Loading {
            done: k + 1,
            total: set.samples.len(),
        });
    }
    Ok(xs)
}

/// What the calibration job hands back for the report and the output.
struct Calibrated {
    state: State,
    cfg: VlmConfig,
    sample_ids: Vec<String>,
    skipped: Vec<CalibItemError>,
}

/// Stages 2-4 as one job for [`crate::backend::with_backend`]: the VLM
/// loaded on the backend encodes the images and embeds the samples, its
/// language model runs MBQ's sensitivity pass, then the layer-by-layer
/// search; the embeddings never leave the backend.
struct CalibJob<'a, P: FnMut(CalibProgress<'_>)> {
    o: &'a QuantizeOptions,
    calib: &'a Path,
    quant: QuantKind,
    weights: &'a WeightFiles,
    prefixes: &'a Prefixes,
    ckpt: &'a Path,
    /// `--backend` as resolved (recorded in the settings).
    backend: BackendKind,
    progress: &'a mut P,
}

impl<P: FnMut(CalibProgress<'_>)> BackendJob for CalibJob<'_, P> {
    type Output = Calibrated;
    fn run<B: Grad + SearchOps>(self, be: &B, device: &str) -> Result<Calibrated> {
        let CalibJob {
            o,
            calib,
            quant,
            weights,
            prefixes,
            ckpt,
            backend,
            progress,
        } = self;
        let dev = format!("{}: {device}", be.name());
        if be.name() != "cpu" {
            progress(CalibProgress::Note(format!("calibration on {dev}")));
        }
        // Stage 2: the calibration set, embedded by the VLM.
        let vlm = Vlm::<B>::load(be, &o.model)?;
        let set = calibration_set(o, &vlm, calib, progress)?;
        let keep = o.feature_dtype.resolve(text_is_f16(weights, prefixes));
        let mut settings = settings(o, set.samples.len(), calib, backend);
        settings.insert("feature_dtype".into(), json!(keep.name()));
        let sample_ids: Vec<String> = set.samples.iter().map(|s| s.id.clone()).collect();
        let mut state = open_state(
            o,
            ckpt,
            &settings,
            &sample_ids,
            vlm.text.layers.len(),
            progress,
        )?;
        let t0 = Instant::now();
        let xs = embed_all(be, &vlm, &set, keep, progress)?;
        state.record_stage("embed", &dev, t0.elapsed().as_secs_f64());
        let masks: Vec<TokenMasks> = set
            .samples
            .iter()
            .map(|s| TokenMasks {
                vision: s.vision.clone(),
                caption: s.caption.clone(),
                mrope: s.mrope.clone(),
            })
            .collect();

        // Stage 3: MBQ's modality sensitivity of every layer.
        if o.method.needs_sensitivity() && state.grads.is_none() {
            let t0 = Instant::now();
            state.grads = Some(sensitivity(be, &vlm.text, &set.samples, &xs, progress)?);
            state.sensitivity_seconds = t0.elapsed().as_secs_f64();
            state.record_stage("sensitivity", &dev, state.sensitivity_seconds);
            checkpoint::write_state(ckpt, &state)?;
        }
        let ratios = state.grads.as_ref().map(|g| ratios(g)).transpose()?;
        let cfg = vlm.cfg.clone();
        drop(vlm);

        // Stage 4: the scale search, layer by layer, on the host weights
        // (one layer in f32 at a time; each folded layer goes to the
        // checkpoint).
        let text_weights = weights.pp(&prefixes.text);
        let mut search = Search {
            spec: DecoderSpec::new(&cfg.text),
            weights: &text_weights,
            text: &cfg.text,
            masks: &masks,
            o,
            settings: SearchSettings {
                quant,
                loss: o.loss,
            },
            state: &mut state,
            ratios: ratios.as_deref(),
            ckpt,
            progress,
        };
        search.run(be, xs)?;
        let search_seconds = state.layer_seconds.iter().sum();
        state.record_stage("search", &dev, search_seconds);
        Ok(Calibrated {
            state,
            cfg,
            sample_ids,
            skipped: set.skipped,
        })
    }
}

/// The calibration samples and the image processor that embeds them.
struct CalibSet {
    samples: Vec<CalibSample>,
    skipped: Vec<CalibItemError>,
    img_cfg: ImageProcessor,
}

fn calibration_set<B: Backend>(
    o: &QuantizeOptions,
    vlm: &Vlm<B>,
    calib: &Path,
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<CalibSet> {
    let proc = Processor::load(&o.model, vlm.cfg.image_token_index)?;
    let img_cfg = ImageProcessor::load(&o.model)?;
    let set = load_calib_set(
        vlm,
        &proc,
        &img_cfg,
        calib,
        o.image_folder.as_deref(),
        o.n_samples,
        o.seed,
    )?;
    for s in &set.skipped {
        progress(CalibProgress::Note(format!(
            "{}: skipped item {}{}{}: {}",
            calib.display(),
            s.index,
            s.line.map(|l| format!(" (line {l})")).unwrap_or_default(),
            s.id.as_ref()
                .map(|i| format!(" id {i}"))
                .unwrap_or_default(),
            s.reason
        )));
    }
    if set.samples.len() < o.n_samples {
        progress(CalibProgress::Note(format!(
            "{}: {} valid samples of the {} asked for",
            calib.display(),
            set.samples.len(),
            o.n_samples
        )));
    }
    Ok(CalibSet {
        samples: set.samples,
        skipped: set.skipped,
        img_cfg,
    })
}

/// The checkpoint's state when resuming (checked against this run), else a new one.
fn open_state(
    o: &QuantizeOptions,
    ckpt: &Path,
    settings: &serde_json::Map<String, Value>,
    sample_ids: &[String],
    layers: usize,
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<State> {
    if !(o.resume && ckpt.join("state.json").is_file()) {
        if o.resume {
            progress(CalibProgress::Note(format!(
                "--resume: no checkpoint at {}; starting from the beginning",
                ckpt.display()
            )));
        }
        return Ok(State::new(settings.clone(), sample_ids.to_vec()));
    }
    let st = checkpoint::read_state(ckpt)?;
    if &st.settings != settings {
        return Err(Error::invalid(format!(
            "{}: the checkpoint was made with other settings ({}); run without --resume after removing it, or with the same options",
            ckpt.display(),
            checkpoint::diff_settings(&st.settings, settings)
        )));
    }
    if st.sample_ids != sample_ids {
        return Err(Error::invalid(format!(
            "{}: the checkpoint was made on other calibration samples (the data changed)",
            ckpt.display()
        )));
    }
    progress(CalibProgress::Note(format!(
        "resuming from {}: {} of {layers} layers done",
        ckpt.display(),
        st.layers_done
    )));
    Ok(st)
}

/// Every decoder layer of the model as host f32 tensors.
pub fn load_host_layers(
    w: &WeightFiles,
    text_prefix: &str,
    cfg: &VlmConfig,
) -> Result<Vec<HostLayer>> {
    let base = w.pp(text_prefix);
    (0..cfg.text.num_hidden_layers)
        .map(|i| HostLayer::load_host(&base.pp(format!("layers.{i}")), &cfg.text))
        .collect()
}

/// Whether the language model's weights are stored in f16 (its first
/// layer's q_proj; then the calibration keeps activations in f16 under
/// `--feature-dtype auto`).
fn text_is_f16(weights: &WeightFiles, prefixes: &Prefixes) -> bool {
    let name = weights
        .pp(&prefixes.text)
        .name("layers.0.self_attn.q_proj.weight");
    weights
        .raw(&name)
        .is_ok_and(|(d, _, _)| d == safetensors::Dtype::F16)
}

/// Mean |grad| per layer, averaged over samples. Vision means average over
/// the samples that have vision tokens.
fn sensitivity<B: Grad + SearchOps>(
    be: &B,
    text: &TextModel<B>,
    samples: &[CalibSample],
    xs: &[Kept<B>],
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<Vec<LayerGrad>> {
    let mut sum = vec![LayerGrad::default(); text.layers.len()];
    let (mut n_vis, mut n) = (0usize, 0usize);
    // Progress in layer passes: each sample's forward, then its backward.
    let per_sample = 2 * text.layers.len();
    let total = samples.len() * per_sample;
    let tokens = samples.iter().map(|s| s.ids.len()).sum::<usize>() / samples.len().max(1);
    for (k, (s, x)) in samples.iter().zip(xs).enumerate() {
        let mut done = k * per_sample;
        let mut tick = || {
            done += 1;
            progress(CalibProgress::Sensitivity {
                done,
                total,
                tokens,
            });
        };
        let r = sample_sensitivity(
            be,
            text,
            &*x.get(be)?,
            &s.ids,
            &s.vision,
            &s.caption,
            rope_pos(s.mrope.as_ref()),
            &mut tick,
        )
        .map_err(|e| Error::invalid(format!("sensitivity of sample {}: {e}", s.id)))?;
        for (acc, g) in sum.iter_mut().zip(&r.layers) {
            if r.has_vision {
                acc.attn.vision += g.attn.vision;
                acc.mlp.vision += g.mlp.vision;
            }
            acc.attn.caption += g.attn.caption;
            acc.mlp.caption += g.mlp.caption;
        }
        n_vis += r.has_vision as usize;
        n += 1;
        progress(CalibProgress::Sensitivity {
            done: (k + 1) * per_sample,
            total,
            tokens,
        });
    }
    let vis = |x: f64| if n_vis == 0 { 0.0 } else { x / n_vis as f64 };
    let mean = |m: ModalityGrad| ModalityGrad {
        vision: vis(m.vision),
        caption: m.caption / n as f64,
    };
    Ok(sum
        .iter()
        .map(|a| LayerGrad {
            attn: mean(a.attn),
            mlp: mean(a.mlp),
        })
        .collect())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Per layer (attn, mlp): vision/caption, clamped from below by the median
/// over layers (numpy's median: the mean of the middle two when even).
fn ratios(g: &[LayerGrad]) -> Result<Vec<(f64, f64)>> {
    let raw: Vec<(f64, f64)> = g
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if a.attn.caption <= 0.0 || a.mlp.caption <= 0.0 {
                Err(Error::invalid(format!(
                    "layer {i}: the caption gradient is zero; the calibration set has no usable caption tokens"
                )))
            } else {
                Ok(a.ratios())
            }
        })
        .collect::<Result<_>>()?;
    let ma = median(&raw.iter().map(|r| r.0).collect::<Vec<_>>());
    let mm = median(&raw.iter().map(|r| r.1).collect::<Vec<_>>());
    Ok(raw.iter().map(|r| (r.0.max(ma), r.1.max(mm))).collect())
}

/// The report: the settings with timings, samples and skipped items at the
/// top, then the layers.
fn report(
    mut top: serde_json::Map<String, Value>,
    state: &State,
    sample_ids: &[String],
    skipped: &[CalibItemError],
) -> CalibReport {
    top.insert(
        "sensitivity_seconds".into(),
        json!(state.sensitivity_seconds),
    );
    top.insert("layer_seconds".into(), json!(state.layer_seconds));
    top.insert("stages".into(), json!(state.stages));
    top.insert("samples".into(), json!(sample_ids));
    top.insert(
        "skipped".into(),
        Value::Array(
            skipped
                .iter()
                .map(|s| json!({"index": s.index, "line": s.line, "id": s.id, "reason": s.reason}))
                .collect(),
        ),
    );
    CalibReport {
        settings: top,
        layers: state.layers.clone(),
    }
}

/// The layer-by-layer search of every layer not yet in the checkpoint, on
/// one backend.
struct Search<'a, P: FnMut(CalibProgress<'_>)> {
    spec: DecoderSpec,
    /// The decoder's prefix (`<text>`: its `layers.N.*`).
    weights: &'a Prefixed<'a>,
    text: &'a TextConfig,
    masks: &'a [TokenMasks],
    o: &'a QuantizeOptions,
    settings: SearchSettings,
    state: &'a mut State,
    ratios: Option<&'a [(f64, f64)]>,
    ckpt: &'a Path,
    progress: &'a mut P,
}

impl<P: FnMut(CalibProgress<'_>)> Search<'_, P> {
    /// Searches layer after layer from the decoder inputs `xs` (on the
    /// backend), checkpointing each; finished layers are restored instead.
    fn run<B: SearchOps>(&mut self, be: &B, mut xs: Vec<Kept<B>>) -> Result<()> {
        let layers = self.text.num_hidden_layers;
        for i in 0..layers {
            let mut host =
                HostLayer::load_host(&self.weights.pp(format!("layers.{i}")), self.text)?;
            if i < self.state.layers_done {
                checkpoint::restore_layer(self.ckpt, &mut host, i)?;
            } else {
                let t0 = Instant::now();
                let rep = self.layer(be, i, &mut host, &xs)?;
                self.state.layers.push(rep);
                self.state.layer_seconds.push(t0.elapsed().as_secs_f64());
                self.state.layers_done = i + 1;
                checkpoint::save_layer(self.ckpt, &host, i)?;
                checkpoint::write_state(self.ckpt, self.state)?;
                if self.o.stop_after_layer == Some(i) {
                    return Err(Error::invalid(format!(
                        "stopped after layer {i} as asked (checkpoint in {})",
                        self.ckpt.display()
                    )));
                }
            }
            if i + 1 < layers {
                let folded = host.upload(be)?;
                xs = layer_outputs(be, &self.spec, &folded, &xs, self.masks)?;
            }
        }
        Ok(())
    }

    /// Searches (or, for SmoothQuant, sets) the scales of layer `i`, folds
    /// them in, and returns the layer's report.
    fn layer<B: SearchOps>(
        &mut self,
        be: &B,
        i: usize,
        layer: &mut HostLayer,
        xs: &[Kept<B>],
    ) -> Result<LayerReport> {
        let method = self.o.method;
        let layers = self.text.num_hidden_layers;
        let host = &*layer;
        let groups: Vec<_> = method
            .groups(true)
            .into_iter()
            .filter(|g| g.applies(host))
            .collect();
        let ratios = self.ratios.map(|r| r[i]);
        let chunk_tokens = self.o.search_chunk_tokens;
        let search = LayerSearch::new(i, be, &self.spec, host, xs, self.masks, chunk_tokens)?;
        let per_group = if method.scales() == Scales::Fixed {
            1
        } else {
            GRID
        };
        let chunks = search.chunk_count();
        let total = groups.len() * per_group * chunks;
        let progress = &mut *self.progress;
        let tokens = self.masks.iter().map(|m| m.caption.len()).sum::<usize>() / chunks.max(1);
        let mut report = |done: usize| {
            progress(CalibProgress::Layer {
                layer: i,
                layers,
                done,
                total,
                tokens,
                chunks,
            })
        };
        report(0);
        let mut done = 0;
        let tick = || {
            done += 1;
            report(done)
        };
        let results = if method.scales() == Scales::Fixed {
            search.smoothquant(&groups, self.o.loss, tick)?
        } else {
            let weighted: Vec<_> = groups
                .iter()
                .map(|&g| (g, method.weighting(g, ratios)))
                .collect();
            search.search(&weighted, self.settings, tick)?
        };
        drop(search);
        for r in &results {
            r.group.fold(layer, &r.scales)?;
        }
        let grads = self.state.grads.as_ref().map(|g| g[i]);
        Ok(LayerReport {
            index: i,
            grad: grads.filter(|_| ratios.is_some()),
            ratio: ratios.map(|(attn, mlp)| Ratio { attn, mlp }),
            groups: results
                .into_iter()
                .map(|r| GroupReport {
                    name: r.group.name().to_string(),
                    alpha: r.alpha,
                    loss: r.loss,
                    losses: r.losses,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_as_numpy() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let g = |av: f64, ac: f64, mv: f64, mc: f64| LayerGrad {
            attn: ModalityGrad {
                vision: av,
                caption: ac,
            },
            mlp: ModalityGrad {
                vision: mv,
                caption: mc,
            },
        };
        let r = ratios(&[
            g(1.0, 10.0, 0.0, 1.0),
            g(3.0, 10.0, 2.0, 1.0),
            g(2.0, 10.0, 1.0, 1.0),
        ])
        .unwrap();
        // attn ratios 0.1, 0.3, 0.2 -> median 0.2; mlp 0, 2, 1 -> median 1.
        assert_eq!(r, vec![(0.2, 1.0), (3.0 / 10.0, 2.0), (0.2, 1.0)]);
    }
}
