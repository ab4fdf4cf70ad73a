//! One request end to end for the command-line tools: pick the backend,
//! load the model directory, preprocess the image, generate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{self, AnyBackend, Backend, BackendJob, BackendKind, BackendOptions};
use crate::chat_template::{system_message, user_message};
use crate::config::VlmConfig;
use crate::error::{Error, Result};
use crate::generate::{generate_chat, GenerateOptions, Generation};
use crate::image_processor::ImageProcessor;
use crate::model::Vlm;
use crate::preprocess::load_image;
use crate::processor::Processor;

pub struct Request {
    pub model: PathBuf,
    pub image: Option<PathBuf>,
    pub prompt: String,
    /// A system message before the user's.
    pub system: Option<String>,
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

/// `--adapter` as backend options.
fn backend_options(adapter: Option<&str>) -> BackendOptions {
    BackendOptions {
        adapter: adapter.map(String::from),
    }
}

/// Runs one request; generated text goes to `on_text` as it comes.
pub fn run(
    req: &Request,
    mut note: impl FnMut(&str),
    on_text: impl FnMut(&str),
) -> Result<Response> {
    let be = open_backend(req.backend, req.adapter.as_deref(), &mut note)?;
    be.run(RunJob { req, on_text })
}

/// Opens `kind` (`--backend`, with `--adapter`); says through `note`
/// which device an explicit GPU backend opened (`auto` says it already).
pub fn open_backend(
    kind: BackendKind,
    adapter: Option<&str>,
    mut note: impl FnMut(&str),
) -> Result<AnyBackend> {
    let be = backend::open(kind, &backend_options(adapter), &mut note)?;
    if kind == be.kind() && be.kind() != BackendKind::Cpu {
        note(&format!("{}: {}", be.kind().name(), be.device()));
    }
    Ok(be)
}

/// A model directory's network (on `be`) and processor.
pub fn load_model<B: Backend>(be: &B, dir: &Path) -> Result<(Vlm<B>, Processor)> {
    let cfg = VlmConfig::load(dir)?;
    let proc = Processor::load(dir, cfg.image_token_index)?;
    let weights = crate::weights::WeightFiles::open(dir)?;
    let model = Vlm::from_weights(be, cfg, &weights)?;
    Ok((model, proc))
}

/// [`run`] on the opened backend.
struct RunJob<'a, F> {
    req: &'a Request,
    on_text: F,
}

impl<F: FnMut(&str)> BackendJob for RunJob<'_, F> {
    type Output = Response;
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<Response> {
        run_on(be, device.to_string(), self.req, self.on_text)
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
            let img_cfg = ImageProcessor::load(&req.model)?;
            let img = load_image(path)?;
            Some(img_cfg.preprocess(&img)?)
        }
        None => None,
    };
    let weights = crate::weights::WeightFiles::open(&req.model)?;
    let model = Vlm::from_weights(be, cfg, &weights)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut messages: Vec<serde_json::Value> =
        req.system.iter().map(|s| system_message(s)).collect();
    messages.push(user_message(&req.prompt, pre.is_some()));
    let generation = generate_chat(
        be,
        &model,
        &proc,
        &serde_json::Value::Array(messages),
        pre.as_ref().as_slice(),
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

/// Models that ship with mbq, in the repository's `models/` directory:
/// (name, what stderr says about it).
pub const BUNDLED_MODELS: &[(&str, &str)] = &[
    (
        "tiny-shapes",
        "a small LLaVA (SigLIP + Qwen2) trained on the `mbq shapes` task, f16",
    ),
    (
        "tiny-shapes-w3",
        "tiny-shapes quantized with MBQ W3 g128 (calibrated on 128 samples of `mbq shapes --seed 2000`), 3.25 bits per decoder weight",
    ),
];

/// The model used when `--model` is not given: the MBQ W3 g128 version.
pub const DEFAULT_MODEL: &str = "tiny-shapes-w3";

/// Where bundled models are looked for, in order: `$MBQ_MODELS`, a
/// `models/` folder next to the executable or up to three folders above it
/// (`target/release/../../models` is the repository's), and the crate's own
/// `models/` at build time.
pub fn models_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("MBQ_MODELS") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).take(4).map(|a| a.join("models")));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let new = !seen.contains(d);
        seen.push(d.clone());
        new
    });
    dirs
}

/// Resolves `--model`: an existing directory is used as is; a bundled
/// model's name (or no `--model`: [`DEFAULT_MODEL`]) is looked up in
/// [`models_dirs`]. Says on stderr (through `note`) which bundled model it
/// uses. Anything else is returned as a path (loading it reports what is
/// missing).
pub fn resolve_model(model: Option<&str>, mut note: impl FnMut(&str)) -> Result<PathBuf> {
    let name = match model {
        Some(m) if Path::new(m).is_dir() => return Ok(PathBuf::from(m)),
        Some(m) => m,
        None => DEFAULT_MODEL,
    };
    let dirs = models_dirs();
    let looked_in = || {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((name, what)) = BUNDLED_MODELS.iter().find(|(n, _)| *n == name) else {
        let path = Path::new(name);
        if let Some(e) = Error::wrong_kind(path, true, "a model directory (with config.json)") {
            return Err(e);
        }
        // A path (it has a separator): loading it says what is missing.
        if path.components().count() > 1 || name.starts_with('.') {
            return Ok(PathBuf::from(name));
        }
        return Err(Error::Missing {
            path: PathBuf::from(name),
            what: format!(
                "no model directory of that name here, and no bundled model of that name; bundled models: {} (looked for them in {})",
                BUNDLED_MODELS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                looked_in()
            ),
        });
    };
    match dirs.iter().map(|d| d.join(name)).find(|d| is_model_dir(d)) {
        Some(dir) => {
            let how = if model.is_none() {
                "no --model given: using"
            } else {
                "using"
            };
            note(&format!(
                "{how} the bundled model {name} ({}): {what}",
                dir.display()
            ));
            Ok(dir)
        }
        None => Err(Error::Missing {
            path: PathBuf::from(name),
            what: format!(
                "bundled model {name} (a directory with config.json); looked in {} \
                 (set MBQ_MODELS to the folder that holds it, or give --model DIR)",
                looked_in()
            ),
        }),
    }
}

/// Called first thing by the binaries, while they are single-threaded:
/// Mesa's Vulkan drivers (probed by wgpu) print "XDG_RUNTIME_DIR is invalid
/// or not set" on headless machines where it is unset; give it the
/// temporary directory so a user sees only mbq's own messages.
pub fn quiet_headless_vulkan() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}
