//! The whole-model suite every device backend runs, written once and
//! generic over the backend: the VLM against the CPU backend and the
//! transformers goldens for every committed fixture case (the image
//! through the vision tower and projector, prefill logits, and greedy
//! tokens with the KV cache on the device, EOS ignored); then the packed
//! models of the quantization goldens (RTN W3 / W4, g128), quantized here
//! with `quant::writer`: the fused dequant kernels in a whole model; and
//! `mbq-run` with `--backend`. tests/wgpu_model.rs and tests/cuda_model.rs
//! instantiate it. The test crate must declare `mod common;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crate::common::{cases, fixtures, rel_err, scratch};
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::generate::{argmax, build_prompt, embed_prompt, prefill, Prompt};
use mbq::image_processor::ImageProcessor;
use mbq::model::decoder::{RopePos, SeqKv};
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;
use mbq::quant::writer::quantize_rtn_dir;
use mbq::weights::WeightFiles;

/// Image features entering the decoder, relative to their scale (every
/// backend).
pub const FEATURES_REL_TOL: f32 = 1e-4;
/// Last-position prefill logits, relative to their scale (every backend):
/// the tolerance `mbq verify` holds every step to.
pub const LOGITS_REL_TOL: f32 = mbq::verify::LOGITS_REL_TOL as f32;
/// Last-position prefill logits of a model with INT8 activations (W4A8),
/// relative to their scale. A device summing in another order than the CPU
/// moves an activation that sits at a .5 boundary of its INT8 grid by one
/// step, which moves the logits by up to about the activation
/// quantization's own effect (tests/w4a8.rs measures 1.4e-2 for it; an H200
/// measured 8.3e-3 on the InternVL fixture, 3e-7 on the other two, lavapipe
/// 3e-7 on all). The greedy ids must still be equal.
pub const A8_LOGITS_REL_TOL: f32 = 5e-2;
/// Tokens generated greedily per case (as many as `mbq verify` compares);
/// they must equal the CPU's and the transformers goldens exactly.
pub const GREEDY_TOKENS: usize = mbq::verify::TOKENS;

/// Image features, prefill logits and greedy ids of the model in `dir` on
/// `image` (if any) and `text`, on backend `be`.
pub fn run<B: Backend>(
    be: &B,
    dir: &Path,
    image: Option<&Path>,
    text: &str,
) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let model = Vlm::load(be, dir).unwrap();
    let proc = Processor::load(dir, model.cfg.image_token_index).unwrap();
    let pre = image.map(|image| {
        let img_cfg = ImageProcessor::load(dir).unwrap();
        img_cfg.preprocess(&load_image(image).unwrap()).unwrap()
    });
    let prompt = build_prompt(&model, &proc, text, pre.as_ref()).unwrap();
    let emb = pre.as_ref().map(|pre| model.encode_image(be, pre).unwrap());
    let features = match &emb {
        Some(emb) => be.download(&emb.features).unwrap().data,
        None => Vec::new(),
    };
    let mut cache = be
        .new_cache(
            model.text.layers.len(),
            model.text.kv_dim(),
            prompt.ids.len() + GREEDY_TOKENS,
        )
        .unwrap();
    let feats = emb.as_ref().map(|e| &e.features);
    let logits = prefill(be, &model, &prompt, feats, &mut cache).unwrap();
    let mut ids = vec![argmax(&logits)];
    let mut pos = prompt.ids.len();
    while ids.len() < GREEDY_TOKENS {
        let x = model.text.embed(be, &[ids[ids.len() - 1]]).unwrap();
        let lg = model
            .text
            .forward_at(be, x, &mut cache, pos, prompt.rope_pos())
            .unwrap();
        ids.push(argmax(&be.download(&lg).unwrap().data));
        pos += 1;
    }
    (features, logits, ids)
}

/// Every fixture case on `be`: features and logits within the tolerances
/// of the CPU's, greedy ids equal to the CPU's and to transformers'.
pub fn every_case_matches_cpu_and_transformers<B: Backend>(be: &B) {
    let label = be.name();
    for case in cases() {
        let t0 = std::time::Instant::now();
        let image = case.image.as_deref();
        let (gf, gl, gids) = run(be, &case.model, image, &case.prompt);
        let dev_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (cf, cl, cids) = run(&Cpu, &case.model, image, &case.prompt);
        let fe = rel_err(&gf, &cf);
        let le = rel_err(&gl, &cl);
        println!(
            "{}: features rel err {fe:.2e}, logits rel err {le:.2e}, {label} {dev_ms:.0} ms",
            case.name
        );
        assert!(fe <= FEATURES_REL_TOL, "{}: features {fe}", case.name);
        assert!(le <= LOGITS_REL_TOL, "{}: logits {le}", case.name);
        assert_eq!(gids, cids, "{}: {label} vs cpu greedy ids", case.name);
        let golden: Vec<u32> = case
            .i64("greedy_ids")
            .iter()
            .map(|&x| x as u32)
            .take(GREEDY_TOKENS)
            .collect();
        assert_eq!(
            gids, golden,
            "{}: {label} vs transformers greedy ids",
            case.name
        );
    }
}

/// Every quantization golden (tests/fixtures/quant), quantized here with
/// RTN, on `be`: logits within the tolerance of the CPU's, greedy ids equal
/// to the CPU's and to transformers'.
pub fn packed_models_match_cpu_and_transformers<B: Backend>(be: &B) {
    let label = be.name();
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
        let packed = scratch(&format!("{label}-{name}")).join("packed");
        quantize_rtn_dir(&fixtures().join(s("model")), &packed, bits, group, |_| {}).unwrap();
        let image = fixtures().join(s("image"));
        let (_, gl, gids) = run(be, &packed, Some(&image), &s("prompt"));
        let (_, cl, cids) = run(&Cpu, &packed, Some(&image), &s("prompt"));
        let le = rel_err(&gl, &cl);
        println!("{name}: packed W{bits} g{group}: logits rel err vs cpu {le:.2e}");
        assert!(le <= LOGITS_REL_TOL, "{name}: logits {le}");
        assert_eq!(gids, cids, "{name}: {label} vs cpu greedy ids");
        let golden = WeightFiles::open_file(&case.join("golden.safetensors")).unwrap();
        let (_, _, bytes) = golden.raw("greedy_ids").unwrap();
        let want: Vec<u32> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .take(GREEDY_TOKENS)
            .collect();
        assert_eq!(gids, want, "{name}: {label} vs transformers greedy ids");
    }
}

/// The Qwen2-VL, Qwen2.5-VL and InternVL fixtures quantized here with RTN W3, MBQ W3
/// and SmoothQuant W4A8 (g128; the calibrated ones on 4 samples of the
/// committed set, on the CPU): on `be` the prefill logits are within the
/// tolerance of the CPU's and the greedy ids equal.
pub fn quantized_families_match_cpu<B: Backend>(be: &B) {
    use mbq::calib::{quantize_model, Method};
    let label = be.name();
    for (model, case) in [
        ("qwen2vl", "qwen2vl_odd2"),
        ("qwen25vl", "qwen25vl_big"),
        ("internvl", "internvl_wide"),
    ] {
        let case = crate::common::load_case(case);
        for (method, w_bit, a_bit) in [
            (Method::Rtn, 3, None),
            (Method::Mbq, 3, None),
            (Method::Smoothquant, 4, Some(8)),
        ] {
            let name = format!("{model}-{method:?}-w{w_bit}");
            let out = scratch(&format!("{label}-{name}")).join("out");
            let mut o = crate::common::calib_options(method, w_bit, a_bit, 4, out.clone());
            o.model = fixtures().join("models").join(model);
            quantize_model(&o, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
            let image = case.image.as_deref();
            let (_, gl, gids) = run(be, &out, image, &case.prompt);
            let (_, cl, cids) = run(&Cpu, &out, image, &case.prompt);
            let le = rel_err(&gl, &cl);
            println!("{name}: logits rel err vs cpu {le:.2e}, ids {cids:?}, {label} {gids:?}");
            let tol = if a_bit.is_some() {
                A8_LOGITS_REL_TOL
            } else {
                LOGITS_REL_TOL
            };
            assert!(le <= tol, "{name}: logits {le} (tolerance {tol})");
            assert_eq!(gids, cids, "{name}: {label} vs cpu greedy ids");
        }
    }
}

/// Decode steps each sequence of [`batched_steps_match_one_sequence_at_a_time`] runs.
const BATCH_STEPS: usize = 6;

/// The server's batched step (`TextModel::forward_batch`) against each
/// sequence run alone (the path the transformers goldens check): three
/// requests of the bundled W3 model join one step apart (prefill rows
/// batched with the others' decode rows, each sequence at its own
/// positions and cache). Every step's logits are within the tolerance of
/// the lone run's and the greedy ids are equal.
pub fn batched_steps_match_one_sequence_at_a_time<B: Backend>(be: &B) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/tiny-shapes-w3");
    let model = Vlm::load(be, &dir).unwrap();
    let proc = Processor::load(&dir, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(&dir).unwrap();
    let reqs = [
        ("s1000_000000.png", "What color is the circle?"),
        ("s1000_000003.png", "What shape is it?"),
        ("s1000_000009.png", "Describe the image."),
    ];
    let text = &model.text;
    let new_cache = |p: &Prompt| {
        be.new_cache(text.layers.len(), text.kv_dim(), p.ids.len() + BATCH_STEPS)
            .unwrap()
    };
    let mut prompts = Vec::new();
    for (image, question) in reqs {
        let pre = preprocess(
            &img_cfg,
            &load_image(&root.join("examples").join(image)).unwrap(),
        )
        .unwrap();
        let prompt = build_prompt(&model, &proc, question, Some(&pre)).unwrap();
        let f = model.encode_image(be, &pre).unwrap().features;
        prompts.push((prompt, f));
    }
    // Alone: prefill, then one token at a time.
    let mut alone = Vec::new();
    for (prompt, f) in &prompts {
        let mut cache = new_cache(prompt);
        let mut logits = vec![prefill(be, &model, prompt, Some(f), &mut cache).unwrap()];
        let mut pos = prompt.ids.len();
        while logits.len() < BATCH_STEPS {
            let x = text.embed(be, &[argmax(logits.last().unwrap())]).unwrap();
            let l = text.forward(be, x, &mut cache, pos).unwrap();
            logits.push(be.download(&l).unwrap().data);
            pos += 1;
        }
        alone.push(logits);
    }
    // Batched: sequence i joins at step i.
    let mut caches: Vec<B::Cache> = prompts.iter().map(|(p, _)| new_cache(p)).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    for step in 0.. {
        let active: Vec<usize> = (0..prompts.len())
            .filter(|&i| i <= step && got[i].len() < BATCH_STEPS)
            .collect();
        if active.is_empty() {
            break;
        }
        let mut x: Option<B::Tensor> = None;
        let mut shape = Vec::new();
        for &i in &active {
            let (prompt, f) = &prompts[i];
            let (xi, pos0) = match got[i].last() {
                None => (embed_prompt(be, &model, prompt, &[f]).unwrap(), 0),
                Some(l) => (
                    text.embed(be, &[argmax(l)]).unwrap(),
                    prompt.ids.len() + got[i].len() - 1,
                ),
            };
            shape.push((pos0, be.dims(&xi).0));
            x = Some(match x {
                None => xi,
                Some(x) => be.concat_rows(&x, &xi).unwrap(),
            });
        }
        let mut seqs: Vec<SeqKv<'_, B>> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .zip(&shape)
            .map(|((_, cache), &(pos0, rows))| SeqKv {
                cache,
                pos0,
                rows,
                rope: RopePos::Sequential,
            })
            .collect();
        let logits = text.forward_batch(be, x.unwrap(), &mut seqs).unwrap();
        let logits = be.download(&logits).unwrap().data;
        let vocab = logits.len() / active.len();
        for (&i, l) in active.iter().zip(logits.chunks(vocab)) {
            got[i].push(l.to_vec());
        }
    }
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        let ids = |v: &Vec<Vec<f32>>| v.iter().map(|l| argmax(l)).collect::<Vec<_>>();
        assert_eq!(
            ids(g),
            ids(a),
            "{}: sequence {i}: batched vs alone greedy ids",
            be.name()
        );
        for (step, (gl, al)) in g.iter().zip(a).enumerate() {
            let e = rel_err(gl, al);
            assert!(
                e <= LOGITS_REL_TOL,
                "{}: sequence {i} step {step}: logits rel err {e:.2e}",
                be.name()
            );
        }
    }
}

/// `mbq-run`: `$MBQ_RUN_BIN`, else the one cargo built with this test,
/// else `dist/mbq-run` of the checkout (scripts/build-gpu-dist.sh: the
/// test binary may run on another machine than the one that built it).
pub fn mbq_run_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MBQ_RUN_BIN") {
        return PathBuf::from(p);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mbq-run"));
    if built.exists() {
        built
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/mbq-run")
    }
}

pub fn mbq_run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(mbq_run_bin())
        .args(args)
        .output()
        .expect("failed to start mbq-run")
}

/// `mbq-run --json --ignore-eos` on the first fixture case of each family
/// (LLaVA, Qwen2-VL, Qwen2.5-VL, InternVL) with each `(extra arguments, backend it
/// must report)`: it succeeds, reports that backend and generates the
/// transformers greedy ids. With `--backend auto` it must also say on
/// stderr which backend it chose.
pub fn mbq_run_matches_golden(runs: &[(Vec<&str>, &str)]) {
    for name in [
        "llava15_odd",
        "qwen2vl_odd2",
        "qwen25vl_big",
        "internvl_wide",
    ] {
        mbq_run_case_matches_golden(&crate::common::load_case(name), runs);
    }
}

fn mbq_run_case_matches_golden(case: &crate::common::Case, runs: &[(Vec<&str>, &str)]) {
    let (model, image) = (
        case.model.to_string_lossy().into_owned(),
        case.image
            .as_ref()
            .expect("an image case")
            .to_string_lossy()
            .into_owned(),
    );
    let tokens = GREEDY_TOKENS.to_string();
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
        &tokens,
    ];
    let golden: Vec<i64> = case
        .i64("greedy_ids")
        .into_iter()
        .take(GREEDY_TOKENS)
        .collect();
    for (extra, want) in runs {
        let out = mbq_run(&[&base[..], &extra[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["backend"], *want, "{extra:?}: {stderr}");
        let tokens: Vec<i64> = j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(tokens, golden, "{}: {extra:?}: greedy ids", case.name);
        if extra.windows(2).any(|w| w == ["--backend", "auto"]) {
            assert!(stderr.contains("--backend auto: using"), "{stderr}");
        }
        println!("{extra:?}: {}", stderr.trim());
    }
}
