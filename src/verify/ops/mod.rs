//! Every op of a device backend against the CPU reference ([`Cpu`]) on
//! random inputs with odd shapes (not multiples of a workgroup size or of
//! 4), written once and generic over the backend. The one implementation
//! of the op checks and of their tolerances ([`Tolerances`]): `mbq verify
//! --ops` runs [`suite`] on the user's device, and the test suite
//! (tests/backend_ops, tests/wgpu_ops.rs, tests/cuda_ops.rs) runs the same
//! functions and asserts every [`OpCheck`] passed.
//!
//! Every check takes `paths`, the configurations of one backend to run it
//! on, named (wgpu: the subgroup and workgroup-memory reductions, weights
//! split across bindings; CUDA: the cuBLAS and gemm.cu prefill GEMMs), and
//! records one [`OpCheck`] per kernel and shape in a [`Checks`]: the
//! measured error, its tolerance, OK or FAIL. A backend error is a FAIL
//! with its message, never a panic.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::wgpu::{Wgpu, WgpuWeight};
use crate::backend::{AttnShape, Backend, Grad, Rope, Search};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::quant::pseudo::quantize_linear;
use crate::tensor::Tensor;

/// How far a backend may be from the CPU reference, per op family. One
/// table for every backend: [`Tolerances::DEFAULT`], and per backend
/// ([`Tolerances::WGPU`], [`Tolerances::CUDA`]) only the overrides a
/// comment justifies.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerances {
    /// Copies (rows, set_rows, concat_rows, embedding): bit-exact.
    pub copy: f32,
    /// add: one f32 rounding, the same as the CPU's.
    pub add: f32,
    /// div_cols, relative to the output's scale: one division per value.
    pub div_cols: f32,
    /// Activations, per value: |gpu - cpu| <= act * max(1, |x|) (times
    /// max(1, |up|) for gated). The erf / tanh / exp of the kernels (WGSL's
    /// approximations, CUDA's erff / tanhf / expf) are within 2e-7 or a few
    /// ulp of libm's.
    pub act: f32,
    /// Norms, relative to the output's scale (a different summation order).
    pub norm: f32,
    /// RoPE: the cos/sin table is the CPU's; only the multiply-adds differ
    /// (rounded as the CPU's where there is no FMA: then bit-exact).
    pub rope: f32,
    /// Dense and packed products, relative to the output's scale: f32
    /// accumulation on the exact weight values in another order (the packed
    /// products fold the zero point per 32-input block). Also W4A8 through
    /// the fake-quant path (measured 2e-6 at k = 2560 on lavapipe).
    pub linear: f32,
    /// Attention, relative to the output's scale (online softmax, another
    /// summation order).
    pub attn: f32,
    /// INT8 activation fake quantization, per element: equal to the CPU's
    /// up to `act_quant_same * max|x_row|` (an ulp or two of the scale,
    /// should a device divide less exactly), else off by at most one
    /// quantization step (x / s within float rounding of a .5 boundary),
    /// and that for at most `act_quant_max_step_fraction` of the elements.
    pub act_quant_same: f32,
    pub act_quant_max_step_fraction: f64,
    /// W4A8 with integer dot products (wgpu's gemv_w4a8.wgsl) against the
    /// CPU reference on the same INT8 activations, relative to the output's
    /// scale. The integer sums are exact; the GPU rounds once per 32-input
    /// block (the f32 combine of block sums times the group scale, then
    /// times s_x), the CPU rounds every product and sum of its f32 dot in
    /// another order: both are a few f32 ulps of the partial sums: lavapipe
    /// measures 4e-8..5.7e-7 over these shapes (k up to 2560, terms of
    /// either sign, so partial sums reach a few times the output's scale).
    /// 2e-6 leaves room for other devices' orders; a wrong code, zero or
    /// scale is off by > 1e-3.
    pub w4a8_int: f32,
    /// gated_backward, per value: |gpu - cpu| <= grad_act * max(1, |gate|)
    /// max(1, |up|) max(1, |dy|). The derivatives use the same erf / tanh /
    /// exp approximations as `act` (within 2e-7 or a few ulp of libm's),
    /// times up to 3 more roundings.
    pub grad_act: f32,
    /// rms_norm_backward, relative to the output's scale: both sums of the
    /// row in f32 in another order (the CPU's dot sum is f64).
    pub grad_norm: f32,
    /// rope_backward: the forward rotation with negated frequencies; sin is
    /// odd, so the table is the CPU's and only the multiply-adds differ.
    pub grad_rope: f32,
    /// linear_backward (dX = dY W, dense), relative to the output's scale:
    /// f32 accumulation in another order, as `linear`.
    pub grad_linear: f32,
    /// attention_backward, each of dq, dk, dv relative to its scale
    /// (recomputed softmax, another summation order; 0 for a host fallback
    /// running the CPU code). lavapipe: up to 7.8e-7 at n 150, d 72.
    pub grad_attn: f32,
    /// cross_entropy: the loss relative to the CPU's and the gradient
    /// relative to its scale. The devices reduce the max and the exp-sum
    /// in f32 (the CPU in f64) with their own exp / log (WGSL's exp is
    /// within 3 + 2|x| ulp); measured: lavapipe 8.9e-8 (subgroup and
    /// workgroup reductions), the CUDA kernel on the host emulation 3e-8.
    pub grad_ce: f32,
    /// fake_quant, the largest error of a row relative to the row's scale:
    /// the codes, scales and zeros are the reference's exactly (its f16
    /// roundings, done in integers where a device's f16 conversion or
    /// division is not guaranteed to round to nearest even), so only the
    /// final f32 division by `s` of weight-only quantization may differ.
    pub fake_quant: f32,
    /// loss_terms, each of the three sums relative to the CPU's (f64 on the
    /// CPU, f32 partial sums in another order on a device).
    pub loss_terms: f32,
    /// abs_col_stats, each column's sum (`hi + lo` as f64) relative to the
    /// CPU's f64 sum (the maxima are compared exactly). The devices add the
    /// rows in order to a compensated f32 pair, so what is left is the f32
    /// rounding of the compensation term (at most about n^2 u^2 of the
    /// sum, u = 2^-24), not the n u of a plain f32 sum. Measured on the
    /// harness's cases (up to 1520 rows chained over 3 samples): lavapipe
    /// 2.4e-12 (both reduction paths), the CUDA kernel on the host emulation
    /// 2.6e-12; the same sums in plain f32 are off by 4.4e-7..4.8e-6, and
    /// stats.wgsl without its guard against reassociation by 5e-8..8.5e-8
    /// on lavapipe. 1e-9 leaves 400x for other devices and still fails any
    /// sum that is not compensated (by 400x or more).
    pub abs_col_stats: f32,
    /// abs_terms, each of the three sums relative to the CPU's (f64 on the
    /// CPU, f32 partial sums in another order on a device: loss_terms'
    /// kernels, not compensated). Measured: lavapipe up to 1.9e-7, the CUDA
    /// kernels on the host emulation up to 1.1e-7 (values of 1e-3..2e4, up
    /// to 1000 rows); as loss_terms, 1e-5.
    pub abs_terms: f32,
    /// (weight_to_half and linear_half, the search's f16 products, use
    /// `linear`: the same exact products, summed in another order.)
    /// to_half then half_to_f32: the number of values whose bits differ from
    /// the CPU's (`half`'s round to nearest even, saturating at ±65504);
    /// every device converts with integer arithmetic or a correctly
    /// rounding instruction, so none.
    pub half: f32,
}

impl Tolerances {
    /// What every backend meets unless it overrides a field below.
    /// `div_cols` is exact: an IEEE division is correctly rounded, as the
    /// CPU's.
    pub const DEFAULT: Tolerances = Tolerances {
        copy: 0.0,
        add: 0.0,
        div_cols: 0.0,
        act: 1e-6,
        norm: 1e-5,
        rope: 1e-6,
        linear: 1e-5,
        attn: 1e-5,
        act_quant_same: 1e-6,
        act_quant_max_step_fraction: 0.01,
        w4a8_int: 2e-6,
        grad_act: 2e-6,
        grad_norm: 1e-5,
        grad_rope: 1e-6,
        grad_linear: 1e-5,
        grad_attn: 1e-5,
        grad_ce: 1e-6,
        fake_quant: 0.0,
        loss_terms: 1e-5,
        abs_col_stats: 1e-9,
        abs_terms: 1e-5,
        half: 0.0,
    };

    /// wgpu: Vulkan lets a device round a division to within 2.5 ulp, so
    /// div_cols may differ from the CPU's by that (relative to the output's
    /// scale, 1e-6), and so may fake_quant's final division by `s`.
    pub const WGPU: Tolerances = Tolerances {
        div_cols: 1e-6,
        fake_quant: 1e-6,
        ..Tolerances::DEFAULT
    };

    /// CUDA: the default (`/` compiles to the correctly rounded div.rn.f32
    /// without fast-math, so div_cols is exact, and f32 division in the
    /// INT8 quantization too: 0 values one step off are expected).
    pub const CUDA: Tolerances = Tolerances::DEFAULT;
}

/// A backend under test: what the generic checks need beyond [`Backend`].
pub trait Device: Grad + Search {
    /// The backend's row of the tolerance table.
    const TOL: Tolerances;
    /// Most rows a product still runs as a GEMV (decode) before the GEMM:
    /// the checks run a product at it and at one more.
    const GEMV_MAX_ROWS: usize;
    /// Whether `rope` takes an odd head_dim (the CPU's: the last value of
    /// each head is kept); where not, it must be an `Error::Invalid`.
    const ROPE_ODD_HEAD_DIM: bool = true;
    /// Whether a dense weight is stored as f16.
    fn weight_is_f16(w: &Self::Weight) -> bool;
    /// Whether a weight is kept in the packed format.
    fn weight_is_packed(w: &Self::Weight) -> bool;
    /// How many bindings a weight is split across (1 where the backend
    /// never splits).
    fn weight_chunks(_w: &Self::Weight) -> usize {
        1
    }
    /// How many W4A8 linears ran in integers so far (0 where the backend
    /// has only the trait's fake-quant `linear_a8`).
    fn integer_a8_linears(&self) -> usize {
        0
    }
    /// Whether this instance runs W4A8 on integer zero points in integers.
    fn integer_a8(&self) -> bool {
        false
    }
}

impl Device for Wgpu {
    const TOL: Tolerances = Tolerances::WGPU;
    /// Up to SKINNY_MAX tokens run a GEMV (gemv*.wgsl), more the GEMM.
    const GEMV_MAX_ROWS: usize = crate::backend::wgpu::SKINNY_MAX;
    /// rope.wgsl rotates pairs only, and no model has an odd head_dim:
    /// the wgpu backend rejects one.
    const ROPE_ODD_HEAD_DIM: bool = false;
    fn weight_is_f16(w: &Self::Weight) -> bool {
        w.is_f16()
    }
    fn weight_is_packed(w: &Self::Weight) -> bool {
        matches!(w, WgpuWeight::Packed { .. })
    }
    fn weight_chunks(w: &Self::Weight) -> usize {
        w.chunks()
    }
    fn integer_a8_linears(&self) -> usize {
        self.dot4_linears()
    }
    fn integer_a8(&self) -> bool {
        self.uses_dot4()
    }
}

impl Device for Cuda {
    const TOL: Tolerances = Tolerances::CUDA;
    const GEMV_MAX_ROWS: usize = crate::backend::cuda::GEMV_MAX_ROWS;
    fn weight_is_f16(w: &Self::Weight) -> bool {
        w.is_f16()
    }
    fn weight_is_packed(w: &Self::Weight) -> bool {
        w.is_packed()
    }
}

/// The op families [`suite`] checks, as [`OpCheck::family`] names them.
pub const FAMILIES: &[&str] = &[
    "add",
    "act",
    "gated",
    "div_cols",
    "layer_norm",
    "rms_norm",
    "rope",
    "embedding",
    "rows",
    "set_rows",
    "concat_rows",
    "attention",
    "attention_cached",
    "quant_act_int8",
    "linear_dense",
    "linear_packed",
    "linear_a8",
    "gated_backward",
    "rms_norm_backward",
    "rope_backward",
    "linear_backward",
    "attention_backward",
    "cross_entropy",
    "fake_quant",
    "loss_terms",
    "abs_col_stats",
    "abs_terms",
    "half",
    "linear_half",
    "errors",
];

/// One kernel on one shape against the CPU.
#[derive(Clone, Debug, Serialize)]
pub struct OpCheck {
    /// One of [`FAMILIES`].
    pub family: &'static str,
    /// The configuration (path), kernel and shape.
    pub case: String,
    /// The measured error (see the tolerance's field for its measure);
    /// `None` for a yes/no check (an error is an error, a weight's storage).
    pub err: Option<f64>,
    pub tol: f64,
    pub ok: bool,
    /// Why it failed, or what else was seen.
    pub note: String,
}

impl fmt::Display for OpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.ok { "OK" } else { "FAIL" };
        match self.err {
            Some(e) => write!(
                f,
                "{verdict:<4}  {:<16}  err {e:>9.2e}  tol {:>7.1e}  {}",
                self.family, self.tol, self.case
            )?,
            None => write!(
                f,
                "{verdict:<4}  {:<16}  {:>26}  {}",
                self.family, "check", self.case
            )?,
        }
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// The results of a run of checks.
#[derive(Debug, Default)]
pub struct Checks {
    pub results: Vec<OpCheck>,
}

impl Checks {
    /// Records `f`'s measured error against `tol`: a backend error or a
    /// non-finite error is a FAIL.
    pub fn measure(
        &mut self,
        family: &'static str,
        case: String,
        tol: f64,
        f: impl FnOnce() -> Result<f64>,
    ) {
        let (err, ok, note) = match f() {
            Ok(e) if e.is_finite() => (Some(e), e <= tol, String::new()),
            Ok(e) => (Some(e), false, "non-finite output".into()),
            Err(e) => (None, false, e.to_string()),
        };
        self.results.push(OpCheck {
            family,
            case,
            err,
            tol,
            ok,
            note,
        });
    }

    /// Records a yes/no check: `f` returns `Err(why)` when it fails.
    pub fn expect(
        &mut self,
        family: &'static str,
        case: String,
        f: impl FnOnce() -> std::result::Result<(), String>,
    ) {
        let (ok, note) = match f() {
            Ok(()) => (true, String::new()),
            Err(why) => (false, why),
        };
        self.results.push(OpCheck {
            family,
            case,
            err: None,
            tol: 0.0,
            ok,
            note,
        });
    }

    /// Records a backend error outside any one kernel as a FAIL.
    pub fn error(&mut self, family: &'static str, case: String, e: Error) {
        self.results.push(OpCheck {
            family,
            case,
            err: None,
            tol: 0.0,
            ok: false,
            note: e.to_string(),
        });
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&OpCheck> {
        self.results.iter().filter(|c| !c.ok).collect()
    }

    /// Panics listing every failure (for the test suite).
    pub fn assert_ok(&self) {
        for c in &self.results {
            println!("{c}");
        }
        let fails = self.failures();
        assert!(
            fails.is_empty(),
            "{} of {} op checks failed:\n{}",
            fails.len(),
            self.results.len(),
            fails
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `[rows, cols]` of uniform values in `[-scale, scale)`.
pub fn random(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let data = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::new(vec![rows, cols], data).expect("rows * cols values")
}

/// The same values rounded to f16 (what an f16 checkpoint holds).
pub fn to_f16(t: &Tensor) -> Tensor {
    let data = t
        .data
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    Tensor::new(t.shape.clone(), data).expect("same shape")
}

/// max |a - b| / max |b|: the error relative to the reference's scale
/// (NaN where an output is not finite; infinite where the sizes differ).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    if a.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff / scale) as f64
}

/// [`rel_err`] of two tensors, an error where their sizes differ.
pub fn close(got: &Tensor, want: &Tensor) -> Result<f64> {
    if got.data.len() != want.data.len() {
        return Err(Error::invalid(format!(
            "sizes {:?} vs the CPU's {:?}",
            got.shape, want.shape
        )));
    }
    Ok(rel_err(&got.data, &want.data))
}

fn up<B: Backend>(g: &B, t: &Tensor) -> Result<B::Tensor> {
    g.upload(t)
}

fn down<B: Backend>(g: &B, t: Result<B::Tensor>) -> Result<Tensor> {
    g.download(&t?)
}

/// `Ok` when `r` is an `Error::Invalid`.
fn is_invalid<T>(r: Result<T>) -> std::result::Result<(), String> {
    match r {
        Err(Error::Invalid(_)) => Ok(()),
        Err(e) => Err(format!("expected an invalid-input error, got: {e}")),
        Ok(_) => Err("expected an invalid-input error, got a value".into()),
    }
}

/// `Ok` when `r` is an error.
fn is_err<T>(r: Result<T>) -> std::result::Result<(), String> {
    match r {
        Err(_) => Ok(()),
        Ok(_) => Err("expected an error, got a value".into()),
    }
}

mod attention;
mod backward;
mod elementwise;
mod linear;
mod search;

pub use attention::*;
pub use backward::*;
pub use elementwise::*;
pub use linear::*;
pub use search::*;

/// Every op family on `paths` of one backend (each configuration named),
/// then the split-binding products on `split` where the backend has one.
pub fn suite<B: Device>(paths: &[(&str, &B)], split: Option<(&str, &B)>) -> Checks {
    let mut c = Checks::default();
    add_act_gated(&mut c, paths);
    acts_over_a_dense_range(&mut c, paths);
    div_cols(&mut c, paths);
    layer_norm_and_rms_norm(&mut c, paths);
    rows_set_rows_concat_rows(&mut c, paths);
    rope_matches(&mut c, paths);
    embedding_f16_and_f32(&mut c, paths);
    attention_non_causal(&mut c, paths);
    attention_cached_prefill_then_decode(&mut c, paths);
    act_quant_int8_matches_cpu(&mut c, paths);
    linear_dense_gemv_and_gemm(&mut c, paths);
    packed_gemv_every_format(&mut c, paths);
    packed_prefill_every_format(&mut c, paths);
    let a8: Vec<(&str, &B, bool)> = paths.iter().map(|&(p, g)| (p, g, g.integer_a8())).collect();
    w4a8_matches_cpu(&mut c, &a8);
    for &(path, g) in paths {
        shape_errors_are_errors(&mut c, path, g);
    }
    backward_ops(&mut c, paths, split);
    fake_quant_matches_cpu(&mut c, paths);
    loss_terms_match_cpu(&mut c, paths);
    abs_col_stats_matches_cpu(&mut c, paths);
    abs_terms_match_cpu(&mut c, paths);
    half_matches_cpu(&mut c, paths);
    linear_half_matches_cpu(&mut c, paths);
    if let Some((path, g)) = split {
        split_weights(&mut c, path, g, g.integer_a8());
        fake_quant_narrow_rows(&mut c, &[(path, g)]);
        linear_half_matches_cpu(&mut c, &[(path, g)]);
    }
    c
}
