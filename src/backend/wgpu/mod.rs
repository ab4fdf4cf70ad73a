//! The wgpu backend: the whole VLM on any GPU (Vulkan, Metal, DX12) with
//! the WGSL compute shaders in `shaders/`, tested against the CPU reference
//! on Mesa's lavapipe.
//!
//! - `device.rs`: adapters, picking one, the device with the adapter's limits.
//! - `kernels.rs`: shader sources, the preprocessor, the pipeline cache.
//! - `encode.rs`: buffers, the pending command batch, flush and read-back.
//! - `linear.rs`: dense and packed weights (split by rows past the binding
//!   limit), GEMV / GEMM / fused dequant-GEMV, embedding.
//! - `ops.rs`: the [`Backend`](super::Backend) implementation.
//!
//! Ops are recorded into one pending command encoder and submitted
//! together when a download needs the results (or the batch is full).
//! Activations are f32; dense weights are f16 pairs when every value is
//! exactly an f16 (f16 checkpoints), else f32; packed weights keep the
//! bytes of `quant::format`.

mod backward;
mod device;
mod encode;
mod kernels;
mod linear;
mod ops;
mod search;

pub use device::{adapters, probe, AdapterReport, WgpuOptions};
pub use linear::{WgpuWeight, SKINNY_MAX};

use encode::Recorder;

use crate::error::{Error, Result};

/// An `Error::Backend` of this backend.
pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: msg.into(),
    }
}

/// Threads per workgroup of the element-wise, norm and GEMV kernels.
const WG: u32 = 256;
/// Threads (= keys per block) of the attention kernel.
const ATTN_WG: u32 = 64;
/// Largest head dimension the attention kernel holds (4 values per thread).
const MAX_HEAD_DIM: u32 = 4 * ATTN_WG;

/// The wgpu backend on one device.
pub struct Wgpu {
    rec: Recorder,
    /// The last RoPE cos/sin table: every layer of a step reuses it.
    rope_table: std::sync::Mutex<Option<RopeTable>>,
    /// W4A8 linears run with integer dot products so far.
    a8_dot4_runs: std::sync::atomic::AtomicUsize,
}

/// RoPE (cos, sin) for rows at positions `pos0..pos0 + rows` of `inv_freq`.
struct RopeTable {
    positions: Vec<usize>,
    inv_freq: Vec<f32>,
    buf: wgpu::Buffer,
}

/// An activation matrix `[rows, cols]` of f32 on the device.
pub struct WgpuTensor {
    mem: encode::Pooled,
    rows: usize,
    cols: usize,
}

impl WgpuTensor {
    fn buf(&self) -> &wgpu::Buffer {
        self.mem.get()
    }

    fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// An activation matrix `[rows, cols]` of f16 values on the device, two
/// to a word (value `2i` in the low half of word `i`), row after row with no
/// padding (`Search::to_half`).
pub struct WgpuHalf {
    mem: encode::Pooled,
    rows: usize,
    cols: usize,
}

/// The KV cache of one sequence: per layer, `[capacity, kv_dim]` keys and
/// values resident on the device.
pub struct WgpuCache {
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    kv_dim: usize,
    capacity: usize,
}

impl Wgpu {
    /// Opens the adapter `opts` picks.
    pub fn new(opts: &WgpuOptions) -> Result<Wgpu> {
        let ctx = device::Context::open(opts)?;
        Ok(Wgpu {
            rec: Recorder::new(ctx),
            rope_table: Default::default(),
            a8_dot4_runs: Default::default(),
        })
    }

    /// The adapter's name, API and type, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`.
    pub fn adapter(&self) -> String {
        let i = &self.rec.ctx.info;
        format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
    }

    /// Whether reductions use subgroup operations on this device.
    pub fn uses_subgroups(&self) -> bool {
        self.rec.ctx.subgroups
    }

    /// Whether W4A8 linears (4-bit packed weights with integer zero points)
    /// use integer dot products (`dot4I8Packed`, gemv_w4a8.wgsl) on this
    /// device; else they fake-quantize the activations and run the float
    /// packed product. Off with `MBQ_WGPU_NO_DOT4=1` (`WgpuOptions::dot4`).
    pub fn uses_dot4(&self) -> bool {
        self.rec.ctx.dot4
    }

    /// Whether the scale search's f16 products read their operands as WGSL
    /// `f16` (the adapter has `SHADER_F16` and `WgpuOptions::shader_f16`),
    /// and whether the adapter has it at all.
    pub fn uses_shader_f16(&self) -> (bool, bool) {
        (self.rec.ctx.shader_f16, self.rec.ctx.adapter_f16)
    }

    /// How many W4A8 linears ran with integer dot products so far.
    pub fn dot4_linears(&self) -> usize {
        self.a8_dot4_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Nanoseconds per device timestamp tick when kernels can be timed on
    /// the device (`TIMESTAMP_QUERY` enabled), else `None`.
    pub fn timestamp_period(&self) -> Option<f32> {
        self.rec.timestamp_period()
    }

    /// Largest storage binding (bytes) a weight chunk may use.
    pub fn max_binding(&self) -> u64 {
        self.rec.ctx.max_binding
    }

    /// Compiles a WGSL compute shader on this device: `Err(Error::Backend)`
    /// naming `name` with the compiler's message when it does not compile.
    pub fn compile_wgsl(&self, name: &str, src: &str, entry: &str) -> Result<()> {
        kernels::compile_source(&self.rec.ctx.device, name, src.to_string(), entry).map(|_| ())
    }

    /// Submits everything recorded so far and waits for it.
    pub fn synchronize(&self) -> Result<()> {
        self.rec.read(&self.rec.buffer(4, "sync")?, 4).map(|_| ())
    }

    /// Bytes of a `[rows, cols]` activation, or an error when it cannot
    /// be bound whole.
    fn activation_bytes(&self, rows: usize, cols: usize, label: &str) -> Result<u64> {
        let bytes = (rows * cols * 4) as u64;
        if bytes > self.rec.ctx.limits.max_storage_buffer_binding_size {
            return Err(err(format!(
                "{label}: a [{rows}, {cols}] activation ({bytes} bytes) exceeds the device's \
                 max_storage_buffer_binding_size {}",
                self.rec.ctx.limits.max_storage_buffer_binding_size
            )));
        }
        Ok(bytes)
    }

    /// A new uninitialised `[rows, cols]` tensor.
    fn tensor(&self, rows: usize, cols: usize, label: &str) -> Result<WgpuTensor> {
        let bytes = self.activation_bytes(rows, cols, label)?;
        Ok(WgpuTensor {
            mem: self.rec.output(bytes)?,
            rows,
            cols,
        })
    }

    /// Common flags of a kernel key: the workgroup size and subgroups.
    fn key(&self, file: &'static str, entry: &'static str, wg: u32) -> kernels::KernelKey {
        kernels::KernelKey::new(file, entry)
            .def("WG", wg)
            .def("SUBGROUP", self.rec.ctx.subgroups as u32)
    }
}

fn shape_err(op: &str, msg: String) -> Error {
    Error::invalid(format!("wgpu {op}: {msg}"))
}

/// A size as a kernel parameter, or an error when it does not fit 32 bits.
fn u32_of(op: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| shape_err(op, format!("{v} does not fit in 32 bits")))
}
