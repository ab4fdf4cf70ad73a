//! Every op of the CUDA backend against the CPU reference: the generic op
//! suite (tests/backend_ops), with both prefill GEMM paths (cuBLAS and
//! gemm.cu) for the products, then what only CUDA has: every kernel
//! module loads, and event timing. Needs a CUDA device and NVRTC; with no
//! device each test prints `<test>: skipped: no CUDA device (...)` to
//! stderr and returns, or fails with `MBQ_REQUIRE_CUDA=1`.
#![cfg(feature = "cuda")]

mod backend_ops;
mod cuda_common;

use backend_ops::{random, rng};
use cuda_common::{both, cuda};
use mbq::backend::cuda::Cuda;
use mbq::backend::Backend;
use mbq::config::Act;

/// The device as the one path of a check, or `None` (skipped) without one.
fn one(test: &str) -> Option<[(&'static str, &'static Cuda); 1]> {
    Some([("cuda", cuda(test)?)])
}

#[test]
fn every_kernel_loads_on_the_device() {
    let Some(g) = cuda("every_kernel_loads_on_the_device") else {
        return;
    };
    g.warm_up().unwrap();
    println!("{}: every kernels/*.cu module loads", g.device());
}

#[test]
fn add_act_gated() {
    if let Some(p) = one("add_act_gated") {
        backend_ops::add_act_gated(&p);
    }
}

#[test]
fn gelu_is_erf_exact_over_a_dense_range() {
    if let Some(p) = one("gelu_is_erf_exact_over_a_dense_range") {
        backend_ops::acts_over_a_dense_range(&p);
    }
}

#[test]
fn div_cols() {
    if let Some(p) = one("div_cols") {
        backend_ops::div_cols(&p);
    }
}

#[test]
fn layer_norm_and_rms_norm() {
    if let Some(p) = one("layer_norm_and_rms_norm") {
        backend_ops::layer_norm_and_rms_norm(&p);
    }
}

#[test]
fn rows_set_rows_concat_rows() {
    if let Some(p) = one("rows_set_rows_concat_rows") {
        backend_ops::rows_set_rows_concat_rows(&p);
    }
}

#[test]
fn rope_matches() {
    if let Some(p) = one("rope_matches") {
        backend_ops::rope_matches(&p);
    }
}

#[test]
fn embedding_f16_and_f32() {
    if let Some(p) = one("embedding_f16_and_f32") {
        backend_ops::embedding_f16_and_f32(&p);
    }
}

#[test]
fn linear_dense_gemv_and_gemm() {
    if let Some(p) = both("linear_dense_gemv_and_gemm") {
        backend_ops::linear_dense_gemv_and_gemm(&p);
    }
}

#[test]
fn packed_gemv_every_format() {
    if let Some(p) = one("packed_gemv_every_format") {
        backend_ops::packed_gemv_every_format(&p);
    }
}

#[test]
fn packed_prefill_every_format() {
    if let Some(p) = both("packed_prefill_every_format") {
        backend_ops::packed_prefill_every_format(&p);
    }
}

#[test]
fn backward_ops() {
    if let Some(p) = one("backward_ops") {
        backend_ops::backward_ops(&p, None);
    }
}

#[test]
fn attention_non_causal() {
    if let Some(p) = one("attention_non_causal") {
        backend_ops::attention_non_causal(&p);
    }
}

#[test]
fn attention_cached_prefill_then_decode() {
    if let Some(p) = one("attention_cached_prefill_then_decode") {
        backend_ops::attention_cached_prefill_then_decode(&p);
    }
}

#[test]
fn shape_errors_are_errors() {
    if let Some(g) = cuda("shape_errors_are_errors") {
        backend_ops::shape_errors_are_errors(g);
    }
}

#[test]
fn act_quant_int8_matches_cpu() {
    if let Some(p) = one("act_quant_int8_matches_cpu") {
        backend_ops::act_quant_int8_matches_cpu(&p);
    }
}

#[test]
fn w4a8_matches_cpu() {
    // No integer path on CUDA: `linear_a8` is the trait's fake quant, then
    // the packed product.
    if let Some(g) = cuda("w4a8_matches_cpu") {
        backend_ops::w4a8_matches_cpu(&[("cuda", g, false)]);
    }
}

#[test]
fn fake_quant_matches_cpu() {
    if let Some(p) = one("fake_quant_matches_cpu") {
        backend_ops::fake_quant_matches_cpu(&p);
    }
}

#[test]
fn loss_terms_match_cpu() {
    if let Some(p) = one("loss_terms_match_cpu") {
        backend_ops::loss_terms_match_cpu(&p);
    }
}

#[test]
fn abs_col_stats_matches_cpu() {
    if let Some(p) = one("abs_col_stats_matches_cpu") {
        backend_ops::abs_col_stats_matches_cpu(&p);
    }
}

#[test]
fn abs_terms_match_cpu() {
    if let Some(p) = one("abs_terms_match_cpu") {
        backend_ops::abs_terms_match_cpu(&p);
    }
}

#[test]
fn half_matches_cpu() {
    if let Some(p) = one("half_matches_cpu") {
        backend_ops::half_matches_cpu(&p);
    }
}

/// cuBLAS's f16 GEMM (cublasGemmEx, tensor cores) and, without cuBLAS,
/// the operands expanded for gemm.cu.
#[test]
fn linear_half_matches_cpu() {
    if let Some(p) = both("linear_half_matches_cpu") {
        backend_ops::linear_half_matches_cpu(&p);
    }
}

#[test]
fn timing_with_events() {
    let Some(g) = cuda("timing_with_events") else {
        return;
    };
    let mut r = rng(60);
    let x = g.upload(&random(&mut r, 64, 1024, 1.0)).unwrap();
    assert!(g.begin_timing().unwrap());
    for _ in 0..10 {
        g.act(&x, Act::Silu).unwrap();
    }
    let s = g.end_timing().unwrap().expect("a time");
    println!("10 silu on [64, 1024]: {:.1} us", s * 1e6);
    assert!(s > 0.0 && s < 10.0, "{s}");
    assert_eq!(g.end_timing().unwrap(), None);
}
