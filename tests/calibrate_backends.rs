//! The scale search on a GPU backend against the CPU reference: the same
//! `mbq quantize` (MBQ W3 g128, MBQ W4A8, SmoothQuant W4A8) on the bundled
//! tiny-shapes model and the committed calibration set, with `--backend
//! cpu` and with `--backend wgpu` (lavapipe here) or `cuda` (skipped with
//! its reason where there is no device, a failure with `MBQ_REQUIRE_CUDA=1`:
//! tests/cuda_common's `cuda`). The two `calibration_report.json`
//! must agree: the sensitivity ratios within RATIO_RTOL, every grid point's
//! loss within LOSS_RTOL, and the same alpha wherever the CPU's best loss
//! beats its runner-up by more than ALPHA_MARGIN (relative).

mod common;
#[cfg(feature = "cuda")]
mod cuda_common;

use common::reports::{compare, report, Agreement};
use common::{calib_options, scratch};
use mbq::backend::BackendKind;
use mbq::calib::{quantize_model, CalibProgress, Method, QuantizeOptions};
use serde_json::Value;

/// Sensitivity ratios (the criterion). Each run computes them on
/// its own backend (settings' `sensitivity_backend`): the backward ops are
/// within 1e-5 of the CPU's each (verify/ops/backward.rs) and the whole
/// pass within 1e-6 on the fixture (tests/sensitivity_backends.rs).
const RATIO_RTOL: f64 = 1e-3;
/// A grid point's loss. With f32 products most agreed to about 1e-6 (f32
/// summation order), a few by up to ~2e-3 where a weight's 3- or 4-bit
/// code (or, in W4A8, an INT8 activation) rounds the other way: the scales
/// come from the device-computed |x| means, which differ in the last bits.
/// With f16 products (this f16 model's default) a last-bit difference in
/// an operand also becomes an f16 step where it crosses a rounding
/// boundary: measured on lavapipe, medians per group 1e-6..2e-4, at worst
/// 1.35e-3 (W3) and 2.05e-3 (W4A8); the test prints how many points differ
/// by more than 1e-5.
const LOSS_RTOL: f64 = 1e-2;
/// The criterion: the alpha must match where the CPU's best loss
/// is this much (relative) below its runner-up.
const ALPHA_MARGIN: f64 = 1e-4;
const N_SAMPLES: usize = 6;

/// Runs every case on the CPU and on `backend`, and compares.
fn search_matches_cpu(backend: BackendKind, label: &str) {
    let tmp = scratch(&format!("calibrate_backends_{label}"));
    for (method, a_bit) in [
        (Method::Mbq, None),
        (Method::Mbq, Some(8)),
        (Method::Smoothquant, Some(8)),
    ] {
        let name = format!("{}-a{}", method.name(), a_bit.unwrap_or(16));
        let run = |b: BackendKind, tag: &str| {
            let out = tmp.join(format!("{name}-{tag}"));
            let w_bit = if a_bit.is_some() { 4 } else { 3 };
            // The device makes its features a few samples at a time (at
            // least two chunks of these samples), the CPU all at once.
            let chunk = if b == BackendKind::Cpu { 8192 } else { 400 };
            let o = QuantizeOptions {
                backend: b,
                search_chunk_tokens: chunk,
                ..calib_options(method, w_bit, a_bit, N_SAMPLES, out.clone())
            };
            let mut chunks = 0;
            quantize_model(&o, |p| {
                if let CalibProgress::Layer { chunks: c, .. } = p {
                    chunks = chunks.max(c)
                }
            })
            .unwrap_or_else(|e| panic!("{name} on {tag}: {e}"));
            let want = if b == BackendKind::Cpu { 1 } else { 2 };
            assert!(chunks >= want, "{name} on {tag}: {chunks} chunks");
            report(&out)
        };
        let cpu = run(BackendKind::Cpu, "cpu");
        let dev = run(backend, label);
        assert_eq!(cpu["backend"], "cpu");
        assert_eq!(dev["backend"], label, "{name}");
        if method == Method::Mbq {
            assert_eq!(cpu["sensitivity_backend"], "cpu", "{name}");
            assert_eq!(dev["sensitivity_backend"], label, "{name}");
        }
        // Where each stage ran, and that it took some time.
        let stage = |r: &Value, s: &str| {
            r["stages"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["stage"] == s))
                .cloned()
                .unwrap_or_else(|| panic!("{name}: no stage {s} in {}", r["stages"]))
        };
        let mut stages = vec!["embed", "search"];
        if method == Method::Mbq {
            stages.push("sensitivity");
        }
        for s in stages {
            let (c, d) = (stage(&cpu, s), stage(&dev, s));
            assert!(
                c["device"].as_str().unwrap().starts_with("cpu"),
                "{name} {s}: {c}"
            );
            assert!(
                d["device"].as_str().unwrap().starts_with(label),
                "{name} {s}: {d}"
            );
            assert!(d["seconds"].as_f64().unwrap() > 0.0, "{name} {s}: {d}");
        }
        // The default keeps the activations in f16 for this f16 model, on
        // both sides.
        assert_eq!(cpu["feature_dtype"], "f16", "{name}");
        assert_eq!(dev["feature_dtype"], "f16", "{name}");
        let agree = Agreement {
            ratio_rtol: RATIO_RTOL,
            loss_rtol: LOSS_RTOL,
            alpha_margin: ALPHA_MARGIN,
        };
        let (worst, over, points) = compare(&name, &cpu, &dev, agree);
        eprintln!(
            "{name}: {label} vs cpu: largest relative loss difference {worst:.2e}; \
             {over} of {points} grid points over 1e-5"
        );
    }
}

#[test]
fn wgpu_search_matches_cpu() {
    search_matches_cpu(BackendKind::Wgpu, "wgpu");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_search_matches_cpu() {
    if cuda_common::cuda("cuda_search_matches_cpu").is_none() {
        return;
    }
    search_matches_cpu(BackendKind::Cuda, "cuda");
}
