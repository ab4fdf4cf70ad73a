//! Golden tests: the CPU runtime against HF transformers, stage by stage, on
//! every committed fixture case (tests/fixtures/make_fixtures.py).
//!
//! Each stage is fed the REFERENCE output of the stage before it (HF's pixel
//! values into the vision tower, HF's image features into the decoder), so
//! a failure points at one stage; `mbq_run_cli.rs` checks the whole chain.

mod common;

use common::{cases, max_abs_diff, rel_err, Case};
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::config::VlmConfig;
use mbq::generate::{argmax, build_prompt, prefill, Prompt};
use mbq::model::llava::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig, Preprocessed};
use mbq::processor::Processor;
use mbq::tensor::Tensor;

/// Pixel values: the bound (HF normalises uint8 PIL output; one
/// level of 255 is ~0.015 after CLIP's std, so this needs an exact resize).
const PIXEL_TOL: f32 = 1e-2;
/// Activations relative to their scale (max |reference|), f32 vs f32.
const FEATURE_REL_TOL: f32 = 1e-4;
/// Last-position logits relative to their scale.
const LOGITS_REL_TOL: f32 = 1e-4;

struct Loaded {
    cfg: VlmConfig,
    model: Vlm<Cpu>,
    proc: Processor,
}

fn load(case: &Case) -> Loaded {
    let cfg = VlmConfig::load(&case.model).unwrap();
    let proc = Processor::load(&case.model, cfg.image_token_index).unwrap();
    let model = Vlm::load(&Cpu, &case.model).unwrap();
    Loaded { cfg, model, proc }
}

/// HF's pixel values as a Preprocessed (to feed the vision tower).
fn reference_pixels(case: &Case) -> Preprocessed {
    let pv = case.f32("pixel_values");
    let (tiles, h, w) = match pv.shape.as_slice() {
        [3, h, w] => (1, *h, *w),
        [t, 3, h, w] => (*t, *h, *w),
        s => panic!("{}: unexpected pixel_values shape {s:?}", case.name),
    };
    let image_size = if case.has("image_sizes") {
        let s = case.i64("image_sizes");
        (s[0] as usize, s[1] as usize)
    } else {
        (h, w)
    };
    Preprocessed {
        pixel_values: pv.data,
        num_tiles: tiles,
        height: h,
        width: w,
        image_size,
    }
}

#[test]
fn chat_template_renders_as_transformers() {
    for case in cases() {
        let l = load(&case);
        let text = l.proc.render(&case.prompt, true).unwrap();
        assert_eq!(text, case.rendered_prompt, "{}: rendered prompt", case.name);
    }
}

#[test]
fn pixel_values_match_hf_image_processor() {
    for case in cases() {
        let cfg = ImageProcessorConfig::load(&case.model).unwrap();
        let img = load_image(&case.image).unwrap();
        let ours = preprocess(&cfg, &img).unwrap();
        let reference = reference_pixels(&case);
        assert_eq!(
            (ours.num_tiles, ours.height, ours.width),
            (reference.num_tiles, reference.height, reference.width),
            "{}: pixel_values shape",
            case.name
        );
        if case.has("image_sizes") {
            assert_eq!(
                ours.image_size, reference.image_size,
                "{}: image size",
                case.name
            );
        }
        let d = max_abs_diff(&ours.pixel_values, &reference.pixel_values);
        println!("{}: pixel_values max |diff| = {d:.2e}", case.name);
        assert!(d <= PIXEL_TOL, "{}: pixel_values differ by {d}", case.name);
    }
}

#[test]
fn prompt_ids_match_hf_processor() {
    for case in cases() {
        let l = load(&case);
        let pre = reference_pixels(&case);
        let prompt = build_prompt(&l.model, &l.proc, &case.prompt, Some(&pre)).unwrap();
        let expected: Vec<u32> = case.i64("input_ids").iter().map(|&x| x as u32).collect();
        assert_eq!(prompt.ids, expected, "{}: input ids", case.name);
    }
}

#[test]
fn vision_projector_and_image_features_match() {
    for case in cases() {
        let l = load(&case);
        let pre = reference_pixels(&case);
        let emb = l.model.encode_image(&Cpu, &pre).unwrap();
        let flat = |ts: &[Tensor]| -> Vec<f32> {
            ts.iter().flat_map(|t| t.data.iter().copied()).collect()
        };
        for (stage, ours, reference) in [
            (
                "vision_features",
                flat(&emb.vision_features),
                case.f32("vision_features"),
            ),
            (
                "projector_output",
                flat(&emb.projector_output),
                case.f32("projector_output"),
            ),
            (
                "image_features",
                Cpu.download(&emb.features).unwrap().data,
                case.f32("image_features"),
            ),
        ] {
            assert_eq!(
                ours.len(),
                reference.numel(),
                "{}: {stage} size (reference {:?})",
                case.name,
                reference.shape
            );
            let e = rel_err(&ours, &reference.data);
            println!("{}: {stage} rel err {e:.2e}", case.name);
            assert!(e <= FEATURE_REL_TOL, "{}: {stage} rel err {e}", case.name);
        }
        assert_eq!(
            emb.num_tokens,
            l.model.num_image_tokens(pre.image_size).unwrap(),
            "{}: image token count",
            case.name
        );
        let _ = &l.cfg;
    }
}

#[test]
fn logits_and_greedy_ids_match() {
    for case in cases() {
        let l = load(&case);
        let ids: Vec<u32> = case.i64("input_ids").iter().map(|&x| x as u32).collect();
        let tok = l.cfg.image_token_index;
        let first = ids.iter().position(|&t| t == tok);
        let count = ids.iter().filter(|&&t| t == tok).count();
        let prompt = Prompt {
            ids: ids.clone(),
            image_spans: first.map(|f| (f, count)).into_iter().collect(),
        };
        let feats = Cpu.upload(&case.f32("image_features")).unwrap();
        let feats = feats.reshape(vec![count, l.cfg.text.hidden_size]).unwrap();
        let greedy: Vec<u32> = case.i64("greedy_ids").iter().map(|&x| x as u32).collect();
        let mut cache = Cpu
            .new_cache(
                l.model.text.layers.len(),
                l.model.text.kv_dim(),
                ids.len() + greedy.len(),
            )
            .unwrap();
        let logits = prefill(&Cpu, &l.model, &prompt, Some(&feats), &mut cache).unwrap();
        let reference = case.f32("logits_last");
        let e = rel_err(&logits, &reference.data);
        println!("{}: logits rel err {e:.2e}", case.name);
        assert!(e <= LOGITS_REL_TOL, "{}: logits rel err {e}", case.name);

        // Greedy decoding with the cache, never stopping at EOS.
        let mut out = vec![argmax(&logits)];
        let mut pos = ids.len();
        while out.len() < greedy.len() {
            let x = l.model.text.embed(&Cpu, &[*out.last().unwrap()]).unwrap();
            let lg = l.model.text.forward(&Cpu, x, &mut cache, pos).unwrap();
            out.push(argmax(&lg.data));
            pos += 1;
        }
        assert_eq!(out, greedy, "{}: greedy ids", case.name);
    }
}
