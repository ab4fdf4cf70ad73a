//! The bundled models (models/tiny-shapes, trained by tools/train_tiny.py on
//! `mbq shapes`, and models/tiny-shapes-w3, its MBQ W3 g128 version made by
//! tools/make_tiny_w3.sh): `mbq-run` uses the W3 one when no --model is
//! given and answers the example images' questions; `mbq eval` on the
//! committed held-out set (tests/fixtures/shapes_eval, `mbq shapes --seed
//! 1000`) clears MIN_ACCURACY with both; the W3 one says it is MBQ.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::scratch;

/// Exact-match accuracy the held-out subset must reach. Both bundled
/// models score 0.98 on these 50 questions (0.974 and 0.970 on the
/// README's 1034), so this guards against regressions of the model and the
/// eval path with room for a changed summation order.
const MIN_ACCURACY: f64 = 0.9;
/// The seed the examples and the held-out set come from (never trained on).
const EVAL_SEED: &str = "1000";
/// The example images: `mbq shapes --seed 1000` images by index.
const EXAMPLES: &[&str] = &["s1000_000000", "s1000_000003", "s1000_000009"];

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn mbq_run_without_model_uses_tiny_shapes_w3_and_answers_the_examples_questions() {
    // Ground truth: the generator's questions for the eval seed.
    let gen = scratch("tiny_shapes_examples").join("data");
    let o = run(
        env!("CARGO_BIN_EXE_mbq"),
        &[
            "shapes",
            "--seed",
            EVAL_SEED,
            "--count",
            "12",
            "--out",
            gen.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let qs = mbq::eval::load_questions(&gen.join("questions.jsonl")).unwrap();
    let mut relations = 0;
    for stem in EXAMPLES {
        let example = repo().join("examples").join(format!("{stem}.png"));
        let generated = gen.join("images").join(format!("{stem}.png"));
        assert_eq!(
            std::fs::read(&example).unwrap(),
            std::fs::read(&generated).unwrap(),
            "{} is not `mbq shapes --seed {EVAL_SEED}`'s image",
            example.display()
        );
        // The README's main job asks a colour question; the shape question
        // looks a shape up the other way (by its colour); the relation
        // question (where the image has one) compares two shapes' positions.
        for kind in ["color", "shape", "relation"] {
            let found = qs
                .iter()
                .find(|q| q.kind == kind && q.image == format!("images/{stem}.png"));
            let Some(q) = found else {
                assert_eq!(kind, "relation", "{stem}: no {kind} question");
                continue;
            };
            relations += usize::from(kind == "relation");
            let o = run(
                env!("CARGO_BIN_EXE_mbq-run"),
                &[
                    "--image",
                    example.to_str().unwrap(),
                    "--prompt",
                    &q.prompt,
                    "--backend",
                    "cpu",
                    "--json",
                ],
            );
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{stem}: {stderr}");
            assert!(
                stderr.contains("no --model given") && stderr.contains("tiny-shapes-w3"),
                "does not say which model: {stderr}"
            );
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let text = j["text"].as_str().unwrap();
            assert!(
                mbq::eval::matches(text, &q.answer),
                "{stem}: {:?} answered {text:?}, expected {:?}",
                q.prompt,
                q.answer
            );
        }
    }
    assert!(relations > 0, "no example image has a relation question");
}

#[test]
fn eval_on_the_committed_held_out_set() {
    let data = repo().join("tests/fixtures/shapes_eval/questions.jsonl");
    for model in ["tiny-shapes", "tiny-shapes-w3"] {
        let o = run(
            env!("CARGO_BIN_EXE_mbq"),
            &[
                "eval",
                "--model",
                model,
                "--data",
                data.to_str().unwrap(),
                "--limit",
                "50",
                "--json",
                "--misses",
                "--backend",
                "cpu",
            ],
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{model}: {stderr}");
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["count"], 50);
        // --misses lists exactly the wrong answers.
        let misses = j["misses"].as_array().unwrap();
        assert_eq!(
            misses.len() as u64,
            50 - j["correct"].as_u64().unwrap(),
            "{j}"
        );
        for m in misses {
            let (want, got) = (
                m["answer"].as_str().unwrap(),
                m["generated"].as_str().unwrap(),
            );
            assert!(!mbq::eval::matches(got, want), "{m}");
        }
        let acc = j["accuracy"].as_f64().unwrap();
        assert!(
            acc >= MIN_ACCURACY,
            "{model}: accuracy {acc} < {MIN_ACCURACY}: {j}"
        );
        assert!(j["per_type"]["color"]["count"].as_u64().unwrap() > 0);
        let ppl = j["caption_perplexity"].as_f64().unwrap();
        assert!(
            (1.0..2.0).contains(&ppl),
            "{model}: caption perplexity {ppl}"
        );
    }
}

#[test]
fn w3_model_runs_and_says_it_is_mbq() {
    let example = repo().join("examples").join(format!("{}.png", EXAMPLES[0]));
    let o = run(
        env!("CARGO_BIN_EXE_mbq-run"),
        &[
            "--model",
            "tiny-shapes-w3",
            "--image",
            example.to_str().unwrap(),
            "--prompt",
            "How many shapes are there?",
            "--backend",
            "cpu",
            "--max-new-tokens",
            "8",
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("tiny-shapes-w3") && stderr.contains("MBQ W3 g128"),
        "{stderr}"
    );
}

#[test]
fn mbq_models_is_looked_in_first() {
    let d = scratch("tiny_shapes_env");
    common::copy_dir(
        &repo().join("models/tiny-shapes-w3"),
        &d.join("tiny-shapes-w3"),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .env("MBQ_MODELS", &d)
        .args([
            "--prompt",
            "hi",
            "--backend",
            "cpu",
            "--max-new-tokens",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(d.join("tiny-shapes-w3").to_str().unwrap()),
        "{stderr}"
    );
}
