//! Helpers shared by the GPU op tests (wgpu_common, cuda_common) and the
//! model tests (common): random inputs and relative-error checks against the
//! CPU reference.
#![allow(dead_code)]

use mbq::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Asserts `rel_err(got, want) <= tol`, naming the case.
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
    println!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
