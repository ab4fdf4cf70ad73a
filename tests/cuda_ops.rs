//! Every op of the CUDA backend against the CPU reference on random inputs
//! with odd shapes (the cases of tests/wgpu_ops.rs), both prefill GEMM
//! paths (cuBLAS and gemm.cu) for the products, and the packed GEMV / GEMM
//! at W3 / W4 / W8 in groups of 32 / 64 / 128. Needs a CUDA device and
//! NVRTC; with no device each test prints `skipped: no CUDA device (...)`
//! to stderr and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::{assert_close, both, cuda, random, rng, to_f16};
use mbq::backend::cpu::Cpu;
use mbq::backend::cuda::{Cuda, CudaTensor, GEMV_MAX_ROWS};
use mbq::backend::{AttnShape, Backend, Rope};
use mbq::config::Act;
use mbq::error::Error;
use mbq::quant::pseudo::quantize_linear;
use mbq::tensor::Tensor;
use rand::Rng;

/// Copies (rows, set_rows, concat_rows, embedding): bit-exact.
const COPY_TOL: f32 = 0.0;
/// add: one f32 rounding, the same as the CPU's.
const ADD_TOL: f32 = 0.0;
/// div_cols: one IEEE division per value (`/` compiles to the correctly
/// rounded div.rn.f32 without fast-math), the same as the CPU's.
const DIV_COLS_TOL: f32 = 0.0;
/// Activations, per value: |gpu - cpu| <= ACT_TOL * max(1, |x|) (CUDA's
/// erff / tanhf / expf are within 2 ulp of libm's).
const ACT_TOL: f32 = 1e-6;
/// Norms, relative to the output's scale (a different summation order).
const NORM_TOL: f32 = 1e-5;
/// RoPE: the cos/sin table is the CPU's and the products are rounded as
/// the CPU's (no FMA): expected bit-exact; 1e-6 leaves room for nothing else.
const ROPE_TOL: f32 = 1e-6;
/// Dense and packed products, relative to the output's scale: f32
/// accumulation on the exact weight values in another order (the packed
/// GEMV folds the zero point per 32-input block).
const LINEAR_TOL: f32 = 1e-5;
/// Attention, relative to the output's scale (another summation order).
const ATTN_TOL: f32 = 1e-5;
/// INT8 activation fake quantization (as tests/wgpu_ops.rs): equal to the
/// CPU up to ACT_QUANT_SAME_TOL * max|x_row|, else one quantization step
/// off for at most ACT_QUANT_MAX_STEP_FRACTION of the values (CUDA's f32
/// division is IEEE-exact, so 0 are expected).
const ACT_QUANT_SAME_TOL: f32 = 1e-6;
const ACT_QUANT_MAX_STEP_FRACTION: f64 = 0.01;

fn up(be: &Cuda, t: &Tensor) -> CudaTensor {
    be.upload(t).unwrap()
}

fn down(be: &Cuda, t: &CudaTensor) -> Tensor {
    be.download(t).unwrap()
}

#[test]
fn every_kernel_loads_on_the_device() {
    let Some(g) = cuda("every_kernel_loads_on_the_device") else {
        return;
    };
    g.warm_up().unwrap();
    println!("{}: every kernels/*.cu module loads", g.device());
}

/// Columns divided by per-column scales (the search's W4A8 `X / s`).
#[test]
fn div_cols() {
    let Some(g) = cuda("div_cols") else {
        return;
    };
    let mut r = rng(21);
    let x = random(&mut r, 9, 37, 5.0);
    let s: Vec<f32> = (0..37).map(|_| r.random_range(0.05f32..8.0)).collect();
    let s = Tensor::new(vec![37], s).unwrap();
    assert_close(
        "div_cols",
        &down(g, &g.div_cols(&up(g, &x), &up(g, &s)).unwrap()),
        &Cpu.div_cols(&x, &s).unwrap(),
        DIV_COLS_TOL,
    );
    let short = up(g, &Tensor::new(vec![36], vec![1.0; 36]).unwrap());
    assert!(matches!(
        g.div_cols(&up(g, &x), &short),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn add_act_gated() {
    let Some(g) = cuda("add_act_gated") else {
        return;
    };
    let mut r = rng(1);
    let a = random(&mut r, 7, 37, 6.0);
    let b = random(&mut r, 7, 37, 2.0);
    let (ga, gb) = (up(g, &a), up(g, &b));
    assert_close(
        "add",
        &down(g, &g.add(&ga, &gb).unwrap()),
        &Cpu.add(&a, &b).unwrap(),
        ADD_TOL,
    );
    for act in [
        Act::Gelu,
        Act::GeluTanh,
        Act::QuickGelu,
        Act::Silu,
        Act::Relu,
    ] {
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
                    (u - v).abs() <= ACT_TOL * x.abs().max(1.0) * scale,
                    "{op} {act:?}({x}): gpu {u} cpu {v}"
                );
            }
        }
    }
}

#[test]
fn gelu_is_erf_exact_over_a_dense_range() {
    let Some(g) = cuda("gelu_is_erf_exact_over_a_dense_range") else {
        return;
    };
    let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
    let x = Tensor::new(vec![1, xs.len()], xs.clone()).unwrap();
    for act in [Act::Gelu, Act::GeluTanh, Act::QuickGelu, Act::Silu] {
        let got = down(g, &g.act(&up(g, &x), act).unwrap());
        let want = Cpu.act(&x, act).unwrap();
        let worst = xs
            .iter()
            .zip(got.data.iter().zip(&want.data))
            .map(|(x, (u, v))| (u - v).abs() / x.abs().max(1.0))
            .fold(0.0f32, f32::max);
        println!("{act:?}: worst |gpu - cpu| / max(1, |x|) = {worst:.2e}");
        assert!(worst <= ACT_TOL, "{act:?}: {worst}");
    }
}

#[test]
fn layer_norm_and_rms_norm() {
    let Some(g) = cuda("layer_norm_and_rms_norm") else {
        return;
    };
    let mut r = rng(2);
    for (rows, cols) in [(5, 300), (3, 33), (1, 7), (2, 4099)] {
        let x = random(&mut r, rows, cols, 3.0);
        let w = random(&mut r, 1, cols, 1.5);
        let b = random(&mut r, 1, cols, 0.5);
        let (gx, gw, gb) = (up(g, &x), up(g, &w), up(g, &b));
        assert_close(
            &format!("layer_norm [{rows}, {cols}]"),
            &down(g, &g.layer_norm(&gx, &gw, &gb, 1e-5).unwrap()),
            &Cpu.layer_norm(&x, &w, &b, 1e-5).unwrap(),
            NORM_TOL,
        );
        assert_close(
            &format!("rms_norm [{rows}, {cols}]"),
            &down(g, &g.rms_norm(&gx, &gw, 1e-6).unwrap()),
            &Cpu.rms_norm(&x, &w, 1e-6).unwrap(),
            NORM_TOL,
        );
    }
}

#[test]
fn rows_set_rows_concat_rows() {
    let Some(g) = cuda("rows_set_rows_concat_rows") else {
        return;
    };
    let mut r = rng(3);
    let x = random(&mut r, 9, 13, 1.0);
    let s = random(&mut r, 3, 13, 1.0);
    let (gx, gs) = (up(g, &x), up(g, &s));
    assert_close(
        "rows",
        &down(g, &g.rows(&gx, 2, 5).unwrap()),
        &Cpu.rows(&x, 2, 5).unwrap(),
        COPY_TOL,
    );
    assert_close(
        "concat_rows",
        &down(g, &g.concat_rows(&gs, &gx).unwrap()),
        &Cpu.concat_rows(&s, &x).unwrap(),
        COPY_TOL,
    );
    let mut gx2 = up(g, &x);
    g.set_rows(&mut gx2, 5, &gs).unwrap();
    let mut x2 = x.clone();
    Cpu.set_rows(&mut x2, 5, &s).unwrap();
    assert_close("set_rows", &down(g, &gx2), &x2, COPY_TOL);
    // Empty slices and out of range: no panic; errors are errors.
    assert_eq!(g.dims(&g.rows(&gx, 9, 0).unwrap()), (0, 13));
    assert!(matches!(g.rows(&gx, 7, 5), Err(Error::Invalid(_))));
    assert!(g.set_rows(&mut gx2, 8, &gs).is_err());
}

#[test]
fn rope_matches() {
    let Some(g) = cuda("rope_matches") else {
        return;
    };
    let mut r = rng(4);
    for (heads, d) in [(3, 10), (2, 64), (1, 7)] {
        let rope = Rope {
            inv_freq: (0..d / 2)
                .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
                .collect(),
            head_dim: d,
        };
        let x = random(&mut r, 5, heads * d, 2.0);
        for pos0 in [0, 17, 4093] {
            assert_close(
                &format!("rope heads {heads} d {d} pos0 {pos0}"),
                &down(g, &g.rope(&up(g, &x), heads, &rope, pos0).unwrap()),
                &Cpu.rope(&x, heads, &rope, pos0).unwrap(),
                ROPE_TOL,
            );
        }
    }
}

#[test]
fn embedding_f16_and_f32() {
    let Some(g) = cuda("embedding_f16_and_f32") else {
        return;
    };
    let mut r = rng(5);
    let t32 = random(&mut r, 41, 13, 1.0);
    let t16 = to_f16(&t32);
    let ids = [0u32, 40, 7, 7, 23, 1];
    for (name, t) in [("f32", &t32), ("f16", &t16)] {
        let w = g.weight(t).unwrap();
        assert_eq!(w.is_f16(), name == "f16", "{name} storage");
        let cw = Cpu.weight(t).unwrap();
        assert_close(
            &format!("embedding {name}"),
            &down(g, &g.embedding(&w, &ids).unwrap()),
            &Cpu.embedding(&cw, &ids).unwrap(),
            COPY_TOL,
        );
    }
    let w = g.weight(&t32).unwrap();
    assert!(matches!(g.embedding(&w, &[41]), Err(Error::Invalid(_))));
}

/// `x [rows, inp] . w^T (+ b)` on the GPU vs the CPU.
#[allow(clippy::too_many_arguments)]
fn check_dense(
    label: &str,
    g: &Cuda,
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
    assert_eq!(gw.is_f16(), f16);
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
        LINEAR_TOL,
    );
}

#[test]
fn linear_dense_gemv_and_gemm() {
    let Some(paths) = both("linear_dense_gemv_and_gemm") else {
        return;
    };
    for (path, g) in paths {
        for f16 in [false, true] {
            // GEMV (vector and scalar paths of gemv_f16: in % 8), the last
            // GEMV row count, then the prefill GEMM of one and several tiles.
            for &(rows, out, inp) in &[
                (1, 37, 45),
                (1, 131, 600),
                (1, 13, 2100),
                (GEMV_MAX_ROWS, 37, 48),
                (GEMV_MAX_ROWS + 1, 37, 45),
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

/// A packed linear `[out, inp]` at `bits` / `group` on the GPU vs the CPU.
#[allow(clippy::too_many_arguments)]
fn check_packed(
    label: &str,
    g: &Cuda,
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
    assert!(gw.is_packed());
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
        LINEAR_TOL,
    );
}

#[test]
fn packed_gemv_every_format() {
    let Some(g) = cuda("packed_gemv_every_format") else {
        return;
    };
    for bits in [3, 4, 8] {
        for group in [32, 64, 128] {
            check_packed("gemv", g, 1, 37, 384, bits, group, group == 64);
            check_packed("gemv", g, GEMV_MAX_ROWS, 9, 1152, bits, group, group != 64);
        }
    }
    check_packed("gemv", g, 1, 21, 2560, 3, 128, true);
    check_packed("gemv", g, 1, 13, 12288, 4, 64, false);
}

#[test]
fn packed_prefill_every_format() {
    let Some(paths) = both("packed_prefill_every_format") else {
        return;
    };
    for (path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(path, g, 5, 37, 384, bits, group, group == 32);
            }
        }
        // Several GEMM tiles in both directions.
        check_packed(path, g, 67, 131, 256, 3, 128, true);
    }
}

#[test]
fn attention_non_causal() {
    let Some(g) = cuda("attention_non_causal") else {
        return;
    };
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
        assert_close(
            &format!("attention n {n} heads {heads}/{kv_heads} d {d}"),
            &down(
                g,
                &g.attention(&up(g, &q), &up(g, &k), &up(g, &v), shape)
                    .unwrap(),
            ),
            &Cpu.attention(&q, &k, &v, shape).unwrap(),
            ATTN_TOL,
        );
    }
}

#[test]
fn attention_cached_prefill_then_decode() {
    let Some(g) = cuda("attention_cached_prefill_then_decode") else {
        return;
    };
    let (heads, kv_heads, d, layers, cap) = (4, 2, 12, 2, 90);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale: (d as f32).powf(-0.5),
    };
    let mut r = rng(30);
    let mut gc = g.new_cache(layers, kv_heads * d, cap).unwrap();
    let mut cc = Cpu.new_cache(layers, kv_heads * d, cap).unwrap();
    // A 71-token prefill, a 3-token chunk, then 3 single-token steps.
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
                &format!("cached attention n {n} at {pos}, layer {layer}"),
                &down(g, &got),
                &want,
                ATTN_TOL,
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

#[test]
fn act_quant_int8_matches_cpu() {
    let Some(g) = cuda("act_quant_int8_matches_cpu") else {
        return;
    };
    let mut r = rng(11);
    for (rows, cols, scale) in [(7, 129, 3.0), (1, 300, 0.02), (33, 45, 40.0), (3, 1, 1.0)] {
        let mut x = random(&mut r, rows, cols, scale);
        // A zero row, and values exactly on .5 boundaries of the row's grid.
        if rows > 2 {
            x.data[cols..2 * cols].iter_mut().for_each(|v| *v = 0.0);
            let row = &mut x.data[2 * cols..3 * cols];
            row[0] = 127.0;
            for (i, v) in row.iter_mut().enumerate().skip(1) {
                *v = ((i % 50) as f32 - 25.0) + 0.5;
            }
        }
        let want = Cpu.quant_act_int8(&x).unwrap();
        let got = down(g, &g.quant_act_int8(&up(g, &x)).unwrap());
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
                if d <= ACT_QUANT_SAME_TOL * max {
                    continue;
                }
                assert!(
                    d <= step * (1.0 + 1e-5),
                    "[{rows}, {cols}] at [{ri}, {i}]: x {} gpu {a} cpu {b} (step {step})",
                    xr[i]
                );
                steps += 1;
            }
        }
        println!("act_quant [{rows}, {cols}]: {steps} values one step off");
        assert!(steps as f64 / (rows * cols) as f64 <= ACT_QUANT_MAX_STEP_FRACTION);
    }
    // linear_a8 (the trait default: fake quant, then the packed product).
    let mut r = rng(12);
    let w = random(&mut r, 67, 384, 0.5);
    let p = quantize_linear("w", &w.data, 67, 384, 4, 128).unwrap();
    for rows in [1, 7] {
        let x = random(&mut r, rows, 384, 2.0);
        let got = g
            .linear_a8(&up(g, &x), &g.packed_weight(&p).unwrap(), None)
            .and_then(|y| g.download(&y))
            .unwrap();
        let want = Cpu
            .linear_a8(&x, &Cpu.packed_weight(&p).unwrap(), None)
            .unwrap();
        assert_close(&format!("linear_a8 rows {rows}"), &got, &want, LINEAR_TOL);
    }
}

#[test]
fn timing_with_events() {
    let Some(g) = cuda("timing_with_events") else {
        return;
    };
    let mut r = rng(60);
    let x = up(g, &random(&mut r, 64, 1024, 1.0));
    assert!(g.begin_timing().unwrap());
    for _ in 0..10 {
        g.act(&x, Act::Silu).unwrap();
    }
    let s = g.end_timing().unwrap().expect("a time");
    println!("10 silu on [64, 1024]: {:.1} us", s * 1e6);
    assert!(s > 0.0 && s < 10.0, "{s}");
    assert_eq!(g.end_timing().unwrap(), None);
}

#[test]
fn shape_errors_are_errors() {
    let Some(g) = cuda("shape_errors_are_errors") else {
        return;
    };
    let mut r = rng(40);
    let a = up(g, &random(&mut r, 3, 5, 1.0));
    let b = up(g, &random(&mut r, 3, 6, 1.0));
    assert!(matches!(g.add(&a, &b), Err(Error::Invalid(_))));
    let w = g.weight(&random(&mut r, 4, 7, 1.0)).unwrap();
    assert!(matches!(g.linear(&a, &w, None), Err(Error::Invalid(_))));
    assert!(g.weight(&Tensor::zeros(vec![2, 3, 4])).is_err());
}
