//! Conversations against transformers: several images in one request and
//! several turns (a system turn, answers between), on the fixture models
//! of LLaVA 1.5, LLaVA (SigLIP + Qwen2), LLaVA-OneVision (anyres per
//! image) and, where the goldens have them, Qwen2-VL / Qwen2.5-VL (M-RoPE
//! positions over the whole conversation). Goldens by tests/fixtures/make_chat_fixtures.py: the processor's
//! input_ids (every image expanded), the last prompt position's logits and
//! 12 greedy ids with the KV cache. mbq renders the same messages with
//! `build_chat_prompt`, the path `mbq serve` and `mbq-run --chat` take.

mod common;

use std::path::PathBuf;

use common::{fixtures, rel_err};
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::generate::{argmax, build_chat_prompt, embed_prompt};
use mbq::image_processor::ImageProcessor;
use mbq::model::Vlm;
use mbq::preprocess::load_image;
use mbq::processor::Processor;
use mbq::weights::WeightFiles;

/// Last-position logits relative to their scale (as tests/golden.rs).
const LOGITS_REL_TOL: f32 = 1e-4;

fn case_dirs() -> Vec<PathBuf> {
    let dir = fixtures().join("chat");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "chat goldens missing in {}", dir.display());
    dirs
}

fn i64s(w: &WeightFiles, name: &str) -> Vec<u32> {
    let (_, _, bytes) = w.raw(name).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

#[test]
fn conversations_match_transformers() {
    for dir in case_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let golden = WeightFiles::open_file(&dir.join("golden.safetensors")).unwrap();
        let model_dir = fixtures().join(case["model"].as_str().unwrap());
        let model = Vlm::load(&Cpu, &model_dir).unwrap();
        let proc = Processor::load(&model_dir, model.cfg.image_token_index).unwrap();
        let img_cfg = ImageProcessor::load(&model_dir).unwrap();
        let pres: Vec<_> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let img = load_image(&fixtures().join(p.as_str().unwrap())).unwrap();
                img_cfg.preprocess(&img).unwrap()
            })
            .collect();
        let refs: Vec<_> = pres.iter().collect();

        let rendered = proc.render_messages(&case["messages"], pres.len()).unwrap();
        assert_eq!(
            rendered,
            case["rendered_prompt"].as_str().unwrap(),
            "{name}: rendered prompt"
        );
        let prompt = build_chat_prompt(&model, &proc, &case["messages"], &refs).unwrap();
        assert_eq!(prompt.ids, i64s(&golden, "input_ids"), "{name}: input_ids");
        assert_eq!(prompt.image_spans.len(), pres.len(), "{name}: image spans");
        if golden.contains("position_ids") {
            // M-RoPE over the whole conversation: transformers' get_rope_index.
            let want = i64s(&golden, "position_ids");
            let m = prompt.mrope.as_ref().expect("M-RoPE positions");
            let n = prompt.ids.len();
            for (i, p) in m.thw.iter().enumerate() {
                let w = [want[i], want[n + i], want[2 * n + i]].map(|x| x as usize);
                assert_eq!(*p, w, "{name}: position of token {i}");
            }
            let (_, _, d) = golden.raw("rope_deltas").unwrap();
            assert_eq!(
                m.delta,
                i64::from_le_bytes(d[..8].try_into().unwrap()),
                "{name}: delta"
            );
        }

        let features: Vec<_> = pres
            .iter()
            .map(|p| model.encode_image(&Cpu, p).unwrap().features)
            .collect();
        let frefs: Vec<_> = features.iter().collect();
        let x = embed_prompt(&Cpu, &model, &prompt, &frefs).unwrap();
        let steps = case["max_new_tokens"].as_u64().unwrap() as usize;
        let mut cache = Cpu
            .new_cache(
                model.text.layers.len(),
                model.text.kv_dim(),
                prompt.ids.len() + steps,
            )
            .unwrap();
        let logits = Cpu
            .download(
                &model
                    .text
                    .forward_at(&Cpu, x, &mut cache, 0, prompt.rope_pos())
                    .unwrap(),
            )
            .unwrap();
        let want = golden.get_any("logits_last").unwrap();
        let e = rel_err(&logits.data, &want.data);
        println!(
            "{name}: {} prompt tokens, logits rel err {e:.2e}",
            prompt.ids.len()
        );
        assert!(e <= LOGITS_REL_TOL, "{name}: logits rel err {e}");

        let mut ids = vec![argmax(&logits.data)];
        let mut pos = prompt.ids.len();
        while ids.len() < steps {
            let x = model.text.embed(&Cpu, &[ids[ids.len() - 1]]).unwrap();
            let l = model
                .text
                .forward_at(&Cpu, x, &mut cache, pos, prompt.rope_pos())
                .unwrap();
            ids.push(argmax(&Cpu.download(&l).unwrap().data));
            pos += 1;
        }
        assert_eq!(ids, i64s(&golden, "greedy_ids"), "{name}: greedy ids");
    }
}
