//! `mbq verify` as a user runs it, on lavapipe in CI: the bundled model
//! and fixture models on cpu and wgpu (verdict lines, exit 0), `--ops`
//! listing every kernel family all OK, `--json` parsing, and clear errors
//! with a non-zero exit for a backend that does not exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn mbq(args: &[&str]) -> Output {
    let xdg = std::env::temp_dir().join(format!("mbq-verify-xdg-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&xdg);
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .arg("verify")
        .args(args)
        .env("XDG_RUNTIME_DIR", &xdg)
        .output()
        .expect("failed to start mbq")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exit 0 and the verdict lines of cpu and wgpu.
fn assert_verified(o: &Output, what: &str) -> String {
    let (out, err) = text(o);
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status.code()
    );
    for line in ["verdict cpu: OK", "verdict wgpu: OK", "verify: OK"] {
        assert!(out.contains(line), "{what}: no `{line}` in\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("wgpu: ids equal") && l.contains("top-1 12/12 steps")),
        "{what}: no wgpu ids line in\n{out}"
    );
    out
}

#[test]
fn bundled_model_on_cpu_and_wgpu() {
    let o = mbq(&["--backends", "cpu,wgpu"]);
    let out = assert_verified(&o, "bundled model");
    assert!(out.contains("tiny-shapes-w3"), "{out}");
    assert!(out.contains("What color is the circle?"), "{out}");
}

#[test]
fn fixture_models_on_cpu_and_wgpu() {
    let fx = repo().join("tests/fixtures");
    for (model, image, prompt) in [
        ("llava_qwen", "odd2.png", "Describe this picture briefly."),
        ("onevision", "odd.png", "Is there a red circle?"),
    ] {
        let m = fx.join("models").join(model);
        let i = fx.join("images").join(image);
        let o = mbq(&[
            "--backends",
            "cpu,wgpu",
            "--model",
            m.to_str().unwrap(),
            "--image",
            i.to_str().unwrap(),
            "--prompt",
            prompt,
        ]);
        assert_verified(&o, model);
    }
}

#[test]
fn ops_list_every_kernel_all_ok() {
    let o = mbq(&["--backends", "wgpu", "--ops"]);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "exit {:?}\n{out}\n{err}",
        o.status.code()
    );
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("wgpu ops: "))
        .collect();
    for family in mbq::verify::ops::FAMILIES {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().nth(3) == Some(family)),
            "family {family} missing from\n{out}"
        );
    }
    let kernels: Vec<&&str> = lines.iter().filter(|l| !l.contains("kernels OK")).collect();
    assert!(kernels.len() > 100, "{} kernel lines", kernels.len());
    for l in &kernels {
        assert!(l.starts_with("wgpu ops: OK "), "not OK: {l}");
    }
    // The split-binding path ran.
    assert!(kernels.iter().any(|l| l.contains(" split ")), "{out}");
    let summary = format!("wgpu ops: {0} of {0} kernels OK", kernels.len());
    assert!(out.contains(&summary), "no `{summary}` in\n{out}");
    assert!(out.contains("verdict wgpu: OK"), "{out}");
}

#[test]
fn json_parses() {
    let o = mbq(&["--backends", "cpu,wgpu", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(j["ok"], true);
    assert_eq!(j["tokens"], mbq::verify::TOKENS);
    let backends = j["backends"].as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu", "wgpu"]);
    let w = &backends[1];
    assert_eq!(w["ok"], true);
    assert_eq!(w["model"]["ids_equal"], true);
    assert_eq!(w["model"]["ids"], j["reference_ids"]);
    assert!(w["model"]["max_rel_logit_diff"].as_f64().unwrap() <= mbq::verify::LOGITS_REL_TOL);
    assert!(w["ops"].as_array().unwrap().is_empty());
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let o = mbq(&["--backends", "nope"]);
    let (out, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("unknown backend `nope`") && err.contains("cpu, wgpu, cuda"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let missing = PathBuf::from("/nonexistent/verify.png");
    let o = mbq(&["--backends", "cpu", "--image", missing.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("verify.png") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn cuda_when_not_available_is_an_error() {
    // Without the feature (or without a device) an explicit cuda fails
    // clearly; with one it must verify.
    let o = mbq(&["--backends", "cuda"]);
    let (out, err) = text(&o);
    if mbq::backend::cuda::probe(&mbq::backend::cuda::CudaOptions::from_env()).is_err() {
        assert!(!o.status.success(), "{out}");
        assert!(err.contains("--backends cuda: not available"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    } else {
        assert!(o.status.success(), "{out}\n{err}");
    }
}
