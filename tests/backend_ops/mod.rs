//! The op suite every device backend runs, as tests: each check of
//! `mbq::verify::ops` (the one implementation of the op checks and of
//! their [`Tolerances`], which `mbq verify --ops` also runs) wrapped to
//! print its lines and fail on any FAIL. tests/wgpu_ops.rs and
//! tests/cuda_ops.rs instantiate it (one `#[test]` per op family) and keep
//! only their backend's own tests.
//!
//! Every check takes `paths`, the configurations of one backend to run it
//! on, named (wgpu: the subgroup and workgroup-memory reductions; CUDA: the
//! cuBLAS and gemm.cu prefill GEMMs).
#![allow(dead_code)]

use mbq::quant::format::PackedLinear;
use mbq::tensor::Tensor;
use mbq::verify::ops::{self, Checks};
#[allow(unused_imports)]
pub use mbq::verify::ops::{embedding_table, Device, Tolerances, Zeros, FAMILIES};

// A test crate may load this through several helper modules (common,
// wgpu_common / cuda_common, backend_ops): harmless copies of free functions.
#[allow(clippy::duplicate_mod)]
#[path = "../op_check/mod.rs"]
mod op_check;
#[allow(unused_imports)]
pub use op_check::*;

/// Runs `f` on fresh [`Checks`], prints every line, panics on any FAIL.
fn checked<T>(f: impl FnOnce(&mut Checks) -> T) -> T {
    let mut c = Checks::default();
    let out = f(&mut c);
    assert!(!c.results.is_empty(), "no checks ran");
    c.assert_ok();
    out
}

pub fn add_act_gated<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::add_act_gated(c, paths))
}

pub fn acts_over_a_dense_range<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::acts_over_a_dense_range(c, paths))
}

pub fn div_cols<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::div_cols(c, paths))
}

pub fn layer_norm_and_rms_norm<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::layer_norm_and_rms_norm(c, paths))
}

pub fn rows_set_rows_concat_rows<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::rows_set_rows_concat_rows(c, paths))
}

pub fn rope_matches<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::rope_matches(c, paths))
}

pub fn embedding_f16_and_f32<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::embedding_f16_and_f32(c, paths))
}

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
    checked(|c| ops::check_dense(c, label, g, rows, out, inp, f16, bias, seed))
}

pub fn linear_dense_gemv_and_gemm<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::linear_dense_gemv_and_gemm(c, paths))
}

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
    checked(|c| ops::check_packed(c, label, g, rows, out, inp, bits, group, bias))
}

pub fn packed_gemv_every_format<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::packed_gemv_every_format(c, paths))
}

pub fn packed_prefill_every_format<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::packed_prefill_every_format(c, paths))
}

pub fn attention_non_causal<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::attention_non_causal(c, paths))
}

pub fn attention_cached_prefill_then_decode<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::attention_cached_prefill_then_decode(c, paths))
}

pub fn shape_errors_are_errors<B: Device>(g: &B) {
    checked(|c| ops::shape_errors_are_errors(c, g.name(), g))
}

pub fn act_quant_int8_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::act_quant_int8_matches_cpu(c, paths))
}

/// A [`ops::w4_random`] weight (the test's inputs are valid).
pub fn w4_random(seed: u64, out: usize, inp: usize, group: usize, zeros: Zeros) -> PackedLinear {
    ops::w4_random(seed, out, inp, group, zeros).unwrap()
}

/// [`ops::check_linear_a8`], no expectation on the path; returns whether
/// the integer path ran.
pub fn check_linear_a8<B: Device>(
    what: &str,
    g: &B,
    x: &Tensor,
    p: &PackedLinear,
    b: Option<&Tensor>,
) -> bool {
    checked(|c| ops::check_linear_a8(c, what, g, x, p, b, None))
}

/// [`ops::check_w4a8`], no expectation on the path; returns whether the
/// integer path ran.
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
    checked(|c| ops::check_w4a8(c, label, g, rows, out, inp, group, zeros, bias, None))
}

/// `paths` name, with each backend, whether its integer path must run on
/// integer zero points (never on non-integer ones).
pub fn w4a8_matches_cpu<B: Device>(paths: &[(&str, &B, bool)]) {
    checked(|c| ops::w4a8_matches_cpu(c, paths))
}

/// The backward ops of the sensitivity pass (`Grad`) on `paths`, and the
/// dense input gradient over split weights on `split`.
pub fn backward_ops<B: Device>(paths: &[(&str, &B)], split: Option<(&str, &B)>) {
    checked(|c| ops::backward_ops(c, paths, split))
}

/// The whole suite as `mbq verify --ops` runs it: every family appears.
pub fn suite<B: Device>(paths: &[(&str, &B)], split: Option<(&str, &B)>) {
    let c = ops::suite(paths, split);
    for f in FAMILIES {
        assert!(
            c.results.iter().any(|r| r.family == *f),
            "family {f} not checked"
        );
    }
    c.assert_ok();
}

/// The scale search's `fake_quant` (bit-exact codes) against the CPU.
pub fn fake_quant_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::fake_quant_matches_cpu(c, paths))
}

/// `fake_quant` on rows narrow enough for weights split across bindings.
pub fn fake_quant_narrow_rows<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::fake_quant_narrow_rows(c, paths))
}

/// The scale search's `loss_terms` (masked error sums) against the CPU.
pub fn loss_terms_match_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::loss_terms_match_cpu(c, paths))
}

/// The search's per-column |x| statistics (compensated sums, maxima,
/// chained over samples) against the CPU.
pub fn abs_col_stats_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::abs_col_stats_matches_cpu(c, paths))
}

/// The sensitivity pass's masked |x| sums against the CPU.
pub fn abs_terms_match_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::abs_terms_match_cpu(c, paths))
}

/// The f16 conversion of kept activations (to_half, half_to_f32) against
/// the CPU, bit for bit.
pub fn half_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::half_matches_cpu(c, paths))
}

/// The search's f16 products (weight_to_half, linear_half) against the
/// CPU's.
pub fn linear_half_matches_cpu<B: Device>(paths: &[(&str, &B)]) {
    checked(|c| ops::linear_half_matches_cpu(c, paths))
}
