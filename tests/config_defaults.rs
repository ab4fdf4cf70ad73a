//! config.json parsing against transformers' config classes: the values
//! they fill in for left-out keys, and their RoPE inverse frequencies
//! (tests/fixtures/config_defaults.json, made by make_config_defaults.py).

mod common;

use std::path::Path;

use mbq::config::{Act, TextKind, VisionKind, VlmConfig};
use mbq::model::rope::rope_inv_freq;
use serde_json::Value;

/// RoPE frequencies: f32 here vs f32 in torch; pow may differ by an ulp.
const INV_FREQ_REL_TOL: f32 = 1e-6;

fn reference() -> Value {
    let p = common::fixtures().join("config_defaults.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn act_name(a: Act) -> &'static str {
    match a {
        Act::Gelu => "gelu",
        Act::GeluTanh => "gelu_pytorch_tanh",
        Act::QuickGelu => "quick_gelu",
        Act::Silu => "silu",
        Act::Relu => "relu",
    }
}

fn close(a: f64, b: &Value) -> bool {
    let b = b.as_f64().unwrap();
    (a - b).abs() <= 1e-6 * b.abs().max(1e-12)
}

#[test]
fn left_out_keys_get_transformers_defaults() {
    let r = reference();
    let cases = r["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let given = &case["config"];
        let e = &case["expected"];
        let c = VlmConfig::from_json(given, Path::new("config.json")).unwrap();
        let ctx = given.to_string();
        assert_eq!(
            c.image_token_index as u64,
            e["image_token_index"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            act_name(c.projector_hidden_act),
            e["projector_hidden_act"],
            "{ctx}"
        );
        assert_eq!(
            c.vision_feature_layer,
            vec![e["vision_feature_layer"].as_i64().unwrap()],
            "{ctx}"
        );
        assert_eq!(
            c.vision_feature_select_strategy,
            e["vision_feature_select_strategy"].as_str().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            c.multimodal_projector_bias,
            e["multimodal_projector_bias"].as_bool().unwrap(),
            "{ctx}"
        );
        if let Some(p) = e.get("image_grid_pinpoints") {
            let want: Vec<(usize, usize)> = p
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    (
                        x[0].as_u64().unwrap() as usize,
                        x[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            assert_eq!(c.image_grid_pinpoints, want, "{ctx}");
            assert_eq!(
                c.vision_aspect_ratio,
                e["vision_aspect_ratio"].as_str().unwrap(),
                "{ctx}"
            );
        }
        let t = &e["text_config"];
        let kind = match c.text.kind {
            TextKind::Llama => "llama",
            TextKind::Qwen2 => "qwen2",
        };
        assert_eq!(kind, t["model_type"], "{ctx}");
        let u = |k: &str| t[k].as_u64().unwrap() as usize;
        assert_eq!(c.text.vocab_size, u("vocab_size"), "{ctx}");
        assert_eq!(c.text.hidden_size, u("hidden_size"), "{ctx}");
        assert_eq!(c.text.intermediate_size, u("intermediate_size"), "{ctx}");
        assert_eq!(c.text.num_hidden_layers, u("num_hidden_layers"), "{ctx}");
        assert_eq!(
            c.text.num_attention_heads,
            u("num_attention_heads"),
            "{ctx}"
        );
        assert_eq!(
            c.text.num_key_value_heads,
            u("num_key_value_heads"),
            "{ctx}"
        );
        assert_eq!(
            c.text.max_position_embeddings,
            u("max_position_embeddings"),
            "{ctx}"
        );
        assert!(
            close(c.text.rms_norm_eps as f64, &t["rms_norm_eps"]),
            "{ctx}"
        );
        assert!(close(c.text.rope_theta as f64, &t["rope_theta"]), "{ctx}");
        assert_eq!(act_name(c.text.hidden_act), t["hidden_act"], "{ctx}");
        assert_eq!(
            c.text.tie_word_embeddings,
            t["tie_word_embeddings"].as_bool().unwrap(),
            "{ctx}"
        );
        let v = &e["vision_config"];
        let kind = match c.vision.kind {
            VisionKind::Clip => "clip_vision_model",
            VisionKind::Siglip => "siglip_vision_model",
            VisionKind::Qwen2Vl => "qwen2_vl",
            VisionKind::Qwen25Vl => "qwen2_5_vl",
            VisionKind::InternVit => "internvl_vision",
        };
        assert_eq!(kind, v["model_type"], "{ctx}");
        let u = |k: &str| v[k].as_u64().unwrap() as usize;
        assert_eq!(c.vision.hidden_size, u("hidden_size"), "{ctx}");
        assert_eq!(c.vision.intermediate_size, u("intermediate_size"), "{ctx}");
        assert_eq!(c.vision.num_hidden_layers, u("num_hidden_layers"), "{ctx}");
        assert_eq!(
            c.vision.num_attention_heads,
            u("num_attention_heads"),
            "{ctx}"
        );
        assert_eq!(c.vision.num_channels, u("num_channels"), "{ctx}");
        assert_eq!(c.vision.image_size, u("image_size"), "{ctx}");
        assert_eq!(c.vision.patch_size, u("patch_size"), "{ctx}");
        assert!(
            close(c.vision.layer_norm_eps as f64, &v["layer_norm_eps"]),
            "{ctx}"
        );
        assert_eq!(act_name(c.vision.hidden_act), v["hidden_act"], "{ctx}");
    }
}

#[test]
fn rope_inverse_frequencies_match_transformers() {
    let r = reference();
    for case in r["rope"].as_array().unwrap() {
        let c = VlmConfig::from_json(&case["config"], Path::new("config.json")).unwrap();
        let ours = rope_inv_freq(&c.text).inv_freq;
        let want: Vec<f32> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let e = common::rel_err(&ours, &want);
        assert!(e <= INV_FREQ_REL_TOL, "{}: rel err {e}", case["config"]);
    }
}

#[test]
fn transformers5_rope_parameters_equal_rope_theta() {
    let v4 = serde_json::json!({"model_type": "llava", "text_config": {"model_type": "qwen2", "rope_theta": 1000000.0}});
    let v5 = serde_json::json!({"model_type": "llava", "text_config": {"model_type": "qwen2",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}});
    let a = VlmConfig::from_json(&v4, Path::new("config.json")).unwrap();
    let b = VlmConfig::from_json(&v5, Path::new("config.json")).unwrap();
    assert_eq!(a.text.rope_theta, 1e6);
    assert_eq!(a.text.rope_theta, b.text.rope_theta);
    assert_eq!(a.text.rope_scaling, b.text.rope_scaling);
}

#[test]
fn bad_values_name_the_key() {
    let bad = serde_json::json!({"model_type": "llava", "text_config": {"hidden_size": "big"}});
    let e = VlmConfig::from_json(&bad, Path::new("m/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m/config.json")
            && e.contains("text_config.hidden_size")
            && e.contains("integer"),
        "{e}"
    );
    let bad = serde_json::json!({"model_type": "llava", "text_config": {"rope_scaling": {"rope_type": "yarn"}}});
    let e = VlmConfig::from_json(&bad, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
    let bad = serde_json::json!({"model_type": "llava", "text_config": {"model_type": "mistral"}});
    let e = VlmConfig::from_json(&bad, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mistral") && e.contains("llama, qwen2"), "{e}");
}

/// Qwen2-VL / Qwen2.5-VL configs leaving out every key but the M-RoPE
/// sections (and the text width), flat as the Hub's transformers-4 files
/// and nested as transformers 5 writes them: transformers' defaults.
#[test]
fn qwen_left_out_keys_get_transformers_defaults() {
    let r = reference();
    let cases = r["qwen_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let given = &case["config"];
        let e = &case["expected"];
        let c = VlmConfig::from_json(given, Path::new("config.json")).unwrap();
        let ctx = given.to_string();
        assert_eq!(
            c.image_token_index as u64,
            e["image_token_id"].as_u64().unwrap(),
            "{ctx}"
        );
        let t = &e["text_config"];
        let u = |o: &Value, k: &str| o[k].as_u64().unwrap() as usize;
        assert_eq!(c.text.vocab_size, u(t, "vocab_size"), "{ctx}");
        assert_eq!(c.text.hidden_size, u(t, "hidden_size"), "{ctx}");
        assert_eq!(c.text.intermediate_size, u(t, "intermediate_size"), "{ctx}");
        assert_eq!(c.text.num_hidden_layers, u(t, "num_hidden_layers"), "{ctx}");
        assert_eq!(
            c.text.num_attention_heads,
            u(t, "num_attention_heads"),
            "{ctx}"
        );
        assert_eq!(
            c.text.num_key_value_heads,
            u(t, "num_key_value_heads"),
            "{ctx}"
        );
        assert!(
            close(c.text.rms_norm_eps as f64, &t["rms_norm_eps"]),
            "{ctx}"
        );
        assert!(close(c.text.rope_theta as f64, &t["rope_theta"]), "{ctx}");
        assert_eq!(
            c.text.max_position_embeddings,
            u(t, "max_position_embeddings"),
            "{ctx}"
        );
        assert_eq!(act_name(c.text.hidden_act), t["hidden_act"], "{ctx}");
        assert_eq!(
            c.text.tie_word_embeddings,
            t["tie_word_embeddings"].as_bool().unwrap(),
            "{ctx}"
        );
        assert_eq!(c.text.mrope_section, Some(vec![16, 24, 24]), "{ctx}");
        let v = &e["vision_config"];
        let vc = &c.vision;
        assert_eq!(vc.num_hidden_layers, u(v, "depth"), "{ctx}");
        assert_eq!(vc.num_attention_heads, u(v, "num_heads"), "{ctx}");
        assert_eq!(vc.patch_size, u(v, "patch_size"), "{ctx}");
        assert_eq!(vc.spatial_merge_size, u(v, "spatial_merge_size"), "{ctx}");
        assert_eq!(vc.temporal_patch_size, u(v, "temporal_patch_size"), "{ctx}");
        assert_eq!(act_name(vc.hidden_act), v["hidden_act"], "{ctx}");
        if given["model_type"] == "qwen2_vl" {
            assert_eq!(vc.kind, VisionKind::Qwen2Vl);
            assert_eq!(vc.hidden_size, u(v, "embed_dim"), "{ctx}");
            assert_eq!(vc.out_hidden_size, u(v, "hidden_size"), "{ctx}");
            assert_eq!(
                vc.intermediate_size,
                u(v, "embed_dim") * u(v, "mlp_ratio"),
                "{ctx}"
            );
        } else {
            assert_eq!(vc.kind, VisionKind::Qwen25Vl);
            assert_eq!(vc.hidden_size, u(v, "hidden_size"), "{ctx}");
            assert_eq!(vc.out_hidden_size, u(v, "out_hidden_size"), "{ctx}");
            assert_eq!(vc.intermediate_size, u(v, "intermediate_size"), "{ctx}");
            assert_eq!(vc.window_size, u(v, "window_size"), "{ctx}");
            let full: Vec<usize> = v["fullatt_block_indexes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(vc.fullatt_block_indexes, full, "{ctx}");
        }
    }
}
