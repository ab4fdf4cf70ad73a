//! `mbq quantize`: one entry point for every method. RTN quantizes
//! directly; MBQ, AWQ and SmoothQuant first calibrate (the calibration set
//! and MBQ's sensitivity pass on the CPU reference backend, then the
//! layer-by-layer scale search on `--backend`: CPU, wgpu or CUDA), fold
//! their scales into the FP weights and quantize those.
//!
//! A search checkpoints after every layer in `.<OUT>.calib-checkpoint/`
//! beside OUT: `state.json` (settings, sensitivity, reports, the number of
//! finished layers) is replaced atomically after `layer-<i>.safetensors`
//! (the scaled f32 weights of layer i) is in place. `--resume` restores the
//! finished layers, recomputes the next layer's inputs from them exactly as
//! the uninterrupted run did, and goes on: the output is bit-identical.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::data::{embed_sample, load_calib_set, CalibItemError};
use super::grad::sample_sensitivity;
use super::report::{
    self, CalibReport, GroupReport, LayerGradReport, LayerReport, ModalityGrad, Ratio,
};
use super::search::{
    self, apply_scales, has_attn_out, layer_features, LossKind, QuantKind, TokenMasks, Weighting,
    GRID,
};
use crate::backend::cpu::{Cpu, CpuWeight};
use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::model::llava::{Prefixes, Vlm};
use crate::model::text::{DecoderLayer, TextModel};
use crate::model::Linear;
use crate::preprocess::ImageProcessorConfig;
use crate::processor::Processor;
use crate::quant::format::{PackedLinear, META_ACT_BITS};
use crate::quant::safetensors_out::{self, OutTensor};
use crate::quant::w4a8::quantize_linear_w4_per_channel;
use crate::quant::writer::{
    self, check_bits_group, check_output, quantize_rows, QuantSpec, Replacements, DECODER_LINEARS,
};
use crate::tensor::Tensor;
use crate::weights::WeightFiles;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Mbq,
    Awq,
    Smoothquant,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Mbq => "mbq",
            Method::Awq => "awq",
            Method::Smoothquant => "smoothquant",
        }
    }
}

/// Everything `mbq quantize` is asked to do.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub method: Method,
    pub w_bit: u32,
    /// `Some(8)`: W4A8 (per-channel INT4 weights, per-token INT8 activations).
    pub a_bit: Option<u32>,
    pub group_size: usize,
    pub calib: Option<PathBuf>,
    pub image_folder: Option<PathBuf>,
    pub n_samples: usize,
    pub seed: u64,
    pub loss: LossKind,
    pub model: PathBuf,
    pub out: PathBuf,
    /// Where the scale search runs (`auto` resolves as `mbq-run` does).
    pub backend: BackendKind,
    pub resume: bool,
    /// Testing aid: stop with [`Error::Invalid`] right after layer `k`'s
    /// checkpoint, as a kill would.
    pub stop_after_layer: Option<usize>,
}

/// What the run reports while it works.
#[derive(Debug)]
pub enum CalibProgress<'a> {
    /// Something to tell the user (skipped items, resume, ...).
    Note(String),
    /// Image encoding / embedding of the calibration samples.
    Loading { done: usize, total: usize },
    /// MBQ's gradient pass, per sample.
    Sensitivity { done: usize, total: usize },
    /// Search of one layer: `done` of `total` loss evaluations.
    Layer {
        layer: usize,
        layers: usize,
        done: usize,
        total: usize,
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

/// The checkpoint's contents.
#[derive(Serialize, Deserialize)]
struct State {
    settings: Map<String, Value>,
    sample_ids: Vec<String>,
    /// Per layer (vision, caption) mean |grad| at o_proj and down_proj.
    grads: Option<Vec<[f64; 4]>>,
    layers_done: usize,
    layers: Vec<LayerReport>,
    layer_seconds: Vec<f64>,
    sensitivity_seconds: f64,
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.calib-checkpoint"))
}

fn check_options(o: &QuantizeOptions) -> Result<Option<QuantKind>> {
    match o.a_bit {
        None => check_bits_group(o.w_bit, o.group_size)?,
        Some(8) => {
            if o.w_bit != 4 {
                return Err(Error::invalid(format!(
                    "--a-bit 8 needs --w-bit 4 (W4A8), got --w-bit {}",
                    o.w_bit
                )));
            }
            check_bits_group(4, o.group_size)?;
        }
        Some(a) => {
            return Err(Error::invalid(format!(
                "--a-bit {a}: only 8 (W4A8) is supported"
            )))
        }
    }
    let q = match o.a_bit {
        Some(_) => QuantKind::W4A8,
        None => QuantKind::Weight {
            bits: o.w_bit,
            group_size: o.group_size,
        },
    };
    match o.method {
        Method::Rtn => return Ok(None),
        Method::Smoothquant if o.a_bit.is_none() => {
            return Err(Error::invalid(
                "--method smoothquant is a weight-activation method: give --w-bit 4 --a-bit 8",
            ))
        }
        Method::Mbq | Method::Awq if o.w_bit == 8 && o.a_bit.is_none() => {
            return Err(Error::invalid(format!(
                "--method {}: --w-bit 3 or 4 (8-bit weights need no search; use rtn)",
                o.method.name()
            )))
        }
        _ => {}
    }
    if o.calib.is_none() {
        return Err(Error::invalid(format!(
            "--method {} needs --calib FILE (LLaVA JSON/JSONL) and usually --image-folder DIR",
            o.method.name()
        )));
    }
    Ok(Some(q))
}

/// Quantizes `o.model` into `o.out` by `o.method`.
pub fn quantize_model(
    o: &QuantizeOptions,
    mut progress: impl FnMut(CalibProgress<'_>),
) -> Result<QuantizeOutcome> {
    let q = check_options(o)?;
    let w4a8 = o.a_bit.is_some();
    let group = o.group_size;
    let bits = o.w_bit;
    let quantize = move |name: &str, w: &[f32], out: usize, inp: usize| -> Result<PackedLinear> {
        if w4a8 {
            quantize_linear_w4_per_channel(name, w, out, inp, group)
        } else {
            quantize_rows(name, w, out, inp, bits, group)
        }
    };
    let spec = QuantSpec {
        method: o.method.name(),
        bits,
        group_size: group,
        quantize: &quantize,
        extra_meta: if w4a8 {
            vec![(META_ACT_BITS.to_string(), "8".to_string())]
        } else {
            Vec::new()
        },
    };
    let Some(q) = q else {
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
    let search_backend = crate::runtime::resolve_backend(o.backend, None, |m| {
        progress(CalibProgress::Note(m.to_string()))
    })?;
    let ckpt = checkpoint_dir(&o.out);
    if ckpt.exists() && !o.resume {
        return Err(Error::invalid(format!(
            "{}: a checkpoint of an interrupted calibration exists; pass --resume to continue it, or remove it to start over",
            ckpt.display()
        )));
    }

    let be = Cpu;
    let mut vlm = Vlm::<Cpu>::load(&be, &o.model)?;
    let proc = Processor::load(&o.model, vlm.cfg.image_token_index)?;
    let img_cfg = ImageProcessorConfig::load(&o.model)?;
    let calib = o.calib.as_deref().ok_or_else(|| {
        Error::invalid(format!("--method {} needs --calib FILE", o.method.name()))
    })?;
    let set = load_calib_set(
        &vlm,
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
    let settings = settings(o, set.samples.len(), calib, search_backend);
    let sample_ids: Vec<String> = set.samples.iter().map(|s| s.id.clone()).collect();
    let layers = vlm.text.layers.len();

    let mut state = if o.resume && ckpt.join("state.json").is_file() {
        let st = read_state(&ckpt)?;
        if st.settings != settings {
            return Err(Error::invalid(format!(
                "{}: the checkpoint was made with other settings ({}); run without --resume after removing it, or with the same options",
                ckpt.display(),
                diff_settings(&st.settings, &settings)
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
        st
    } else {
        if o.resume {
            progress(CalibProgress::Note(format!(
                "--resume: no checkpoint at {}; starting from the beginning",
                ckpt.display()
            )));
        }
        State {
            settings: settings.clone(),
            sample_ids: sample_ids.clone(),
            grads: None,
            layers_done: 0,
            layers: Vec::new(),
            layer_seconds: Vec::new(),
            sensitivity_seconds: 0.0,
        }
    };

    // The decoder inputs of every sample.
    let mut xs: Vec<Tensor> = Vec::with_capacity(set.samples.len());
    for (k, s) in set.samples.iter().enumerate() {
        xs.push(embed_sample(&be, &vlm, &img_cfg, s)?);
        progress(CalibProgress::Loading {
            done: k + 1,
            total: set.samples.len(),
        });
    }
    let masks: Vec<TokenMasks> = set
        .samples
        .iter()
        .map(|s| TokenMasks {
            vision: s.vision.clone(),
            caption: s.caption.clone(),
        })
        .collect();

    // MBQ: the modality sensitivity of every layer.
    if o.method == Method::Mbq && state.grads.is_none() {
        let t0 = Instant::now();
        state.grads = Some(sensitivity(&vlm.text, &set.samples, &xs, &mut progress)?);
        state.sensitivity_seconds = t0.elapsed().as_secs_f64();
        write_state(&ckpt, &state)?;
    }
    let ratios = state.grads.as_ref().map(|g| ratios(g)).transpose()?;

    let mut search = Search {
        text: &mut vlm.text,
        masks: &masks,
        o,
        q,
        state: &mut state,
        ratios: ratios.as_deref(),
        ckpt: &ckpt,
        progress: &mut progress,
    };
    {
        // The search on the backend resolved above; a device says which.
        struct SearchJob<'s, 'a, P: FnMut(CalibProgress<'_>)> {
            search: &'s mut Search<'a, P>,
            xs: Vec<Tensor>,
        }
        impl<P: FnMut(CalibProgress<'_>)> crate::backend::BackendJob for SearchJob<'_, '_, P> {
            type Output = ();
            fn run<B: Backend>(self, be: &B, device: &str) -> Result<()> {
                if be.name() != "cpu" {
                    (self.search.progress)(CalibProgress::Note(format!(
                        "scale search on {}: {device}",
                        be.name()
                    )));
                }
                self.search.run(be, self.xs)
            }
        }
        let job = SearchJob {
            search: &mut search,
            xs,
        };
        let opts = crate::backend::BackendOptions::default();
        crate::backend::with_backend(search_backend, &opts, |_| {}, job)?;
    }

    // The report, then the output directory.
    let mut top = settings.clone();
    top.insert(
        "sensitivity_seconds".into(),
        json!(state.sensitivity_seconds),
    );
    top.insert("layer_seconds".into(), json!(state.layer_seconds));
    top.insert("samples".into(), json!(sample_ids));
    top.insert(
        "skipped".into(),
        Value::Array(
            set.skipped
                .iter()
                .map(|s| json!({"index": s.index, "line": s.line, "id": s.id, "reason": s.reason}))
                .collect(),
        ),
    );
    let calib_report = CalibReport {
        settings: top,
        layers: state.layers.clone(),
    };
    let mut repl = Replacements::default();
    let w = WeightFiles::open(&o.model)?;
    let text_prefix = Prefixes::detect(&w)?.text;
    decoder_tensors(&vlm.text, &text_prefix, |name, t| {
        repl.tensors.insert(name, t.data.clone());
    })?;
    let json_text = serde_json::to_string_pretty(&calib_report)
        .map_err(|e| Error::invalid(format!("calibration report: {e}")))?;
    repl.files.push((
        PathBuf::from("calibration_report.json"),
        format!("{json_text}\n").into_bytes(),
    ));
    repl.files.push((
        PathBuf::from("calibration_report.svg"),
        report::to_svg(&calib_report).into_bytes(),
    ));
    let written = writer::write_quantized_dir(&o.model, &o.out, &spec, &repl, |p| {
        progress(CalibProgress::Write(p))
    })?;
    let _ = fs::remove_dir_all(&ckpt);
    Ok(QuantizeOutcome {
        written,
        calibration: Some(calib_report),
        skipped: set.skipped,
    })
}

/// The layer-by-layer search of every layer not yet in the checkpoint, on
/// one backend.
struct Search<'a, P: FnMut(CalibProgress<'_>)> {
    text: &'a mut TextModel<Cpu>,
    masks: &'a [TokenMasks],
    o: &'a QuantizeOptions,
    q: QuantKind,
    state: &'a mut State,
    ratios: Option<&'a [(f64, f64)]>,
    ckpt: &'a Path,
    progress: &'a mut P,
}

impl<P: FnMut(CalibProgress<'_>)> Search<'_, P> {
    /// Searches layer after layer from the decoder inputs `xs` (host),
    /// checkpointing each; finished layers are restored instead.
    fn run<B: Backend>(&mut self, be: &B, xs: Vec<Tensor>) -> Result<()> {
        let layers = self.text.layers.len();
        let mut xs = xs
            .iter()
            .map(|x| be.upload(x))
            .collect::<Result<Vec<_>>>()?;
        for i in 0..layers {
            if i < self.state.layers_done {
                restore_layer(self.ckpt, self.text, i)?;
            } else {
                let t0 = Instant::now();
                let rep = search_layer(
                    be,
                    self.text,
                    i,
                    &xs,
                    self.masks,
                    self.o,
                    self.q,
                    self.state,
                    self.ratios,
                    self.progress,
                )?;
                self.state.layers.push(rep);
                self.state.layer_seconds.push(t0.elapsed().as_secs_f64());
                self.state.layers_done = i + 1;
                save_layer(self.ckpt, self.text, i)?;
                write_state(self.ckpt, self.state)?;
                if self.o.stop_after_layer == Some(i) {
                    return Err(Error::invalid(format!(
                        "stopped after layer {i} as asked (checkpoint in {})",
                        self.ckpt.display()
                    )));
                }
            }
            if i + 1 < layers {
                xs = layer_features(be, self.text, i, &xs)?.out;
            }
        }
        Ok(())
    }
}

/// The run's settings, as the report's top level and the checkpoint's key.
fn settings(
    o: &QuantizeOptions,
    n: usize,
    calib: &Path,
    backend: BackendKind,
) -> Map<String, Value> {
    let abs = |p: &Path| {
        p.canonicalize()
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let mut m = Map::new();
    m.insert("method".into(), json!(o.method.name()));
    m.insert("w_bit".into(), json!(o.w_bit));
    m.insert("a_bit".into(), json!(o.a_bit));
    m.insert(
        "group_size".into(),
        if o.a_bit.is_some() {
            json!("per-channel")
        } else {
            json!(o.group_size)
        },
    );
    m.insert(
        "loss".into(),
        json!(match o.loss {
            LossKind::Mae => "mae",
            LossKind::Mse => "mse",
        }),
    );
    m.insert("grid".into(), json!(GRID));
    m.insert("n_samples".into(), json!(n));
    m.insert("seed".into(), json!(o.seed));
    m.insert("model".into(), json!(abs(&o.model)));
    m.insert("calib".into(), json!(abs(calib)));
    m.insert(
        "image_folder".into(),
        json!(o.image_folder.as_deref().map(abs)),
    );
    m.insert(
        "backend".into(),
        json!(match backend {
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
            _ => "cpu",
        }),
    );
    m.insert("mbq_version".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}

fn diff_settings(a: &Map<String, Value>, b: &Map<String, Value>) -> String {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} there, {} now", b.get(k).unwrap_or(&Value::Null)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Mean |grad| per layer, averaged over samples: `[attn_vis, attn_cap,
/// mlp_vis, mlp_cap]`. Vision means average over the samples that have
/// vision tokens.
fn sensitivity(
    text: &TextModel<Cpu>,
    samples: &[super::data::CalibSample],
    xs: &[Tensor],
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<Vec<[f64; 4]>> {
    let layers = text.layers.len();
    let mut sum = vec![[0.0f64; 4]; layers];
    let (mut n_vis, mut n) = (0usize, 0usize);
    for (k, (s, x)) in samples.iter().zip(xs).enumerate() {
        let r = sample_sensitivity(text, x, &s.ids, &s.vision, &s.caption)
            .map_err(|e| Error::invalid(format!("sensitivity of sample {}: {e}", s.id)))?;
        for (acc, g) in sum.iter_mut().zip(&r.layers) {
            if r.has_vision {
                acc[0] += g.attn_vision;
                acc[2] += g.mlp_vision;
            }
            acc[1] += g.attn_caption;
            acc[3] += g.mlp_caption;
        }
        n_vis += r.has_vision as usize;
        n += 1;
        progress(CalibProgress::Sensitivity {
            done: k + 1,
            total: samples.len(),
        });
    }
    Ok(sum
        .iter()
        .map(|a| {
            let v = |x: f64| if n_vis == 0 { 0.0 } else { x / n_vis as f64 };
            [v(a[0]), a[1] / n as f64, v(a[2]), a[3] / n as f64]
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
fn ratios(g: &[[f64; 4]]) -> Result<Vec<(f64, f64)>> {
    let raw: Vec<(f64, f64)> = g
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if a[1] <= 0.0 || a[3] <= 0.0 {
                Err(Error::invalid(format!(
                    "layer {i}: the caption gradient is zero; the calibration set has no usable caption tokens"
                )))
            } else {
                Ok((a[0] / a[1], a[2] / a[3]))
            }
        })
        .collect::<Result<_>>()?;
    let ma = median(&raw.iter().map(|r| r.0).collect::<Vec<_>>());
    let mm = median(&raw.iter().map(|r| r.1).collect::<Vec<_>>());
    Ok(raw.iter().map(|r| (r.0.max(ma), r.1.max(mm))).collect())
}

/// Searches (or, for SmoothQuant, sets) the scales of layer `i`, folds them
/// in, and returns the layer's report.
#[allow(clippy::too_many_arguments)]
fn search_layer<B: Backend>(
    be: &B,
    text: &mut TextModel<Cpu>,
    i: usize,
    xs: &[B::Tensor],
    masks: &[TokenMasks],
    o: &QuantizeOptions,
    q: QuantKind,
    state: &State,
    ratios: Option<&[(f64, f64)]>,
    progress: &mut impl FnMut(CalibProgress<'_>),
) -> Result<LayerReport> {
    let layers = text.layers.len();
    let f = layer_features(be, text, i, xs)?;
    let groups: Vec<&'static str> = match o.method {
        Method::Smoothquant => vec!["attn_in", "mlp_in"],
        _ => {
            let mut g = vec!["attn_in"];
            if has_attn_out(text, i)? {
                g.push("attn_out");
            }
            g.extend(["mlp_in", "mlp_out"]);
            g
        }
    };
    let per_group = if o.method == Method::Smoothquant {
        1
    } else {
        GRID
    };
    let total = groups.len() * per_group;
    let mut done = 0;
    let mut tick = |done: usize| {
        progress(CalibProgress::Layer {
            layer: i,
            layers,
            done,
            total,
        })
    };
    tick(done);
    let mut results = Vec::new();
    for g in groups {
        let weighting = match (o.method, ratios) {
            (Method::Mbq, Some(r)) => Weighting::Modality {
                ratio: if g.starts_with("attn") {
                    r[i].0
                } else {
                    r[i].1
                },
            },
            _ => Weighting::Plain,
        };
        let r = if o.method == Method::Smoothquant {
            let r = search::smoothquant_group(be, text, i, g, &f, masks, o.loss)?;
            done += 1;
            tick(done);
            r
        } else {
            search::search_group(be, text, i, g, &f, masks, q, o.loss, weighting, || {
                done += 1;
                tick(done)
            })?
        };
        results.push(r);
    }
    for r in &results {
        apply_scales(text, i, r.name, &r.scales)?;
    }
    let (grad, ratio) = match (&state.grads, ratios) {
        (Some(g), Some(r)) => (
            Some(LayerGradReport {
                attn: ModalityGrad {
                    vision: g[i][0],
                    caption: g[i][1],
                },
                mlp: ModalityGrad {
                    vision: g[i][2],
                    caption: g[i][3],
                },
            }),
            Some(Ratio {
                attn: r[i].0,
                mlp: r[i].1,
            }),
        ),
        _ => (None, None),
    };
    Ok(LayerReport {
        index: i,
        grad,
        ratio,
        groups: results
            .into_iter()
            .map(|r| GroupReport {
                name: r.name.to_string(),
                alpha: r.alpha,
                loss: r.loss,
                losses: r.losses,
            })
            .collect(),
    })
}

/// The linears of a layer in [`DECODER_LINEARS`] order.
fn linears(l: &DecoderLayer<Cpu>) -> [&Linear<Cpu>; 7] {
    [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
}

fn linears_mut(l: &mut DecoderLayer<Cpu>) -> [&mut Linear<Cpu>; 7] {
    [
        &mut l.q,
        &mut l.k,
        &mut l.v,
        &mut l.o,
        &mut l.gate,
        &mut l.up,
        &mut l.down,
    ]
}

/// Every tensor of the decoder layers that a fold may change, by its name
/// in the model's files.
fn decoder_tensors(
    text: &TextModel<Cpu>,
    prefix: &str,
    mut f: impl FnMut(String, &Tensor),
) -> Result<()> {
    for (i, l) in text.layers.iter().enumerate() {
        let p = format!("{prefix}.layers.{i}");
        f(format!("{p}.input_layernorm.weight"), &l.input_layernorm);
        f(
            format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        );
        for (name, lin) in DECODER_LINEARS.iter().zip(linears(l)) {
            let CpuWeight::Dense(w) = &lin.w else {
                return Err(Error::invalid(format!(
                    "{p}.{name}: calibration needs an unquantized model"
                )));
            };
            f(format!("{p}.{name}.weight"), w);
            if let Some(b) = &lin.b {
                f(format!("{p}.{name}.bias"), b);
            }
        }
    }
    Ok(())
}

fn layer_file(ckpt: &Path, i: usize) -> PathBuf {
    ckpt.join(format!("layer-{i}.safetensors"))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn save_layer(ckpt: &Path, text: &TextModel<Cpu>, i: usize) -> Result<()> {
    fs::create_dir_all(ckpt).map_err(|e| Error::io(ckpt, e))?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    decoder_tensors(text, "model", |name, t| {
        if name.starts_with(&format!("model.layers.{i}.")) {
            owned.push((
                name,
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ))
        }
    })?;
    let tensors = owned
        .iter()
        .map(|(n, s, b)| OutTensor {
            name: n.clone(),
            dtype: safetensors::tensor::Dtype::F32,
            shape: s.clone(),
            bytes: b,
        })
        .collect();
    write_atomic(&layer_file(ckpt, i), |p| {
        safetensors_out::write(p, &BTreeMap::new(), tensors).map(|_| ())
    })
}

fn restore_layer(ckpt: &Path, text: &mut TextModel<Cpu>, i: usize) -> Result<()> {
    let path = layer_file(ckpt, i);
    let w = WeightFiles::open_file(&path)?;
    let get = |leaf: &str| w.get_any(&format!("model.layers.{i}.{leaf}"));
    let l = &mut text.layers[i];
    l.input_layernorm = get("input_layernorm.weight")?;
    l.post_attention_layernorm = get("post_attention_layernorm.weight")?;
    for (name, lin) in DECODER_LINEARS.iter().zip(linears_mut(l)) {
        lin.w = CpuWeight::Dense(get(&format!("{name}.weight"))?);
        if lin.b.is_some() {
            lin.b = Some(get(&format!("{name}.bias"))?);
        }
    }
    Ok(())
}

fn write_state(ckpt: &Path, st: &State) -> Result<()> {
    fs::create_dir_all(ckpt).map_err(|e| Error::io(ckpt, e))?;
    let text = serde_json::to_string(st).map_err(|e| Error::invalid(e.to_string()))?;
    let path = ckpt.join("state.json");
    write_atomic(&path, |p| fs::write(p, text).map_err(|e| Error::io(p, e)))
}

fn read_state(ckpt: &Path) -> Result<State> {
    let path = ckpt.join("state.json");
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("not a calibration checkpoint: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_as_numpy() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let r = ratios(&[
            [1.0, 10.0, 0.0, 1.0],
            [3.0, 10.0, 2.0, 1.0],
            [2.0, 10.0, 1.0, 1.0],
        ])
        .unwrap();
        // attn ratios 0.1, 0.3, 0.2 -> median 0.2; mlp 0, 2, 1 -> median 1.
        assert_eq!(r, vec![(0.2, 1.0), (3.0 / 10.0, 2.0), (0.2, 1.0)]);
    }
}
