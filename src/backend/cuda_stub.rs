//! The CUDA backend in a build without the `cuda` feature: the names the
//! rest of the crate uses ([`Cuda`], [`CudaOptions`], [`probe`],
//! [`devices`]), so that no caller needs a `cfg` arm. [`Cuda`] has no
//! values; everything that would make one says the backend is not
//! compiled in.

use std::convert::Infallible;

use crate::backend::{AttnShape, Backend, Distance, Grad, Rope, Search};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::quant::pseudo::FakeQuant;
use crate::tensor::Tensor;

/// Why there is no CUDA device in this build.
fn not_compiled_in() -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: "not compiled in; rebuild with `--features cuda`".into(),
    }
}

/// The names of the CUDA devices: none in this build.
pub fn devices() -> Result<Vec<String>> {
    Err(not_compiled_in())
}

/// The device `o` selects: none in this build.
pub fn probe(_o: &CudaOptions) -> Result<String> {
    Err(not_compiled_in())
}

/// How to open the backend (read, as with the feature, from
/// `MBQ_CUDA_DEVICE` and `MBQ_CUDA_NO_CUBLAS`).
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: usize,
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

/// As with the feature: up to this many rows a linear runs as a GEMV.
pub const GEMV_MAX_ROWS: usize = 8;

/// A weight on the device, which this build cannot make: uninhabited.
pub struct CudaWeight(Infallible);

impl CudaWeight {
    pub fn is_f16(&self) -> bool {
        match self.0 {}
    }

    pub fn is_packed(&self) -> bool {
        match self.0 {}
    }
}

/// The CUDA backend, which this build cannot make: uninhabited.
pub struct Cuda(Infallible);

impl Cuda {
    /// Always the error "not compiled in".
    pub fn with_options(_o: &CudaOptions) -> Result<Cuda> {
        Err(not_compiled_in())
    }

    pub fn device(&self) -> String {
        match self.0 {}
    }
}

impl Backend for Cuda {
    type Tensor = Infallible;
    type Weight = CudaWeight;
    type Cache = Infallible;

    fn name(&self) -> &'static str {
        match self.0 {}
    }
    fn upload(&self, _t: &Tensor) -> Result<Infallible> {
        match self.0 {}
    }
    fn download(&self, _t: &Infallible) -> Result<Tensor> {
        match self.0 {}
    }
    fn weight(&self, _w: &Tensor) -> Result<CudaWeight> {
        match self.0 {}
    }
    fn packed_weight_unchecked(&self, _w: &PackedLinear) -> Result<CudaWeight> {
        match self.0 {}
    }
    fn dims(&self, _t: &Infallible) -> (usize, usize) {
        match self.0 {}
    }
    fn weight_shape(&self, _w: &CudaWeight) -> (usize, usize) {
        match self.0 {}
    }
    fn linear(
        &self,
        _x: &Infallible,
        _w: &CudaWeight,
        _b: Option<&Infallible>,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn embedding(&self, _table: &CudaWeight, _ids: &[u32]) -> Result<Infallible> {
        match self.0 {}
    }
    fn layer_norm(
        &self,
        _x: &Infallible,
        _w: &Infallible,
        _b: &Infallible,
        _eps: f32,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn rms_norm(&self, _x: &Infallible, _w: &Infallible, _eps: f32) -> Result<Infallible> {
        match self.0 {}
    }
    fn add_unchecked(&self, _a: &Infallible, _b: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn act(&self, _x: &Infallible, _act: Act) -> Result<Infallible> {
        match self.0 {}
    }
    fn gated_unchecked(
        &self,
        _gate: &Infallible,
        _up: &Infallible,
        _act: Act,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn div_cols(&self, _x: &Infallible, _s: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn quant_act_int8(&self, _x: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn rows(&self, _x: &Infallible, _start: usize, _n: usize) -> Result<Infallible> {
        match self.0 {}
    }
    fn set_rows(&self, _x: &mut Infallible, _at: usize, _src: &Infallible) -> Result<()> {
        match self.0 {}
    }
    fn concat_rows(&self, _a: &Infallible, _b: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn rope_at_unchecked(
        &self,
        _x: &Infallible,
        _heads: usize,
        _rope: &Rope,
        _positions: &[usize],
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn attention(
        &self,
        _q: &Infallible,
        _k: &Infallible,
        _v: &Infallible,
        _shape: AttnShape,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn new_cache(&self, _layers: usize, _kv_dim: usize, _capacity: usize) -> Result<Infallible> {
        match self.0 {}
    }
    fn cache_dims(&self, _cache: &Infallible) -> (usize, usize, usize) {
        match self.0 {}
    }
    fn attention_cached_unchecked(
        &self,
        _q: &Infallible,
        _k: &Infallible,
        _v: &Infallible,
        _cache: &mut Infallible,
        _layer: usize,
        _pos0: usize,
        _shape: AttnShape,
    ) -> Result<Infallible> {
        match self.0 {}
    }
}

impl Grad for Cuda {
    fn linear_backward_unchecked(&self, _dy: &Infallible, _w: &CudaWeight) -> Result<Infallible> {
        match self.0 {}
    }
    fn rms_norm_backward_unchecked(
        &self,
        _x: &Infallible,
        _w: &Infallible,
        _eps: f32,
        _dy: &Infallible,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn gated_backward_unchecked(
        &self,
        _gate: &Infallible,
        _up: &Infallible,
        _dy: &Infallible,
        _act: Act,
    ) -> Result<(Infallible, Infallible)> {
        match self.0 {}
    }
    fn attention_backward_unchecked(
        &self,
        _q: &Infallible,
        _k: &Infallible,
        _v: &Infallible,
        _dout: &Infallible,
        _shape: AttnShape,
    ) -> Result<(Infallible, Infallible, Infallible)> {
        match self.0 {}
    }
    fn cross_entropy_unchecked(
        &self,
        _logits: &Infallible,
        _labels: &[u32],
    ) -> Result<(f64, Infallible)> {
        match self.0 {}
    }
}

impl Search for Cuda {
    type Half = Infallible;
    fn to_half(&self, _x: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn half_to_f32(&self, _h: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
    fn half_dims(&self, _h: &Infallible) -> (usize, usize) {
        match self.0 {}
    }
    fn weight_to_half(&self, _w: &CudaWeight) -> Result<CudaWeight> {
        match self.0 {}
    }
    fn linear_half_unchecked(
        &self,
        _x: &Infallible,
        _w: &CudaWeight,
        _b: Option<&Infallible>,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn fake_quant_unchecked(
        &self,
        _w: &CudaWeight,
        _s: &Infallible,
        _q: FakeQuant,
    ) -> Result<CudaWeight> {
        match self.0 {}
    }
    fn loss_terms_unchecked(
        &self,
        _want: &Infallible,
        _got: &Infallible,
        _masks: &Infallible,
        _dist: Distance,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn abs_col_stats_unchecked(
        &self,
        _x: &Infallible,
        _acc: Option<&Infallible>,
    ) -> Result<Infallible> {
        match self.0 {}
    }
    fn abs_terms_unchecked(&self, _x: &Infallible, _masks: &Infallible) -> Result<Infallible> {
        match self.0 {}
    }
}
