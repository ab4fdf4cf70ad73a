//! One op-by-op interface for every device. The model code in `model/` is
//! written once against [`Backend`]; the CPU backend (`cpu/`) is the
//! readable reference every other backend is tested against.
//!
//! Shapes: activations are matrices `[rows, cols]` (tokens x features);
//! a linear weight is `[out, in]` as in PyTorch.

pub mod backward;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
/// The CUDA backend's stand-in in a build without the `cuda` feature: the
/// same names, and every way to open it says it is not compiled in.
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
mod open;
pub mod search;
pub mod wgpu;

pub use open::{open, resolve, with_backend, AnyBackend, BackendJob, BackendOptions};

use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;
use crate::weights::StoredWeight;

pub use backward::Grad;
pub use search::{Distance, Search};

/// Precomputed RoPE inverse frequencies for one model (`head_dim / 2` values).
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub head_dim: usize,
}

/// What the attention of a block sees.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, usually `head_dim^-0.5`.
    pub scale: f32,
}

/// An activation's code in the kernels (`shaders/elementwise.wgsl`, `kernels/act.cu`): one
/// numbering for every backend.
pub fn act_code(act: Act) -> u32 {
    match act {
        Act::Gelu => 0,
        Act::GeluTanh => 1,
        Act::QuickGelu => 2,
        Act::Silu => 3,
        Act::Relu => 4,
    }
}

/// An error unless two `[rows, cols]` activations have the same shape
/// (element-wise ops), naming the backend and the op.
fn same_dims(backend: &str, op: &str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        return Err(Error::invalid(format!(
            "{backend} {op}: shapes [{}, {}] and [{}, {}] differ",
            a.0, a.1, b.0, b.1
        )));
    }
    Ok(())
}

/// The checks [`Backend::attention_cached`] makes before any backend writes
/// the new keys and values: q `[n, heads * head_dim]`, k and v
/// `[n, kv_heads * head_dim]` matching the cache's row width, a layer the
/// cache has, and positions `pos0..pos0 + n` within its capacity. `cache`
/// is (kv_dim, layers, capacity).
#[allow(clippy::too_many_arguments)]
fn check_attention_cached(
    backend: &str,
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    cache: (usize, usize, usize),
    layer: usize,
    pos0: usize,
    shape: AttnShape,
) -> Result<()> {
    let (kvd, layers, capacity) = cache;
    let n = q.0;
    if k.1 != kvd
        || v != k
        || k.0 != n
        || layer >= layers
        || q.1 != shape.heads * shape.head_dim
        || kvd != shape.kv_heads * shape.head_dim
    {
        return Err(Error::invalid(format!(
            "{backend} attention_cached: q [{}, {}], k [{}, {}], v [{}, {}], cache kv_dim {kvd}, \
             layer {layer} of {layers}, {} heads / {} kv heads of {}",
            q.0, q.1, k.0, k.1, v.0, v.1, shape.heads, shape.kv_heads, shape.head_dim
        )));
    }
    if pos0 + n > capacity {
        return Err(Error::invalid(format!(
            "KV cache full: positions {pos0}..{} exceed its capacity {capacity}",
            pos0 + n
        )));
    }
    Ok(())
}

pub trait Backend {
    /// An activation matrix on the device.
    type Tensor;
    /// A linear weight `[out, in]` on the device.
    type Weight;
    /// The key/value cache of one sequence, all layers.
    type Cache;

    fn name(&self) -> &'static str;

    /// Host -> device.
    fn upload(&self, t: &Tensor) -> Result<Self::Tensor>;
    /// Device -> host.
    fn download(&self, t: &Self::Tensor) -> Result<Tensor>;
    /// A `[rows, cols]` tensor of zeros. By default uploaded; the devices
    /// make it in place (nothing crosses the bus).
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload(&Tensor::zeros(vec![rows, cols]))
    }
    /// A linear weight from a host `[out, in]` tensor.
    fn weight(&self, w: &Tensor) -> Result<Self::Weight>;
    /// A linear weight in the packed format (`quant::format`), kept packed:
    /// its lengths are checked ([`PackedLinear::validate`]) before the
    /// backend's [`Backend::packed_weight_unchecked`] sees it.
    /// A dense weight `[out, in]` as the checkpoint stores it (f32, f16 or
    /// bf16). By default converted to f32 and given to [`Backend::weight`];
    /// the CPU keeps f16 / bf16 as stored, in the mapped file.
    fn stored_weight(&self, w: &StoredWeight) -> Result<Self::Weight> {
        self.weight(&w.to_tensor()?)
    }
    fn packed_weight(&self, w: &PackedLinear) -> Result<Self::Weight> {
        w.validate("packed weight")?;
        self.packed_weight_unchecked(w)
    }
    /// [`Backend::packed_weight`] of a weight already validated: bits,
    /// group size and the lengths of its codes and (scale, zero) pairs
    /// agree with `[out, in]`.
    fn packed_weight_unchecked(&self, w: &PackedLinear) -> Result<Self::Weight>;
    /// Bytes a dense weight element takes on this device (2: f16, as
    /// checkpoints store them; the CPU reads them as stored). Used by
    /// benchmarks.
    fn dense_weight_bytes(&self) -> f64 {
        2.0
    }
    /// Starts timing the device's own work: `Ok(true)` when this backend
    /// can (wgpu with `TIMESTAMP_QUERY`), `Ok(false)` otherwise (the
    /// default; callers fall back to wall clock).
    fn begin_timing(&self) -> Result<bool> {
        Ok(false)
    }
    /// Ends the timing `begin_timing` started and waits for the device:
    /// seconds of device time from the start of the first kernel recorded
    /// since then to the end of the last one (idle gaps between them
    /// included). `None` when the backend cannot time or was not timing.
    fn end_timing(&self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// `(rows, cols)` of an activation matrix.
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);
    /// `[out, in]` of a weight.
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);

    /// y[r, o] = sum_i x[r, i] w[o, i] + b[o]; x `[rows, in]` -> `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// Rows of an embedding table (a `[vocab, dim]` weight) -> `[ids, dim]`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;

    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// a + b, same shapes (checked here, then [`Backend::add_unchecked`]).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        same_dims(self.name(), "add", self.dims(a), self.dims(b))?;
        self.add_unchecked(a, b)
    }
    /// [`Backend::add`] of two tensors of the same shape.
    fn add_unchecked(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    fn act(&self, x: &Self::Tensor, act: Act) -> Result<Self::Tensor>;
    /// act(gate) * up, same shapes (SwiGLU when act is silu); checked here,
    /// then [`Backend::gated_unchecked`].
    fn gated(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Act) -> Result<Self::Tensor> {
        same_dims(self.name(), "gated", self.dims(gate), self.dims(up))?;
        self.gated_unchecked(gate, up, act)
    }
    /// [`Backend::gated`] of two tensors of the same shape.
    fn gated_unchecked(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        act: Act,
    ) -> Result<Self::Tensor>;

    /// y[r, c] = x[r, c] / s[c]: every column divided by its own scale (`s`
    /// holds `cols` values). W4A8's `X / s` in the scale search.
    fn div_cols(&self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor>;

    /// Per-row (per-token) symmetric INT8 fake quantization of activations,
    /// the A8 of W4A8 (`quant::w4a8::fake_quantize_act_int8`): with
    /// `s = max(max|x_row|, 1e-5) / 127`, `y = clamp(round(x / s), -128, 127) * s`
    /// (round half to even), in f32.
    fn quant_act_int8(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// A W4A8 linear: `x` quantized per token to INT8, then the product
    /// with `w`. The default (and the reference semantics) fake-quantizes
    /// with [`Backend::quant_act_int8`] and runs [`Backend::linear`]; a
    /// backend may instead compute in integers (wgpu with `dot4I8Packed`:
    /// exact per block, so equal up to f32 summation order).
    fn linear_a8(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.linear(&self.quant_act_int8(x)?, w, b)
    }

    /// Rows `start..start + n` of x.
    fn rows(&self, x: &Self::Tensor, start: usize, n: usize) -> Result<Self::Tensor>;
    /// x with rows `at..at + src.rows` replaced by src.
    fn set_rows(&self, x: &mut Self::Tensor, at: usize, src: &Self::Tensor) -> Result<()>;
    /// a stacked on b (same column count).
    fn concat_rows(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// The rows of every part, in order (at least one part).
    fn concat_all(&self, parts: Vec<Self::Tensor>) -> Result<Self::Tensor> {
        let mut parts = parts.into_iter();
        let first = parts.next().ok_or_else(|| {
            Error::invalid(format!("backend {}: op concat_all: no parts", self.name()))
        })?;
        parts.try_fold(first, |a, b| self.concat_rows(&a, &b))
    }

    /// Rotates `[rows, heads * head_dim]` in place-style (returns a new tensor):
    /// row r is at position `pos0 + r` (rotate-half convention).
    fn rope(
        &self,
        x: &Self::Tensor,
        heads: usize,
        rope: &Rope,
        pos0: usize,
    ) -> Result<Self::Tensor> {
        let rows = self.dims(x).0;
        let positions: Vec<usize> = (pos0..pos0 + rows).collect();
        self.rope_at(x, heads, rope, &positions)
    }

    /// [`Backend::rope`] with row r at `positions[r]` (the server's batch:
    /// each sequence's rows at its own positions).
    fn rope_at(
        &self,
        x: &Self::Tensor,
        heads: usize,
        rope: &Rope,
        positions: &[usize],
    ) -> Result<Self::Tensor> {
        let rows = self.dims(x).0;
        if positions.len() != rows {
            return Err(Error::invalid(format!(
                "backend {}: op rope: {} positions for {rows} rows",
                self.name(),
                positions.len()
            )));
        }
        self.rope_at_unchecked(x, heads, rope, positions)
    }

    fn rope_at_unchecked(
        &self,
        x: &Self::Tensor,
        heads: usize,
        rope: &Rope,
        positions: &[usize],
    ) -> Result<Self::Tensor>;

    /// Full (non-causal) attention: q `[n, heads*d]`, k, v `[n, kv_heads*d]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;

    /// A cache for `layers` layers of up to `capacity` positions.
    fn new_cache(&self, layers: usize, kv_dim: usize, capacity: usize) -> Result<Self::Cache>;
    /// `(kv_dim, layers, capacity)` of a cache.
    fn cache_dims(&self, cache: &Self::Cache) -> (usize, usize, usize);
    /// Writes k, v `[n, kv_heads*d]` at positions `pos0..pos0+n` of `layer`,
    /// then runs causal attention of q `[n, heads*d]` (query r at position
    /// `pos0 + r`) over positions `0..pos0+n`. The shapes, the layer and
    /// the cache's capacity are checked here, then
    /// [`Backend::attention_cached_unchecked`] runs.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::Cache,
        layer: usize,
        pos0: usize,
        shape: AttnShape,
    ) -> Result<Self::Tensor> {
        check_attention_cached(
            self.name(),
            self.dims(q),
            self.dims(k),
            self.dims(v),
            self.cache_dims(cache),
            layer,
            pos0,
            shape,
        )?;
        self.attention_cached_unchecked(q, k, v, cache, layer, pos0, shape)
    }
    /// [`Backend::attention_cached`] once its checks have passed.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached_unchecked(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::Cache,
        layer: usize,
        pos0: usize,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;
}

/// Which backend to run on (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => BackendKind::Auto,
            "cpu" => BackendKind::Cpu,
            "wgpu" => BackendKind::Wgpu,
            "cuda" => BackendKind::Cuda,
            other => {
                return Err(Error::invalid(format!(
                    "--backend: unknown backend \"{other}\"; expected auto, cpu, wgpu or cuda"
                )))
            }
        })
    }
}
