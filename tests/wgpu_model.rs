//! The whole VLM on the wgpu backend: the generic whole-model suite
//! (tests/backend_model) against the CPU backend and the transformers
//! goldens, then `mbq-run --backend wgpu` (also naming the adapter) and
//! `--backend auto`.

mod backend_model;
mod common;
mod wgpu_common;

use wgpu_common::gpu;

#[test]
fn every_case_matches_cpu_and_transformers() {
    backend_model::every_case_matches_cpu_and_transformers(gpu());
}

#[test]
fn packed_models_match_cpu_and_transformers() {
    backend_model::packed_models_match_cpu_and_transformers(gpu());
}

#[test]
fn quantized_families_match_cpu() {
    backend_model::quantized_families_match_cpu(gpu());
}

#[test]
fn batched_steps_match_one_sequence_at_a_time() {
    backend_model::batched_steps_match_one_sequence_at_a_time(gpu());
}

#[test]
fn mbq_run_backend_wgpu_and_auto() {
    let adapter = gpu().adapter();
    let name = adapter.split(" (").next().unwrap_or("").to_string();
    // auto: CUDA first (when built with `--features cuda` and a device is
    // there), else a real GPU, else the CPU (never a CPU adapter such as
    // lavapipe).
    let has_gpu = mbq::backend::wgpu::adapters().iter().any(|a| a.is_gpu);
    let auto = if cuda_available() {
        "cuda"
    } else if has_gpu {
        "wgpu"
    } else {
        "cpu"
    };
    backend_model::mbq_run_matches_golden(&[
        (vec!["--backend", "wgpu"], "wgpu"),
        (vec!["--backend", "wgpu", "--adapter", &name], "wgpu"),
        (vec!["--backend", "auto"], auto),
    ]);
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    mbq::backend::cuda::probe(&mbq::backend::cuda::CudaOptions::from_env()).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}
