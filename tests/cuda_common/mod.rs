//! Shared helpers of the CUDA tests (tests/cuda_ops.rs, tests/cuda_model.rs):
//! the backend on device 0 (with cuBLAS, and with `gemm.cu` instead), and
//! random inputs. With no CUDA device every test prints
//! `skipped: no CUDA device (<reason>)` to stderr and returns.
#![allow(dead_code)]

use std::sync::OnceLock;

use mbq::backend::cuda::{self, Cuda, CudaOptions};
use mbq::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// The backend on device 0 (cuBLAS when it loads), or `None` after printing
/// `skipped: no CUDA device (<reason>)` to stderr.
pub fn cuda(test: &str) -> Option<&'static Cuda> {
    if let Some(why) = no_device() {
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

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `[rows, cols]` of uniform values in `[-scale, scale)`.
pub fn random(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let data = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::new(vec![rows, cols], data).unwrap()
}

/// The same values rounded to f16 (what an f16 checkpoint holds).
pub fn to_f16(t: &Tensor) -> Tensor {
    let data = t
        .data
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    Tensor::new(t.shape.clone(), data).unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Asserts `rel_err(got, want) <= tol`, naming the case; prints the error.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(
        got.data.len(),
        want.data.len(),
        "{what}: sizes {:?} vs {:?}",
        got.shape,
        want.shape
    );
    assert!(
        got.data.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let e = rel_err(&got.data, &want.data);
    println!("{what}: rel err {e:.2e}");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:e}");
}
