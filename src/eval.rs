//! `mbq eval`: accuracy of a model on a LLaVA-format question file (as
//! `mbq shapes` writes), through the same generation path as `mbq-run`.
//!
//! Each question is answered greedily (the human turn without its
//! `<image>\n` prefix is the prompt, the image goes through the chat
//! template's image slot) and scored by exact match after trimming and
//! lowercasing. Caption questions are also scored teacher-forced: the
//! perplexity of the reference caption's tokens given the prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::{self, Backend, BackendJob, BackendKind, BackendOptions};
use crate::config::VlmConfig;
use crate::error::{Error, Result};
use crate::generate::{build_prompt, generate, nll, target_logits, GenerateOptions};
use crate::image_processor::ImageProcessor;
use crate::model::Vlm;
use crate::preprocess::{load_image, Preprocessed};
use crate::processor::Processor;

/// The question type whose answers also get a perplexity.
pub const CAPTION_TYPE: &str = "caption";

/// One question of the data file.
#[derive(Clone, Debug)]
pub struct Question {
    pub id: String,
    /// Relative to the image folder.
    pub image: String,
    /// The human turn without the `<image>` placeholder.
    pub prompt: String,
    pub answer: String,
    pub kind: String,
}

/// Reads a JSONL file of LLaVA conversations: `image`, `conversations`
/// (first human turn = the question, first gpt turn = the answer), and the
/// optional `id`, `answer` (overrides the gpt turn) and `type`.
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| Error::config(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let image = v
            .get("image")
            .and_then(|x| x.as_str())
            .ok_or_else(|| bad("no \"image\" string"))?
            .to_string();
        let turns = v
            .get("conversations")
            .and_then(|x| x.as_array())
            .ok_or_else(|| bad("no \"conversations\" array"))?;
        let turn = |from: &str| {
            turns
                .iter()
                .find(|t| t.get("from").and_then(|f| f.as_str()) == Some(from))
                .and_then(|t| t.get("value"))
                .and_then(|x| x.as_str())
        };
        let human = turn("human").ok_or_else(|| bad("no human turn"))?;
        let prompt = human
            .trim_start()
            .strip_prefix("<image>")
            .map(|s| s.strip_prefix('\n').unwrap_or(s))
            .unwrap_or(human)
            .replace("<image>", "")
            .trim()
            .to_string();
        let answer = match v.get("answer").and_then(|x| x.as_str()) {
            Some(a) => a.to_string(),
            None => turn("gpt")
                .ok_or_else(|| bad("no \"answer\" and no gpt turn"))?
                .to_string(),
        };
        out.push(Question {
            id: v
                .get("id")
                .and_then(|x| x.as_str())
                .map(String::from)
                .unwrap_or_else(|| format!("line{}", i + 1)),
            image,
            prompt,
            answer,
            kind: v
                .get("type")
                .and_then(|x| x.as_str())
                .unwrap_or("other")
                .to_string(),
        });
    }
    Ok(out)
}

/// Exact match after trimming and lowercasing.
pub fn matches(generated: &str, answer: &str) -> bool {
    generated.trim().to_lowercase() == answer.trim().to_lowercase()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeScore {
    pub correct: usize,
    pub count: usize,
    pub accuracy: f64,
}

/// One answered question.
#[derive(Clone, Debug, Serialize)]
pub struct Answered {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub answer: String,
    pub generated: String,
    pub correct: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Exact-match accuracy over every question, 0..1.
    pub accuracy: f64,
    /// Over every question that is not a caption.
    pub short_answer_accuracy: f64,
    pub correct: usize,
    pub count: usize,
    pub per_type: BTreeMap<String, TypeScore>,
    /// exp(mean NLL) of the reference caption tokens; None without captions.
    pub caption_perplexity: Option<f64>,
    pub caption_tokens: usize,
    pub backend: String,
    pub device: String,
    pub model: String,
    pub seconds: f64,
    #[serde(skip)]
    pub answers: Vec<Answered>,
}

pub struct EvalRequest {
    pub model: PathBuf,
    pub data: PathBuf,
    pub image_folder: PathBuf,
    pub backend: BackendKind,
    pub adapter: Option<String>,
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
}

/// Loads the questions and the model once, answers every question.
/// `progress(done, total)` is called after each question.
pub fn run(
    req: &EvalRequest,
    note: impl FnMut(&str),
    progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let mut qs = load_questions(&req.data)?;
    if let Some(n) = req.limit {
        qs.truncate(n);
    }
    if qs.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no questions",
            req.data.display()
        )));
    }
    let opts = BackendOptions {
        adapter: req.adapter.clone(),
    };
    let job = EvalJob {
        req,
        qs: &qs,
        progress,
    };
    backend::with_backend(req.backend, &opts, note, job)
}

/// [`evaluate`] on the opened backend.
struct EvalJob<'a, P> {
    req: &'a EvalRequest,
    qs: &'a [Question],
    progress: P,
}

impl<P: FnMut(usize, usize)> BackendJob for EvalJob<'_, P> {
    type Output = EvalReport;
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<EvalReport> {
        evaluate(be, device.to_string(), self.req, self.qs, self.progress)
    }
}

fn evaluate<B: Backend>(
    be: &B,
    device: String,
    req: &EvalRequest,
    qs: &[Question],
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let cfg = VlmConfig::load(&req.model)?;
    let proc = Processor::load(&req.model, cfg.image_token_index)?;
    let img_cfg = ImageProcessor::load(&req.model)?;
    let weights = crate::weights::WeightFiles::open(&req.model)?;
    let model = Vlm::from_weights(be, cfg, &weights)?;
    let opts = GenerateOptions {
        max_new_tokens: req.max_new_tokens,
        ..GenerateOptions::default()
    };

    let mut per_type: BTreeMap<String, TypeScore> = BTreeMap::new();
    let mut answers = Vec::with_capacity(qs.len());
    let (mut cap_nll, mut cap_tokens) = (0.0f64, 0usize);
    // Questions of one image are usually consecutive: keep its pixels.
    let mut cached: Option<(String, Preprocessed)> = None;
    for (i, q) in qs.iter().enumerate() {
        if cached.as_ref().map(|c| c.0 != q.image).unwrap_or(true) {
            let path = req.image_folder.join(&q.image);
            let img = load_image(&path)?;
            cached = Some((q.image.clone(), img_cfg.preprocess(&img)?));
        }
        let pre = cached.as_ref().map(|c| &c.1);
        let g = generate(be, &model, &proc, &q.prompt, pre, &opts, |_| {})?;
        let ok = matches(&g.text, &q.answer);
        let s = per_type.entry(q.kind.clone()).or_default();
        s.count += 1;
        s.correct += ok as usize;
        if q.kind == CAPTION_TYPE {
            let prompt = build_prompt(&model, &proc, &q.prompt, pre)?;
            let target = proc.encode(&q.answer, 0)?;
            let feats = match pre {
                Some(p) => Some(model.encode_image(be, p)?.features),
                None => None,
            };
            let logits = target_logits(be, &model, &prompt, feats.as_ref(), &target)?;
            for (row, &t) in logits.iter().zip(&target) {
                cap_nll += nll(row, t);
                cap_tokens += 1;
            }
        }
        answers.push(Answered {
            id: q.id.clone(),
            kind: q.kind.clone(),
            answer: q.answer.clone(),
            generated: g.text,
            correct: ok,
        });
        progress(i + 1, qs.len());
    }
    for s in per_type.values_mut() {
        s.accuracy = s.correct as f64 / s.count.max(1) as f64;
    }
    let correct = answers.iter().filter(|a| a.correct).count();
    let short: Vec<&Answered> = answers.iter().filter(|a| a.kind != CAPTION_TYPE).collect();
    let short_ok = short.iter().filter(|a| a.correct).count();
    Ok(EvalReport {
        accuracy: correct as f64 / answers.len().max(1) as f64,
        short_answer_accuracy: if short.is_empty() {
            0.0
        } else {
            short_ok as f64 / short.len() as f64
        },
        correct,
        count: answers.len(),
        per_type,
        caption_perplexity: (cap_tokens > 0).then(|| (cap_nll / cap_tokens as f64).exp()),
        caption_tokens: cap_tokens,
        backend: be.name().to_string(),
        device,
        model: req.model.display().to_string(),
        seconds: t0.elapsed().as_secs_f64(),
        answers,
    })
}
