//! `mbq synth`: the planned tensors of each model against facts of the real
//! hub checkpoints (tensor and parameter counts, names, shapes, shards),
//! and a shrunk llava-ov-0.5b, Qwen2-VL-7B and InternVL3-8B written, loaded
//! by mbq's loader and run on the CPU (finite, non-degenerate logits; the
//! tokenizer's special ids and chat template).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use mbq::backend::cpu::Cpu;
use mbq::config::{Arch, VlmConfig};
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

#[test]
fn qwen2_vl_7b_plan_matches_the_hub_checkpoint() {
    let p = real(Like::Qwen2Vl7b);
    check_layout(&p);
    // Qwen2-VL-7B-Instruct's 8,291,375,616 parameters (the Hub's 8.29B;
    // also the sum of the shapes below: tower 675,759,104 + decoder
    // 7,615,616,512). A transformers-4 save with the default 5 GB limit
    // writes 4 shards; the Hub's upload has 5 (written with a smaller
    // limit by Qwen).
    assert_eq!(p.parameters(), 8_291_375_616);
    assert_eq!(p.total_bytes(), 16_582_751_232);
    assert_eq!(p.files.len(), 4);
    // Tower: patch embed + 32 x 12 + merger 6; decoder: embed + 28 x 12 +
    // norm + lm_head.
    assert_eq!(p.tensors.len(), 1 + 32 * 12 + 6 + 1 + 28 * 12 + 2);
    assert_eq!(p.tensors[0].name, "visual.patch_embed.proj.weight");
    assert_eq!(p.tensors.last().unwrap().name, "lm_head.weight");
    for (name, shape) in [
        ("visual.patch_embed.proj.weight", vec![1280, 3, 2, 14, 14]),
        ("visual.blocks.0.norm1.weight", vec![1280]),
        ("visual.blocks.0.norm2.bias", vec![1280]),
        ("visual.blocks.31.attn.qkv.weight", vec![3840, 1280]),
        ("visual.blocks.31.attn.qkv.bias", vec![3840]),
        ("visual.blocks.0.attn.proj.weight", vec![1280, 1280]),
        ("visual.blocks.0.attn.proj.bias", vec![1280]),
        ("visual.blocks.0.mlp.fc1.weight", vec![5120, 1280]),
        ("visual.blocks.0.mlp.fc2.weight", vec![1280, 5120]),
        ("visual.merger.ln_q.weight", vec![1280]),
        ("visual.merger.ln_q.bias", vec![1280]),
        ("visual.merger.mlp.0.weight", vec![5120, 5120]),
        ("visual.merger.mlp.2.weight", vec![3584, 5120]),
        ("visual.merger.mlp.2.bias", vec![3584]),
        ("model.embed_tokens.weight", vec![152064, 3584]),
        ("model.layers.27.self_attn.q_proj.bias", vec![3584]),
        ("model.layers.0.self_attn.k_proj.weight", vec![512, 3584]),
        ("model.layers.0.mlp.down_proj.weight", vec![3584, 18944]),
        ("model.norm.weight", vec![3584]),
        ("lm_head.weight", vec![152064, 3584]),
    ] {
        assert_eq!(find(&p, name).shape, shape, "{name}");
    }
    for absent in [
        "visual.patch_embed.proj.bias",
        "visual.blocks.32.norm1.weight",
        "model.layers.28.input_layernorm.weight",
        "model.layers.0.self_attn.o_proj.bias",
    ] {
        assert!(p.tensors.iter().all(|t| t.name != absent), "{absent}");
    }
    assert_eq!(find(&p, "visual.merger.mlp.2.bias").shard, 0);
    assert_eq!(find(&p, "lm_head.weight").shard, 3);
    assert!(p
        .tensors
        .iter()
        .all(|t| !t.name.starts_with("language_model")));
}

#[test]
fn internvl3_8b_plan_matches_the_hub_checkpoint() {
    let p = real(Like::InternVl3_8b);
    check_layout(&p);
    // The sum of the shapes: InternViT-300M 304,012,288 (cls 1024 +
    // positions 1025 x 1024 + patch conv 603,136 + 24 x 12,598,272) +
    // projector 27,540,480 + Qwen2.5-7B with 151674 rows untied
    // 7,612,820,992. InternVL's documentation lists InternVL3-8B as 7.9B
    // parameters, 15.9 GB in bf16.
    assert_eq!(p.parameters(), 7_944_373_760);
    assert_eq!(p.total_bytes(), 15_888_747_520);
    assert_eq!(p.files.len(), 4);
    // Tower: 4 embedding tensors + 24 x 18; projector 6; decoder embed +
    // 28 x 12 + norm + lm_head.
    assert_eq!(p.tensors.len(), 4 + 24 * 18 + 6 + 1 + 28 * 12 + 2);
    assert_eq!(p.tensors[0].name, "vision_tower.embeddings.cls_token");
    assert_eq!(
        p.tensors.last().unwrap().name,
        "language_model.lm_head.weight"
    );
    let v = "vision_tower.encoder.layer";
    for (name, shape) in [
        (
            "vision_tower.embeddings.cls_token".to_string(),
            vec![1, 1, 1024],
        ),
        (
            "vision_tower.embeddings.position_embeddings".into(),
            vec![1, 1025, 1024],
        ),
        (
            "vision_tower.embeddings.patch_embeddings.projection.weight".into(),
            vec![1024, 3, 14, 14],
        ),
        (
            "vision_tower.embeddings.patch_embeddings.projection.bias".into(),
            vec![1024],
        ),
        (format!("{v}.0.lambda_1"), vec![1024]),
        (format!("{v}.23.lambda_2"), vec![1024]),
        (format!("{v}.0.attention.q_proj.weight"), vec![1024, 1024]),
        (format!("{v}.0.attention.k_proj.bias"), vec![1024]),
        (
            format!("{v}.23.attention.projection_layer.weight"),
            vec![1024, 1024],
        ),
        (format!("{v}.0.mlp.fc1.weight"), vec![4096, 1024]),
        (format!("{v}.0.mlp.fc2.weight"), vec![1024, 4096]),
        (format!("{v}.0.layernorm_before.bias"), vec![1024]),
        (format!("{v}.0.layernorm_after.weight"), vec![1024]),
        ("multi_modal_projector.layer_norm.weight".into(), vec![4096]),
        (
            "multi_modal_projector.linear_1.weight".into(),
            vec![3584, 4096],
        ),
        (
            "multi_modal_projector.linear_2.weight".into(),
            vec![3584, 3584],
        ),
        (
            "language_model.model.embed_tokens.weight".into(),
            vec![151674, 3584],
        ),
        (
            "language_model.model.layers.27.self_attn.v_proj.bias".into(),
            vec![512],
        ),
        ("language_model.lm_head.weight".into(), vec![151674, 3584]),
    ] {
        assert_eq!(find(&p, &name).shape, shape, "{name}");
    }
    for absent in [
        "vision_tower.layernorm.weight",
        "vision_tower.embeddings.mask_token",
        "vision_tower.encoder.layer.0.attention.q_norm.weight",
        "vision_tower.encoder.layer.24.lambda_1",
    ] {
        assert!(p.tensors.iter().all(|t| t.name != absent), "{absent}");
    }
    assert_eq!(find(&p, "multi_modal_projector.linear_2.bias").shard, 0);
    assert_eq!(find(&p, "language_model.lm_head.weight").shard, 3);
}

/// Writes a shrunk `like` (1 decoder layer, 1 vision layer, 1024 vocabulary
/// rows, bf16 as on the Hub) with the CLI and checks every planned tensor
/// is there; returns the directory.
fn write_shrunk(like: Like, scratch: &str) -> std::path::PathBuf {
    let dir = common::scratch(scratch);
    let out = dir.join("m");
    let o = mbq(&[
        "synth",
        "--like",
        like.name(),
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "1",
        "--vision-layers",
        "1",
        "--vocab",
        "1024",
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = plan(
        like,
        &SynthOptions {
            layers: Some(1),
            vision_layers: Some(1),
            vocab: Some(1024),
            dtype: SynthDtype::Bf16,
        },
    )
    .unwrap();
    let w = WeightFiles::open(&out).unwrap();
    assert_eq!(w.names().count(), p.tensors.len());
    for t in &p.tensors {
        assert_eq!(w.shape(&t.name), Some(t.shape.as_slice()), "{}", t.name);
    }
    out
}

/// One text-only forward on the CPU: finite, non-degenerate logits.
fn forward_is_sane(out: &Path, image_token: u32) {
    let be = Cpu;
    let model = Vlm::load(&be, out).unwrap();
    let prompt = Prompt::new(vec![5, 80, 300, 17, 999], image_token, &[]).unwrap();
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
fn written_qwen2_vl_loads_and_runs_on_the_cpu() {
    let out = write_shrunk(Like::Qwen2Vl7b, "synth_qwen2vl");
    let w = WeightFiles::open(&out).unwrap();
    let pre = Prefixes::detect(&w).unwrap();
    assert_eq!(pre.text, "model");
    assert_eq!(pre.vision, "visual");
    assert_eq!(pre.projector, "visual.merger");
    assert_eq!(pre.lm_head, "lm_head");
    let cfg = VlmConfig::load(&out).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen2Vl);
    assert!(cfg.flat_text);
    assert_eq!(cfg.text.hidden_size, 3584);
    assert_eq!(cfg.text.num_hidden_layers, 1);
    assert_eq!(cfg.text.num_key_value_heads, 4);
    assert_eq!(cfg.text.vocab_size, 1024);
    assert_eq!(cfg.text.rope_theta, 1e6);
    assert_eq!(cfg.text.mrope_section, Some(vec![16, 24, 24]));
    assert!(!cfg.text.tie_word_embeddings);
    assert_eq!(cfg.vision.hidden_size, 1280);
    assert_eq!(cfg.vision.intermediate_size, 5120);
    assert_eq!(cfg.vision.num_hidden_layers, 1);
    assert_eq!(cfg.vision.out_hidden_size, 3584);
    assert_eq!(cfg.image_token_index, 151655);
    // The full-size config parses to the real sizes too.
    let dir = common::scratch("synth_qwen2vl_files");
    mbq::synth::write_side_files(&real(Like::Qwen2Vl7b), &dir).unwrap();
    let full = VlmConfig::load(&dir).unwrap();
    assert_eq!(
        (full.text.num_hidden_layers, full.vision.num_hidden_layers),
        (28, 32)
    );
    assert_eq!(full.text.vocab_size, 152064);
    assert!(mbq::preprocess_qwen::QwenVlImageConfig::load(&dir).is_ok());

    // The Hub's chat template (default system turn) and special ids.
    let proc = Processor::load(&out, cfg.image_token_index).unwrap();
    let text = proc.render("hi", true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = proc.encode(&text, 3).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(ids.iter().filter(|&&t| t == 151655).count(), 3);
    assert!(ids.contains(&151652) && ids.contains(&151653) && ids.contains(&151645));

    forward_is_sane(&out, cfg.image_token_index);
}

#[test]
fn written_internvl3_loads_and_runs_on_the_cpu() {
    let out = write_shrunk(Like::InternVl3_8b, "synth_internvl3");
    let w = WeightFiles::open(&out).unwrap();
    let pre = Prefixes::detect(&w).unwrap();
    assert_eq!(pre.text, "language_model.model");
    assert_eq!(pre.vision, "vision_tower");
    assert_eq!(pre.projector, "multi_modal_projector");
    assert_eq!(pre.lm_head, "language_model.lm_head");
    let cfg = VlmConfig::load(&out).unwrap();
    assert_eq!(cfg.arch, Arch::InternVl);
    assert_eq!(cfg.text.hidden_size, 3584);
    assert_eq!(cfg.text.num_hidden_layers, 1);
    assert_eq!(cfg.text.vocab_size, 1024);
    assert_eq!(cfg.text.rope_theta, 1e6);
    assert!(!cfg.text.tie_word_embeddings);
    assert_eq!(cfg.vision.hidden_size, 1024);
    assert_eq!(cfg.vision.image_size, 448);
    assert_eq!(cfg.vision.patch_size, 14);
    assert_eq!(cfg.vision.num_hidden_layers, 1);
    let extra = cfg.internvl.as_ref().unwrap();
    assert!(extra.qkv_bias && !extra.qk_norm && !extra.rms_norm && !extra.final_norm);
    assert_eq!(cfg.image_token_index, 151667);
    assert_eq!(mbq::config_internvl::tokens_per_tile(&cfg.vision), 256);
    let dir = common::scratch("synth_internvl3_files");
    mbq::synth::write_side_files(&real(Like::InternVl3_8b), &dir).unwrap();
    let full = VlmConfig::load(&dir).unwrap();
    assert_eq!(
        (full.text.num_hidden_layers, full.vision.num_hidden_layers),
        (28, 24)
    );
    assert_eq!(full.text.vocab_size, 151674);
    let img = mbq::preprocess_internvl::InternVlImageConfig::load(&dir).unwrap();
    assert_eq!(img.tile, (448, 448));

    // The conversion script's template; `<img>` + context tokens + `</img>`.
    let proc = Processor::load(&out, cfg.image_token_index).unwrap();
    let text = proc.render("hi", true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = proc.encode(&text, 3).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(ids.iter().filter(|&&t| t == 151667).count(), 3);
    assert!(ids.contains(&151665) && ids.contains(&151666));
    assert!(ids.iter().all(|&t| t < 151674));

    forward_is_sane(&out, cfg.image_token_index);
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
    assert_eq!(
        Like::parse("Qwen/Qwen2-VL-7B-Instruct").unwrap(),
        Like::Qwen2Vl7b
    );
    assert_eq!(Like::parse("internvl3-8b").unwrap(), Like::InternVl3_8b);
}
