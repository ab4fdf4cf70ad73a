//! Every op of the wgpu backend against the CPU reference on random inputs
//! with odd shapes (not multiples of the workgroup size or of 4), on both
//! reduction paths (subgroups and workgroup memory) and, for weights, with
//! the binding split forced. Runs on any adapter; CI uses lavapipe.

mod wgpu_common;

use mbq::backend::cpu::Cpu;
use mbq::backend::wgpu::Wgpu;
use mbq::backend::{AttnShape, Backend, Rope};
use mbq::config::Act;
use mbq::error::Error;
use mbq::quant::format::PackedLinear;
use mbq::quant::pseudo::quantize_linear;
use mbq::tensor::Tensor;
use rand::Rng;
use wgpu_common::{
    assert_close, both, expect_dot4, gpu, gpu_no_dot4, gpu_split, random, rng, to_f16,
};

/// Copies (rows, set_rows, concat_rows, embedding): bit-exact.
const COPY_TOL: f32 = 0.0;
/// add: one f32 rounding, the same as the CPU's.
const ADD_TOL: f32 = 0.0;
/// div_cols, relative to the output's scale: one division per value,
/// which Vulkan lets a device round to within 2.5 ulp.
const DIV_COLS_TOL: f32 = 1e-6;
/// Activations, per value: |gpu - cpu| <= ACT_TOL * max(1, |x|) (the erf
/// and tanh approximations are within 2e-7; exp differs by a few ulp).
const ACT_TOL: f32 = 1e-6;
/// Norms, relative to the output's scale (a different summation order).
const NORM_TOL: f32 = 1e-5;
/// RoPE: the cos/sin table is the CPU's; only the multiply-adds differ.
const ROPE_TOL: f32 = 1e-6;
/// Dense and packed products, relative to the output's scale (f32
/// accumulation in another order; packed folds the zero point per block).
const LINEAR_TOL: f32 = 1e-5;
/// Attention, relative to the output's scale (online softmax).
const ATTN_TOL: f32 = 1e-5;
/// INT8 activation fake quantization, per element: equal to the CPU's up
/// to ACT_QUANT_SAME_TOL * max|x_row| (an ulp or two of the scale, should a
/// device divide less exactly), else off by at most one quantization step
/// (x / s within float rounding of a .5 boundary), and that for at most
/// ACT_QUANT_MAX_STEP_FRACTION of the elements.
const ACT_QUANT_SAME_TOL: f32 = 1e-6;
const ACT_QUANT_MAX_STEP_FRACTION: f64 = 0.01;
/// W4A8 with integer dot products (gemv_w4a8.wgsl) against the CPU
/// reference on the same INT8 activations, relative to the output's scale.
/// The integer sums are exact; the GPU rounds once per 32-input block (the
/// f32 combine of block sums times the group scale, then times s_x), the
/// CPU rounds every product and sum of its f32 dot in another order: both
/// are a few f32 ulps of the partial sums: lavapipe measures 4e-8..5.7e-7
/// over these shapes (k up to 2560, terms of either sign, so partial sums
/// reach a few times the output's scale). 2e-6 leaves room for other
/// devices' orders; a wrong code, zero or scale is off by > 1e-3.
const W4A8_DOT4_TOL: f32 = 2e-6;

fn up(be: &Wgpu, t: &Tensor) -> mbq::backend::wgpu::WgpuTensor {
    be.upload(t).unwrap()
}

fn down(be: &Wgpu, t: &mbq::backend::wgpu::WgpuTensor) -> Tensor {
    be.download(t).unwrap()
}

#[test]
fn adapter_and_reduction_paths() {
    let g = gpu();
    println!(
        "adapter {}; subgroups {}; max binding {} bytes",
        g.adapter(),
        g.uses_subgroups(),
        g.max_binding()
    );
    assert!(!wgpu_common::gpu_fallback().uses_subgroups());
}

#[test]
fn add_act_gated() {
    let mut r = rng(1);
    let a = random(&mut r, 7, 37, 6.0);
    let b = random(&mut r, 7, 37, 2.0);
    for (path, g) in both() {
        let (ga, gb) = (up(g, &a), up(g, &b));
        assert_close(
            &format!("{path} add"),
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
                        "{path} {op} {act:?}({x}): gpu {u} cpu {v}"
                    );
                }
            }
        }
    }
}

/// Columns divided by per-column scales (the search's W4A8 `X / s`).
#[test]
fn div_cols() {
    let mut r = rng(21);
    let x = random(&mut r, 9, 37, 5.0);
    let s: Vec<f32> = (0..37).map(|_| r.random_range(0.05f32..8.0)).collect();
    let s = Tensor::new(vec![37], s).unwrap();
    for (path, g) in both() {
        let (gx, gs) = (up(g, &x), up(g, &s));
        assert_close(
            &format!("{path} div_cols"),
            &down(g, &g.div_cols(&gx, &gs).unwrap()),
            &Cpu.div_cols(&x, &s).unwrap(),
            DIV_COLS_TOL,
        );
        let short = up(g, &Tensor::new(vec![36], vec![1.0; 36]).unwrap());
        assert!(matches!(g.div_cols(&gx, &short), Err(Error::Invalid(_))));
    }
    assert!(matches!(
        Cpu.div_cols(&x, &Tensor::new(vec![36], vec![1.0; 36]).unwrap()),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn gelu_is_erf_exact_over_a_dense_range() {
    let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
    let x = Tensor::new(vec![1, xs.len()], xs.clone()).unwrap();
    let g = gpu();
    let got = down(g, &g.act(&up(g, &x), Act::Gelu).unwrap());
    let want = Cpu.act(&x, Act::Gelu).unwrap();
    let worst = xs
        .iter()
        .zip(got.data.iter().zip(&want.data))
        .map(|(x, (u, v))| (u - v).abs() / x.abs().max(1.0))
        .fold(0.0f32, f32::max);
    println!("gelu: worst |gpu - cpu| / max(1, |x|) = {worst:.2e}");
    assert!(worst <= ACT_TOL, "{worst}");
}

#[test]
fn layer_norm_and_rms_norm() {
    let mut r = rng(2);
    for (rows, cols) in [(5, 300), (3, 33), (1, 7)] {
        let x = random(&mut r, rows, cols, 3.0);
        let w = random(&mut r, 1, cols, 1.5);
        let b = random(&mut r, 1, cols, 0.5);
        for (path, g) in both() {
            let (gx, gw, gb) = (up(g, &x), up(g, &w), up(g, &b));
            assert_close(
                &format!("{path} layer_norm [{rows}, {cols}]"),
                &down(g, &g.layer_norm(&gx, &gw, &gb, 1e-5).unwrap()),
                &Cpu.layer_norm(&x, &w, &b, 1e-5).unwrap(),
                NORM_TOL,
            );
            assert_close(
                &format!("{path} rms_norm [{rows}, {cols}]"),
                &down(g, &g.rms_norm(&gx, &gw, 1e-6).unwrap()),
                &Cpu.rms_norm(&x, &w, 1e-6).unwrap(),
                NORM_TOL,
            );
        }
    }
}

#[test]
fn rows_set_rows_concat_rows() {
    let mut r = rng(3);
    let x = random(&mut r, 9, 13, 1.0);
    let s = random(&mut r, 3, 13, 1.0);
    let g = gpu();
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
    // Out of range: an error, not a panic.
    assert!(matches!(g.rows(&gx, 7, 5), Err(Error::Invalid(_))));
    assert!(g.set_rows(&mut gx2, 8, &gs).is_err());
}

#[test]
fn rope_matches() {
    let mut r = rng(4);
    let (heads, d) = (3, 10);
    let rope = Rope {
        inv_freq: (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
            .collect(),
        head_dim: d,
    };
    let x = random(&mut r, 5, heads * d, 2.0);
    let g = gpu();
    for pos0 in [0, 17, 4093] {
        assert_close(
            &format!("rope pos0 {pos0}"),
            &down(g, &g.rope(&up(g, &x), heads, &rope, pos0).unwrap()),
            &Cpu.rope(&x, heads, &rope, pos0).unwrap(),
            ROPE_TOL,
        );
    }
}

#[test]
fn embedding_f16_f32_and_split() {
    let mut r = rng(5);
    let t32 = random(&mut r, 41, 13, 1.0);
    let t16 = to_f16(&t32);
    let ids = [0u32, 40, 7, 7, 23, 1];
    for (name, t) in [("f32", &t32), ("f16", &t16)] {
        for (cfg, g) in [("whole", gpu()), ("split", gpu_split())] {
            let w = g.weight(t).unwrap();
            assert_eq!(w.is_f16(), name == "f16", "{name} storage");
            if cfg == "split" {
                assert!(w.chunks() > 1, "the split backend must split");
            }
            let cw = Cpu.weight(t).unwrap();
            assert_close(
                &format!("embedding {name} {cfg}"),
                &down(g, &g.embedding(&w, &ids).unwrap()),
                &Cpu.embedding(&cw, &ids).unwrap(),
                COPY_TOL,
            );
        }
    }
    let g = gpu();
    let w = g.weight(&t32).unwrap();
    assert!(matches!(g.embedding(&w, &[41]), Err(Error::Invalid(_))));
}

/// `x [rows, inp] . w^T (+ b)` on the GPU (both weight paths) vs the CPU.
#[allow(clippy::too_many_arguments)]
fn check_dense(
    label: &str,
    g: &Wgpu,
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
    for (path, g) in both() {
        for f16 in [false, true] {
            // GEMV at 64, 128 and 256 threads (k / 8 = 6, 75, 263 blocks),
            // then GEMMs of one and several tiles.
            for &(rows, out, inp) in &[
                (1, 37, 45),
                (1, 131, 600),
                (1, 13, 2100),
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

#[test]
fn linear_dense_split_weights() {
    let g = gpu_split();
    let mut r = rng(11);
    let w = random(&mut r, 37, 45, 0.5);
    assert!(g.weight(&w).unwrap().chunks() > 1);
    for rows in [1, 9] {
        for f16 in [false, true] {
            check_dense("split", g, rows, 37, 45, f16, true, 12);
        }
    }
}

/// A packed linear `[out, inp]` at `bits` / `group` on the GPU vs the CPU.
#[allow(clippy::too_many_arguments)]
fn check_packed(
    label: &str,
    g: &Wgpu,
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
fn packed_gemv_every_format_both_paths() {
    for (path, g) in both() {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(path, g, 1, 37, 384, bits, group, group == 64);
            }
        }
        // 128 and 256 threads (k / 32 = 80 and 384 blocks).
        check_packed(path, g, 1, 21, 2560, 3, 128, true);
        check_packed(path, g, 1, 13, 12288, 4, 64, false);
    }
}

#[test]
fn packed_prefill_every_format() {
    let g = gpu();
    for bits in [3, 4, 8] {
        for group in [32, 64, 128] {
            check_packed("prefill", g, 5, 37, 384, bits, group, group == 32);
        }
    }
    // Several GEMM tiles in both directions.
    check_packed("prefill", g, 67, 131, 256, 3, 128, true);
}

#[test]
fn packed_split_weights() {
    let g = gpu_split();
    let mut r = rng(7);
    let w = random(&mut r, 37, 384, 0.5);
    let p = quantize_linear("w", &w.data, 37, 384, 4, 128).unwrap();
    assert!(g.packed_weight(&p).unwrap().chunks() > 1);
    for rows in [1, 6] {
        for bits in [3, 8] {
            check_packed("split", g, rows, 37, 384, bits, 64, true);
        }
    }
}

#[test]
fn attention_non_causal() {
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
        for (path, g) in both() {
            assert_close(
                &format!("{path} attention n {n} heads {heads}/{kv_heads} d {d}"),
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
}

#[test]
fn attention_cached_prefill_then_decode() {
    let (heads, kv_heads, d, layers, cap) = (4, 2, 12, 2, 90);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale: (d as f32).powf(-0.5),
    };
    for (path, g) in both() {
        let mut r = rng(30);
        let mut gc = g.new_cache(layers, kv_heads * d, cap).unwrap();
        let mut cc = Cpu.new_cache(layers, kv_heads * d, cap).unwrap();
        // A 71-token prefill (two key blocks), then 3 single-token steps.
        let mut pos = 0;
        for n in [71, 1, 1, 1] {
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
}

#[test]
fn shape_errors_are_errors() {
    let g = gpu();
    let mut r = rng(40);
    let a = up(g, &random(&mut r, 3, 5, 1.0));
    let b = up(g, &random(&mut r, 3, 6, 1.0));
    assert!(matches!(g.add(&a, &b), Err(Error::Invalid(_))));
    let w = g.weight(&random(&mut r, 4, 7, 1.0)).unwrap();
    assert!(matches!(g.linear(&a, &w, None), Err(Error::Invalid(_))));
    assert!(g.weight(&Tensor::zeros(vec![2, 3, 4])).is_err());
}

#[test]
fn a_bad_shader_is_a_backend_error_naming_it() {
    let g = gpu();
    let e = g
        .compile_wgsl(
            "broken.wgsl:main",
            "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
            "main",
        )
        .unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, Error::Backend { .. }) && m.contains("broken.wgsl"),
        "{m}"
    );
    // A good one compiles.
    g.compile_wgsl(
        "ok.wgsl:main",
        "@compute @workgroup_size(1) fn main() {}",
        "main",
    )
    .unwrap();
}

#[test]
fn reused_buffers_do_not_clobber_pending_reads() {
    // a's buffer goes back to the pool while the add that reads it is
    // still only recorded; the next outputs of the same size may reuse it.
    let g = gpu();
    let mut r = rng(50);
    let (a, b) = (random(&mut r, 3, 29, 1.0), random(&mut r, 3, 29, 1.0));
    let ga = up(g, &a);
    let gb = up(g, &b);
    let sum = g.add(&ga, &gb).unwrap();
    drop(ga);
    let mut later = Vec::new();
    for _ in 0..4 {
        later.push(g.act(&gb, Act::Relu).unwrap());
    }
    assert_close(
        "add after reuse",
        &down(g, &sum),
        &Cpu.add(&a, &b).unwrap(),
        ADD_TOL,
    );
    for t in &later {
        assert_close(
            "relu after reuse",
            &down(g, t),
            &Cpu.act(&b, Act::Relu).unwrap(),
            COPY_TOL,
        );
    }
}

#[test]
fn act_quant_int8_matches_cpu() {
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
        for (path, g) in both() {
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
                    if d <= ACT_QUANT_SAME_TOL * max {
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
                frac <= ACT_QUANT_MAX_STEP_FRACTION,
                "{path} [{rows}, {cols}]: {steps} values one step off"
            );
        }
    }
}

/// Zero points of a random W4A8-style packed weight.
#[derive(Clone, Copy, Debug)]
enum Zeros {
    /// 8 everywhere, as `quant::w4a8` writes.
    Eight,
    /// A random integer in 0..=15 per group (asymmetric RTN-style).
    Random,
    /// 7.5: not an integer, so the integer path must not take it.
    Half,
}

/// A 4-bit packed `[out, inp]` with random codes, random per-group f16
/// scales (spanning 0.002..0.05) and `zeros`.
fn w4_random(seed: u64, out: usize, inp: usize, group: usize, zeros: Zeros) -> PackedLinear {
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

/// `linear_a8` on `g` against the CPU reference (fake-quantized INT8
/// activations, then the packed f32 product) for one case; returns whether
/// the integer path ran (the counter moved).
#[allow(clippy::too_many_arguments)]
fn check_w4a8(
    label: &str,
    g: &Wgpu,
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
    // An outlier per row, as LLM activations have.
    for row in x.data.chunks_mut(inp) {
        row[(seed as usize) % inp] = 30.0;
    }
    let b = random(&mut r, 1, out, 0.5);
    let gw = g.packed_weight(&p).unwrap();
    let gb = up(g, &b);
    let before = g.dot4_linears();
    let got = g
        .linear_a8(&up(g, &x), &gw, bias.then_some(&gb))
        .and_then(|y| g.download(&y))
        .unwrap();
    let ran = g.dot4_linears() > before;
    let cw = Cpu.packed_weight(&p).unwrap();
    let want = Cpu.linear_a8(&x, &cw, bias.then_some(&b)).unwrap();
    // The reference on the device's own INT8 grid (the same `q_of` as the
    // integer path): equal to the CPU's unless the device divides less
    // exactly (see ACT_QUANT_SAME_TOL); then a value may sit one step off.
    let gq = down(g, &g.quant_act_int8(&up(g, &x)).unwrap());
    let cq = Cpu.quant_act_int8(&x).unwrap();
    let what = format!(
        "{label} W4A8 rows {rows} [{out}, {inp}] g{group} zeros {zeros:?} bias {bias} (dot4 {ran})"
    );
    // The fallback is the float packed product (zero point folded per
    // block: more rounding, LINEAR_TOL; measured 2e-6 at k = 2560).
    let tol = if ran { W4A8_DOT4_TOL } else { LINEAR_TOL };
    if gq.data == cq.data {
        assert_close(&what, &got, &want, tol);
    } else {
        let off = gq.data.iter().zip(&cq.data).filter(|(a, b)| a != b).count();
        println!(
            "{what}: {off} INT8 activations differ from the CPU's; comparing on the device's grid"
        );
        let want_dev = Cpu.linear(&gq, &cw, bias.then_some(&b)).unwrap();
        assert_close(&what, &got, &want_dev, tol);
    }
    ran
}

#[test]
fn w4a8_dot4_gemv_and_prefill_match_cpu() {
    // Every shape on both reduction paths: the integer kernel runs when the
    // device has dot4I8Packed (it must, on lavapipe: wgpu-core reports it).
    let mut cases = 0;
    for (path, g) in both() {
        let dot4 = expect_dot4(g);
        for rows in [1, 3, 7] {
            for (ii, inp) in [128, 384, 2560].into_iter().enumerate() {
                for (oi, out) in [1, 67, 300].into_iter().enumerate() {
                    let group = [32, 64, 128][(rows + ii + oi) % 3];
                    let zeros = [Zeros::Eight, Zeros::Random][(ii + oi) % 2];
                    let bias = (rows + oi) % 2 == 0;
                    let ran = check_w4a8(path, g, rows, out, inp, group, zeros, bias);
                    assert_eq!(ran, dot4, "{path}: integer path ran {ran}, expected {dot4}");
                    cases += 1;
                }
            }
        }
        // Every group size, zero kind and bias on one shape.
        for group in [32, 64, 128] {
            for zeros in [Zeros::Eight, Zeros::Random] {
                for bias in [false, true] {
                    for rows in [1, 5] {
                        let ran = check_w4a8(path, g, rows, 67, 384, group, zeros, bias);
                        assert_eq!(ran, dot4);
                    }
                }
            }
        }
        // Non-integer zero points: never the integer path, still correct.
        assert!(!check_w4a8(path, g, 3, 67, 384, 64, Zeros::Half, true));
        // Several token tiles of the prefill kernel (T = 4) and row blocks.
        assert_eq!(
            check_w4a8(path, g, 19, 131, 256, 128, Zeros::Random, true),
            dot4
        );
    }
    println!("{cases} W4A8 shapes");
}

#[test]
fn w4a8_dot4_split_weights() {
    let g = gpu_split();
    let dot4 = expect_dot4(g);
    let p = w4_random(1, 67, 384, 64, Zeros::Eight);
    assert!(g.packed_weight(&p).unwrap().chunks() > 1);
    for rows in [1, 6] {
        assert_eq!(
            check_w4a8("split", g, rows, 67, 384, 64, Zeros::Random, true),
            dot4
        );
    }
}

#[test]
fn w4a8_no_dot4_runs_the_fake_quant_fallback() {
    // MBQ_WGPU_NO_DOT4=1 (WgpuOptions::dot4 = false): the same results
    // through act_quant.wgsl + the float packed GEMV / GEMM.
    let g = gpu_no_dot4();
    assert!(!g.uses_dot4());
    for rows in [1, 7] {
        for zeros in [Zeros::Eight, Zeros::Random] {
            assert!(!check_w4a8("no dot4", g, rows, 67, 384, 128, zeros, true));
        }
    }
    assert_eq!(g.dot4_linears(), 0);
}
