//! One request end to end for the command-line tools: pick the backend,
//! load the model directory, preprocess the image, generate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, BackendKind};
use crate::config::VlmConfig;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions, Generation};
use crate::model::llava::Vlm;
use crate::preprocess::{load_image, preprocess, ImageProcessorConfig};
use crate::processor::Processor;

pub struct Request {
    pub model: PathBuf,
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub options: GenerateOptions,
    pub backend: BackendKind,
}

pub struct Response {
    pub generation: Generation,
    pub backend: &'static str,
    pub load_ms: f64,
}

/// Resolves `--backend`: `auto` falls back to the CPU (with a note through
/// `note`), an explicit backend that is not available is an error.
pub fn resolve_backend(kind: BackendKind, mut note: impl FnMut(&str)) -> Result<BackendKind> {
    let why_not = |k: BackendKind| -> Error {
        match k {
            BackendKind::Wgpu => Error::Backend {
                backend: "wgpu".into(),
                msg: "not available in this build (the wgpu backend is not implemented yet); use --backend cpu".into(),
            },
            BackendKind::Cuda => cuda_unavailable(),
            _ => Error::invalid("no such backend"),
        }
    };
    match kind {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Wgpu | BackendKind::Cuda => Err(why_not(kind)),
        BackendKind::Auto => {
            let reasons: Vec<String> = [BackendKind::Cuda, BackendKind::Wgpu]
                .into_iter()
                .map(|k| why_not(k).to_string())
                .collect();
            note(&format!(
                "--backend auto: using the CPU ({})",
                reasons.join("; ")
            ));
            Ok(BackendKind::Cpu)
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_unavailable() -> Error {
    match crate::backend::cuda::open() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_unavailable() -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: "not compiled in; rebuild with `--features cuda`".into(),
    }
}

/// Runs one request; generated text goes to `on_text` as it comes.
pub fn run(req: &Request, note: impl FnMut(&str), on_text: impl FnMut(&str)) -> Result<Response> {
    // Only the CPU backend exists so far; resolve_backend errors for others.
    resolve_backend(req.backend, note)?;
    run_on(&Cpu, req, on_text)
}

fn run_on<B: Backend>(be: &B, req: &Request, on_text: impl FnMut(&str)) -> Result<Response> {
    let t0 = Instant::now();
    let cfg = VlmConfig::load(&req.model)?;
    let proc = Processor::load(&req.model, cfg.image_token_index)?;
    let pre = match &req.image {
        Some(path) => {
            let img_cfg = ImageProcessorConfig::load(&req.model)?;
            let img = load_image(path)?;
            Some(preprocess(&img_cfg, &img)?)
        }
        None => None,
    };
    let weights = crate::weights::WeightFiles::open(&req.model)?;
    let model = Vlm::from_weights(be, cfg, &weights)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let generation = generate(
        be,
        &model,
        &proc,
        &req.prompt,
        pre.as_ref(),
        &req.options,
        on_text,
    )?;
    Ok(Response {
        generation,
        backend: be.name(),
        load_ms,
    })
}

/// True if `dir` looks like a model directory (has config.json).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}
