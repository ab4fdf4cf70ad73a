//! Opening a backend: the one place that turns `--backend` (and
//! `--adapter`) into a device, and the one way to run code that is generic
//! over [`Backend`] on it. Every command goes through [`open`] (or
//! [`with_backend`]); none names the CUDA feature: without it,
//! [`super::cuda`] is a stand-in whose constructors say "not compiled in".

use super::cpu::Cpu;
use super::cuda::{self, Cuda, CudaOptions};
use super::wgpu::{self, Wgpu, WgpuOptions};
use super::{BackendKind, Grad, Search};
use crate::error::{Error, Result};

/// How to open a backend, besides its kind.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// `--adapter NAME`: the wgpu adapter whose name contains this. Under
    /// `auto` it also means "wgpu, not CUDA", and it accepts a CPU adapter.
    pub adapter: Option<String>,
}

impl BackendOptions {
    /// Options of the wgpu backend (the MBQ_WGPU_* environment variables,
    /// then `--adapter`). `allow_cpu`: accept a CPU adapter such as
    /// lavapipe when no adapter is named.
    pub fn wgpu(&self, allow_cpu: bool) -> WgpuOptions {
        let mut o = WgpuOptions::from_env();
        if let Some(a) = &self.adapter {
            o.adapter = Some(a.clone());
        }
        o.allow_cpu = allow_cpu;
        o
    }

    /// Options of the CUDA backend (`MBQ_CUDA_DEVICE`, `MBQ_CUDA_NO_CUBLAS`).
    pub fn cuda(&self) -> CudaOptions {
        CudaOptions::from_env()
    }

    /// Whether wgpu, opened for `asked` (what the user asked for, before
    /// `auto` resolved), may take a CPU adapter: when wgpu was asked for
    /// by name, or an adapter was named; `auto` alone never does.
    fn wgpu_allows_cpu(&self, asked: BackendKind) -> bool {
        asked == BackendKind::Wgpu || self.adapter.is_some()
    }
}

impl BackendKind {
    /// Whether this build has the backend: CUDA only with the `cuda`
    /// feature; `auto` always (it falls back to the CPU).
    pub fn compiled_in(self) -> bool {
        self != BackendKind::Cuda || cfg!(feature = "cuda")
    }

    /// The backend's name as `--backend` spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// Resolves `--backend`: `auto` picks CUDA when built and available, else
/// a wgpu adapter that is a real GPU (discrete, integrated or virtual),
/// else the CPU, and says what it chose and why through `note`. An
/// explicit backend that is not available is an error. Never returns
/// [`BackendKind::Auto`].
pub fn resolve(
    kind: BackendKind,
    opts: &BackendOptions,
    mut note: impl FnMut(&str),
) -> Result<BackendKind> {
    match kind {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Cuda => {
            cuda::probe(&opts.cuda())?;
            Ok(BackendKind::Cuda)
        }
        BackendKind::Wgpu => {
            wgpu::probe(&opts.wgpu(true))?;
            Ok(BackendKind::Wgpu)
        }
        BackendKind::Auto => {
            let named = opts.adapter.is_some();
            // A named wgpu adapter is asked for explicitly: CUDA steps aside.
            let cuda = match cuda::probe(&opts.cuda()) {
                Ok(device) if !named => {
                    note(&format!("--backend auto: using cuda on {device}"));
                    return Ok(BackendKind::Cuda);
                }
                Ok(device) => Error::Backend {
                    backend: "cuda".into(),
                    msg: format!("{device} not used: --adapter names a wgpu adapter"),
                },
                Err(e) => e,
            };
            // A named adapter is asked for, whatever its type.
            match wgpu::probe(&opts.wgpu(named)) {
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

/// An open backend of any kind: what [`open`] returns. Code generic over
/// [`Backend`] runs on it through [`AnyBackend::run`].
pub enum AnyBackend {
    Cpu(Cpu),
    Wgpu(Box<Wgpu>),
    Cuda(Box<Cuda>),
}

impl AnyBackend {
    /// `cpu`, `wgpu` or `cuda`.
    pub fn kind(&self) -> BackendKind {
        match self {
            AnyBackend::Cpu(_) => BackendKind::Cpu,
            AnyBackend::Wgpu(_) => BackendKind::Wgpu,
            AnyBackend::Cuda(_) => BackendKind::Cuda,
        }
    }

    /// The device it runs on: `cpu`, the wgpu adapter
    /// (`name (api, type)`), or the CUDA device (`name (sm_XY)`).
    pub fn device(&self) -> String {
        match self {
            AnyBackend::Cpu(_) => "cpu".to_string(),
            AnyBackend::Wgpu(be) => be.adapter(),
            AnyBackend::Cuda(be) => be.device(),
        }
    }

    /// Runs `job` on this backend.
    pub fn run<J: BackendJob>(&self, job: J) -> Result<J::Output> {
        let device = self.device();
        match self {
            AnyBackend::Cpu(be) => job.run(be, &device),
            AnyBackend::Wgpu(be) => job.run(&**be, &device),
            AnyBackend::Cuda(be) => job.run(&**be, &device),
        }
    }
}

/// Code generic over the backend (Rust has no generic closures): what
/// [`AnyBackend::run`] and [`with_backend`] run. Every backend has the
/// backward ops too ([`Grad`]: the sensitivity pass); a job that needs only
/// the forward may declare `run<B: Backend>`.
pub trait BackendJob {
    type Output;
    /// Runs on `be`; `device` is [`AnyBackend::device`].
    fn run<B: Grad + Search>(self, be: &B, device: &str) -> Result<Self::Output>;
}

/// Resolves `kind` ([`resolve`], notes through `note`) and opens it.
pub fn open(
    kind: BackendKind,
    opts: &BackendOptions,
    note: impl FnMut(&str),
) -> Result<AnyBackend> {
    Ok(match resolve(kind, opts, note)? {
        BackendKind::Wgpu => {
            AnyBackend::Wgpu(Box::new(Wgpu::new(&opts.wgpu(opts.wgpu_allows_cpu(kind)))?))
        }
        BackendKind::Cuda => AnyBackend::Cuda(Box::new(Cuda::with_options(&opts.cuda())?)),
        BackendKind::Cpu | BackendKind::Auto => AnyBackend::Cpu(Cpu),
    })
}

/// [`open`], then [`AnyBackend::run`]: runs `job` on the backend `kind`
/// resolves to.
pub fn with_backend<J: BackendJob>(
    kind: BackendKind,
    opts: &BackendOptions,
    note: impl FnMut(&str),
    job: J,
) -> Result<J::Output> {
    open(kind, opts, note)?.run(job)
}
