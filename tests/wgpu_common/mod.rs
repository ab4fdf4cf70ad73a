//! Shared by the wgpu tests: one backend per configuration for the whole
//! test binary (pipelines compile once), random inputs, comparisons.
//!
//! No adapter is a FAILURE, never a silent pass: every wgpu test needs one,
//! and CI gets one from Mesa's lavapipe (scripts/test.sh installs it).
#![allow(dead_code)]

use std::sync::OnceLock;

use mbq::backend::wgpu::{Wgpu, WgpuOptions};
use mbq::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes per binding for the split-path backend: small enough that every
/// test weight is cut into several chunks.
pub const SPLIT_BINDING: u64 = 1024;

fn open(opts: WgpuOptions, what: &str) -> Wgpu {
    match Wgpu::new(&opts) {
        Ok(w) => {
            eprintln!("wgpu ({what}): {}", w.adapter());
            w
        }
        Err(e) => {
            let ci = std::env::var_os("CI").is_some()
                || std::env::var("MBQ_REQUIRE_GPU").is_ok_and(|v| v == "1");
            panic!(
                "the wgpu tests need an adapter{}: {e}\n\
                 Install a CPU Vulkan driver (Mesa lavapipe) with\n    \
                 sudo apt-get install -y mesa-vulkan-drivers\n\
                 or run `bash scripts/test.sh`, which does it.",
                if ci { " (CI / MBQ_REQUIRE_GPU)" } else { "" }
            )
        }
    }
}

fn base() -> WgpuOptions {
    WgpuOptions {
        allow_cpu: true,
        ..WgpuOptions::from_env()
    }
}

/// The default configuration: subgroup reductions when the adapter has them.
pub fn gpu() -> &'static Wgpu {
    static G: OnceLock<Wgpu> = OnceLock::new();
    G.get_or_init(|| open(base(), "default"))
}

/// Reductions forced through workgroup memory.
pub fn gpu_fallback() -> &'static Wgpu {
    static G: OnceLock<Wgpu> = OnceLock::new();
    G.get_or_init(|| {
        open(
            WgpuOptions {
                subgroups: false,
                ..base()
            },
            "no subgroups",
        )
    })
}

/// Weights split into bindings of [`SPLIT_BINDING`] bytes.
pub fn gpu_split() -> &'static Wgpu {
    static G: OnceLock<Wgpu> = OnceLock::new();
    G.get_or_init(|| {
        open(
            WgpuOptions {
                max_binding: Some(SPLIT_BINDING),
                ..base()
            },
            "split weights",
        )
    })
}

/// W4A8 forced onto the fake-quant fallback (as `MBQ_WGPU_NO_DOT4=1`):
/// no integer dot products.
pub fn gpu_no_dot4() -> &'static Wgpu {
    static G: OnceLock<Wgpu> = OnceLock::new();
    G.get_or_init(|| {
        open(
            WgpuOptions {
                dot4: false,
                ..base()
            },
            "no dot4",
        )
    })
}

/// Whether the integer W4A8 path must run on `g`: the instance's WGSL has
/// `dot4I8Packed` and `MBQ_WGPU_NO_DOT4=1` does not turn it off. Fails
/// loudly (never a silent pass) when the adapter claims the feature but
/// the device did not enable it, and says so when there is no feature.
pub fn expect_dot4(g: &Wgpu) -> bool {
    let forced_off = std::env::var("MBQ_WGPU_NO_DOT4").is_ok_and(|v| v == "1");
    let reported = mbq::backend::wgpu::adapters()
        .iter()
        .any(|a| a.wgsl_dot4 && g.adapter().starts_with(&a.name));
    if forced_off {
        assert!(!g.uses_dot4(), "MBQ_WGPU_NO_DOT4=1 but dot4 is on");
        eprintln!("W4A8: MBQ_WGPU_NO_DOT4=1, testing the fake-quant fallback only");
        return false;
    }
    assert!(
        reported,
        "{}: WGSL packed_4x8_integer_dot_product (dot4I8Packed) is not reported, so the integer \
         W4A8 path cannot be tested here; set MBQ_WGPU_NO_DOT4=1 to test the fallback only",
        g.adapter()
    );
    assert!(
        g.uses_dot4(),
        "{}: dot4I8Packed is reported but the device did not enable it (probe failed)",
        g.adapter()
    );
    true
}

/// Both reduction paths, named.
pub fn both() -> [(&'static str, &'static Wgpu); 2] {
    [("subgroup", gpu()), ("fallback", gpu_fallback())]
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
