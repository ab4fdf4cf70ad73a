//! The whole VLM on the CUDA backend: the generic whole-model suite
//! (tests/backend_model) against the CPU backend and the transformers
//! goldens, then `mbq-run --backend cuda` / `auto`. With no CUDA device
//! each test prints `<test>: skipped: no CUDA device (...)` to stderr and
//! returns, or fails with `MBQ_REQUIRE_CUDA=1`.
#![cfg(feature = "cuda")]

mod backend_model;
mod common;
mod cuda_common;

use cuda_common::cuda;

#[test]
fn every_case_matches_cpu_and_transformers() {
    if let Some(g) = cuda("every_case_matches_cpu_and_transformers") {
        backend_model::every_case_matches_cpu_and_transformers(g);
    }
}

#[test]
fn packed_models_match_cpu_and_transformers() {
    if let Some(g) = cuda("packed_models_match_cpu_and_transformers") {
        backend_model::packed_models_match_cpu_and_transformers(g);
    }
}

#[test]
fn quantized_families_match_cpu() {
    if let Some(g) = cuda("quantized_families_match_cpu") {
        backend_model::quantized_families_match_cpu(g);
    }
}

#[test]
fn batched_steps_match_one_sequence_at_a_time() {
    if let Some(g) = cuda("batched_steps_match_one_sequence_at_a_time") {
        backend_model::batched_steps_match_one_sequence_at_a_time(g);
    }
}

#[test]
fn mbq_run_backend_cuda_and_auto() {
    // auto picks CUDA first when there is a device.
    if cuda("mbq_run_backend_cuda_and_auto").is_some() {
        backend_model::mbq_run_matches_golden(&[
            (vec!["--backend", "cuda"], "cuda"),
            (vec!["--backend", "auto"], "cuda"),
        ]);
    }
}
