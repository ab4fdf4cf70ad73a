//! `mbq verify`: does this machine's build compute what the CPU reference
//! computes? On each backend it runs the same prompt through a model
//! ([`model_check`]: greedy ids, per-step top-1 agreement teacher-forced on
//! the CPU's ids, the largest relative logit difference) and, with `--ops`,
//! every kernel family against the CPU ([`ops::suite`], the same checks and
//! tolerances the test suite asserts). Verdicts use the named tolerances
//! below ([`LOGITS_REL_TOL`], [`TIE_REL_TOL`]) and [`ops::Tolerances`].

pub mod ops;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::wgpu::Wgpu;
use crate::backend::{self, AnyBackend, Backend, BackendJob, BackendKind, BackendOptions};
use crate::error::{Error, Result};
use crate::generate::{argmax, build_prompt, prefill};
use crate::image_processor::ImageProcessor;
use crate::model::Vlm;
use crate::preprocess::load_image;
use crate::processor::Processor;
use ops::{Checks, OpCheck};

/// Tokens generated (greedy, EOS ignored) and compared per backend.
pub const TOKENS: usize = 12;

/// Largest relative logit difference a backend may have from the CPU at
/// any step: max |a - b| / max |b| over the vocabulary. Every backend
/// computes in f32 on the same weight values; only summation orders and
/// the kernels' exp / erf differ, which the op tolerances (1e-5 per op)
/// bound; through a whole model that stays below 1e-4 (the fixtures
/// measure 1e-6..2e-5 on lavapipe).
pub const LOGITS_REL_TOL: f64 = 1e-4;

/// A step's top-1 may differ from the CPU's only on a near tie: when the
/// CPU's logits of the two tokens are within this much of each other,
/// relative to the step's max |logit| (the same size as the logit
/// tolerance: a difference that small cannot be told from rounding).
/// Greedy ids may then diverge from that step on; any other flip fails.
pub const TIE_REL_TOL: f64 = LOGITS_REL_TOL;

/// Bytes per binding of the second wgpu instance `--ops` opens, so that
/// every test weight is split into several bindings (the split path).
pub const SPLIT_BINDING: u64 = 1024;

/// The default image and prompt: a picture of the shapes task that the
/// bundled model answers.
pub const DEFAULT_IMAGE: &str = "s1000_000000.png";
pub const DEFAULT_PROMPT: &str = "What color is the circle?";

/// What to verify.
#[derive(Clone, Debug)]
pub struct VerifyRequest {
    /// The model directory (already resolved).
    pub model: PathBuf,
    pub image: PathBuf,
    pub prompt: String,
    /// The backends named by `--backends`, or `None` for every backend
    /// built in and available here.
    pub backends: Option<Vec<BackendKind>>,
    /// Also run every kernel family against the CPU.
    pub ops: bool,
    pub options: BackendOptions,
}

/// Parses `--backends` (`cpu,wgpu,cuda`, in any order, no repeats).
pub fn parse_backends(s: &str) -> Result<Vec<BackendKind>> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = match name {
            "cpu" => BackendKind::Cpu,
            "wgpu" => BackendKind::Wgpu,
            "cuda" => BackendKind::Cuda,
            _ => {
                return Err(Error::invalid(format!(
                    "--backends: unknown backend `{name}` (expected a comma-separated list of cpu, wgpu, cuda)"
                )))
            }
        };
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "--backends: no backend named (expected e.g. cpu,wgpu)",
        ));
    }
    Ok(out)
}

/// The default image, [`DEFAULT_IMAGE`], in an `examples/` folder: next
/// to the executable or up to three folders above it, in the working
/// directory, or the crate's own at build time.
pub fn default_image() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).take(4).map(|a| a.join("examples")));
    }
    dirs.push(PathBuf::from("examples"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"));
    dirs.iter()
        .map(|d| d.join(DEFAULT_IMAGE))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Missing {
            path: PathBuf::from(DEFAULT_IMAGE),
            what: format!(
                "the default image examples/{DEFAULT_IMAGE}; looked in {} (give --image)",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// One backend's model run against the CPU's.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCheck {
    /// Greedy ids of the free run (EOS ignored).
    pub ids: Vec<u32>,
    /// Whether they equal the CPU's.
    pub ids_equal: bool,
    /// Steps whose top-1 equals the CPU's, teacher-forced on the CPU's ids.
    pub top1_agree: usize,
    pub steps: usize,
    /// Of the disagreeing steps, those on a near tie ([`TIE_REL_TOL`]).
    pub near_ties: usize,
    /// max |a - b| / max |b| per step, teacher-forced.
    pub rel_logit_diff: Vec<f64>,
    pub max_rel_logit_diff: f64,
    pub ok: bool,
    /// Why it failed, empty when OK.
    pub why: String,
}

/// One backend's results.
#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub backend: &'static str,
    pub device: String,
    /// The model check (`None` on the CPU, the reference, or on an error).
    pub model: Option<ModelCheck>,
    /// `--ops`: one line per kernel and shape (empty on the CPU).
    pub ops: Vec<OpCheck>,
    pub ops_failed: usize,
    /// A backend error (opening, loading, running).
    pub error: Option<String>,
    pub ok: bool,
}

/// Everything `mbq verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub image: String,
    pub prompt: String,
    pub tokens: usize,
    /// The CPU's greedy ids (the reference).
    pub reference_ids: Vec<u32>,
    pub logits_rel_tol: f64,
    pub tie_rel_tol: f64,
    pub backends: Vec<BackendReport>,
    /// Backends not available here (default list only), with why.
    pub skipped: Vec<(String, String)>,
    pub ok: bool,
}

/// A model run on one backend: greedy ids of a free run and, when given
/// the CPU's ids, the logits of each step teacher-forced on them.
struct Trace {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

struct ModelJob<'a> {
    req: &'a VerifyRequest,
    /// The CPU's ids to teacher-force on (None: the CPU itself, whose free
    /// run is its teacher-forced run).
    force: Option<&'a [u32]>,
}

impl BackendJob for ModelJob<'_> {
    type Output = Trace;
    fn run<B: Backend>(self, be: &B, _device: &str) -> Result<Trace> {
        let dir = &self.req.model;
        let model = Vlm::load(be, dir)?;
        let proc = Processor::load(dir, model.cfg.image_token_index)?;
        let img_cfg = ImageProcessor::load(dir)?;
        let pre = img_cfg.preprocess(&load_image(&self.req.image)?)?;
        let prompt = build_prompt(&model, &proc, &self.req.prompt, Some(&pre))?;
        let emb = model.encode_image(be, &pre)?;
        let ctx = model.cfg.text.max_position_embeddings;
        if prompt.ids.len() + TOKENS > ctx {
            return Err(Error::invalid(format!(
                "the prompt ({} tokens) and {TOKENS} generated tokens exceed the model's context {ctx}",
                prompt.ids.len()
            )));
        }
        // One decode run: `feed` picks the token fed back at each step.
        let decode = |feed: &dyn Fn(usize, u32) -> u32| -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
            let mut cache = be.new_cache(
                model.text.layers.len(),
                model.text.kv_dim(),
                prompt.ids.len() + TOKENS,
            )?;
            let mut logits = prefill(be, &model, &prompt, Some(&emb.features), &mut cache)?;
            let mut ids = Vec::with_capacity(TOKENS);
            let mut all = Vec::with_capacity(TOKENS);
            let mut pos = prompt.ids.len();
            loop {
                let id = argmax(&logits);
                ids.push(id);
                all.push(logits);
                if ids.len() == TOKENS {
                    break;
                }
                let x = model.text.embed(be, &[feed(ids.len() - 1, id)])?;
                let lg = model
                    .text
                    .forward_at(be, x, &mut cache, pos, prompt.rope_pos())?;
                logits = be.download(&lg)?.data;
                pos += 1;
            }
            Ok((ids, all))
        };
        let (ids, free_logits) = decode(&|_, id| id)?;
        let logits = match self.force {
            None => free_logits,
            Some(cpu) => decode(&|step, _| cpu[step])?.1,
        };
        Ok(Trace { ids, logits })
    }
}

/// Compares a backend's trace with the CPU's.
fn model_check(cpu: &Trace, dev: &Trace) -> ModelCheck {
    let steps = cpu.logits.len().min(dev.logits.len());
    let mut rel = Vec::with_capacity(steps);
    let (mut agree, mut ties, mut flips) = (0, 0, Vec::new());
    for s in 0..steps {
        let (c, d) = (&cpu.logits[s], &dev.logits[s]);
        rel.push(ops::rel_err(d, c));
        let (ci, di) = (argmax(c) as usize, argmax(d) as usize);
        if ci == di {
            agree += 1;
            continue;
        }
        let scale = c.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12) as f64;
        let gap = (c[ci] - c.get(di).copied().unwrap_or(f32::NEG_INFINITY)) as f64 / scale;
        if gap <= TIE_REL_TOL {
            ties += 1;
        } else {
            flips.push(s);
        }
    }
    let max_rel = rel
        .iter()
        .copied()
        .fold(0.0f64, |m, e| if e.is_nan() { e } else { m.max(e) });
    let ids_equal = cpu.ids == dev.ids;
    let first_diff = cpu.ids.iter().zip(&dev.ids).position(|(a, b)| a != b);
    let mut why = Vec::new();
    if max_rel.is_nan() || max_rel > LOGITS_REL_TOL {
        why.push(format!(
            "max relative logit difference {max_rel:.2e} > {LOGITS_REL_TOL:.0e}"
        ));
    }
    if !flips.is_empty() {
        why.push(format!("top-1 differs (not a near tie) at steps {flips:?}"));
    }
    if !ids_equal && flips.is_empty() {
        // Teacher forcing agreed except on near ties: the free run may
        // diverge only at such a step.
        let tie_at = |s: usize| {
            let c = &cpu.logits[s];
            argmax(c) != argmax(&dev.logits[s])
        };
        match first_diff {
            Some(s) if s < steps && tie_at(s) => {}
            _ => why.push(format!(
                "greedy ids differ (first at step {}) where teacher forcing agreed",
                first_diff.unwrap_or(steps)
            )),
        }
    }
    if steps < TOKENS || dev.ids.len() != cpu.ids.len() {
        why.push(format!("{steps} steps of {TOKENS}"));
    }
    ModelCheck {
        ids: dev.ids.clone(),
        ids_equal,
        top1_agree: agree,
        steps,
        near_ties: ties,
        rel_logit_diff: rel,
        max_rel_logit_diff: max_rel,
        ok: why.is_empty(),
        why: why.join("; "),
    }
}

/// `--ops` on an opened backend: the op suite on its default
/// configuration and, on wgpu, on a second instance whose weights are
/// split across bindings of [`SPLIT_BINDING`] bytes.
fn run_ops(be: &AnyBackend, opts: &BackendOptions) -> Result<Checks> {
    Ok(match be {
        AnyBackend::Cpu(_) => Checks::default(),
        AnyBackend::Wgpu(g) => {
            let mut o = opts.wgpu(true);
            o.max_binding = Some(SPLIT_BINDING);
            let split = Wgpu::new(&o)?;
            ops::suite(&[("default", &**g)], Some(("split", &split)))
        }
        AnyBackend::Cuda(g) => ops::suite(&[("default", &**g)], None),
    })
}

/// Runs the checks `req` asks for. `note` gets progress and what was
/// skipped. An explicitly named backend that cannot be opened is an
/// error; a backend that fails while running is a failed
/// [`BackendReport`].
pub fn verify(req: &VerifyRequest, mut note: impl FnMut(&str)) -> Result<Report> {
    let mut skipped = Vec::new();
    let mut opened = Vec::new();
    match &req.backends {
        Some(list) => {
            for &kind in list {
                let be = backend::open(kind, &req.options, &mut note).map_err(|e| {
                    Error::invalid(format!("--backends {}: not available: {e}", kind.name()))
                })?;
                opened.push(be);
            }
        }
        None => {
            for kind in [BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda] {
                if !kind.compiled_in() {
                    skipped.push((kind.name().to_string(), "not compiled in".to_string()));
                    continue;
                }
                match backend::open(kind, &req.options, &mut note) {
                    Ok(be) => opened.push(be),
                    Err(e) => skipped.push((kind.name().to_string(), e.to_string())),
                }
            }
        }
    }
    for (k, why) in &skipped {
        note(&format!("verify: skipping {k}: {why}"));
    }
    // The CPU reference runs first, whether or not `cpu` was named.
    note("verify: cpu (reference) ...");
    let cpu = backend::cpu::Cpu;
    let reference = ModelJob { req, force: None }.run(&cpu, "cpu")?;
    let mut backends = Vec::new();
    for be in &opened {
        let kind = be.kind();
        let mut rep = BackendReport {
            backend: kind.name(),
            device: be.device(),
            model: None,
            ops: Vec::new(),
            ops_failed: 0,
            error: None,
            ok: true,
        };
        if kind != BackendKind::Cpu {
            note(&format!("verify: {} on {} ...", kind.name(), rep.device));
            match be.run(ModelJob {
                req,
                force: Some(&reference.ids),
            }) {
                Ok(t) => rep.model = Some(model_check(&reference, &t)),
                Err(e) => rep.error = Some(e.to_string()),
            }
            if req.ops {
                note(&format!("verify: {} ops ...", kind.name()));
                match run_ops(be, &req.options) {
                    Ok(c) => rep.ops = c.results,
                    Err(e) => {
                        let msg = format!("ops: {e}");
                        rep.error = Some(match rep.error.take() {
                            Some(m) => format!("{m}; {msg}"),
                            None => msg,
                        })
                    }
                }
            }
        }
        rep.ops_failed = rep.ops.iter().filter(|c| !c.ok).count();
        rep.ok =
            rep.error.is_none() && rep.ops_failed == 0 && rep.model.as_ref().is_none_or(|m| m.ok);
        backends.push(rep);
    }
    let ok = backends.iter().all(|b| b.ok);
    Ok(Report {
        model: req.model.display().to_string(),
        image: req.image.display().to_string(),
        prompt: req.prompt.clone(),
        tokens: TOKENS,
        reference_ids: reference.ids,
        logits_rel_tol: LOGITS_REL_TOL,
        tie_rel_tol: TIE_REL_TOL,
        backends,
        skipped,
        ok,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model {}", self.model)?;
        writeln!(f, "image {}, prompt {:?}", self.image, self.prompt)?;
        writeln!(
            f,
            "{} greedy tokens (EOS ignored); tolerances: logits {:.0e} (max |a-b| / max |b| per step), near tie {:.0e}",
            self.tokens, self.logits_rel_tol, self.tie_rel_tol
        )?;
        writeln!(f, "cpu (reference) ids {:?}", self.reference_ids)?;
        for (k, why) in &self.skipped {
            writeln!(f, "{k}: skipped ({why})")?;
        }
        for b in &self.backends {
            for c in &b.ops {
                writeln!(f, "{} ops: {c}", b.backend)?;
            }
            if !b.ops.is_empty() {
                writeln!(
                    f,
                    "{} ops: {} of {} kernels OK",
                    b.backend,
                    b.ops.len() - b.ops_failed,
                    b.ops.len()
                )?;
            }
            if let Some(m) = &b.model {
                writeln!(
                    f,
                    "{}: ids {} ({:?}); top-1 {}/{} steps{}; max rel logit diff {:.2e} (tol {:.0e})",
                    b.backend,
                    if m.ids_equal { "equal" } else { "DIFFER" },
                    m.ids,
                    m.top1_agree,
                    m.steps,
                    if m.near_ties > 0 {
                        format!(" ({} near ties)", m.near_ties)
                    } else {
                        String::new()
                    },
                    m.max_rel_logit_diff,
                    self.logits_rel_tol
                )?;
                if !m.ok {
                    writeln!(f, "{}: {}", b.backend, m.why)?;
                }
            }
            if let Some(e) = &b.error {
                writeln!(f, "{}: error: {e}", b.backend)?;
            }
            let what = if b.backend == "cpu" {
                "the reference".to_string()
            } else {
                b.device.clone()
            };
            writeln!(
                f,
                "verdict {}: {} ({what})",
                b.backend,
                if b.ok { "OK" } else { "FAIL" }
            )?;
        }
        write!(f, "verify: {}", if self.ok { "OK" } else { "FAIL" })
    }
}
