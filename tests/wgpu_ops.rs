//! Every op of the wgpu backend against the CPU reference: the generic op
//! suite (tests/backend_ops) on both reduction paths (subgroups and
//! workgroup memory), then what only wgpu has: weights split across
//! bindings, the integer W4A8 path (`dot4I8Packed`) and its fallback,
//! shader errors and buffer reuse. Runs on any adapter; CI uses lavapipe.

mod backend_ops;
mod wgpu_common;

use backend_ops::{
    assert_close, check_dense, check_packed, check_w4a8, embedding_table, random, rng, to_f16,
    w4_random, Device, Zeros,
};
use mbq::backend::cpu::Cpu;
use mbq::backend::wgpu::Wgpu;
use mbq::backend::Backend;
use mbq::config::Act;
use mbq::error::Error;
use mbq::quant::pseudo::quantize_linear;
use wgpu_common::{both, expect_dot4, gpu, gpu_fallback, gpu_no_dot4, gpu_split};

/// The default configuration alone (ops with no reduction, or whose
/// reduction path the other tests already cover).
fn default() -> [(&'static str, &'static Wgpu); 1] {
    [("default", gpu())]
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
    assert!(!gpu_fallback().uses_subgroups());
}

/// The whole suite as `mbq verify --ops` runs it (the default
/// configuration, then weights split across bindings): every family, all OK.
/// On instances of its own: the W4A8 checks read a per-instance counter of
/// integer linears, which other tests running at once would move.
#[test]
fn verify_ops_suite() {
    let opts = mbq::backend::wgpu::WgpuOptions {
        allow_cpu: true,
        ..mbq::backend::wgpu::WgpuOptions::from_env()
    };
    let g = Wgpu::new(&opts).unwrap();
    let split = Wgpu::new(&mbq::backend::wgpu::WgpuOptions {
        max_binding: Some(mbq::verify::SPLIT_BINDING),
        ..opts
    })
    .unwrap();
    backend_ops::suite(&[("default", &g)], Some(("split", &split)));
}

#[test]
fn backward_ops() {
    backend_ops::backward_ops(&both(), Some(("split", gpu_split())));
}

#[test]
fn add_act_gated() {
    backend_ops::add_act_gated(&both());
}

#[test]
fn gelu_is_erf_exact_over_a_dense_range() {
    backend_ops::acts_over_a_dense_range(&default());
}

#[test]
fn div_cols() {
    backend_ops::div_cols(&both());
}

#[test]
fn layer_norm_and_rms_norm() {
    backend_ops::layer_norm_and_rms_norm(&both());
}

#[test]
fn rows_set_rows_concat_rows() {
    backend_ops::rows_set_rows_concat_rows(&default());
}

#[test]
fn rope_matches() {
    backend_ops::rope_matches(&default());
}

#[test]
fn embedding_f16_f32_and_split() {
    let t32 = embedding_table();
    for t in [&t32, &to_f16(&t32)] {
        assert!(
            gpu_split().weight(t).unwrap().chunks() > 1,
            "the split backend must split"
        );
    }
    backend_ops::embedding_f16_and_f32(&[("whole", gpu()), ("split", gpu_split())]);
}

#[test]
fn linear_dense_gemv_and_gemm() {
    backend_ops::linear_dense_gemv_and_gemm(&both());
}

#[test]
fn linear_dense_split_weights() {
    let g = gpu_split();
    let mut r = rng(11);
    let w = random(&mut r, 37, 45, 0.5);
    assert!(g.weight(&w).unwrap().chunks() > 1);
    for rows in [1, 3, 8, 9] {
        for f16 in [false, true] {
            check_dense("split", g, rows, 37, 45, f16, true, 12);
        }
    }
}

#[test]
fn packed_gemv_every_format_both_paths() {
    backend_ops::packed_gemv_every_format(&both());
}

#[test]
fn packed_prefill_every_format() {
    backend_ops::packed_prefill_every_format(&[("prefill", gpu())]);
}

#[test]
fn packed_split_weights() {
    let g = gpu_split();
    let mut r = rng(7);
    let w = random(&mut r, 37, 384, 0.5);
    let p = quantize_linear("w", &w.data, 37, 384, 4, 128).unwrap();
    assert!(g.packed_weight(&p).unwrap().chunks() > 1);
    for rows in [1, 3, 8, 9] {
        for bits in [3, 8] {
            check_packed("split", g, rows, 37, 384, bits, 64, true);
        }
    }
}

#[test]
fn attention_non_causal() {
    backend_ops::attention_non_causal(&both());
}

#[test]
fn attention_cached_prefill_then_decode() {
    backend_ops::attention_cached_prefill_then_decode(&both());
}

#[test]
fn shape_errors_are_errors() {
    backend_ops::shape_errors_are_errors(gpu());
}

#[test]
fn act_quant_int8_matches_cpu() {
    backend_ops::act_quant_int8_matches_cpu(&both());
}

#[test]
fn w4a8_dot4_gemv_and_prefill_match_cpu() {
    // Every shape on both reduction paths: the integer kernel runs when the
    // device has dot4I8Packed (it must, on lavapipe: wgpu-core reports it).
    let paths = both().map(|(path, g)| (path, g, expect_dot4(g)));
    backend_ops::w4a8_matches_cpu(&paths);
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
    let tol = <Wgpu as Device>::TOL;
    let mut r = rng(50);
    let (a, b) = (random(&mut r, 3, 29, 1.0), random(&mut r, 3, 29, 1.0));
    let ga = g.upload(&a).unwrap();
    let gb = g.upload(&b).unwrap();
    let sum = g.add(&ga, &gb).unwrap();
    drop(ga);
    let mut later = Vec::new();
    for _ in 0..4 {
        later.push(g.act(&gb, Act::Relu).unwrap());
    }
    assert_close(
        "add after reuse",
        &g.download(&sum).unwrap(),
        &Cpu.add(&a, &b).unwrap(),
        tol.add,
    );
    for t in &later {
        assert_close(
            "relu after reuse",
            &g.download(t).unwrap(),
            &Cpu.act(&b, Act::Relu).unwrap(),
            tol.copy,
        );
    }
}

/// The search's fake-quantized weights: the reference's codes exactly, on
/// both reduction paths and with the weights split across bindings.
#[test]
fn fake_quant_matches_cpu() {
    backend_ops::fake_quant_matches_cpu(&both());
    backend_ops::fake_quant_narrow_rows(&[("split", gpu_split())]);
}

#[test]
fn loss_terms_match_cpu() {
    backend_ops::loss_terms_match_cpu(&both());
}

#[test]
fn abs_col_stats_matches_cpu() {
    backend_ops::abs_col_stats_matches_cpu(&both());
}

#[test]
fn abs_terms_match_cpu() {
    backend_ops::abs_terms_match_cpu(&both());
}

#[test]
fn half_matches_cpu() {
    backend_ops::half_matches_cpu(&both());
}

/// Both ways of reading f16 operands run: WGSL `f16` where the adapter
/// has SHADER_F16 (lavapipe has), u32 pairs on the fallback instance.
#[test]
fn linear_half_matches_cpu_whole_and_split() {
    let (native, has) = gpu().uses_shader_f16();
    assert_eq!(
        native, has,
        "the default instance uses SHADER_F16 where the adapter has it"
    );
    assert!(!gpu_fallback().uses_shader_f16().0);
    eprintln!("adapter SHADER_F16: {has}");
    backend_ops::linear_half_matches_cpu(&both());
    backend_ops::linear_half_matches_cpu(&[("split", gpu_split())]);
}
