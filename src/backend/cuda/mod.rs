//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so the
//! crate builds without a CUDA toolkit; at run time it needs the driver
//! (`libcuda.so`), NVRTC (`libnvrtc.so.12`) and, optionally, cuBLAS.
//!
//! - Kernels: `kernels/*.cu` ([`super::cuda_kernels::SOURCES`]), compiled
//!   with NVRTC for the device's compute capability (`sm_XY`: a CUBIN, PTX
//!   as the fallback) the first time one of a file's kernels runs; the
//!   modules and functions are cached in memory for the life of the backend.
//! - Tensors: f32 device buffers `[rows, cols]` ([`CudaTensor`]), one
//!   stream (the context's default stream), so ops are ordered without
//!   events; `download` waits for the stream.
//! - Weights ([`CudaWeight`]): dense ones in f16 when every value is
//!   exactly an f16 (f16 checkpoints), else in f32 (so the product equals
//!   the CPU reference's up to summation order, as in the wgpu backend);
//!   packed ones keep the bytes of `quant::format` (codes as u32 words,
//!   (scale, zero) f16 pairs as one u32 per group).
//! - Products (`linear.rs`): up to [`GEMV_MAX_ROWS`] rows, one GEMV launch
//!   for all rows (`gemv_f16.cu`, or the fused dequantize-GEMV
//!   `gemv_packed.cu`, each weight word read once for every row); more
//!   rows (prefill): the weight expanded to f32 in a scratch buffer
//!   (`convert.cu`), then an f32 SGEMM: cuBLAS in its default math mode
//!   (full f32, no TF32) when libcublas loads, else `gemm.cu`. Dense f32
//!   weights always take the SGEMM. Every path computes in f32 from the
//!   exact weight values, so it matches the CPU to f32 rounding.
//! - The scale search's ops (`search.rs`, [`crate::backend::Search`]):
//!   `fake_quant`, `loss_terms`, `abs_col_stats` and `abs_terms` in
//!   `search.cu`, bit-exact fake-quantized weights, masked error sums and
//!   activation statistics without a host round trip.
//! - KV cache ([`CudaCache`]): per layer, K and V buffers of
//!   `capacity x kv_dim` f32 (the CPU cache's layout), written in place by
//!   device copies; attention reads positions `0..pos0 + n` of them.

mod backward;
mod linear;
mod ops;
mod search;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

use super::cuda_kernels::{self, KernelSource, SOURCES};
use crate::error::{Error, Result};

/// Up to this many rows, a linear runs as one multi-token GEMV launch
/// (reading the weight once for all rows); above, the prefill path
/// (expand + SGEMM). At most the kernels' MAXM (8).
pub const GEMV_MAX_ROWS: usize = 8;

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: msg.into(),
    }
}

/// `result.ctx("what")`: a driver / cuBLAS error as a backend error naming
/// what failed.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| err(format!("{what}: {e:?}")))
    }
}

/// The names of the CUDA devices, or why there are none.
pub fn devices() -> Result<Vec<String>> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(err("the CUDA driver library (libcuda.so) was not found"));
    }
    let n = CudaContext::device_count().map_err(|e| err(format!("cuDeviceGetCount: {e:?}")))?;
    if n <= 0 {
        return Err(err("the CUDA driver reports no device"));
    }
    (0..n as usize)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| err(format!("device {i}: {e:?}")))?;
            ctx.name().map_err(|e| err(format!("device {i}: {e:?}")))
        })
        .collect()
}

/// The device `o` selects (`name (sm_XY)`), or why it cannot run: no
/// driver, no such device, or no NVRTC. Cheap: compiles nothing.
pub fn probe(o: &CudaOptions) -> Result<String> {
    let names = devices()?;
    let Some(name) = names.get(o.device) else {
        return Err(err(format!(
            "no CUDA device {} (found {}: {})",
            o.device,
            names.len(),
            names.join(", ")
        )));
    };
    cuda_kernels::nvrtc_available()?;
    Ok(name.clone())
}

/// How to open the backend.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal (`MBQ_CUDA_DEVICE`, default 0).
    pub device: usize,
    /// Use cuBLAS for the prefill SGEMM when it loads (`MBQ_CUDA_NO_CUBLAS=1`
    /// turns it off: `gemm.cu` instead).
    pub cublas: bool,
}

impl CudaOptions {
    pub fn from_env() -> Self {
        CudaOptions {
            device: std::env::var("MBQ_CUDA_DEVICE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            cublas: !std::env::var("MBQ_CUDA_NO_CUBLAS").is_ok_and(|v| v == "1"),
        }
    }
}

/// An activation matrix `[rows, cols]` on the device (f32, row-major). The
/// buffer may be longer than `rows * cols` (never shorter).
pub struct CudaTensor {
    pub(crate) data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CudaTensor {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// An activation matrix `[rows, cols]` of f16 bits on the device
/// (row-major, `Search::to_half`).
pub struct CudaHalf {
    pub(crate) data: CudaSlice<u16>,
    pub rows: usize,
    pub cols: usize,
}

/// A linear weight `[out, in]` on the device.
pub enum CudaWeight {
    /// f16 bits, row-major (every value of the host tensor was an f16).
    F16 {
        w: CudaSlice<u16>,
        out: usize,
        inp: usize,
    },
    /// f32, row-major.
    F32 {
        w: CudaSlice<f32>,
        out: usize,
        inp: usize,
    },
    /// The packed format: `q` the `qweight` words, `sz` one u32 per
    /// (row, group): the f16 scale in the low half, the zero in the high.
    Packed {
        q: CudaSlice<u32>,
        sz: CudaSlice<u32>,
        out: usize,
        inp: usize,
        bits: u32,
        group: usize,
    },
}

impl CudaWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CudaWeight::F16 { out, inp, .. }
            | CudaWeight::F32 { out, inp, .. }
            | CudaWeight::Packed { out, inp, .. } => (*out, *inp),
        }
    }

    pub fn is_f16(&self) -> bool {
        matches!(self, CudaWeight::F16 { .. })
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, CudaWeight::Packed { .. })
    }
}

/// The key/value cache of one sequence: per layer, `capacity x kv_dim` f32
/// keys and values (position p of layer l at `k[l][p * kv_dim..]`).
pub struct CudaCache {
    pub(crate) k: Vec<CudaSlice<f32>>,
    pub(crate) v: Vec<CudaSlice<f32>>,
    pub kv_dim: usize,
    pub capacity: usize,
}

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: String,
    /// cuBLAS on the stream; a Mutex as a handle is not for concurrent use.
    blas: Option<Mutex<CudaBlas>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// The start event of `begin_timing`.
    timing: Mutex<Option<CudaEvent>>,
}

impl Cuda {
    /// Opens device `device` (the other options from the environment).
    pub fn open(device: usize) -> Result<Cuda> {
        Cuda::with_options(&CudaOptions {
            device,
            ..CudaOptions::from_env()
        })
    }

    /// Opens the device of `o`: an error (never a panic) when the driver,
    /// the device or NVRTC is missing.
    pub fn with_options(o: &CudaOptions) -> Result<Cuda> {
        let name = probe(o)?;
        let ctx = CudaContext::new(o.device).ctx(&format!("device {}", o.device))?;
        let (major, minor) = ctx.compute_capability().ctx("compute capability")?;
        // SAFETY: this backend uses one stream (below) for every buffer, so
        // cudarc's per-buffer events for cross-stream ordering are not
        // needed (and each would cost two cuEventCreate per allocation).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // SAFETY: only probes whether libcublas can be loaded.
        let blas = if o.cublas && unsafe { cudarc::cublas::sys::is_culib_present() } {
            Some(Mutex::new(CudaBlas::new(stream.clone()).ctx("cuBLAS")?))
        } else {
            None
        };
        Ok(Cuda {
            ctx,
            stream,
            name,
            arch: format!("sm_{major}{minor}"),
            blas,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            timing: Mutex::new(None),
        })
    }

    /// The device's name and architecture, e.g. `NVIDIA H200 (sm_90)`.
    pub fn device(&self) -> String {
        format!("{} ({})", self.name, self.arch)
    }

    /// The NVRTC target, `sm_XY`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether the prefill SGEMM runs on cuBLAS (else `gemm.cu`).
    pub fn uses_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// Compiles (once) and loads every kernel file: a way to pay NVRTC's
    /// cost up front and to check the whole set on this device.
    pub fn warm_up(&self) -> Result<()> {
        for k in SOURCES {
            self.module(k)?;
        }
        Ok(())
    }

    /// The module of kernel file `k`, compiled and loaded at first use: a
    /// CUBIN for the device's `sm_XY` (no JIT: loads on a driver older than
    /// NVRTC within the same major version), else PTX (JIT-compiled by the
    /// driver, for an architecture NVRTC cannot emit code for).
    fn module(&self, k: &'static KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| err("module cache poisoned"))?;
        if let Some(m) = modules.get(k.file) {
            return Ok(m.clone());
        }
        let cubin = cuda_kernels::compile_cubin(k.file, k.src, &self.arch).and_then(|bin| {
            self.ctx.load_module(Ptx::from_binary(bin)).map_err(|e| {
                err(format!(
                    "{}: loading the CUBIN for {}: {e:?}",
                    k.file, self.arch
                ))
            })
        });
        let m = match cubin {
            Ok(m) => m,
            Err(cubin_err) => {
                let ptx = cuda_kernels::compile(k.file, k.src, &self.arch)?;
                self.ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                    err(format!(
                        "{}: loading the PTX for {} failed ({e:?}) after the CUBIN failed \
                         ({cubin_err}); CUDA_ERROR_UNSUPPORTED_PTX_VERSION means NVRTC is \
                         newer than the driver: use an NVRTC no newer than the driver's CUDA",
                        k.file, self.arch
                    ))
                })?
            }
        };
        modules.insert(k.file, m.clone());
        Ok(m)
    }

    /// The kernel `entry` (listed in [`SOURCES`]), compiling its file at first use.
    pub(crate) fn function(&self, entry: &str) -> Result<CudaFunction> {
        let (k, name) = SOURCES
            .iter()
            .find_map(|k| k.entries.iter().find(|e| **e == entry).map(|e| (k, *e)))
            .ok_or_else(|| err(format!("no kernel named {entry} in kernels/*.cu")))?;
        if let Some(f) = self
            .functions
            .lock()
            .map_err(|_| err("function cache poisoned"))?
            .get(name)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(k)?
            .load_function(name)
            .ctx(&format!("{}: kernel {name}", k.file))?;
        self.functions
            .lock()
            .map_err(|_| err("function cache poisoned"))?
            .insert(name, f.clone());
        Ok(f)
    }

    /// A zeroed f32 buffer of `n` values (at least one, so that empty
    /// tensors have a valid pointer).
    pub(crate) fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).ctx("cuMemAlloc")
    }

    pub(crate) fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.zeros(rows * cols)?,
            rows,
            cols,
        })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// A size as a kernel's `int` argument.
pub(crate) fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| err(format!("{what}: {n} does not fit a 32-bit kernel argument")))
}

/// A grid-stride launch over `n` items with `threads` per block.
pub(crate) fn grid_stride(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
