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
use mbq::image_processor::ImageProcessor;
use mbq::model::qwen2vl::windows;
use mbq::model::Vlm;
use mbq::preprocess::{load_image, Preprocessed};
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

/// HF's pixel values as a Preprocessed (to feed the vision tower); `None`
/// for a text-only case.
fn reference_pixels(case: &Case) -> Option<Preprocessed> {
    case.image.as_ref()?;
    let pv = case.f32("pixel_values");
    if case.has("image_grid_thw") {
        // Qwen2-VL: rows of patches, the grid says where they are.
        let g = case.i64("image_grid_thw");
        let (t, h, w) = (g[0] as usize, g[1] as usize, g[2] as usize);
        let patch = 14;
        return Some(Preprocessed {
            pixel_values: pv.data,
            num_tiles: 1,
            height: h * patch,
            width: w * patch,
            image_size: (0, 0),
            grid_thw: Some((t, h, w)),
        });
    }
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
    Some(Preprocessed {
        pixel_values: pv.data,
        num_tiles: tiles,
        height: h,
        width: w,
        image_size,
        grid_thw: None,
    })
}

/// The cases with an image.
fn image_cases() -> impl Iterator<Item = Case> {
    cases().into_iter().filter(|c| c.image.is_some())
}

#[test]
fn chat_template_renders_as_transformers() {
    for case in cases() {
        let l = load(&case);
        let text = l.proc.render(&case.prompt, case.image.is_some()).unwrap();
        assert_eq!(text, case.rendered_prompt, "{}: rendered prompt", case.name);
    }
}

#[test]
fn pixel_values_match_hf_image_processor() {
    for case in image_cases() {
        let cfg = ImageProcessor::load(&case.model).unwrap();
        let img = load_image(case.image.as_ref().unwrap()).unwrap();
        let ours = cfg.preprocess(&img).unwrap();
        let reference = reference_pixels(&case).unwrap();
        if reference.grid_thw.is_some() {
            assert_eq!(
                ours.grid_thw, reference.grid_thw,
                "{}: image_grid_thw",
                case.name
            );
        } else {
            assert_eq!(
                (ours.num_tiles, ours.height, ours.width),
                (reference.num_tiles, reference.height, reference.width),
                "{}: pixel_values shape",
                case.name
            );
        }
        if case.has("image_sizes") {
            assert_eq!(
                ours.image_size, reference.image_size,
                "{}: image size",
                case.name
            );
        }
        assert_eq!(
            ours.pixel_values.len(),
            reference.pixel_values.len(),
            "{}: pixel_values size",
            case.name
        );
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
        let prompt = build_prompt(&l.model, &l.proc, &case.prompt, pre.as_ref()).unwrap();
        let expected: Vec<u32> = case.i64("input_ids").iter().map(|&x| x as u32).collect();
        assert_eq!(prompt.ids, expected, "{}: input ids", case.name);
    }
}

/// M-RoPE models: the (t, h, w) position of every prompt token and the
/// rope delta equal transformers' `get_rope_index`.
#[test]
fn mrope_positions_match_hf_rope_index() {
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| c.has("position_ids")) {
        let l = load(&case);
        let pre = reference_pixels(&case);
        let prompt = build_prompt(&l.model, &l.proc, &case.prompt, pre.as_ref()).unwrap();
        let golden = case.i64("position_ids");
        let n = prompt.ids.len();
        assert_eq!(golden.len(), 3 * n, "{}: position_ids size", case.name);
        let (thw, delta) = match &prompt.mrope {
            Some(m) => (m.thw.clone(), m.delta),
            None => ((0..n).map(|p| [p; 3]).collect(), 0),
        };
        for (i, p) in thw.iter().enumerate() {
            let want = [golden[i], golden[n + i], golden[2 * n + i]].map(|x| x as usize);
            assert_eq!(*p, want, "{}: position of token {i}", case.name);
        }
        assert_eq!(
            delta,
            case.i64("rope_deltas")[0],
            "{}: rope delta",
            case.name
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} cases with position_ids");
}

/// Qwen2.5-VL: the window order of the merged tokens and the windows'
/// extents equal transformers' `get_window_index` (after
/// `unique_consecutive`, which drops the empty windows).
#[test]
fn qwen25_windows_match_hf_window_index() {
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| c.has("window_index")) {
        let l = load(&case);
        let g = case.i64("image_grid_thw");
        let m = l.cfg.vision.spatial_merge_size;
        let side = l.cfg.vision.window_size / m / l.cfg.vision.patch_size;
        let (order, sizes) = windows(g[1] as usize / m, g[2] as usize / m, side);
        let want: Vec<usize> = case
            .i64("window_index")
            .iter()
            .map(|&x| x as usize)
            .collect();
        assert_eq!(order, want, "{}: window_index", case.name);
        let mut cu = vec![0];
        for s in sizes {
            cu.push(cu.last().unwrap() + s * m * m);
        }
        let want: Vec<usize> = case
            .i64("cu_window_seqlens")
            .iter()
            .map(|&x| x as usize)
            .collect();
        assert_eq!(cu, want, "{}: cu_window_seqlens", case.name);
        checked += 1;
    }
    assert_eq!(checked, 4, "Qwen2.5-VL cases with window_index");
}

#[test]
fn vision_projector_and_image_features_match() {
    for case in image_cases() {
        let l = load(&case);
        let pre = reference_pixels(&case).unwrap();
        let emb = l.model.encode_image(&Cpu, &pre).unwrap();
        let flat = |ts: &[Tensor]| -> Vec<f32> {
            ts.iter().flat_map(|t| t.data.iter().copied()).collect()
        };
        // Qwen2-VL's merger is its projector: its output is image_features.
        let projector = if case.has("projector_output") {
            "projector_output"
        } else {
            "image_features"
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
                case.f32(projector),
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
            l.model.num_image_tokens(&pre).unwrap(),
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
        let count = ids.iter().filter(|&&t| t == tok).count();
        let pre = reference_pixels(&case);
        let counts: Vec<usize> = pre.iter().map(|_| count).collect();
        let prompt = Prompt::new(ids.clone(), tok, &counts)
            .unwrap()
            .with_mrope(&l.model, &pre.iter().collect::<Vec<_>>())
            .unwrap();
        let feats = pre.as_ref().map(|_| {
            let f = Cpu.upload(&case.f32("image_features")).unwrap();
            f.reshape(vec![count, l.cfg.text.hidden_size]).unwrap()
        });
        let greedy: Vec<u32> = case.i64("greedy_ids").iter().map(|&x| x as u32).collect();
        let mut cache = Cpu
            .new_cache(
                l.model.text.layers.len(),
                l.model.text.kv_dim(),
                ids.len() + greedy.len(),
            )
            .unwrap();
        let logits = prefill(&Cpu, &l.model, &prompt, feats.as_ref(), &mut cache).unwrap();
        let reference = case.f32("logits_last");
        let e = rel_err(&logits, &reference.data);
        println!("{}: logits rel err {e:.2e}", case.name);
        assert!(e <= LOGITS_REL_TOL, "{}: logits rel err {e}", case.name);

        // Greedy decoding with the cache, never stopping at EOS.
        let mut out = vec![argmax(&logits)];
        let mut pos = ids.len();
        while out.len() < greedy.len() {
            let x = l.model.text.embed(&Cpu, &[*out.last().unwrap()]).unwrap();
            let lg = l
                .model
                .text
                .forward_at(&Cpu, x, &mut cache, pos, prompt.rope_pos())
                .unwrap();
            out.push(argmax(&lg.data));
            pos += 1;
        }
        assert_eq!(out, greedy, "{}: greedy ids", case.name);
    }
}
