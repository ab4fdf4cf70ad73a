//! Shared by the wgpu tests: one backend per configuration for the whole
//! test binary (pipelines compile once), random inputs, comparisons.
//!
//! No adapter is a FAILURE, never a silent pass: every wgpu test needs one,
//! and CI gets one from Mesa's lavapipe (scripts/test.sh installs it).
#![allow(dead_code)]

use std::sync::OnceLock;

use mbq::backend::wgpu::{Wgpu, WgpuOptions};

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

/// Reductions forced through workgroup memory, and the search's f16
/// operands read as u32 pairs (no `SHADER_F16`).
pub fn gpu_fallback() -> &'static Wgpu {
    static G: OnceLock<Wgpu> = OnceLock::new();
    G.get_or_init(|| {
        open(
            WgpuOptions {
                subgroups: false,
                shader_f16: false,
                ..base()
            },
            "no subgroups, no SHADER_F16",
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

// A test crate may load this through several helper modules (common,
// wgpu_common / cuda_common, backend_ops): harmless copies of free functions.
#[allow(clippy::duplicate_mod)]
#[path = "../op_check/mod.rs"]
mod op_check;
#[allow(unused_imports)]
pub use op_check::*;
