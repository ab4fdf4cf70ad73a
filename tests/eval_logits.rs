//! Teacher-forced logits (`generate::target_logits`, what `mbq eval`'s
//! caption perplexity reads): feeding transformers' greedy continuation
//! back in, every row's argmax is the next greedy token.

mod common;

use mbq::backend::cpu::Cpu;
use mbq::generate::{argmax, build_prompt, nll, target_logits};
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;

#[test]
fn teacher_forced_rows_reproduce_greedy_ids() {
    let case = common::load_case("llava_qwen128_odd2");
    let be = Cpu;
    let model = Vlm::load(&be, &case.model).unwrap();
    let proc = Processor::load(&case.model, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(&case.model).unwrap();
    let pre = preprocess(&img_cfg, &load_image(case.image.as_ref().unwrap()).unwrap()).unwrap();
    let prompt = build_prompt(&model, &proc, &case.prompt, Some(&pre)).unwrap();
    let feats = model.encode_image(&be, &pre).unwrap().features;
    let greedy: Vec<u32> = case.i64("greedy_ids").iter().map(|&t| t as u32).collect();
    let rows = target_logits(&be, &model, &prompt, Some(&feats), &greedy).unwrap();
    assert_eq!(rows.len(), greedy.len());
    for (i, (row, &t)) in rows.iter().zip(&greedy).enumerate() {
        assert_eq!(argmax(row), t, "row {i}");
        let l = nll(row, t);
        assert!(l.is_finite() && l >= 0.0, "row {i}: nll {l}");
    }
    // The first row is the prefill's last-position logits.
    let last = case.f32("logits_last");
    let err = common::rel_err(&rows[0], &last.data);
    assert!(err < 1e-3, "first row vs transformers' last logits: {err}");
}
