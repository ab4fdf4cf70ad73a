//! `mbq-run` as a user runs it: the greedy ids and prompt length of every
//! golden case (the whole chain: image file -> HF-exact preprocessing ->
//! model -> tokens), and a clear error with a non-zero exit, never a panic,
//! for each kind of bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{cases, copy_dir, fixtures, scratch};

fn mbq_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args(args)
        .output()
        .expect("failed to start mbq-run")
}

fn model_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn mbq_run_reproduces_transformers_greedy_ids() {
    for case in cases() {
        let max = case.max_new_tokens.to_string();
        let model = model_arg(&case.model);
        let mut args = vec!["--model", &model];
        let image = case.image.as_deref().map(model_arg);
        if let Some(image) = &image {
            args.extend(["--image", image]);
        }
        args.extend([
            "--prompt",
            &case.prompt,
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            &max,
            "--backend",
            "cpu",
        ]);
        let out = mbq_run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: mbq-run failed: {stderr}",
            case.name
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not one JSON object ({e}): {}",
                case.name,
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let tokens: Vec<i64> = j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(tokens, case.i64("greedy_ids"), "{}: greedy ids", case.name);
        assert_eq!(
            j["prompt_tokens"].as_u64().unwrap() as usize,
            case.i64("input_ids").len(),
            "{}: prompt tokens",
            case.name
        );
        assert_eq!(j["backend"], "cpu");
        assert!(j["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
        println!("{}: {}", case.name, stderr.trim());
    }
}

/// Runs mbq-run expecting failure; returns stderr.
fn expect_error(args: &[&str]) -> String {
    let out = mbq_run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected a failure for {args:?}; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
    stderr
}

fn base_model() -> std::path::PathBuf {
    fixtures().join("models/llava_qwen")
}

fn image() -> String {
    model_arg(&fixtures().join("images/odd2.png"))
}

/// A writable copy of the base fixture model.
fn model_copy(name: &str) -> std::path::PathBuf {
    let d = scratch(name).join("model");
    copy_dir(&base_model(), &d);
    d
}

fn run_model(model: &Path) -> String {
    expect_error(&[
        "--model",
        &model_arg(model),
        "--image",
        &image(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--backend",
        "cpu",
    ])
}

#[test]
fn missing_model_directory() {
    let e = expect_error(&["--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(
        e.contains("/nonexistent/model") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer_file() {
    let m = model_copy("missing_tok");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    let e = run_model(&m);
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn missing_weights_file() {
    let m = model_copy("missing_weights");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    let e = run_model(&m);
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn unsupported_model_type_lists_supported() {
    let m = model_copy("bad_type");
    let p = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "mllama".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = run_model(&m);
    assert!(
        e.contains("mllama") && e.contains("llava, llava_onevision"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let m = model_copy("truncated");
    let p = m.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = run_model(&m);
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_header() {
    let m = model_copy("corrupt");
    let p = m.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    for b in bytes[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(&p, &bytes).unwrap();
    let e = run_model(&m);
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
}

/// Rewrites model.safetensors through `edit` (name, dtype, shape, bytes).
fn rewrite_weights(
    m: &Path,
    edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let p = m.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut items: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut items);
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let m = model_copy("missing_tensor");
    rewrite_weights(&m, |items| {
        items.retain(|(n, ..)| !n.ends_with("layers.1.mlp.down_proj.weight"))
    });
    let e = run_model(&m);
    assert!(
        e.contains("layers.1.mlp.down_proj.weight") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn wrong_tensor_shape_is_named() {
    let m = model_copy("wrong_shape");
    rewrite_weights(&m, |items| {
        for (n, _, shape, _) in items.iter_mut() {
            if n.ends_with("layers.0.mlp.down_proj.weight") {
                let (a, b) = (shape[0], shape[1]);
                *shape = vec![b, a];
                assert_ne!(a, b, "down_proj must not be square for this test");
            }
        }
    });
    let e = run_model(&m);
    assert!(
        e.contains("layers.0.mlp.down_proj.weight") && e.contains("expected shape"),
        "{e}"
    );
}

#[test]
fn non_image_file() {
    let d = scratch("not_an_image");
    let p = d.join("notes.png");
    std::fs::write(&p, "this is not a PNG").unwrap();
    let e = expect_error(&[
        "--model",
        &model_arg(&base_model()),
        "--image",
        &model_arg(&p),
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("notes.png"), "{e}");
}

#[test]
fn missing_image_file() {
    let e = expect_error(&[
        "--model",
        &model_arg(&base_model()),
        "--image",
        "/nonexistent/cat.png",
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("/nonexistent/cat.png"), "{e}");
}

#[test]
fn prompt_longer_than_context() {
    let long = "word ".repeat(5000);
    let e = expect_error(&[
        "--model",
        &model_arg(&base_model()),
        "--image",
        &image(),
        "--prompt",
        &long,
        "--backend",
        "cpu",
    ]);
    assert!(
        e.contains("context") && e.contains("max_position_embeddings"),
        "{e}"
    );
}

#[test]
fn image_with_template_without_image_slot() {
    let m = model_copy("no_image_slot");
    for f in ["chat_template.json", "chat_template.jinja"] {
        let _ = std::fs::remove_file(m.join(f));
    }
    // A text-only template: it renders only the text items.
    let tmpl = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(m.join("chat_template.jinja"), tmpl).unwrap();
    let e = run_model(&m);
    assert!(e.contains("no image slot"), "{e}");
}

#[test]
fn unknown_backend_option() {
    let out = mbq_run(&[
        "--model",
        &model_arg(&base_model()),
        "--prompt",
        "hi",
        "--backend",
        "tpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--backend") && stderr.contains("tpu"),
        "{stderr}"
    );
}

#[test]
fn unavailable_backend_is_a_clear_error() {
    // CUDA is not compiled in by default; built with it, there may be no
    // device (a runnable CUDA device is tests/cuda_model.rs's business).
    if !cuda_available() {
        let e = expect_error(&[
            "--model",
            &model_arg(&base_model()),
            "--prompt",
            "hi",
            "--backend",
            "cuda",
        ]);
        assert!(e.contains("cuda"), "{e}");
    }
    // A wgpu adapter that is not there.
    let e = expect_error(&[
        "--model",
        &model_arg(&base_model()),
        "--prompt",
        "hi",
        "--backend",
        "wgpu",
        "--adapter",
        "no-such-adapter",
    ]);
    assert!(e.contains("wgpu") && e.contains("no-such-adapter"), "{e}");
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    mbq::backend::cuda::probe(&mbq::backend::cuda::CudaOptions::from_env()).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}
