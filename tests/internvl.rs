//! InternVL (-hf) specifics beyond the family-generic goldens: config.json
//! in both transformers layouts, the errors for settings mbq cannot run,
//! the pixel shuffle's token layout and the `<img>` ... `</img>` expansion.

mod common;

use common::fixtures;
use mbq::config::{Arch, VisionKind, VlmConfig};
use mbq::model::internvl::pixel_shuffle;
use mbq::processor::Processor;
use serde_json::Value;

fn config_json(model: &str) -> Value {
    let text =
        std::fs::read_to_string(fixtures().join(format!("models/{model}/config.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse(v: &Value) -> mbq::error::Result<VlmConfig> {
    VlmConfig::from_json(v, std::path::Path::new("/x/config.json"))
}

#[test]
fn v4_and_v5_configs_read_the_same() {
    let a = VlmConfig::load(&fixtures().join("models/internvl")).unwrap();
    let b = VlmConfig::load(&fixtures().join("models/internvl_v5")).unwrap();
    for c in [&a, &b] {
        assert_eq!(c.arch, Arch::InternVl);
        assert_eq!(c.vision.kind, VisionKind::InternVit);
        assert_eq!((c.vision.image_size, c.vision.patch_size), (28, 7));
        assert_eq!((c.vision.hidden_size, c.vision.num_hidden_layers), (64, 2));
        assert_eq!(c.vision.num_positions(), 17);
        assert_eq!((c.text.hidden_size, c.text.num_key_value_heads), (128, 2));
        assert_eq!(c.text.rope_theta, 1e6);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.image_token_index, 405);
        let x = c.internvl.as_ref().unwrap();
        assert!(x.qkv_bias && !x.qk_norm && !x.rms_norm && !x.final_norm);
        assert_eq!(x.image_seq_length, 4);
    }
}

/// `InternVLConfig()` / `InternVLVisionConfig()` / `Qwen2Config()` defaults
/// (transformers 4.57's configuration_internvl.py) for an empty config.
#[test]
fn defaults_are_transformers_class_defaults() {
    let c = parse(&serde_json::json!({"model_type": "internvl"})).unwrap();
    let v = &c.vision;
    assert_eq!(
        (
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads
        ),
        (1024, 4096, 24, 16)
    );
    assert_eq!(
        (v.image_size, v.patch_size, v.layer_norm_eps),
        (448, 14, 1e-6)
    );
    assert_eq!(c.image_token_index, 151667);
    assert_eq!(c.text.kind, mbq::config::TextKind::Qwen2);
    let x = c.internvl.as_ref().unwrap();
    assert!(!x.qkv_bias && !x.qk_norm && !x.rms_norm && !x.final_norm);
    assert_eq!(x.image_seq_length, 256);
}

#[test]
fn integer_image_and_patch_sizes() {
    let mut v = config_json("internvl");
    v["vision_config"]["image_size"] = 28.into();
    v["vision_config"]["patch_size"] = 7.into();
    let c = parse(&v).unwrap();
    assert_eq!((c.vision.image_size, c.vision.patch_size), (28, 7));
}

fn error_of(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = config_json("internvl");
    edit(&mut v);
    match parse(&v) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_settings_name_the_key_and_value() {
    let e = error_of(|v| v["vision_config"]["norm_type"] = "batch_norm".into());
    assert!(
        e.contains("vision_config.norm_type") && e.contains("batch_norm"),
        "{e}"
    );
    let e = error_of(|v| v["downsample_ratio"] = 0.25.into());
    assert!(e.contains("downsample_ratio") && e.contains("0.25"), "{e}");
    let e = error_of(|v| v["vision_feature_layer"] = (-2).into());
    assert!(
        e.contains("vision_feature_layer") && e.contains("-2"),
        "{e}"
    );
    let e = error_of(|v| v["vision_feature_select_strategy"] = "full".into());
    assert!(
        e.contains("vision_feature_select_strategy") && e.contains("full"),
        "{e}"
    );
    let e = error_of(|v| v["vision_config"]["image_size"] = serde_json::json!([28, 14]));
    assert!(e.contains("vision_config.image_size"), "{e}");
    let e = error_of(|v| v["vision_config"]["patch_size"] = 4.into());
    assert!(
        e.contains("image_size 28") && e.contains("patch_size 4"),
        "{e}"
    );
    let e = error_of(|v| v["text_config"]["model_type"] = "gpt2".into());
    assert!(
        e.contains("text_config.model_type") && e.contains("gpt2"),
        "{e}"
    );
}

#[test]
fn pixel_shuffle_joins_2x2_patches_row_major() {
    // 4 x 4 patches of one channel, value = row * 4 + column.
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let t = pixel_shuffle(&x, 4, 1).unwrap();
    assert_eq!(t.shape, vec![4, 4]);
    assert_eq!(
        t.data,
        [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
    );
    assert!(pixel_shuffle(&x[..9], 3, 1).is_err());
}

#[test]
fn image_slot_expands_to_img_context_run() {
    for model in ["internvl", "internvl_v5"] {
        let dir = fixtures().join(format!("models/{model}"));
        let proc = Processor::load(&dir, 405).unwrap();
        assert_eq!(
            proc.image_wrap,
            Some(("<img>".to_string(), "</img>".to_string())),
            "{model}"
        );
        let text = proc.render("Hi", true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\n<IMG_CONTEXT>\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = proc.encode_images(&text, &[3]).unwrap();
        let at = ids.iter().position(|&t| t == 403).unwrap();
        assert_eq!(
            &ids[at..at + 5],
            &[403, 405, 405, 405, 404],
            "{model}: {ids:?}"
        );
    }
    // Other families keep the bare run.
    let proc = Processor::load(&fixtures().join("models/qwen2vl"), 406).unwrap();
    assert_eq!(proc.image_wrap, None);
}
