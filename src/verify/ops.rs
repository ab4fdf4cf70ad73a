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
use crate::backend::{AttnShape, Backend, Rope};
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
    };

    /// wgpu: Vulkan lets a device round a division to within 2.5 ulp, so
    /// div_cols may differ from the CPU's by that (relative to the output's
    /// scale, 1e-6).
    pub const WGPU: Tolerances = Tolerances {
        div_cols: 1e-6,
        ..Tolerances::DEFAULT
    };

    /// CUDA: the default (`/` compiles to the correctly rounded div.rn.f32
    /// without fast-math, so div_cols is exact, and f32 division in the
    /// INT8 quantization too: 0 values one step off are expected).
    pub const CUDA: Tolerances = Tolerances::DEFAULT;
}

/// A backend under test: what the generic checks need beyond [`Backend`].
pub trait Device: Backend {
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
    /// One token runs a GEMV (gemv*.wgsl), more the GEMM.
    const GEMV_MAX_ROWS: usize = 1;
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

const ACTS: [Act; 5] = [
    Act::Gelu,
    Act::GeluTanh,
    Act::QuickGelu,
    Act::Silu,
    Act::Relu,
];

/// add, then every activation alone and gated, per value.
pub fn add_act_gated<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL;
    let mut r = rng(1);
    let a = random(&mut r, 7, 37, 6.0);
    let b = random(&mut r, 7, 37, 2.0);
    for &(path, g) in paths {
        c.measure("add", format!("{path} add [7, 37]"), tol.add as f64, || {
            close(
                &down(g, g.add(&up(g, &a)?, &up(g, &b)?))?,
                &Cpu.add(&a, &b)?,
            )
        });
        for act in ACTS {
            for op in ["act", "gated"] {
                let gated = op == "gated";
                c.measure(
                    if gated { "gated" } else { "act" },
                    format!("{path} {op} {act:?} [7, 37] (per value, / max(1, |x|))"),
                    tol.act as f64,
                    || {
                        let (ga, gb) = (up(g, &a)?, up(g, &b)?);
                        let (got, want) = if gated {
                            (down(g, g.gated(&ga, &gb, act))?, Cpu.gated(&a, &b, act)?)
                        } else {
                            (down(g, g.act(&ga, act))?, Cpu.act(&a, act)?)
                        };
                        let mut worst = 0.0f64;
                        for (i, (x, (u, v))) in a
                            .data
                            .iter()
                            .zip(got.data.iter().zip(&want.data))
                            .enumerate()
                        {
                            let scale = if gated { b.data[i].abs().max(1.0) } else { 1.0 };
                            let e = ((u - v).abs() / (x.abs().max(1.0) * scale)) as f64;
                            if !e.is_finite() {
                                return Ok(f64::NAN);
                            }
                            worst = worst.max(e);
                        }
                        Ok(worst)
                    },
                );
            }
        }
    }
}

/// Every smooth activation over [-10, 10] in steps of 0.005: the worst
/// |gpu - cpu| / max(1, |x|) within the activation tolerance.
pub fn acts_over_a_dense_range<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
    let x = Tensor::new(vec![1, xs.len()], xs.clone()).expect("a row");
    for &(path, g) in paths {
        for act in [Act::Gelu, Act::GeluTanh, Act::QuickGelu, Act::Silu] {
            c.measure(
                "act",
                format!("{path} act {act:?} over [-10, 10] step 0.005"),
                B::TOL.act as f64,
                || {
                    let got = down(g, g.act(&up(g, &x)?, act))?;
                    let want = Cpu.act(&x, act)?;
                    Ok(xs
                        .iter()
                        .zip(got.data.iter().zip(&want.data))
                        .map(|(x, (u, v))| ((u - v).abs() / x.abs().max(1.0)) as f64)
                        .fold(0.0f64, |m, e| if e.is_nan() { e } else { m.max(e) }))
                },
            );
        }
    }
}

/// Columns divided by per-column scales (the search's W4A8 `X / s`); a
/// scale vector of the wrong length is an error.
pub fn div_cols<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(21);
    let x = random(&mut r, 9, 37, 5.0);
    let s: Vec<f32> = (0..37).map(|_| r.random_range(0.05f32..8.0)).collect();
    let s = Tensor::new(vec![37], s).expect("37 scales");
    let short = Tensor::new(vec![36], vec![1.0; 36]).expect("36 scales");
    for &(path, g) in paths {
        c.measure(
            "div_cols",
            format!("{path} div_cols [9, 37]"),
            B::TOL.div_cols as f64,
            || {
                close(
                    &down(g, g.div_cols(&up(g, &x)?, &up(g, &s)?))?,
                    &Cpu.div_cols(&x, &s)?,
                )
            },
        );
        c.expect(
            "errors",
            format!("{path} div_cols: 36 scales for 37 columns"),
            || match (up(g, &x), up(g, &short)) {
                (Ok(gx), Ok(gs)) => is_invalid(g.div_cols(&gx, &gs)),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

pub fn layer_norm_and_rms_norm<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(2);
    for (rows, cols) in [(5, 300), (3, 33), (1, 7), (2, 4099)] {
        let x = random(&mut r, rows, cols, 3.0);
        let w = random(&mut r, 1, cols, 1.5);
        let b = random(&mut r, 1, cols, 0.5);
        for &(path, g) in paths {
            let tol = B::TOL.norm as f64;
            c.measure(
                "layer_norm",
                format!("{path} layer_norm [{rows}, {cols}]"),
                tol,
                || {
                    close(
                        &down(g, g.layer_norm(&up(g, &x)?, &up(g, &w)?, &up(g, &b)?, 1e-5))?,
                        &Cpu.layer_norm(&x, &w, &b, 1e-5)?,
                    )
                },
            );
            c.measure(
                "rms_norm",
                format!("{path} rms_norm [{rows}, {cols}]"),
                tol,
                || {
                    close(
                        &down(g, g.rms_norm(&up(g, &x)?, &up(g, &w)?, 1e-6))?,
                        &Cpu.rms_norm(&x, &w, 1e-6)?,
                    )
                },
            );
        }
    }
}

/// The row copies, an empty slice, and out-of-range rows as errors.
pub fn rows_set_rows_concat_rows<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.copy as f64;
    let mut r = rng(3);
    let x = random(&mut r, 9, 13, 1.0);
    let s = random(&mut r, 3, 13, 1.0);
    for &(path, g) in paths {
        c.measure("rows", format!("{path} rows 2..7 of [9, 13]"), tol, || {
            close(&down(g, g.rows(&up(g, &x)?, 2, 5))?, &Cpu.rows(&x, 2, 5)?)
        });
        c.measure(
            "concat_rows",
            format!("{path} concat_rows [3, 13] + [9, 13]"),
            tol,
            || {
                close(
                    &down(g, g.concat_rows(&up(g, &s)?, &up(g, &x)?))?,
                    &Cpu.concat_rows(&s, &x)?,
                )
            },
        );
        c.measure(
            "set_rows",
            format!("{path} set_rows [3, 13] at 5 of [9, 13]"),
            tol,
            || {
                let mut gx = up(g, &x)?;
                g.set_rows(&mut gx, 5, &up(g, &s)?)?;
                let mut x2 = x.clone();
                Cpu.set_rows(&mut x2, 5, &s)?;
                close(&g.download(&gx)?, &x2)
            },
        );
        // Empty slices and out of range: no panic; errors are errors.
        c.expect("rows", format!("{path} rows: an empty slice"), || {
            let t = up(g, &x).and_then(|gx| g.rows(&gx, 9, 0));
            match t {
                Ok(t) if g.dims(&t) == (0, 13) => Ok(()),
                Ok(t) => Err(format!("dims {:?}, expected (0, 13)", g.dims(&t))),
                Err(e) => Err(e.to_string()),
            }
        });
        c.expect(
            "errors",
            format!("{path} rows 7..12 of 9 rows"),
            || match up(g, &x) {
                Ok(gx) => is_invalid(g.rows(&gx, 7, 5)),
                Err(e) => Err(e.to_string()),
            },
        );
        c.expect(
            "errors",
            format!("{path} set_rows 3 rows at 8 of 9"),
            || match (up(g, &x), up(g, &s)) {
                (Ok(mut gx), Ok(gs)) => is_err(g.set_rows(&mut gx, 8, &gs)),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

/// RoPE at three head layouts (an odd head_dim among them) and positions.
pub fn rope_matches<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(4);
    for (heads, d) in [(3, 10), (2, 64), (1, 7)] {
        let rope = Rope {
            inv_freq: (0..d / 2)
                .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
                .collect(),
            head_dim: d,
        };
        let x = random(&mut r, 5, heads * d, 2.0);
        for &(path, g) in paths {
            if d % 2 == 1 && !B::ROPE_ODD_HEAD_DIM {
                c.expect(
                    "errors",
                    format!("{path} rope: odd head_dim {d} rejected"),
                    || match up(g, &x) {
                        Ok(gx) => is_invalid(g.rope(&gx, heads, &rope, 0)),
                        Err(e) => Err(e.to_string()),
                    },
                );
                continue;
            }
            for pos0 in [0, 17, 4093] {
                c.measure(
                    "rope",
                    format!("{path} rope heads {heads} d {d} pos0 {pos0}"),
                    B::TOL.rope as f64,
                    || {
                        close(
                            &down(g, g.rope(&up(g, &x)?, heads, &rope, pos0))?,
                            &Cpu.rope(&x, heads, &rope, pos0)?,
                        )
                    },
                );
            }
        }
    }
}

/// The `[41, 13]` embedding table [`embedding_f16_and_f32`] uses (for
/// backend tests that check how it is stored).
pub fn embedding_table() -> Tensor {
    random(&mut rng(5), 41, 13, 1.0)
}

/// Rows of an f32 table and of its f16 rounding (stored as f16), and an
/// id past the table as an error.
pub fn embedding_f16_and_f32<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let t32 = embedding_table();
    let t16 = to_f16(&t32);
    let ids = [0u32, 40, 7, 7, 23, 1];
    for &(path, g) in paths {
        for (name, t) in [("f32", &t32), ("f16", &t16)] {
            c.measure(
                "embedding",
                format!("{path} embedding {name} [41, 13], 6 ids"),
                B::TOL.copy as f64,
                || {
                    let w = g.weight(t)?;
                    if B::weight_is_f16(&w) != (name == "f16") {
                        return Err(Error::invalid(format!(
                            "an {name} table stored as f16: {}",
                            B::weight_is_f16(&w)
                        )));
                    }
                    close(
                        &down(g, g.embedding(&w, &ids))?,
                        &Cpu.embedding(&Cpu.weight(t)?, &ids)?,
                    )
                },
            );
        }
        c.expect(
            "errors",
            format!("{path} embedding: id 41 of 41 rows"),
            || match g.weight(&t32) {
                Ok(w) => is_invalid(g.embedding(&w, &[41])),
                Err(e) => Err(e.to_string()),
            },
        );
    }
}

/// `x [rows, inp] . w^T (+ b)` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_dense<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    f16: bool,
    bias: bool,
    seed: u64,
) {
    let mut r = rng(seed);
    let x = random(&mut r, rows, inp, 1.0);
    let mut w = random(&mut r, out, inp, 0.5);
    if f16 {
        w = to_f16(&w);
    }
    let b = random(&mut r, 1, out, 0.5);
    let kind = if rows <= B::GEMV_MAX_ROWS {
        "GEMV"
    } else {
        "GEMM"
    };
    let dtype = if f16 { "f16" } else { "f32" };
    c.measure(
        "linear_dense",
        format!("{label} dense {dtype} {kind} rows {rows} [{out}, {inp}] bias {bias}"),
        B::TOL.linear as f64,
        || {
            let gw = g.weight(&w)?;
            if B::weight_is_f16(&gw) != f16 {
                return Err(Error::invalid(format!(
                    "stored as f16 {}, expected {f16}",
                    B::weight_is_f16(&gw)
                )));
            }
            let gb = up(g, &b)?;
            let got = down(g, g.linear(&up(g, &x)?, &gw, bias.then_some(&gb)))?;
            let want = Cpu.linear(&x, &Cpu.weight(&w)?, bias.then_some(&b))?;
            close(&got, &want)
        },
    );
}

pub fn linear_dense_gemv_and_gemm<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for f16 in [false, true] {
            // GEMV at 64, 128 and 256 threads (k / 8 = 6, 75, 263 blocks;
            // CUDA's vector and scalar paths: in % 8), the last GEMV row
            // count and one more, then GEMMs of one and several tiles.
            for &(rows, out, inp) in &[
                (1, 37, 45),
                (1, 131, 600),
                (1, 13, 2100),
                (m, 37, 48),
                (m + 1, 37, 45),
                (7, 37, 45),
                (70, 131, 83),
            ] {
                for bias in [false, true] {
                    check_dense(c, path, g, rows, out, inp, f16, bias, 10 + rows as u64);
                }
            }
        }
    }
}

/// A packed linear `[out, inp]` at `bits` / `group` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_packed<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    bits: u32,
    group: usize,
    bias: bool,
) {
    let mut r = rng(100 + bits as u64 * 7 + group as u64 + rows as u64);
    let x = random(&mut r, rows, inp, 1.0);
    let w = random(&mut r, out, inp, 0.5);
    let b = random(&mut r, 1, out, 0.5);
    let kind = if rows <= B::GEMV_MAX_ROWS {
        "GEMV"
    } else {
        "GEMM"
    };
    c.measure(
        "linear_packed",
        format!("{label} packed W{bits} g{group} {kind} rows {rows} [{out}, {inp}] bias {bias}"),
        B::TOL.linear as f64,
        || {
            let p = quantize_linear("w", &w.data, out, inp, bits, group)?;
            let gw = g.packed_weight(&p)?;
            if !B::weight_is_packed(&gw) {
                return Err(Error::invalid("the weight was not kept packed"));
            }
            let gb = up(g, &b)?;
            let got = down(g, g.linear(&up(g, &x)?, &gw, bias.then_some(&gb)))?;
            let want = Cpu.linear(&x, &Cpu.packed_weight(&p)?, bias.then_some(&b))?;
            close(&got, &want)
        },
    );
}

/// The packed GEMV at W3 / W4 / W8 in groups of 32 / 64 / 128, at one row
/// and at the last GEMV row count, then at 128 and 256 threads (k / 32 =
/// 80 and 384 blocks).
pub fn packed_gemv_every_format<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(c, path, g, 1, 37, 384, bits, group, group == 64);
                check_packed(c, path, g, m, 9, 1152, bits, group, group != 64);
            }
        }
        check_packed(c, path, g, 1, 21, 2560, 3, 128, true);
        check_packed(c, path, g, 1, 13, 12288, 4, 64, false);
    }
}

/// The packed prefill GEMM at every format, then several tiles in both
/// directions.
pub fn packed_prefill_every_format<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(c, path, g, 5, 37, 384, bits, group, group == 32);
            }
        }
        check_packed(c, path, g, 67, 131, 256, 3, 128, true);
    }
}

pub fn attention_non_causal<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    for &(n, heads, kv_heads, d) in &[(13, 4, 2, 10), (150, 3, 3, 72), (5, 2, 1, 256)] {
        let mut r = rng(20 + n as u64);
        let q = random(&mut r, n, heads * d, 1.0);
        let k = random(&mut r, n, kv_heads * d, 1.0);
        let v = random(&mut r, n, kv_heads * d, 1.0);
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
        };
        for &(path, g) in paths {
            c.measure(
                "attention",
                format!("{path} attention n {n} heads {heads}/{kv_heads} d {d}"),
                B::TOL.attn as f64,
                || {
                    close(
                        &down(g, g.attention(&up(g, &q)?, &up(g, &k)?, &up(g, &v)?, shape))?,
                        &Cpu.attention(&q, &k, &v, shape)?,
                    )
                },
            );
        }
    }
}

/// A 71-token prefill (two key blocks), a 3-token chunk, then 3
/// single-token steps, on two layers; past the capacity is an error.
pub fn attention_cached_prefill_then_decode<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let (heads, kv_heads, d, layers, cap) = (4, 2, 12, 2, 90);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale: (d as f32).powf(-0.5),
    };
    for &(path, g) in paths {
        let mut r = rng(30);
        let caches = g
            .new_cache(layers, kv_heads * d, cap)
            .and_then(|gc| Ok((gc, Cpu.new_cache(layers, kv_heads * d, cap)?)));
        let (mut gc, mut cc) = match caches {
            Ok(x) => x,
            Err(e) => {
                c.error("attention_cached", format!("{path} new_cache"), e);
                continue;
            }
        };
        let mut pos = 0;
        for n in [71, 3, 1, 1, 1] {
            let step = if n == 1 { "decode" } else { "prefill" };
            for layer in 0..layers {
                let q = random(&mut r, n, heads * d, 1.0);
                let k = random(&mut r, n, kv_heads * d, 1.0);
                let v = random(&mut r, n, kv_heads * d, 1.0);
                c.measure(
                    "attention_cached",
                    format!("{path} attention_cached {step} n {n} at {pos}, layer {layer}"),
                    B::TOL.attn as f64,
                    || {
                        let got = g.attention_cached(
                            &up(g, &q)?,
                            &up(g, &k)?,
                            &up(g, &v)?,
                            &mut gc,
                            layer,
                            pos,
                            shape,
                        );
                        let got = down(g, got)?;
                        let want = Cpu.attention_cached(&q, &k, &v, &mut cc, layer, pos, shape)?;
                        close(&got, &want)
                    },
                );
            }
            pos += n;
        }
        // Past the capacity: an error, not a panic.
        let q = random(&mut r, 1, heads * d, 1.0);
        let k = random(&mut r, 1, kv_heads * d, 1.0);
        c.expect(
            "errors",
            format!("{path} attention_cached past the capacity {cap}"),
            || match (up(g, &q), up(g, &k)) {
                (Ok(gq), Ok(gk)) => {
                    is_err(g.attention_cached(&gq, &gk, &gk, &mut gc, 0, cap, shape))
                }
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

/// Mismatched shapes and a 3-d weight are errors, not panics.
pub fn shape_errors_are_errors<B: Device>(c: &mut Checks, path: &str, g: &B) {
    let mut r = rng(40);
    let a = random(&mut r, 3, 5, 1.0);
    let b = random(&mut r, 3, 6, 1.0);
    let w = random(&mut r, 4, 7, 1.0);
    c.expect("errors", format!("{path} add [3, 5] + [3, 6]"), || {
        match (up(g, &a), up(g, &b)) {
            (Ok(ga), Ok(gb)) => is_invalid(g.add(&ga, &gb)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        }
    });
    c.expect(
        "errors",
        format!("{path} linear [3, 5] by [4, 7]"),
        || match (up(g, &a), g.weight(&w)) {
            (Ok(ga), Ok(gw)) => is_invalid(g.linear(&ga, &gw, None)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        },
    );
    c.expect("errors", format!("{path} a 3-d weight"), || {
        is_err(g.weight(&Tensor::zeros(vec![2, 3, 4])))
    });
}

/// Per-token INT8 fake quantization against the CPU, with a zero row and
/// values exactly on .5 boundaries of a row's grid. The measured error is
/// the fraction of values one quantization step off; a value further off
/// (beyond `act_quant_same` and one step) fails the case.
pub fn act_quant_int8_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL;
    let mut r = rng(11);
    for (rows, cols, scale) in [(7, 129, 3.0), (1, 300, 0.02), (33, 45, 40.0), (3, 1, 1.0)] {
        let mut x = random(&mut r, rows, cols, scale);
        if rows > 2 {
            x.data[cols..2 * cols].iter_mut().for_each(|v| *v = 0.0);
            let row = &mut x.data[2 * cols..3 * cols];
            row[0] = 127.0;
            for (i, v) in row.iter_mut().enumerate().skip(1) {
                *v = ((i % 50) as f32 - 25.0) + 0.5;
            }
        }
        for &(path, g) in paths {
            c.measure(
                "quant_act_int8",
                format!("{path} quant_act_int8 [{rows}, {cols}] (fraction one step off)"),
                tol.act_quant_max_step_fraction,
                || {
                    let want = Cpu.quant_act_int8(&x)?;
                    let got = down(g, g.quant_act_int8(&up(g, &x)?))?;
                    if got.shape != want.shape {
                        return Err(Error::invalid(format!(
                            "shape {:?}, the CPU's {:?}",
                            got.shape, want.shape
                        )));
                    }
                    let mut steps = 0usize;
                    for (ri, (gr, wr)) in got
                        .data
                        .chunks(cols)
                        .zip(want.data.chunks(cols))
                        .enumerate()
                    {
                        let xr = &x.data[ri * cols..(ri + 1) * cols];
                        let max = xr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let step = max.max(1e-5) / 127.0;
                        for (i, (a, b)) in gr.iter().zip(wr).enumerate() {
                            let d = (a - b).abs();
                            if d <= tol.act_quant_same * max {
                                continue;
                            }
                            if d.is_nan() || d > step * (1.0 + 1e-5) {
                                return Err(Error::invalid(format!(
                                    "at [{ri}, {i}]: x {} device {a} cpu {b} (step {step})",
                                    xr[i]
                                )));
                            }
                            steps += 1;
                        }
                    }
                    Ok(steps as f64 / (rows * cols) as f64)
                },
            );
        }
    }
}

/// Zero points of a random W4A8-style packed weight.
#[derive(Clone, Copy, Debug)]
pub enum Zeros {
    /// 8 everywhere, as `quant::w4a8` writes.
    Eight,
    /// A random integer in 0..=15 per group (asymmetric RTN-style).
    Random,
    /// 7.5: not an integer, so an integer path must not take it.
    Half,
}

/// A 4-bit packed `[out, inp]` with random codes, random per-group f16
/// scales (spanning 0.002..0.05) and `zeros`.
pub fn w4_random(
    seed: u64,
    out: usize,
    inp: usize,
    group: usize,
    zeros: Zeros,
) -> Result<PackedLinear> {
    let mut r = rng(seed);
    let codes: Vec<u8> = (0..out * inp).map(|_| r.random_range(0..16u8)).collect();
    let mut sz = Vec::with_capacity(out * inp / group * 2);
    for _ in 0..out * inp / group {
        sz.push(half::f16::from_f32(r.random_range(0.002f32..0.05)));
        sz.push(half::f16::from_f32(match zeros {
            Zeros::Eight => 8.0,
            Zeros::Random => r.random_range(0..16u8) as f32,
            Zeros::Half => 7.5,
        }));
    }
    PackedLinear::from_codes("w4a8", out, inp, 4, group, &codes, sz)
}

/// `linear_a8` of `x` by `p` on `g` against the CPU reference (fake-quantized
/// INT8 activations, then the packed f32 product), recorded as one
/// `linear_a8` check; returns whether an integer path ran
/// ([`Device::integer_a8_linears`] moved). `integer`: whether it must
/// (`None`: no expectation).
pub fn check_linear_a8<B: Device>(
    c: &mut Checks,
    what: &str,
    g: &B,
    x: &Tensor,
    p: &PackedLinear,
    b: Option<&Tensor>,
    integer: Option<bool>,
) -> bool {
    let tol = B::TOL;
    let mut ran = false;
    let mut note = String::new();
    let before = g.integer_a8_linears();
    let mut measured = || -> Result<(f64, f64)> {
        let gw = g.packed_weight(p)?;
        let gb = b.map(|b| up(g, b)).transpose()?;
        let got = down(g, g.linear_a8(&up(g, x)?, &gw, gb.as_ref()))?;
        ran = g.integer_a8_linears() > before;
        let cw = Cpu.packed_weight(p)?;
        // The fake-quant path is the float packed product (zero point
        // folded per block: more rounding, `linear`).
        let tol = if ran { tol.w4a8_int } else { tol.linear } as f64;
        // The reference on the device's own INT8 grid (the same
        // quantization as the integer path): equal to the CPU's unless the
        // device divides less exactly (see `act_quant_same`); then a value
        // may sit one step off.
        let gq = down(g, g.quant_act_int8(&up(g, x)?))?;
        let cq = Cpu.quant_act_int8(x)?;
        if gq.data == cq.data {
            Ok((close(&got, &Cpu.linear_a8(x, &cw, b)?)?, tol))
        } else {
            let off = gq.data.iter().zip(&cq.data).filter(|(a, b)| a != b).count();
            note = format!(
                "{off} INT8 activations differ from the CPU's; compared on the device's grid"
            );
            Ok((close(&got, &Cpu.linear(&gq, &cw, b)?)?, tol))
        }
    };
    let r = measured();
    let path = if ran { "integer" } else { "fake-quant" };
    let case = format!("{what} ({path})");
    match r {
        Ok((e, t)) => {
            let mut note = note;
            let mut ok = e <= t;
            if let Some(want) = integer {
                if want != ran {
                    ok = false;
                    note = format!("the integer path ran {ran}, expected {want}");
                }
            }
            c.results.push(OpCheck {
                family: "linear_a8",
                case,
                err: Some(e),
                tol: t,
                ok,
                note,
            });
        }
        Err(e) => c.error("linear_a8", case, e),
    }
    ran
}

/// One W4A8 case: a [`w4_random`] weight, activations with an outlier per
/// row (as LLM activations have); returns whether an integer path ran.
#[allow(clippy::too_many_arguments)]
pub fn check_w4a8<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    group: usize,
    zeros: Zeros,
    bias: bool,
    integer: Option<bool>,
) -> bool {
    let seed = (rows * 1000 + out * 7 + inp * 3 + group) as u64;
    let what =
        format!("{label} W4A8 rows {rows} [{out}, {inp}] g{group} zeros {zeros:?} bias {bias}");
    let p = match w4_random(seed, out, inp, group, zeros) {
        Ok(p) => p,
        Err(e) => {
            c.error("linear_a8", what, e);
            return false;
        }
    };
    let mut r = rng(seed + 1);
    let mut x = random(&mut r, rows, inp, 2.0);
    for row in x.data.chunks_mut(inp) {
        row[(seed as usize) % inp] = 30.0;
    }
    let b = random(&mut r, 1, out, 0.5);
    check_linear_a8(c, &what, g, &x, &p, bias.then_some(&b), integer)
}

/// W4A8 (`linear_a8`) against the CPU on GEMV and prefill shapes, every
/// group size, zero kind and bias. `paths` name, with each backend,
/// whether its integer path must run on integer zero points (never on
/// non-integer ones).
pub fn w4a8_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B, bool)]) {
    for &(path, g, integer) in paths {
        let want = Some(integer);
        for rows in [1, 3, 7] {
            for (ii, inp) in [128, 384, 2560].into_iter().enumerate() {
                for (oi, out) in [1, 67, 300].into_iter().enumerate() {
                    let group = [32, 64, 128][(rows + ii + oi) % 3];
                    let zeros = [Zeros::Eight, Zeros::Random][(ii + oi) % 2];
                    let bias = (rows + oi) % 2 == 0;
                    check_w4a8(c, path, g, rows, out, inp, group, zeros, bias, want);
                }
            }
        }
        // Every group size, zero kind and bias on one shape.
        for group in [32, 64, 128] {
            for zeros in [Zeros::Eight, Zeros::Random] {
                for bias in [false, true] {
                    for rows in [1, 5] {
                        check_w4a8(c, path, g, rows, 67, 384, group, zeros, bias, want);
                    }
                }
            }
        }
        // Non-integer zero points: never the integer path, still correct.
        check_w4a8(c, path, g, 3, 67, 384, 64, Zeros::Half, true, Some(false));
        // Several token tiles of a prefill kernel (T = 4) and row blocks.
        check_w4a8(c, path, g, 19, 131, 256, 128, Zeros::Random, true, want);
        // An RTN-quantized weight (`quantize_linear`, W4 g128).
        let mut r = rng(12);
        let w = random(&mut r, 67, 384, 0.5);
        match quantize_linear("w", &w.data, 67, 384, 4, 128) {
            Ok(p) => {
                for rows in [1, 7] {
                    let x = random(&mut r, rows, 384, 2.0);
                    let what = format!("{path} RTN W4 g128 linear_a8 rows {rows} [67, 384]");
                    check_linear_a8(c, &what, g, &x, &p, None, None);
                }
            }
            Err(e) => c.error("linear_a8", format!("{path} RTN W4 g128"), e),
        }
    }
}

/// Products on a backend that splits weights across bindings (wgpu with a
/// small `max_binding`): dense f32 / f16, packed W3 / W8 and W4A8, each
/// weight in several chunks, GEMV and GEMM. `integer`: whether W4A8 runs
/// in integers on `g`.
pub fn split_weights<B: Device>(c: &mut Checks, path: &str, g: &B, integer: bool) {
    let mut r = rng(11);
    let w = random(&mut r, 37, 45, 0.5);
    let mut rr = rng(7);
    let pw = random(&mut rr, 37, 384, 0.5);
    let t32 = embedding_table();
    c.expect(
        "errors",
        format!("{path}: weights split into several bindings"),
        || {
            let chunks = |r: Result<B::Weight>| r.map(|w| B::weight_chunks(&w));
            let n = [
                chunks(g.weight(&w)),
                chunks(g.weight(&t32)),
                chunks(g.weight(&to_f16(&t32))),
                quantize_linear("w", &pw.data, 37, 384, 4, 128)
                    .and_then(|p| chunks(g.packed_weight(&p))),
                w4_random(1, 67, 384, 64, Zeros::Eight).and_then(|p| chunks(g.packed_weight(&p))),
            ];
            for k in n {
                match k {
                    Ok(k) if k > 1 => {}
                    Ok(k) => return Err(format!("a weight in {k} binding(s), expected several")),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        },
    );
    embedding_f16_and_f32(c, &[(path, g)]);
    for rows in [1, 9] {
        for f16 in [false, true] {
            check_dense(c, path, g, rows, 37, 45, f16, true, 12);
        }
    }
    for rows in [1, 6] {
        for bits in [3, 8] {
            check_packed(c, path, g, rows, 37, 384, bits, 64, true);
        }
        check_w4a8(
            c,
            path,
            g,
            rows,
            67,
            384,
            64,
            Zeros::Random,
            true,
            Some(integer),
        );
    }
}

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
    if let Some((path, g)) = split {
        split_weights(&mut c, path, g, g.integer_a8());
    }
    c
}
