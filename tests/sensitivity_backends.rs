//! The sensitivity pass (`sample_sensitivity`: forward, caption
//! cross-entropy, backward through every decoder layer with the `Grad`
//! ops) on a GPU backend against the CPU reference, on the fixture
//! tests/fixtures/models/llava_qwen128 with a 20-token sample built as the
//! unit tests of src/calib/sensitivity.rs build theirs (text, random
//! vision features in place, text, caption, text), and on the Qwen2-VL
//! fixture (models/qwen2vl) with the vision run as a 2 x 3 merged grid at
//! its M-RoPE positions (the backward then rotates by negated frequencies
//! at those positions). wgpu runs on any
//! adapter (lavapipe here); CUDA is skipped with its reason where there is
//! no device (a failure with `MBQ_REQUIRE_CUDA=1`).

#[cfg(feature = "cuda")]
mod cuda_common;
mod wgpu_common;

use std::path::Path;

use mbq::backend::cpu::Cpu;
use mbq::backend::{Backend, Grad, Search};
use mbq::calib::sensitivity::{sample_sensitivity, SampleSensitivity};
use mbq::model::rope::{rope_pos, Mrope};
use mbq::model::Vlm;
use mbq::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The loss, relative to the CPU's: the forward's products, norms and
/// attention in f32 in another order (each within 1e-5 of the CPU's,
/// tests/backend_ops) through 2 layers and the LM head; lavapipe measures
/// 1.8e-7.
const LOSS_RTOL: f64 = 1e-5;
/// Each layer's mean |grad| (attention and MLP output, vision and caption
/// positions) relative to the CPU's; where the CPU's is exactly 0 (past
/// the last caption-predicting position, or vision positions in the last
/// layer) the GPU's must be too. The backward ops are within 1e-5 of the
/// CPU's each (verify/ops/backward.rs); the means over a few hundred
/// values average the rounding. lavapipe measures up to 8.3e-7.
const GRAD_RTOL: f64 = 1e-4;

const VISION: std::ops::Range<usize> = 3..9;
const CAPTION: std::ops::Range<usize> = 12..18;
const N: usize = 20;

/// The fixtures: LLaVA (sequential positions) and Qwen2-VL (M-RoPE).
const FIXTURES: [&str; 2] = ["llava_qwen128", "qwen2vl"];

fn fixture_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

struct Sample {
    ids: Vec<u32>,
    x0: Tensor,
    vision: Vec<bool>,
    caption: Vec<bool>,
    mrope: Option<Mrope>,
}

/// Random ids; random features with the embeddings' scale at VISION.
fn sample(m: &Vlm<Cpu>, seed: u64) -> Sample {
    let mut rng = StdRng::seed_from_u64(seed);
    let vocab = m.cfg.text.vocab_size as u32;
    let hidden = m.cfg.text.hidden_size;
    let ids: Vec<u32> = (0..N).map(|_| rng.random_range(0..vocab)).collect();
    let mut x0 = m.text.embed(&Cpu, &ids).unwrap();
    let amp = x0.data.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let features: Vec<f32> = (0..VISION.len() * hidden)
        .map(|_| rng.random_range(-amp..amp))
        .collect();
    let features = Tensor::new(vec![VISION.len(), hidden], features).unwrap();
    Cpu.set_rows(&mut x0, VISION.start, &features).unwrap();
    Sample {
        ids,
        x0,
        vision: (0..N).map(|t| VISION.contains(&t)).collect(),
        caption: (0..N).map(|t| CAPTION.contains(&t)).collect(),
        mrope: m
            .cfg
            .text
            .mrope_section
            .as_ref()
            .map(|_| Mrope::new(N, &[(VISION.start, VISION.len())], &[(2, 3)]).unwrap()),
    }
}

fn run<B: Grad + Search>(be: &B, fixture: &str, s: &Sample) -> SampleSensitivity {
    let m = Vlm::load(be, &fixture_dir(fixture)).unwrap();
    sample_sensitivity(
        be,
        &m.text,
        &be.upload(&s.x0).unwrap(),
        &s.ids,
        &s.vision,
        &s.caption,
        rope_pos(s.mrope.as_ref()),
        &mut || {},
    )
    .unwrap()
}

/// Compares `be`'s pass with the CPU's on two samples; prints the errors.
fn matches_cpu<B: Grad + Search>(be: &B) {
    for fixture in FIXTURES {
        matches_cpu_on(be, fixture);
    }
}

fn matches_cpu_on<B: Grad + Search>(be: &B, fixture: &str) {
    let cpu_model = Vlm::load(&Cpu, &fixture_dir(fixture)).unwrap();
    for seed in [7, 11] {
        let s = sample(&cpu_model, seed);
        assert_eq!(s.mrope.is_some(), fixture == "qwen2vl");
        let want = run(&Cpu, fixture, &s);
        let got = run(be, fixture, &s);
        let loss_err = (got.loss - want.loss).abs() / want.loss.abs();
        println!(
            "{} {fixture} seed {seed}: loss {:.6} vs cpu {:.6} (rel {loss_err:.2e}, tol {LOSS_RTOL:.0e})",
            be.name(),
            got.loss,
            want.loss
        );
        assert!(loss_err <= LOSS_RTOL, "loss {} vs {}", got.loss, want.loss);
        assert_eq!(got.layers.len(), want.layers.len());
        assert_eq!(got.has_vision, want.has_vision);
        let mut worst = 0.0f64;
        for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
            for (what, a, b) in [
                ("attn vision", g.attn.vision, w.attn.vision),
                ("attn caption", g.attn.caption, w.attn.caption),
                ("mlp vision", g.mlp.vision, w.mlp.vision),
                ("mlp caption", g.mlp.caption, w.mlp.caption),
            ] {
                if b == 0.0 {
                    assert_eq!(a, 0.0, "layer {i} {what}: {a} where the CPU's is 0");
                    continue;
                }
                let e = (a - b).abs() / b.abs();
                println!("  layer {i} {what}: {a:.6e} vs cpu {b:.6e} (rel {e:.2e})");
                assert!(e <= GRAD_RTOL, "layer {i} {what}: {a} vs {b} (rel {e:.2e})");
                worst = worst.max(e);
            }
        }
        println!(
            "{} seed {seed}: worst mean |grad| rel err {worst:.2e} (tol {GRAD_RTOL:.0e})",
            be.name()
        );
    }
}

#[test]
fn wgpu_sensitivity_matches_cpu() {
    matches_cpu(wgpu_common::gpu());
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_sensitivity_matches_cpu() {
    if let Some(g) = cuda_common::cuda("cuda_sensitivity_matches_cpu") {
        matches_cpu(g);
    }
}
