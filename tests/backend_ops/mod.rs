//! The op suite every device backend runs: each op of [`Backend`] against
//! the CPU reference ([`Cpu`]) on random inputs with odd shapes (not
//! multiples of a workgroup size or of 4), written once and generic over
//! the backend. tests/wgpu_ops.rs and tests/cuda_ops.rs instantiate it (one
//! `#[test]` per op family) and keep only their backend's own tests.
//!
//! Every check takes `paths`, the configurations of one backend to run it
//! on, named (wgpu: the subgroup and workgroup-memory reductions; CUDA: the
//! cuBLAS and gemm.cu prefill GEMMs), and compares each to the CPU with the
//! backend's [`Tolerances`]: the one table of them is below.
#![allow(dead_code)]

use mbq::backend::cpu::Cpu;
use mbq::backend::{AttnShape, Backend, Rope};
use mbq::config::Act;
use mbq::error::Error;
use mbq::quant::format::PackedLinear;
use mbq::quant::pseudo::quantize_linear;
use mbq::tensor::Tensor;
use rand::Rng;

// A test crate may load this through several helper modules (common,
// wgpu_common / cuda_common, backend_ops): harmless copies of free functions.
#[allow(clippy::duplicate_mod)]
#[path = "../op_check/mod.rs"]
mod op_check;
#[allow(unused_imports)]
pub use op_check::*;

/// How far a backend may be from the CPU reference, per op family. One
/// table for every backend: [`Tolerances::DEFAULT`], and per backend
/// ([`Tolerances::WGPU`], [`Tolerances::CUDA`]) only the overrides a
/// comment justifies.
#[derive(Clone, Copy, Debug)]
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
    /// How many W4A8 linears ran in integers so far (0 where the backend
    /// has only the trait's fake-quant `linear_a8`).
    fn integer_a8_linears(&self) -> usize {
        0
    }
}

impl Device for mbq::backend::wgpu::Wgpu {
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
        matches!(w, mbq::backend::wgpu::WgpuWeight::Packed { .. })
    }
    fn integer_a8_linears(&self) -> usize {
        self.dot4_linears()
    }
}

#[cfg(feature = "cuda")]
impl Device for mbq::backend::cuda::Cuda {
    const TOL: Tolerances = Tolerances::CUDA;
    const GEMV_MAX_ROWS: usize = mbq::backend::cuda::GEMV_MAX_ROWS;
    fn weight_is_f16(w: &Self::Weight) -> bool {
        w.is_f16()
    }
    fn weight_is_packed(w: &Self::Weight) -> bool {
        w.is_packed()
    }
}

pub fn up<B: Backend>(g: &B, t: &Tensor) -> B::Tensor {
    g.upload(t).unwrap()
}

pub fn down<B: Backend>(g: &B, t: &B::Tensor) -> Tensor {
    g.download(t).unwrap()
}

const ACTS: [Act; 5] = [
    Act::Gelu,
    Act::GeluTanh,
    Act::QuickGelu,
    Act::Silu,
    Act::Relu,
];

/// add, then every activation alone and gated, per value.
pub fn add_act_gated<B: Device>(paths: &[(&str, &B)]) {
    let tol = B::TOL;
    let mut r = rng(1);
    let a = random(&mut r, 7, 37, 6.0);
    let b = random(&mut r, 7, 37, 2.0);
    for &(path, g) in paths {
        let (ga, gb) = (up(g, &a), up(g, &b));
        assert_close(
            &format!("{path} add"),
            &down(g, &g.add(&ga, &gb).unwrap()),
            &Cpu.add(&a, &b).unwrap(),
            tol.add,
        );
        for act in ACTS {
            for (op, got, want) in [
                (
                    "act",
                    down(g, &g.act(&ga, act).unwrap()),
                    Cpu.act(&a, act).unwrap(),
                ),
                (
                    "gated",
                    down(g, &g.gated(&ga, &gb, act).unwrap()),
                    Cpu.gated(&a, &b, act).unwrap(),
                ),
            ] {
                for (i, (x, (u, v))) in a
                    .data
                    .iter()
                    .zip(got.data.iter().zip(&want.data))
                    .enumerate()
                {
                    let scale = if op == "gated" {
                        b.data[i].abs().max(1.0)
                    } else {
                        1.0
                    };
                    assert!(
                        (u - v).abs() <= tol.act * x.abs().max(1.0) * scale,
                        "{path} {op} {act:?}({x}): gpu {u} cpu {v}"
                    );
                }
            }
        }
    }
}

/// Every smooth activation over [-10, 10] in steps of 0.005: the worst
/// |gpu - cpu| / max(1, |x|) within the activation tolerance.
pub fn acts_over_a_dense_range<B: Device>(paths: &[(&str, &B)]) {
    let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
    let x = Tensor::new(vec![1, xs.len()], xs.clone()).unwrap();
    for &(path, g) in paths {
        for act in [Act::Gelu, Act::GeluTanh, Act::QuickGelu, Act::Silu] {
            let got = down(g, &g.act(&up(g, &x), act).unwrap());
            let want = Cpu.act(&x, act).unwrap();
            let worst = xs
                .iter()
                .zip(got.data.iter().zip(&want.data))
                .map(|(x, (u, v))| (u - v).abs() / x.abs().max(1.0))
                .fold(0.0f32, f32::max);
            println!("{path} {act:?}: worst |gpu - cpu| / max(1, |x|) = {worst:.2e}");
            assert!(worst <= B::TOL.act, "{path} {act:?}: {worst}");
        }
    }
}

/// Columns divided by per-column scales (the search's W4A8 `X / s`); a
/// scale vector of the wrong length is an error.
pub fn div_cols<B: Device>(paths: &[(&str, &B)]) {
    let mut r = rng(21);
    let x = random(&mut r, 9, 37, 5.0);
    let s: Vec<f32> = (0..37).map(|_| r.random_range(0.05f32..8.0)).collect();
    let s = Tensor::new(vec![37], s).unwrap();
    let short = Tensor::new(vec![36], vec![1.0; 36]).unwrap();
    for &(path, g) in paths {
        let (gx, gs) = (up(g, &x), up(g, &s));
        assert_close(
            &format!("{path} div_cols"),
            &down(g, &g.div_cols(&gx, &gs).unwrap()),
            &Cpu.div_cols(&x, &s).unwrap(),
            B::TOL.div_cols,
        );
        assert!(matches!(
            g.div_cols(&gx, &up(g, &short)),
            Err(Error::Invalid(_))
        ));
    }
    assert!(matches!(Cpu.div_cols(&x, &short), Err(Error::Invalid(_))));
}

pub fn layer_norm_and_rms_norm<B: Device>(paths: &[(&str, &B)]) {
    let mut r = rng(2);
    for (rows, cols) in [(5, 300), (3, 33), (1, 7), (2, 4099)] {
        let x = random(&mut r, rows, cols, 3.0);
        let w = random(&mut r, 1, cols, 1.5);
        let b = random(&mut r, 1, cols, 0.5);
        for &(path, g) in paths {
            let (gx, gw, gb) = (up(g, &x), up(g, &w), up(g, &b));
            assert_close(
                &format!("{path} layer_norm [{rows}, {cols}]"),
                &down(g, &g.layer_norm(&gx, &gw, &gb, 1e-5).unwrap()),
                &Cpu.layer_norm(&x, &w, &b, 1e-5).unwrap(),
                B::TOL.norm,
            );
            assert_close(
                &format!("{path} rms_norm [{rows}, {cols}]"),
                &down(g, &g.rms_norm(&gx, &gw, 1e-6).unwrap()),
                &Cpu.rms_norm(&x, &w, 1e-6).unwrap(),
                B::TOL.norm,
            );
        }
    }
}

/// The row copies, an empty slice, and out-of-range rows as errors.
pub fn rows_set_rows_concat_rows<B: Device>(paths: &[(&str, &B)]) {
    let tol = B::TOL.copy;
    let mut r = rng(3);
    let x = random(&mut r, 9, 13, 1.0);
    let s = random(&mut r, 3, 13, 1.0);
    for &(path, g) in paths {
        let (gx, gs) = (up(g, &x), up(g, &s));
        assert_close(
            &format!("{path} rows"),
            &down(g, &g.rows(&gx, 2, 5).unwrap()),
            &Cpu.rows(&x, 2, 5).unwrap(),
            tol,
        );
        assert_close(
            &format!("{path} concat_rows"),
            &down(g, &g.concat_rows(&gs, &gx).unwrap()),
            &Cpu.concat_rows(&s, &x).unwrap(),
            tol,
        );
        let mut gx2 = up(g, &x);
        g.set_rows(&mut gx2, 5, &gs).unwrap();
        let mut x2 = x.clone();
        Cpu.set_rows(&mut x2, 5, &s).unwrap();
        assert_close(&format!("{path} set_rows"), &down(g, &gx2), &x2, tol);
        // Empty slices and out of range: no panic; errors are errors.
        assert_eq!(g.dims(&g.rows(&gx, 9, 0).unwrap()), (0, 13), "{path}");
        assert!(matches!(g.rows(&gx, 7, 5), Err(Error::Invalid(_))));
        assert!(g.set_rows(&mut gx2, 8, &gs).is_err());
    }
}

/// RoPE at three head layouts (an odd head_dim among them) and positions.
pub fn rope_matches<B: Device>(paths: &[(&str, &B)]) {
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
                let e = g.rope(&up(g, &x), heads, &rope, 0);
                assert!(matches!(e, Err(Error::Invalid(_))), "{path} rope d {d}");
                continue;
            }
            for pos0 in [0, 17, 4093] {
                assert_close(
                    &format!("{path} rope heads {heads} d {d} pos0 {pos0}"),
                    &down(g, &g.rope(&up(g, &x), heads, &rope, pos0).unwrap()),
                    &Cpu.rope(&x, heads, &rope, pos0).unwrap(),
                    B::TOL.rope,
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
pub fn embedding_f16_and_f32<B: Device>(paths: &[(&str, &B)]) {
    let t32 = embedding_table();
    let t16 = to_f16(&t32);
    let ids = [0u32, 40, 7, 7, 23, 1];
    for &(path, g) in paths {
        for (name, t) in [("f32", &t32), ("f16", &t16)] {
            let w = g.weight(t).unwrap();
            assert_eq!(B::weight_is_f16(&w), name == "f16", "{path} {name} storage");
            let cw = Cpu.weight(t).unwrap();
            assert_close(
                &format!("{path} embedding {name}"),
                &down(g, &g.embedding(&w, &ids).unwrap()),
                &Cpu.embedding(&cw, &ids).unwrap(),
                B::TOL.copy,
            );
        }
        let w = g.weight(&t32).unwrap();
        assert!(matches!(g.embedding(&w, &[41]), Err(Error::Invalid(_))));
    }
}

/// `x [rows, inp] . w^T (+ b)` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_dense<B: Device>(
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
    let gw = g.weight(&w).unwrap();
    assert_eq!(B::weight_is_f16(&gw), f16);
    let gb = up(g, &b);
    let got = g
        .linear(&up(g, &x), &gw, bias.then_some(&gb))
        .and_then(|y| g.download(&y))
        .unwrap();
    let want = Cpu
        .linear(&x, &Cpu.weight(&w).unwrap(), bias.then_some(&b))
        .unwrap();
    assert_close(
        &format!("{label} dense rows {rows} [{out}, {inp}] f16 {f16} bias {bias}"),
        &got,
        &want,
        B::TOL.linear,
    );
}

pub fn linear_dense_gemv_and_gemm<B: Device>(paths: &[(&str, &B)]) {
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
                    check_dense(path, g, rows, out, inp, f16, bias, 10 + rows as u64);
                }
            }
        }
    }
}

/// A packed linear `[out, inp]` at `bits` / `group` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_packed<B: Device>(
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
    let p = quantize_linear("w", &w.data, out, inp, bits, group).unwrap();
    let gw = g.packed_weight(&p).unwrap();
    assert!(B::weight_is_packed(&gw), "{label}: kept packed");
    let gb = up(g, &b);
    let got = g
        .linear(&up(g, &x), &gw, bias.then_some(&gb))
        .and_then(|y| g.download(&y))
        .unwrap();
    let want = Cpu
        .linear(&x, &Cpu.packed_weight(&p).unwrap(), bias.then_some(&b))
        .unwrap();
    assert_close(
        &format!("{label} packed W{bits} g{group} rows {rows} [{out}, {inp}] bias {bias}"),
        &got,
        &want,
        B::TOL.linear,
    );
}

/// The packed GEMV at W3 / W4 / W8 in groups of 32 / 64 / 128, at one row
/// and at the last GEMV row count, then at 128 and 256 threads (k / 32 =
/// 80 and 384 blocks).
pub fn packed_gemv_every_format<B: Device>(paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(path, g, 1, 37, 384, bits, group, group == 64);
                check_packed(path, g, m, 9, 1152, bits, group, group != 64);
            }
        }
        check_packed(path, g, 1, 21, 2560, 3, 128, true);
        check_packed(path, g, 1, 13, 12288, 4, 64, false);
    }
}

/// The packed prefill GEMM at every format, then several tiles in both
/// directions.
pub fn packed_prefill_every_format<B: Device>(paths: &[(&str, &B)]) {
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(path, g, 5, 37, 384, bits, group, group == 32);
            }
        }
        check_packed(path, g, 67, 131, 256, 3, 128, true);
    }
}

pub fn attention_non_causal<B: Device>(paths: &[(&str, &B)]) {
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
            assert_close(
                &format!("{path} attention n {n} heads {heads}/{kv_heads} d {d}"),
                &down(
                    g,
                    &g.attention(&up(g, &q), &up(g, &k), &up(g, &v), shape)
                        .unwrap(),
                ),
                &Cpu.attention(&q, &k, &v, shape).unwrap(),
                B::TOL.attn,
            );
        }
    }
}

/// A 71-token prefill (two key blocks), a 3-token chunk, then 3
/// single-token steps, on two layers; past the capacity is an error.
pub fn attention_cached_prefill_then_decode<B: Device>(paths: &[(&str, &B)]) {
    let (heads, kv_heads, d, layers, cap) = (4, 2, 12, 2, 90);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale: (d as f32).powf(-0.5),
    };
    for &(path, g) in paths {
        let mut r = rng(30);
        let mut gc = g.new_cache(layers, kv_heads * d, cap).unwrap();
        let mut cc = Cpu.new_cache(layers, kv_heads * d, cap).unwrap();
        let mut pos = 0;
        for n in [71, 3, 1, 1, 1] {
            for layer in 0..layers {
                let q = random(&mut r, n, heads * d, 1.0);
                let k = random(&mut r, n, kv_heads * d, 1.0);
                let v = random(&mut r, n, kv_heads * d, 1.0);
                let got = g
                    .attention_cached(
                        &up(g, &q),
                        &up(g, &k),
                        &up(g, &v),
                        &mut gc,
                        layer,
                        pos,
                        shape,
                    )
                    .unwrap();
                let want = Cpu
                    .attention_cached(&q, &k, &v, &mut cc, layer, pos, shape)
                    .unwrap();
                assert_close(
                    &format!("{path} cached attention n {n} at {pos}, layer {layer}"),
                    &down(g, &got),
                    &want,
                    B::TOL.attn,
                );
            }
            pos += n;
        }
        // Past the capacity: an error, not a panic.
        let q = random(&mut r, 1, heads * d, 1.0);
        let k = random(&mut r, 1, kv_heads * d, 1.0);
        let (gq, gk) = (up(g, &q), up(g, &k));
        assert!(g
            .attention_cached(&gq, &gk, &gk, &mut gc, 0, cap, shape)
            .is_err());
    }
}

/// Mismatched shapes and a 3-d weight are errors, not panics.
pub fn shape_errors_are_errors<B: Device>(g: &B) {
    let mut r = rng(40);
    let a = up(g, &random(&mut r, 3, 5, 1.0));
    let b = up(g, &random(&mut r, 3, 6, 1.0));
    assert!(matches!(g.add(&a, &b), Err(Error::Invalid(_))));
    let w = g.weight(&random(&mut r, 4, 7, 1.0)).unwrap();
    assert!(matches!(g.linear(&a, &w, None), Err(Error::Invalid(_))));
    assert!(g.weight(&Tensor::zeros(vec![2, 3, 4])).is_err());
}

/// Per-token INT8 fake quantization against the CPU, with a zero row and
/// values exactly on .5 boundaries of a row's grid.
pub fn act_quant_int8_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
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
        let want = Cpu.quant_act_int8(&x).unwrap();
        for &(path, g) in paths {
            let got = down(g, &g.quant_act_int8(&up(g, &x)).unwrap());
            assert_eq!(got.shape, want.shape);
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
                    assert!(
                        d <= step * (1.0 + 1e-5),
                        "{path} [{rows}, {cols}] at [{ri}, {i}]: x {} gpu {a} cpu {b} (step {step})",
                        xr[i]
                    );
                    steps += 1;
                }
            }
            let frac = steps as f64 / (rows * cols) as f64;
            println!("{path} act_quant [{rows}, {cols}]: {steps} values one step off");
            assert!(
                frac <= tol.act_quant_max_step_fraction,
                "{path} [{rows}, {cols}]: {steps} values one step off"
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
pub fn w4_random(seed: u64, out: usize, inp: usize, group: usize, zeros: Zeros) -> PackedLinear {
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
    PackedLinear::from_codes("w4a8", out, inp, 4, group, &codes, sz).unwrap()
}

/// `linear_a8` of `x` by `p` on `g` against the CPU reference (fake-quantized
/// INT8 activations, then the packed f32 product); returns whether an
/// integer path ran ([`Device::integer_a8_linears`] moved).
pub fn check_linear_a8<B: Device>(
    what: &str,
    g: &B,
    x: &Tensor,
    p: &PackedLinear,
    b: Option<&Tensor>,
) -> bool {
    let tol = B::TOL;
    let gw = g.packed_weight(p).unwrap();
    let gb = b.map(|b| up(g, b));
    let before = g.integer_a8_linears();
    let got = g
        .linear_a8(&up(g, x), &gw, gb.as_ref())
        .and_then(|y| g.download(&y))
        .unwrap();
    let ran = g.integer_a8_linears() > before;
    let cw = Cpu.packed_weight(p).unwrap();
    let want = Cpu.linear_a8(x, &cw, b).unwrap();
    // The reference on the device's own INT8 grid (the same quantization
    // as the integer path): equal to the CPU's unless the device divides
    // less exactly (see `act_quant_same`); then a value may sit one step off.
    let gq = down(g, &g.quant_act_int8(&up(g, x)).unwrap());
    let cq = Cpu.quant_act_int8(x).unwrap();
    let what = format!("{what} (integer {ran})");
    // The fake-quant path is the float packed product (zero point folded
    // per block: more rounding, `linear`).
    let tol = if ran { tol.w4a8_int } else { tol.linear };
    if gq.data == cq.data {
        assert_close(&what, &got, &want, tol);
    } else {
        let off = gq.data.iter().zip(&cq.data).filter(|(a, b)| a != b).count();
        println!(
            "{what}: {off} INT8 activations differ from the CPU's; comparing on the device's grid"
        );
        let want_dev = Cpu.linear(&gq, &cw, b).unwrap();
        assert_close(&what, &got, &want_dev, tol);
    }
    ran
}

/// One W4A8 case: a [`w4_random`] weight, activations with an outlier per
/// row (as LLM activations have); returns whether an integer path ran.
#[allow(clippy::too_many_arguments)]
pub fn check_w4a8<B: Device>(
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    group: usize,
    zeros: Zeros,
    bias: bool,
) -> bool {
    let seed = (rows * 1000 + out * 7 + inp * 3 + group) as u64;
    let p = w4_random(seed, out, inp, group, zeros);
    let mut r = rng(seed + 1);
    let mut x = random(&mut r, rows, inp, 2.0);
    for row in x.data.chunks_mut(inp) {
        row[(seed as usize) % inp] = 30.0;
    }
    let b = random(&mut r, 1, out, 0.5);
    check_linear_a8(
        &format!("{label} W4A8 rows {rows} [{out}, {inp}] g{group} zeros {zeros:?} bias {bias}"),
        g,
        &x,
        &p,
        bias.then_some(&b),
    )
}

/// W4A8 (`linear_a8`) against the CPU on GEMV and prefill shapes, every
/// group size, zero kind and bias. `paths` name, with each backend,
/// whether its integer path must run on integer zero points (never on
/// non-integer ones).
pub fn w4a8_matches_cpu<B: Device>(paths: &[(&str, &B, bool)]) {
    let mut cases = 0;
    for &(path, g, integer) in paths {
        let check = |ran: bool| {
            assert_eq!(
                ran, integer,
                "{path}: integer path ran {ran}, expected {integer}"
            )
        };
        for rows in [1, 3, 7] {
            for (ii, inp) in [128, 384, 2560].into_iter().enumerate() {
                for (oi, out) in [1, 67, 300].into_iter().enumerate() {
                    let group = [32, 64, 128][(rows + ii + oi) % 3];
                    let zeros = [Zeros::Eight, Zeros::Random][(ii + oi) % 2];
                    let bias = (rows + oi) % 2 == 0;
                    check(check_w4a8(path, g, rows, out, inp, group, zeros, bias));
                    cases += 1;
                }
            }
        }
        // Every group size, zero kind and bias on one shape.
        for group in [32, 64, 128] {
            for zeros in [Zeros::Eight, Zeros::Random] {
                for bias in [false, true] {
                    for rows in [1, 5] {
                        check(check_w4a8(path, g, rows, 67, 384, group, zeros, bias));
                    }
                }
            }
        }
        // Non-integer zero points: never the integer path, still correct.
        assert!(!check_w4a8(path, g, 3, 67, 384, 64, Zeros::Half, true));
        // Several token tiles of a prefill kernel (T = 4) and row blocks.
        check(check_w4a8(path, g, 19, 131, 256, 128, Zeros::Random, true));
        // An RTN-quantized weight (`quantize_linear`, W4 g128).
        let mut r = rng(12);
        let w = random(&mut r, 67, 384, 0.5);
        let p = quantize_linear("w", &w.data, 67, 384, 4, 128).unwrap();
        for rows in [1, 7] {
            let x = random(&mut r, rows, 384, 2.0);
            check_linear_a8(
                &format!("{path} RTN linear_a8 rows {rows}"),
                g,
                &x,
                &p,
                None,
            );
        }
    }
    println!("{cases} W4A8 shapes per path");
}
