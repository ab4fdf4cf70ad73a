//! One request end to end for the command-line tools: pick the backend,
//! load the model directory, preprocess the image, generate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::cpu::Cpu;
use crate::backend::wgpu::{self, Wgpu, WgpuOptions};
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
    /// `--adapter NAME`: the wgpu adapter whose name contains this.
    pub adapter: Option<String>,
}

pub struct Response {
    pub generation: Generation,
    pub backend: &'static str,
    /// The device it ran on (the CPU, or the wgpu adapter).
    pub device: String,
    pub load_ms: f64,
}

/// Options of the wgpu backend for `--adapter` (and the MBQ_WGPU_*
/// environment variables). An explicit `--backend wgpu` accepts a CPU
/// adapter such as lavapipe when no GPU is there; `auto` never does.
pub fn wgpu_options(adapter: Option<&str>, allow_cpu: bool) -> WgpuOptions {
    let mut o = WgpuOptions::from_env();
    if let Some(a) = adapter {
        o.adapter = Some(a.to_string());
    }
    o.allow_cpu = allow_cpu;
    o
}

/// Resolves `--backend`: `auto` picks CUDA when built and available, else
/// a wgpu adapter that is a real GPU (discrete, integrated or virtual),
/// else the CPU, and says what it chose and why through `note`. An
/// explicit backend that is not available is an error.
pub fn resolve_backend(
    kind: BackendKind,
    adapter: Option<&str>,
    mut note: impl FnMut(&str),
) -> Result<BackendKind> {
    match kind {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Cuda => Err(cuda_unavailable()),
        BackendKind::Wgpu => {
            wgpu::probe(&wgpu_options(adapter, true))?;
            Ok(BackendKind::Wgpu)
        }
        BackendKind::Auto => {
            let cuda = cuda_unavailable();
            // A named adapter is asked for, whatever its type.
            match wgpu::probe(&wgpu_options(adapter, adapter.is_some())) {
                Ok(a) => {
                    note(&format!(
                        "--backend auto: using wgpu on {} ({}, {}) ({cuda})",
                        a.name, a.backend, a.device_type
                    ));
                    Ok(BackendKind::Wgpu)
                }
                Err(w) => {
                    note(&format!("--backend auto: using the CPU ({cuda}; {w})"));
                    Ok(BackendKind::Cpu)
                }
            }
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
pub fn run(
    req: &Request,
    mut note: impl FnMut(&str),
    on_text: impl FnMut(&str),
) -> Result<Response> {
    match resolve_backend(req.backend, req.adapter.as_deref(), &mut note)? {
        BackendKind::Wgpu => {
            let allow_cpu = req.backend == BackendKind::Wgpu || req.adapter.is_some();
            let be = Wgpu::new(&wgpu_options(req.adapter.as_deref(), allow_cpu))?;
            if req.backend == BackendKind::Wgpu {
                note(&format!("wgpu: {}", be.adapter()));
            }
            run_on(&be, be.adapter(), req, on_text)
        }
        _ => run_on(&Cpu, "cpu".to_string(), req, on_text),
    }
}

fn run_on<B: Backend>(
    be: &B,
    device: String,
    req: &Request,
    on_text: impl FnMut(&str),
) -> Result<Response> {
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
        device,
        load_ms,
    })
}

/// True if `dir` looks like a model directory (has config.json).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}
