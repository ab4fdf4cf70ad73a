//! `mbq synth`: the planned tensors of each model against facts of the real
//! hub checkpoints (tensor and parameter counts, names, shapes, shards),
//! and a shrunk llava-ov-0.5b written, loaded by mbq's loader and run on
//! the CPU (finite, non-degenerate logits; the tokenizer's special ids and
//! chat template).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use mbq::backend::cpu::Cpu;
use mbq::config::VlmConfig;
use mbq::generate::{target_logits, Prompt};
use mbq::model::Vlm;
use mbq::processor::Processor;
use mbq::synth::{plan, Like, Plan, SynthDtype, SynthOptions, MAX_SHARD_BYTES};
use mbq::weights::{Prefixes, WeightFiles};

fn real(like: Like) -> Plan {
    plan(like, &SynthOptions::default()).unwrap()
}

fn find<'a>(p: &'a Plan, name: &str) -> &'a mbq::synth::PlannedTensor {
    p.tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("{name} not planned"))
}

/// Names unique, each shard within transformers' 5 GB, shards filled in
/// state-dict order (shard numbers never go down).
fn check_layout(p: &Plan) {
    let names: HashSet<&str> = p.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), p.tensors.len(), "duplicate names");
    for (i, b) in p.file_bytes().iter().enumerate() {
        assert!(*b <= MAX_SHARD_BYTES, "shard {i}: {b} bytes");
    }
    assert!(p.tensors.windows(2).all(|w| w[0].shard <= w[1].shard));
    let n = p.files.len();
    if n > 1 {
        for (i, f) in p.files.iter().enumerate() {
            assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }
    } else {
        assert_eq!(p.files, ["model.safetensors"]);
    }
}

#[test]
fn llava_ov_7b_plan_matches_the_hub_checkpoint() {
    let p = real(Like::LlavaOv7b);
    check_layout(&p);
    // The hub page's "8.03B params"; 16.06 GB of f16 in 4 shards.
    assert_eq!(p.parameters(), 8_030_807_584);
    assert_eq!(p.total_bytes(), 16_061_615_168);
    assert_eq!(p.files.len(), 4);
    // image_newline + SigLIP (3 + 26 x 16 + 2) + projector 4 + Qwen2
    // (embed + 28 x 12 + norm + lm_head).
    assert_eq!(p.tensors.len(), 765);
    assert_eq!(p.tensors[0].name, "image_newline");
    assert_eq!(find(&p, "image_newline").shape, [3584]);
    let lm = "language_model.model.layers";
    for (name, shape) in [
        (
            "language_model.model.embed_tokens.weight",
            vec![152128, 3584],
        ),
        ("language_model.lm_head.weight", vec![152128, 3584]),
        (
            &format!("{lm}.27.self_attn.q_proj.weight"),
            vec![3584, 3584],
        ),
        (&format!("{lm}.27.self_attn.q_proj.bias"), vec![3584]),
        (&format!("{lm}.0.self_attn.k_proj.weight"), vec![512, 3584]),
        (&format!("{lm}.0.self_attn.v_proj.bias"), vec![512]),
        (&format!("{lm}.0.mlp.down_proj.weight"), vec![3584, 18944]),
        (&format!("{lm}.0.mlp.gate_proj.weight"), vec![18944, 3584]),
        ("multi_modal_projector.linear_1.weight", vec![3584, 1152]),
        ("multi_modal_projector.linear_2.weight", vec![3584, 3584]),
        (
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            vec![1152, 3, 14, 14],
        ),
        (
            "vision_tower.vision_model.embeddings.position_embedding.weight",
            vec![729, 1152],
        ),
        (
            "vision_tower.vision_model.encoder.layers.25.mlp.fc1.weight",
            vec![4304, 1152],
        ),
        ("vision_tower.vision_model.post_layernorm.bias", vec![1152]),
    ] {
        assert_eq!(find(&p, name).shape, shape, "{name}");
    }
    for absent in [
        "vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight",
        "vision_tower.vision_model.head.probe",
        "language_model.model.layers.28.input_layernorm.weight",
        "language_model.model.layers.0.self_attn.o_proj.bias",
    ] {
        assert!(p.tensors.iter().all(|t| t.name != absent), "{absent}");
    }
    // The vision tower and projector come first, lm_head last.
    assert_eq!(find(&p, "multi_modal_projector.linear_2.bias").shard, 0);
    assert_eq!(find(&p, "language_model.lm_head.weight").shard, 3);
    assert_eq!(
        p.tensors.last().unwrap().name,
        "language_model.lm_head.weight"
    );

    // Fewer layers: the same widths, shards follow.
    let small = plan(
        Like::LlavaOv7b,
        &SynthOptions {
            layers: Some(1),
            ..SynthOptions::default()
        },
    )
    .unwrap();
    check_layout(&small);
    assert_eq!(small.tensors.len(), 765 - 27 * 12);
    assert_eq!(small.files, ["model.safetensors"]);
    assert_eq!(
        find(&small, "language_model.lm_head.weight").shape,
        [152128, 3584]
    );
}

#[test]
fn llava_ov_05b_plan_matches_the_hub_checkpoint() {
    let p = real(Like::LlavaOv05b);
    check_layout(&p);
    // The hub page's "894M params" in one model.safetensors; tied
    // embeddings, so no lm_head tensor.
    assert_eq!(p.parameters(), 893_675_552);
    assert_eq!(p.files, ["model.safetensors"]);
    assert_eq!(p.tensors.len(), 716);
    assert!(p.tensors.iter().all(|t| !t.name.contains("lm_head")));
    assert_eq!(
        find(&p, "language_model.model.embed_tokens.weight").shape,
        [152000, 896]
    );
    assert_eq!(
        find(&p, "language_model.model.layers.23.self_attn.k_proj.weight").shape,
        [128, 896]
    );
}

#[test]
fn llava_15_7b_plan_matches_the_hub_checkpoint() {
    let p = real(Like::Llava15_7b);
    check_layout(&p);
    // The hub page's "7.06B params", in 3 shards.
    assert_eq!(p.parameters(), 7_063_427_072);
    assert_eq!(p.files.len(), 3);
    // CLIP (class + patch + position + pre-layernorm 2 + 24 x 16 +
    // post-layernorm 2) + projector 4 + Llama (embed + 32 x 9 + norm +
    // lm_head).
    assert_eq!(p.tensors.len(), 686);
    let v = "vision_tower.vision_model";
    for (name, shape) in [
        (format!("{v}.embeddings.class_embedding"), vec![1024]),
        (
            format!("{v}.embeddings.patch_embedding.weight"),
            vec![1024, 3, 14, 14],
        ),
        (
            format!("{v}.embeddings.position_embedding.weight"),
            vec![577, 1024],
        ),
        (format!("{v}.pre_layrnorm.weight"), vec![1024]),
        (
            format!("{v}.encoder.layers.23.self_attn.out_proj.bias"),
            vec![1024],
        ),
        (format!("{v}.post_layernorm.weight"), vec![1024]),
        (
            "multi_modal_projector.linear_1.weight".into(),
            vec![4096, 1024],
        ),
        (
            "language_model.model.embed_tokens.weight".into(),
            vec![32064, 4096],
        ),
        (
            "language_model.model.layers.31.self_attn.k_proj.weight".into(),
            vec![4096, 4096],
        ),
        (
            "language_model.model.layers.0.mlp.up_proj.weight".into(),
            vec![11008, 4096],
        ),
        ("language_model.lm_head.weight".into(), vec![32064, 4096]),
    ] {
        assert_eq!(find(&p, &name).shape, shape, "{name}");
    }
    // Llama has no q/k/v bias, CLIP no patch bias.
    assert!(p
        .tensors
        .iter()
        .all(|t| !t.name.ends_with("q_proj.bias") || t.name.starts_with("vision_tower")));
    assert!(p
        .tensors
        .iter()
        .all(|t| t.name != format!("{v}.embeddings.patch_embedding.bias")));
}

fn mbq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn written_ov_05b_loads_and_runs_on_the_cpu() {
    let dir = common::scratch("synth_ov05b");
    let out = dir.join("m");
    let out_s = out.to_str().unwrap();
    let args = [
        "synth",
        "--like",
        "llava-ov-0.5b",
        "--out",
        out_s,
        "--layers",
        "1",
        "--vision-layers",
        "1",
        "--vocab",
        "1024",
        "--seed",
        "7",
    ];
    let o = mbq(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("wrote"));
    // Nothing left besides the output.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("m")]);

    // Never overwrites.
    let o = mbq(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--out") && err.contains("already exists"),
        "{err}"
    );

    // Every planned tensor, with its shape and dtype, and the config.
    let p = plan(
        Like::LlavaOv05b,
        &SynthOptions {
            layers: Some(1),
            vision_layers: Some(1),
            vocab: Some(1024),
            dtype: SynthDtype::F16,
        },
    )
    .unwrap();
    let w = WeightFiles::open(&out).unwrap();
    assert_eq!(w.names().count(), p.tensors.len());
    for t in &p.tensors {
        assert_eq!(w.shape(&t.name), Some(t.shape.as_slice()), "{}", t.name);
    }
    let pre = Prefixes::detect(&w).unwrap();
    assert_eq!(pre.text, "language_model.model");
    let cfg = VlmConfig::load(&out).unwrap();
    assert_eq!(cfg.text.hidden_size, 896);
    assert_eq!(cfg.text.num_hidden_layers, 1);
    assert_eq!(cfg.text.num_key_value_heads, 2);
    assert_eq!(cfg.text.vocab_size, 1024);
    assert!(cfg.text.tie_word_embeddings);
    assert_eq!(cfg.image_token_index, 151646);
    assert_eq!(cfg.vision.image_size, 384);
    assert_eq!(cfg.image_grid_pinpoints.len(), 36);
    assert_eq!(cfg.vision_aspect_ratio, "anyres_max_9");

    // Values: linears std ~0.02, norm weights ~1.
    let q = w
        .get_any("language_model.model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let n = q.data.len() as f64;
    let mean = q.data.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (q
        .data
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
        "{mean} {std}"
    );
    let norm = w.get_any("language_model.model.norm.weight").unwrap();
    assert!(norm.data.iter().all(|&x| (x - 1.0).abs() < 0.05));

    // The tokenizer: real special ids, the llava-hf chat template.
    let proc = Processor::load(&out, cfg.image_token_index).unwrap();
    let text = proc.render("hi", true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = proc.encode(&text, 3).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(ids.iter().filter(|&&t| t == 151646).count(), 3);
    assert!(ids.contains(&151645));

    // One forward on the CPU (ids below the shrunk vocabulary).
    let be = Cpu;
    let model = Vlm::load(&be, &out).unwrap();
    let prompt = Prompt::new(vec![5, 80, 300, 17, 999], 151646, &[]).unwrap();
    let rows = target_logits(&be, &model, &prompt, None, &[3, 4]).unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.len(), 1024);
        assert!(row.iter().all(|x| x.is_finite()));
        let m = row.iter().sum::<f32>() / row.len() as f32;
        let s = (row.iter().map(|x| (x - m).powi(2)).sum::<f32>() / row.len() as f32).sqrt();
        assert!(s > 0.05 && s < 100.0, "logit std {s}");
    }
}

#[test]
fn llava_15_files_parse_with_the_real_special_ids() {
    let dir = common::scratch("synth_llava15_files");
    let p = plan(
        Like::Llava15_7b,
        &SynthOptions {
            layers: Some(2),
            ..SynthOptions::default()
        },
    )
    .unwrap();
    mbq::synth::write_side_files(&p, &dir).unwrap();
    let cfg = VlmConfig::load(&dir).unwrap();
    assert_eq!(cfg.text.vocab_size, 32064);
    assert_eq!(cfg.text.num_hidden_layers, 2);
    assert_eq!(cfg.text.num_attention_heads, 32);
    assert_eq!(cfg.text.max_position_embeddings, 4096);
    assert_eq!(cfg.text.rms_norm_eps, 1e-5);
    assert_eq!(cfg.image_token_index, 32000);
    assert_eq!(cfg.vision_feature_layer, [-2]);
    assert_eq!(cfg.vision_feature_select_strategy, "default");
    assert_eq!(cfg.vision.image_size, 336);
    assert_eq!(cfg.tokens_per_tile(), 576);
    let proc = Processor::load(&dir, cfg.image_token_index).unwrap();
    let text = proc.render("hi", true).unwrap();
    assert_eq!(text, "USER: <image>\nhi ASSISTANT:");
    let ids = proc.encode(&text, 2).unwrap();
    assert_eq!(ids[0], 1, "<s> first");
    assert_eq!(ids.iter().filter(|&&t| t == 32000).count(), 2);
    assert!(ids.iter().all(|&t| t < 32064));
    assert_eq!(proc.decode(&ids).unwrap(), "USER: \nhi ASSISTANT:");
}

#[test]
fn bad_options_name_the_option() {
    let dir = common::scratch("synth_bad");
    let out = dir.join("m");
    let out_s = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--like", "llava-2"], "--like"),
        (vec!["--like", "llava-ov-0.5b", "--dtype", "f32"], "--dtype"),
        (vec!["--like", "llava-ov-0.5b", "--layers", "0"], "--layers"),
    ] {
        let mut a = vec!["synth", "--out", out_s];
        a.extend(args);
        let o = mbq(&a);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{a:?}: {err}");
    }
    assert!(!Path::new(&out).exists());
    assert_eq!(
        Like::parse("llava-hf/llava-1.5-7b-hf").unwrap(),
        Like::Llava15_7b
    );
}
