//! The whole VLM on the wgpu backend against the CPU backend and the
//! transformers goldens, for every committed fixture case: the image
//! through the vision tower and projector, prefill logits, and 12 greedy
//! tokens with the KV cache on the GPU (EOS ignored). Then the packed
//! models of the quantization goldens (RTN W3 / W4, g128), quantized here
//! with `quant::writer`: the fused dequant kernels in a whole model.

mod common;
mod wgpu_common;

use std::path::Path;

use common::{cases, fixtures, rel_err, scratch};
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::generate::{argmax, build_prompt, prefill};
use mbq::model::llava::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;
use mbq::quant::writer::quantize_rtn_dir;
use mbq::weights::WeightFiles;
use wgpu_common::gpu;

/// Image features entering the decoder, relative to their scale.
const FEATURES_REL_TOL: f32 = 1e-4;
/// Last-position prefill logits, relative to their scale.
const LOGITS_REL_TOL: f32 = 1e-4;
/// Tokens generated greedily per case.
const GREEDY_TOKENS: usize = 12;

/// Image features, prefill logits and greedy ids of the model in `dir` on
/// `image` and `text`, on backend `be`.
fn run<B: Backend>(be: &B, dir: &Path, image: &Path, text: &str) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let model = Vlm::load(be, dir).unwrap();
    let proc = Processor::load(dir, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(dir).unwrap();
    let pre = preprocess(&img_cfg, &load_image(image).unwrap()).unwrap();
    let prompt = build_prompt(&model, &proc, text, Some(&pre)).unwrap();
    let emb = model.encode_image(be, &pre).unwrap();
    let features = be.download(&emb.features).unwrap().data;
    let mut cache = be
        .new_cache(
            model.text.layers.len(),
            model.text.kv_dim(),
            prompt.ids.len() + GREEDY_TOKENS,
        )
        .unwrap();
    let logits = prefill(be, &model, &prompt, Some(&emb.features), &mut cache).unwrap();
    let mut ids = vec![argmax(&logits)];
    let mut pos = prompt.ids.len();
    while ids.len() < GREEDY_TOKENS {
        let x = model.text.embed(be, &[ids[ids.len() - 1]]).unwrap();
        let lg = model.text.forward(be, x, &mut cache, pos).unwrap();
        ids.push(argmax(&be.download(&lg).unwrap().data));
        pos += 1;
    }
    (features, logits, ids)
}

#[test]
fn every_case_matches_cpu_and_transformers() {
    let g = gpu();
    for case in cases() {
        let t0 = std::time::Instant::now();
        let (gf, gl, gids) = run(g, &case.model, &case.image, &case.prompt);
        let gpu_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (cf, cl, cids) = run(&Cpu, &case.model, &case.image, &case.prompt);
        let fe = rel_err(&gf, &cf);
        let le = rel_err(&gl, &cl);
        println!(
            "{}: features rel err {fe:.2e}, logits rel err {le:.2e}, wgpu {gpu_ms:.0} ms",
            case.name
        );
        assert!(fe <= FEATURES_REL_TOL, "{}: features {fe}", case.name);
        assert!(le <= LOGITS_REL_TOL, "{}: logits {le}", case.name);
        assert_eq!(gids, cids, "{}: wgpu vs cpu greedy ids", case.name);
        let golden: Vec<u32> = case
            .i64("greedy_ids")
            .iter()
            .map(|&x| x as u32)
            .take(GREEDY_TOKENS)
            .collect();
        assert_eq!(
            gids, golden,
            "{}: wgpu vs transformers greedy ids",
            case.name
        );
    }
}

#[test]
fn packed_models_match_cpu_and_transformers() {
    let g = gpu();
    let dir = fixtures().join("quant");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no quantization goldens in {}",
        dir.display()
    );
    for name in names {
        let case = dir.join(&name);
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap())
                .unwrap();
        let s = |k: &str| j[k].as_str().unwrap().to_string();
        let bits = j["bits"].as_u64().unwrap() as u32;
        let group = j["group_size"].as_u64().unwrap() as usize;
        let packed = scratch(&format!("wgpu-{name}")).join("packed");
        quantize_rtn_dir(&fixtures().join(s("model")), &packed, bits, group, |_| {}).unwrap();
        let image = fixtures().join(s("image"));
        let (_, gl, gids) = run(g, &packed, &image, &s("prompt"));
        let (_, cl, cids) = run(&Cpu, &packed, &image, &s("prompt"));
        let le = rel_err(&gl, &cl);
        println!("{name}: packed W{bits} g{group}: logits rel err vs cpu {le:.2e}");
        assert!(le <= LOGITS_REL_TOL, "{name}: logits {le}");
        assert_eq!(gids, cids, "{name}: wgpu vs cpu greedy ids");
        let golden = WeightFiles::open_file(&case.join("golden.safetensors")).unwrap();
        let (_, _, bytes) = golden.raw("greedy_ids").unwrap();
        let want: Vec<u32> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .take(GREEDY_TOKENS)
            .collect();
        assert_eq!(gids, want, "{name}: wgpu vs transformers greedy ids");
    }
}

fn mbq_run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args(args)
        .output()
        .expect("failed to start mbq-run")
}

#[test]
fn mbq_run_backend_wgpu_and_auto() {
    let case = &cases()[0];
    let (model, image) = (
        case.model.to_string_lossy().into_owned(),
        case.image.to_string_lossy().into_owned(),
    );
    let base = [
        "--model",
        &model,
        "--image",
        &image,
        "--prompt",
        &case.prompt,
        "--json",
        "--ignore-eos",
        "--max-new-tokens",
        "12",
    ];
    let golden: Vec<i64> = case.i64("greedy_ids");
    let adapter = gpu().adapter();
    let name = adapter.split(" (").next().unwrap_or("").to_string();
    for extra in [
        vec!["--backend", "wgpu"],
        vec!["--backend", "wgpu", "--adapter", &name],
    ] {
        let out = mbq_run(&[&base[..], &extra[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["backend"], "wgpu", "{extra:?}");
        let tokens: Vec<i64> = j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(tokens, golden, "{extra:?}: greedy ids");
        println!("{extra:?}: {}", stderr.trim());
    }
    // auto: a real GPU when there is one, else the CPU (never a CPU
    // adapter such as lavapipe), and it says which on stderr.
    let out = mbq_run(&[&base[..], &["--backend", "auto"][..]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "auto: {stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // (CUDA first, when built with `--features cuda` and a device is there.)
    let has_gpu = mbq::backend::wgpu::adapters().iter().any(|a| a.is_gpu);
    let want = if cuda_available() {
        "cuda"
    } else if has_gpu {
        "wgpu"
    } else {
        "cpu"
    };
    assert_eq!(j["backend"], want, "auto: {stderr}");
    assert!(stderr.contains("--backend auto: using"), "{stderr}");
    println!("auto: {}", stderr.lines().next().unwrap_or(""));
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    mbq::backend::cuda::probe(&mbq::backend::cuda::CudaOptions::from_env()).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}
