//! The redesign's safety net: `mbq quantize` on the CPU of the bundled
//! tiny-shapes with every calibrated method at W3 g128 and W4A8 (the
//! committed calibration set tests/fixtures/calib_shapes, 10 samples, seed
//! 42, MAE) writes exactly the weights file it wrote before the
//! network was given one definition (commit 0a520e1): the SHA-256 of each
//! output is recorded here. A change that moves any weight code, scale or
//! zero point by one bit fails this test; a deliberate change of results
//! must update the hashes and say why in its commit. The recorded runs
//! kept their activations in f32 (`--feature-dtype f32`); the default for
//! this f16 model, f16, is compared with them below.

mod common;

use common::reports::{compare, report, Agreement};
use common::{calib_options, scratch};
use mbq::calib::kept::FeatureDtype;
use mbq::calib::{quantize_model, Method, QuantizeOptions};
use sha2::{Digest, Sha256};

/// Calibration samples per run (as tests/calibrate.rs).
const N_SAMPLES: usize = 10;

/// (method, w_bit, a_bit, SHA-256 of the weights file) as written at 0a520e1
/// (then named model.safetensors, now model.mbq.safetensors: same bytes).
/// SmoothQuant W4A8 re-recorded when the CPU's products of many rows went
/// through the `gemm` crate: its sums in another order move the
/// calibration activations' per-channel maxima, hence SmoothQuant's
/// smoothing scales, in their last bits (the other five are unchanged);
/// and again when the CPU's softmax and SiLU computed `exp` inline
/// (`backend/cpu/math.rs`, within 2.5e-7 of f64) instead of through
/// libm's `expf`: the same last-bit moves, the same five unchanged.
const RECORDED: [(Method, u32, Option<u32>, &str); 6] = [
    (
        Method::Rtn,
        3,
        None,
        "e1d73ccdcd9fbce7739d49594bf52de24480d48dde8648131013298eff9d8278",
    ),
    (
        Method::Awq,
        3,
        None,
        "71ca24305d3630684e919098ccaa42b6db145331072dd8755d79b28b2fca3a6f",
    ),
    (
        Method::Mbq,
        3,
        None,
        "94f19106b4bf26df0056611da3fa94ec18eba5929aa910e35e2c1c49c6c63fd6",
    ),
    (
        Method::Rtn,
        4,
        Some(8),
        "5ca4de96b9213c53e2343dde3637c9ff9b069e348dfb379161501f1a01c24f54",
    ),
    (
        Method::Smoothquant,
        4,
        Some(8),
        "94ca75f4d9c8c131d2f28843106599dbb0ac4a053c9cf8f28c86f49f6149ff30",
    ),
    (
        Method::Mbq,
        4,
        Some(8),
        "58c4e86477d4d1a88bf57e8da7c14888d2438eec56c8ce5f291d0dd4dd35c125",
    ),
];

/// f16 against f32 activations, the sensitivity ratios: the 1e-3
/// (measured: 2.8e-5; the sensitivity pass runs on the f16-rounded
/// embeddings).
const F16_RATIO_RTOL: f64 = 1e-3;
/// f16 against f32 activations, a grid point's loss. Measured: up to
/// 9.5e-3 (W3) and 1.9e-2 (W4A8: an activation a rounding of 2^-11 moves
/// across an INT8 step), most points 1e-4..1e-3 apart.
const F16_LOSS_RTOL: f64 = 5e-2;
/// f16 against f32 activations: the same alpha wherever the f32 run's
/// best loss beats its runner-up by this much (the criterion for a
/// device against the CPU). Measured: the one alpha that moved (W3, layer
/// 2, mlp_out) had a margin of 7.7e-6.
const F16_ALPHA_MARGIN: f64 = 1e-3;

/// The recorded runs' options: [`calib_options`] with f32 activations.
fn recorded_options(
    method: Method,
    w_bit: u32,
    a_bit: Option<u32>,
    out: std::path::PathBuf,
) -> QuantizeOptions {
    QuantizeOptions {
        feature_dtype: FeatureDtype::F32,
        ..calib_options(method, w_bit, a_bit, N_SAMPLES, out)
    }
}

fn sha256_hex(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn quantized_outputs_are_byte_identical_to_the_recorded_ones() {
    let tmp = scratch("quantize_identity");
    let mut wrong = Vec::new();
    for (method, w_bit, a_bit, want) in RECORDED {
        let name = format!("{}-w{w_bit}a{}", method.name(), a_bit.unwrap_or(16));
        let out = tmp.join(&name);
        quantize_model(&recorded_options(method, w_bit, a_bit, out.clone()), |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = sha256_hex(&out.join("model.mbq.safetensors"));
        eprintln!("{name}: {got}");
        if got != want {
            wrong.push(format!("{name}: sha256 {got}, recorded {want}"));
        }
    }
    assert!(wrong.is_empty(), "outputs changed:\n{}", wrong.join("\n"));
}

/// The scale search with its features made one sample at a time
/// (`--search-chunk-tokens 1`) writes the very bytes of the recorded
/// all-at-once MBQ W3 run.
#[test]
fn chunked_search_features_write_the_same_bytes() {
    let tmp = scratch("quantize_identity_chunked");
    let (method, w_bit, a_bit, want) = RECORDED[2];
    assert_eq!((method, w_bit, a_bit), (Method::Mbq, 3, None));
    let out = tmp.join("mbq-w3-chunked");
    let o = QuantizeOptions {
        search_chunk_tokens: 1,
        ..recorded_options(method, w_bit, a_bit, out.clone())
    };
    quantize_model(&o, |_| {}).unwrap();
    assert_eq!(sha256_hex(&out.join("model.mbq.safetensors")), want);
}

/// The default for this f16 model keeps the samples' layer inputs and the
/// search's features in f16: made one sample at a time or all at once, the
/// same bytes; against the recorded f32 runs, losses within the f16
/// rounding of the activations and the same alphas where the f32 choice is
/// clear.
#[test]
fn f16_features_match_the_f32_search() {
    let tmp = scratch("quantize_identity_f16");
    for (method, w_bit, a_bit) in [(Method::Mbq, 3, None), (Method::Mbq, 4, Some(8))] {
        let name = format!("{}-w{w_bit}a{}", method.name(), a_bit.unwrap_or(16));
        let run = |tag: &str, dtype: FeatureDtype, chunk: usize| {
            let out = tmp.join(format!("{name}-{tag}"));
            let o = QuantizeOptions {
                feature_dtype: dtype,
                search_chunk_tokens: chunk,
                ..calib_options(method, w_bit, a_bit, N_SAMPLES, out.clone())
            };
            quantize_model(&o, |_| {}).unwrap_or_else(|e| panic!("{name} {tag}: {e}"));
            out
        };
        let f32_dir = run("f32", FeatureDtype::F32, 8192);
        let f16_dir = run("auto", FeatureDtype::Auto, 8192);
        let chunked = run("auto-chunked", FeatureDtype::Auto, 1);
        let bytes = |d: &std::path::Path| sha256_hex(&d.join("model.mbq.safetensors"));
        assert_eq!(bytes(&f16_dir), bytes(&chunked), "{name}: chunked f16");
        let (a, b) = (report(&f32_dir), report(&f16_dir));
        assert_eq!(a["feature_dtype"], "f32");
        assert_eq!(b["feature_dtype"], "f16");
        let agree = Agreement {
            ratio_rtol: F16_RATIO_RTOL,
            loss_rtol: F16_LOSS_RTOL,
            alpha_margin: F16_ALPHA_MARGIN,
        };
        let (worst, over, points) = compare(&name, &a, &b, agree);
        eprintln!(
            "{name}: f16 vs f32 features: largest relative loss difference {worst:.2e}; \
             {over} of {points} grid points over 1e-5"
        );
        assert!(
            over > 0,
            "{name}: no loss moved: were the features kept in f16?"
        );
    }
}
