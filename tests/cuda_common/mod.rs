//! Shared helpers of the CUDA tests (tests/cuda_ops.rs, tests/cuda_model.rs):
//! the backend on device 0 (with cuBLAS, and with `gemm.cu` instead), and
//! random inputs. With no CUDA device every test prints
//! `<test>: skipped: no CUDA device (<reason>)` to stderr and returns (it
//! counts as passed), unless `MBQ_REQUIRE_CUDA=1` (scripts/gpu-check.sh sets
//! it): then it FAILS, naming the reason.
#![allow(dead_code)]

use std::sync::OnceLock;

use mbq::backend::cuda::{self, Cuda, CudaOptions};

/// Why there is no device to run on, once per process; `None` when there is one.
fn no_device() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| cuda::devices().err().map(|e| e.to_string()))
        .as_deref()
}

fn open(cublas: bool) -> Cuda {
    let o = CudaOptions { device: 0, cublas };
    // A device is there: failing to open it (no NVRTC, ...) is a failure.
    let c = Cuda::with_options(&o).unwrap_or_else(|e| panic!("opening CUDA device 0: {e}"));
    eprintln!(
        "cuda: {} (cuBLAS {})",
        c.device(),
        if c.uses_cublas() { "on" } else { "off" }
    );
    c
}

/// Whether `MBQ_REQUIRE_CUDA=1`: no device is then a failure, not a skip.
pub fn cuda_required() -> bool {
    std::env::var("MBQ_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// The backend on device 0 (cuBLAS when it loads), or `None` after printing
/// `<test>: skipped: no CUDA device (<reason>)` to stderr. With
/// `MBQ_REQUIRE_CUDA=1` no device panics instead (the test fails).
pub fn cuda(test: &str) -> Option<&'static Cuda> {
    if let Some(why) = no_device() {
        if cuda_required() {
            panic!("{test}: no CUDA device ({why}), and MBQ_REQUIRE_CUDA=1 requires one");
        }
        eprintln!("{test}: skipped: no CUDA device ({why})");
        return None;
    }
    static G: OnceLock<Cuda> = OnceLock::new();
    Some(G.get_or_init(|| open(true)))
}

/// The backend with the SGEMM of `gemm.cu` instead of cuBLAS.
pub fn cuda_no_cublas() -> &'static Cuda {
    static G: OnceLock<Cuda> = OnceLock::new();
    G.get_or_init(|| open(false))
}

/// Both prefill GEMM paths: `[("cublas", ..), ("gemm.cu", ..)]`, or `None`
/// (skipped, with the message) when there is no device.
pub fn both(test: &str) -> Option<[(&'static str, &'static Cuda); 2]> {
    let c = cuda(test)?;
    Some([("cublas", c), ("gemm.cu", cuda_no_cublas())])
}

// A test crate may load this through several helper modules (common,
// wgpu_common / cuda_common, backend_ops): harmless copies of free functions.
#[allow(clippy::duplicate_mod)]
#[path = "../op_check/mod.rs"]
mod op_check;
#[allow(unused_imports)]
pub use op_check::*;
