//! The non-weight files of a synthetic checkpoint: config.json as the hub's
//! transformers-4 file has it (composite config with every key of its own,
//! sub-configs holding only what differs from their class defaults), the
//! processor files, the generation config, the index of a sharded
//! checkpoint, and a tokenizer whose special tokens have the real ids.
//!
//! Where the values come from. Confirmed against public copies of the hub
//! files or of transformers' LLaVA and LLaVA-OneVision weight conversion
//! code: all of llava-1.5-7b's config.json (vocab 32064 = 32000 + `<image>` +
//! `<pad>` padded to 64, image_token_index 32000, pad_token_id 32001,
//! vision_feature_layer -2, "default" select, transformers 4.36.0.dev0);
//! for OneVision the vision tower (SigLIP 1152 / 4304 / 26 layers / 16 heads
//! / patch 14 / 384 px, no head), the text models (Qwen2-0.5B-Instruct,
//! Qwen2-7B-Instruct), the added tokens (`<image>`, then `<video>`), the
//! vocabulary padding to 64 (151936 -> 152000, 152064 -> 152128), the
//! chat template, "full" select and num_image_tokens 729.
//! NOT confirmed (no copy of the hub's OneVision config.json, tokenizer
//! files or generation_config.json was available; written from the
//! conversion code and transformers' defaults): the exact key set of the
//! OneVision config.json (ignore_index, use_image_newline_parameter,
//! tie_word_embeddings placement: text_config only, for 0.5b), its
//! transformers_version ("4.45.0.dev0"), text_config.sliding_window
//! (32768 for 0.5b, 131072 for 7b, copied from the Qwen2 configs),
//! tokenizer_config.json's model_max_length and padding_side, and both
//! generation_config.json files.
//! The tokenizers are not the real ones (which cannot be downloaded): a
//! byte-level BPE (OneVision) or byte-fallback Metaspace BPE (LLaVA-1.5)
//! with the real vocabulary size and special-token ids, whose other entries
//! are pseudo-words and which has no merges (prompts tokenize to about one
//! token per character).
//!
//! Qwen2-VL-7B-Instruct. Confirmed (transformers' Qwen2-VL configuration
//! and modeling code, and the repository's Hub-layout fixture, whose chat
//! template and preprocessor keys are the Hub's): the flat config.json of
//! transformers 4 (text keys at the top level, `rope_theta` 1e6,
//! `rope_scaling {"type": "mrope", "mrope_section": [16, 24, 24]}`,
//! `vision_config` with `embed_dim`, `depth`, `mlp_ratio`, `in_chans`,
//! `hidden_size` = the merger's output), the special token ids (151643 ..
//! 151656, `<|image_pad|>` 151655), vocab_size 152064 and the parameter
//! count (8,291,375,616). NOT confirmed: the exact optional keys of
//! config.json (attention_dropout, initializer_range, max_window_layers 28,
//! sliding_window 32768, use_sliding_window, transformers_version
//! "4.41.2"), generation_config.json's sampling values,
//! preprocessor_config.json's max_pixels (12845056), tokenizer_config.json's
//! model_max_length and padding_side, and the Hub's 5 shards (a
//! transformers-4 save with the default 5 GB limit writes 4: see `plan`).
//!
//! InternVL3-8B-hf. Confirmed (transformers' InternVL configuration,
//! modeling and weight-conversion code, and the repository's fixture saved
//! by transformers 4.57): the tensor names (4.57 reverses the model's
//! `_checkpoint_conversion_mapping`, so `vision_tower.*`,
//! `multi_modal_projector.*`, `language_model.model.*`,
//! `language_model.lm_head.weight`), image_token_id 151667, eos 151645,
//! the tokenizer's 9 added tokens after Qwen2.5's 151665 (`<img>` 151665
//! .. `</box>` 151673, so vocab_size 151674), model_max_length 8192, the
//! GotOcr2 image processor (448 tiles, ImageNet mean / std), the chat
//! template, and the parameter count 7,944,373,760 (the sum of the
//! shapes; InternVL's documentation lists 7.9B and 15.9 GB of bf16).
//! Partly confirmed from the Hub config as quoted in vLLM issue #17634:
//! downsample_ratio 0.5, image_seq_length 256, image_token_id 151667,
//! text_config rope_theta 1e6 / sliding_window null / use_cache /
//! use_sliding_window false / vocab_size 151674, torch_dtype bfloat16,
//! transformers_version "4.52.0.dev0". NOT confirmed (no full copy of the
//! Hub's files was available): the rest of config.json's key set (written
//! as transformers 4.5x writes it), max_window_layers, generation_config,
//! padding_side, max_patches 12, and whether the
//! Hub's tokenizer has a `<video>` token (not written here: it would not
//! fit the 151674 embedding rows).

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::{Family, Like, Plan, QWEN_MERGE, QWEN_TEMPORAL_PATCH};
use crate::error::{Error, Result};

/// Writes `model.safetensors.index.json`; returns its size.
pub(super) fn write_index(plan: &Plan, dir: &Path) -> Result<u64> {
    let mut names: Vec<(&str, &str)> = plan
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), plan.files[t.shard].as_str()))
        .collect();
    names.sort();
    let mut map = Map::new();
    for (n, f) in names {
        map.insert(n.to_string(), Value::String(f.to_string()));
    }
    let index = json!({
        "metadata": { "total_size": plan.total_bytes() },
        "weight_map": Value::Object(map),
    });
    write_json(&dir.join("model.safetensors.index.json"), &index)
}

/// Writes every file but the weights and the index (configs, processor
/// files, tokenizer) into `dir`; returns their size.
pub fn write_side_files(plan: &Plan, dir: &Path) -> Result<u64> {
    let like = plan.like;
    let family = like.family();
    let mut files: Vec<(&str, Value)> = vec![
        ("config.json", config(plan)),
        ("generation_config.json", generation_config(like)),
        ("preprocessor_config.json", preprocessor_config(like)),
        (
            "chat_template.json",
            json!({ "chat_template": chat_template(like) }),
        ),
        ("tokenizer.json", tokenizer_json(like)),
        ("tokenizer_config.json", tokenizer_config(like)),
        ("special_tokens_map.json", special_tokens_map(like)),
    ];
    if let Some(v) = processor_config(like) {
        files.push(("processor_config.json", v));
    }
    if let Some(v) = video_preprocessor_config(like) {
        files.push(("video_preprocessor_config.json", v));
    }
    let byte_level = family != Family::Llava;
    if byte_level {
        let added: Map<String, Value> = added_tokens(like)
            .iter()
            .map(|&(id, t)| (t.to_string(), json!(id)))
            .collect();
        files.push(("added_tokens.json", Value::Object(added)));
        files.push(("vocab.json", Value::Object(qwen_vocab())));
    }
    let mut bytes = 0;
    for (name, v) in &files {
        bytes += write_json(&dir.join(name), v)?;
    }
    if byte_level {
        // The slow tokenizer's merges: none (see the module comment).
        let path = dir.join("merges.txt");
        let text = "#version: 0.2\n";
        fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        bytes += text.len() as u64;
    }
    Ok(bytes)
}

/// The tokens after the BPE vocabulary (byte-level tokenizers), with ids.
fn added_tokens(like: Like) -> Vec<(u32, &'static str)> {
    match like.family() {
        Family::Llava => llama_special().to_vec(),
        Family::LlavaOnevision => qwen_added().to_vec(),
        Family::Qwen2Vl => qwen2vl_added().to_vec(),
        Family::InternVl => internvl_added(),
    }
}

fn onevision(like: Like) -> bool {
    like.family() == Family::LlavaOnevision
}

/// `json.dumps(v, indent=2, sort_keys=True)` as transformers writes its
/// files (keys sorted; serde_json here keeps insertion order).
fn write_json(path: &Path, v: &Value) -> Result<u64> {
    let text = serde_json::to_string_pretty(&sorted(v))
        .map_err(|e| Error::config(path, format!("cannot serialize: {e}")))?
        + "\n";
    fs::write(path, &text).map_err(|e| Error::io(path, e))?;
    Ok(text.len() as u64)
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// LlavaOnevisionConfig's default pinpoints (what the hub checkpoints
/// use): every (384 i, 384 j), i, j in 1..=6.
fn pinpoints() -> Value {
    let mut p = Vec::new();
    for i in 1..=6 {
        for j in 1..=6 {
            p.push(json!([384 * i, 384 * j]));
        }
    }
    Value::Array(p)
}

fn config(plan: &Plan) -> Value {
    let real = plan.like.spec();
    let (v, x) = (&plan.spec.vision, &plan.spec.text);
    let dtype = plan.dtype.torch_name();
    match plan.like {
        Like::Qwen2Vl7b => qwen2vl_config(plan),
        Like::InternVl3_8b => internvl_config(plan),
        Like::LlavaOv05b | Like::LlavaOv7b => {
            let small = plan.like == Like::LlavaOv05b;
            let mut text = json!({
                "_name_or_path": if small { "Qwen/Qwen2-0.5B-Instruct" } else { "Qwen/Qwen2-7B-Instruct" },
                "architectures": ["Qwen2ForCausalLM"],
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "hidden_size": x.hidden,
                "intermediate_size": x.intermediate,
                "model_type": "qwen2",
                "num_attention_heads": x.heads,
                "num_hidden_layers": x.layers,
                "num_key_value_heads": x.kv_heads,
                "rope_theta": 1000000.0,
                "sliding_window": if small { 32768 } else { 131072 },
                "torch_dtype": "bfloat16",
                "vocab_size": x.vocab,
            });
            if small {
                // Qwen2Config's default max_window_layers is 28 (7b's).
                text["max_window_layers"] = json!(24);
                text["tie_word_embeddings"] = json!(true);
            }
            let mut c = json!({
                "architectures": ["LlavaOnevisionForConditionalGeneration"],
                "ignore_index": -100,
                "image_grid_pinpoints": pinpoints(),
                "image_token_index": 151646,
                "model_type": "llava_onevision",
                "projector_hidden_act": "gelu",
                "text_config": text,
                "torch_dtype": dtype,
                "transformers_version": "4.45.0.dev0",
                "use_image_newline_parameter": true,
                "video_token_index": 151647,
                "vision_aspect_ratio": "anyres_max_9",
                "vision_config": {
                    "hidden_size": v.hidden,
                    "image_size": v.image,
                    "intermediate_size": v.intermediate,
                    "model_type": "siglip_vision_model",
                    "num_attention_heads": v.heads,
                    "num_hidden_layers": v.layers,
                    "patch_size": v.patch,
                    "vision_use_head": false,
                },
                "vision_feature_layer": -1,
                "vision_feature_select_strategy": "full",
            });
            if !small {
                c["tie_word_embeddings"] = json!(false);
            }
            c
        }
        Like::Llava15_7b => {
            let mut text = json!({
                "_name_or_path": "lmsys/vicuna-7b-v1.5",
                "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 4096,
                "model_type": "llama",
                "rms_norm_eps": 1e-05,
                "torch_dtype": "float16",
                "vocab_size": x.vocab,
            });
            // LlamaConfig's default is 32 layers: written only when changed.
            if x.layers != real.text.layers {
                text["num_hidden_layers"] = json!(x.layers);
            }
            json!({
                "architectures": ["LlavaForConditionalGeneration"],
                "ignore_index": -100,
                "image_token_index": 32000,
                "model_type": "llava",
                "pad_token_id": 32001,
                "projector_hidden_act": "gelu",
                "text_config": text,
                "tie_word_embeddings": false,
                "torch_dtype": dtype,
                "transformers_version": "4.36.0.dev0",
                "vision_config": {
                    "hidden_size": v.hidden,
                    "image_size": v.image,
                    "intermediate_size": v.intermediate,
                    "model_type": "clip_vision_model",
                    "num_attention_heads": v.heads,
                    "num_hidden_layers": v.layers,
                    "patch_size": v.patch,
                    "projection_dim": 768,
                    "vocab_size": 32000,
                },
                "vision_feature_layer": -2,
                "vision_feature_select_strategy": "default",
                "vocab_size": x.vocab,
            })
        }
    }
}

/// Qwen2-VL-7B-Instruct's config.json: transformers 4's flat layout (the
/// language model's keys at the top level).
fn qwen2vl_config(plan: &Plan) -> Value {
    let (v, x) = (&plan.spec.vision, &plan.spec.text);
    json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": x.hidden,
        "image_token_id": 151655,
        "initializer_range": 0.02,
        "intermediate_size": x.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2_vl",
        "num_attention_heads": x.heads,
        "num_hidden_layers": x.layers,
        "num_key_value_heads": x.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": { "mrope_section": [16, 24, 24], "type": "mrope" },
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": x.tied,
        "torch_dtype": plan.dtype.torch_name(),
        "transformers_version": "4.41.2",
        "use_cache": true,
        "use_sliding_window": false,
        "video_token_id": 151656,
        "vision_config": {
            "depth": v.layers,
            "embed_dim": v.hidden,
            "hidden_size": x.hidden,
            "in_chans": 3,
            "mlp_ratio": v.intermediate / v.hidden,
            "num_heads": v.heads,
            "patch_size": v.patch,
            "spatial_merge_size": QWEN_MERGE,
            "spatial_patch_size": v.patch,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
        },
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vision_token_id": 151654,
        "vocab_size": x.vocab,
    })
}

/// InternVL3-8B-hf's config.json: InternVLConfig with a Qwen2 text config
/// (Qwen2.5-7B) and InternViT-300M's vision config, every key written as
/// transformers 4.5x writes them.
fn internvl_config(plan: &Plan) -> Value {
    let (v, x) = (&plan.spec.vision, &plan.spec.text);
    json!({
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "hidden_size": x.hidden,
            "initializer_range": 0.02,
            "intermediate_size": x.intermediate,
            "max_position_embeddings": 32768,
            "max_window_layers": 70,
            "model_type": "qwen2",
            "num_attention_heads": x.heads,
            "num_hidden_layers": x.layers,
            "num_key_value_heads": x.kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": null,
            "rope_theta": 1000000.0,
            "sliding_window": null,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": x.vocab,
        },
        "tie_word_embeddings": x.tied,
        "torch_dtype": plan.dtype.torch_name(),
        "transformers_version": "4.52.0.dev0",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_bias": true,
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": v.hidden,
            "image_size": [v.image, v.image],
            "initializer_range": 0.02,
            "intermediate_size": v.intermediate,
            "layer_norm_eps": 1e-06,
            "layer_scale_init_value": 0.1,
            "model_type": "internvl_vision",
            "norm_type": "layer_norm",
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "num_hidden_layers": v.layers,
            "patch_size": [v.patch, v.patch],
            "projection_dropout": 0.0,
            "torch_dtype": "bfloat16",
            "use_absolute_position_embeddings": true,
            "use_mask_token": false,
            "use_mean_pooling": true,
            "use_qk_norm": false,
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    })
}

fn generation_config(like: Like) -> Value {
    match like.family() {
        Family::Qwen2Vl => {
            return json!({
                "bos_token_id": 151643,
                "do_sample": true,
                "eos_token_id": [151645, 151643],
                "pad_token_id": 151643,
                "repetition_penalty": 1.05,
                "temperature": 0.1,
                "top_k": 1,
                "top_p": 0.001,
                "transformers_version": "4.41.2",
            })
        }
        Family::InternVl => {
            return json!({
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "pad_token_id": 151643,
                "transformers_version": "4.52.0.dev0",
            })
        }
        Family::Llava | Family::LlavaOnevision => {}
    }
    if onevision(like) {
        json!({
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "transformers_version": "4.45.0.dev0",
        })
    } else {
        json!({
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 32001,
            "transformers_version": "4.36.0.dev0",
        })
    }
}

fn preprocessor_config(like: Like) -> Value {
    match like.family() {
        // Qwen2VLImageProcessor as the Hub file has it.
        Family::Qwen2Vl => {
            return json!({
                "image_mean": CLIP_MEAN,
                "image_processor_type": "Qwen2VLImageProcessor",
                "image_std": CLIP_STD,
                "max_pixels": 12845056,
                "merge_size": QWEN_MERGE,
                "min_pixels": 3136,
                "patch_size": 14,
                "processor_class": "Qwen2VLProcessor",
                "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            })
        }
        // GotOcr2ImageProcessorFast as InternVLProcessor saves it (the
        // processor asks for tiles; crop_to_patches is its call-time
        // default).
        Family::InternVl => {
            return json!({
                "crop_size": null,
                "crop_to_patches": false,
                "data_format": "channels_first",
                "default_to_square": true,
                "device": null,
                "do_center_crop": null,
                "do_convert_rgb": true,
                "do_normalize": true,
                "do_rescale": true,
                "do_resize": true,
                "image_mean": IMAGENET_MEAN,
                "image_processor_type": "GotOcr2ImageProcessorFast",
                "image_std": IMAGENET_STD,
                "input_data_format": null,
                "max_patches": 12,
                "min_patches": 1,
                "processor_class": "InternVLProcessor",
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "return_tensors": null,
                "size": { "height": 448, "width": 448 },
            })
        }
        Family::Llava | Family::LlavaOnevision => {}
    }
    if onevision(like) {
        json!({
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_pad": true,
            "do_rescale": true,
            "do_resize": true,
            "image_grid_pinpoints": pinpoints(),
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "LlavaOnevisionProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": { "height": 384, "width": 384 },
        })
    } else {
        json!({
            "crop_size": { "height": 336, "width": 336 },
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": { "shortest_edge": 336 },
        })
    }
}

fn video_preprocessor_config(like: Like) -> Option<Value> {
    match like.family() {
        Family::LlavaOnevision => Some(onevision_video_preprocessor_config()),
        Family::InternVl => Some(json!({
            "crop_size": null,
            "data_format": "channels_first",
            "default_to_square": true,
            "device": null,
            "do_center_crop": null,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "do_sample_frames": false,
            "fps": null,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "initial_shift": true,
            "input_data_format": null,
            "num_frames": null,
            "processor_class": "InternVLProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": { "height": 448, "width": 448 },
            "video_metadata": null,
            "video_processor_type": "InternVLVideoProcessor",
        })),
        Family::Llava | Family::Qwen2Vl => None,
    }
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

fn onevision_video_preprocessor_config() -> Value {
    json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionVideoProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": { "height": 384, "width": 384 },
    })
}

fn processor_config(like: Like) -> Option<Value> {
    match like.family() {
        // Qwen2VLProcessor has no settings of its own: no file.
        Family::Qwen2Vl => return None,
        // 256 tokens per 448 tile (1024 patches, 2 x 2 pixel shuffle).
        Family::InternVl => {
            return Some(json!({
                "image_seq_length": 256,
                "processor_class": "InternVLProcessor",
            }))
        }
        Family::Llava | Family::LlavaOnevision => {}
    }
    Some(if onevision(like) {
        json!({
            "image_token": "<image>",
            "num_image_tokens": 729,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>",
            "vision_feature_select_strategy": "full",
        })
    } else {
        json!({
            "image_token": "<image>",
            "num_additional_image_tokens": 1,
            "patch_size": 14,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default",
        })
    })
}

/// The chat templates: the Hub's (Qwen2-VL, with a default system turn),
/// transformers' InternVL conversion script's (an image is
/// `<IMG_CONTEXT>\n`), the llava-hf processors'.
fn chat_template(like: Like) -> &'static str {
    match like.family() {
        Family::Qwen2Vl => return QWEN2VL_TEMPLATE,
        Family::InternVl => return INTERNVL_TEMPLATE,
        Family::Llava | Family::LlavaOnevision => {}
    }
    if onevision(like) {
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    } else {
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    }
}

const QWEN2VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const INTERNVL_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}";

/// Qwen2-VL's added tokens (Qwen2's three, then the grounding and vision
/// ones), with their ids.
pub fn qwen2vl_added() -> [(u32, &'static str); 14] {
    [
        (151643, "<|endoftext|>"),
        (151644, "<|im_start|>"),
        (151645, "<|im_end|>"),
        (151646, "<|object_ref_start|>"),
        (151647, "<|object_ref_end|>"),
        (151648, "<|box_start|>"),
        (151649, "<|box_end|>"),
        (151650, "<|quad_start|>"),
        (151651, "<|quad_end|>"),
        (151652, "<|vision_start|>"),
        (151653, "<|vision_end|>"),
        (151654, "<|vision_pad|>"),
        (151655, "<|image_pad|>"),
        (151656, "<|video_pad|>"),
    ]
}

/// InternVL3's tokenizer: Qwen2.5-VL's added tokens (Qwen2-VL's, then
/// tool-call and fill-in-the-middle ones, 151643 .. 151664) and the 9 of
/// transformers' InternVL conversion (`<img>` 151665 .. `</box>` 151673).
pub fn internvl_added() -> Vec<(u32, &'static str)> {
    let mut t = qwen2vl_added().to_vec();
    let more = [
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
    ];
    for (i, tok) in more.into_iter().enumerate() {
        t.push((151657 + i as u32, tok));
    }
    t
}

/// The additional special tokens of tokenizer_config.json: every added
/// token but `<|endoftext|>` and, for InternVL, the tool-call and
/// fill-in-the-middle ones (not special in Qwen2.5's tokenizer).
fn additional_special(like: Like) -> Vec<&'static str> {
    added_tokens(like)
        .into_iter()
        .filter(|&(id, _)| id != 151643 && !(151657..=151664).contains(&id))
        .map(|(_, t)| t)
        .collect()
}

/// Qwen2's special tokens and llava-hf's two added ones, with their ids.
pub fn qwen_added() -> [(u32, &'static str); 5] {
    [
        (151643, "<|endoftext|>"),
        (151644, "<|im_start|>"),
        (151645, "<|im_end|>"),
        (151646, "<image>"),
        (151647, "<video>"),
    ]
}

/// Llama's special tokens (in the vocabulary) and llava-hf's added ones.
pub fn llama_special() -> [(u32, &'static str); 5] {
    [
        (0, "<unk>"),
        (1, "<s>"),
        (2, "</s>"),
        (32000, "<image>"),
        (32001, "<pad>"),
    ]
}

/// Size of Qwen2's BPE vocabulary (the special tokens come after it).
const QWEN_BPE: u32 = 151643;
/// Size of Llama's SentencePiece vocabulary.
const LLAMA_SP: u32 = 32000;

/// A pronounceable filler token for `n` (distinct `n`, distinct words of
/// at least two letters).
fn pseudo_word(n: u32) -> String {
    const C: &[u8; 16] = b"bcdfghjklmnprstv";
    const V: &[u8; 4] = b"aeio";
    let mut m = n;
    let mut out = Vec::new();
    loop {
        let d = (m % 64) as usize;
        out.push(C[d / 4]);
        out.push(V[d % 4]);
        m /= 64;
        if m == 0 {
            break;
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// GPT-2's byte-to-character table in vocabulary order: the printable
/// bytes first (as themselves), then the others mapped to U+0100 onwards.
fn byte_level_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut chars: Vec<char> = printable
        .iter()
        .filter_map(|&b| char::from_u32(b))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            chars.extend(char::from_u32(256 + n));
            n += 1;
        }
    }
    chars
}

fn qwen_vocab() -> Map<String, Value> {
    let mut vocab = Map::new();
    for (i, c) in byte_level_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    for id in vocab.len() as u32..QWEN_BPE {
        let n = id - 256;
        let w = pseudo_word(n / 2);
        let w = if n % 2 == 1 { format!("Ġ{w}") } else { w };
        vocab.insert(w, json!(id));
    }
    vocab
}

fn llama_vocab() -> Map<String, Value> {
    let mut vocab = Map::new();
    for (id, t) in &llama_special()[..3] {
        vocab.insert(t.to_string(), json!(id));
    }
    for b in 0..256u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let mut id = 259u32;
    vocab.insert("▁".into(), json!(id));
    id += 1;
    for c in b'!'..=b'~' {
        vocab.insert((c as char).to_string(), json!(id));
        id += 1;
    }
    let first = id;
    for id in first..LLAMA_SP {
        let n = id - first;
        let w = pseudo_word(n / 2);
        let w = if n % 2 == 1 { format!("▁{w}") } else { w };
        vocab.insert(w, json!(id));
    }
    vocab
}

fn added_token(id: u32, content: &str) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": true,
    })
}

fn added_decoder(tokens: &[(u32, &str)]) -> Value {
    let m: Map<String, Value> = tokens
        .iter()
        .map(|&(id, t)| {
            (
                id.to_string(),
                json!({
                    "content": t,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            )
        })
        .collect();
    Value::Object(m)
}

fn tokenizer_json(like: Like) -> Value {
    if like.family() != Family::Llava {
        let byte_level = json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false,
        });
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(like).iter().map(|&(id, t)| added_token(id, t)).collect::<Vec<_>>(),
            "normalizer": { "type": "NFC" },
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": { "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" },
                        "behavior": "Isolated",
                        "invert": false,
                    },
                    byte_level,
                ],
            },
            "post_processor": byte_level,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true,
            },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": Value::Object(qwen_vocab()),
                "merges": [],
            },
        })
    } else {
        let specials = llama_special();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": specials.iter().map(|&(id, t)| added_token(id, t)).collect::<Vec<_>>(),
            "normalizer": null,
            "pre_tokenizer": {
                "type": "Metaspace",
                "replacement": "▁",
                "prepend_scheme": "first",
                "split": false,
            },
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [
                    { "SpecialToken": { "id": "<s>", "type_id": 0 } },
                    { "Sequence": { "id": "A", "type_id": 0 } },
                ],
                "pair": [
                    { "SpecialToken": { "id": "<s>", "type_id": 0 } },
                    { "Sequence": { "id": "A", "type_id": 0 } },
                    { "SpecialToken": { "id": "<s>", "type_id": 1 } },
                    { "Sequence": { "id": "B", "type_id": 1 } },
                ],
                "special_tokens": {
                    "<s>": { "id": "<s>", "ids": [1], "tokens": ["<s>"] },
                },
            },
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    { "type": "Replace", "pattern": { "String": "▁" }, "content": " " },
                    { "type": "ByteFallback" },
                    { "type": "Fuse" },
                    { "type": "Strip", "content": " ", "start": 1, "stop": 0 },
                ],
            },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": "<unk>",
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": Value::Object(llama_vocab()),
                "merges": [],
            },
        })
    }
}

fn tokenizer_config(like: Like) -> Value {
    match like.family() {
        Family::Qwen2Vl => {
            return json!({
                "add_prefix_space": false,
                "added_tokens_decoder": added_decoder(&qwen2vl_added()),
                "additional_special_tokens": additional_special(like),
                "bos_token": null,
                "chat_template": QWEN2VL_TEMPLATE,
                "clean_up_tokenization_spaces": false,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": 32768,
                "pad_token": "<|endoftext|>",
                "padding_side": "left",
                "processor_class": "Qwen2VLProcessor",
                "split_special_tokens": false,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": null,
            })
        }
        Family::InternVl => {
            return json!({
                "add_prefix_space": false,
                "added_tokens_decoder": added_decoder(&internvl_added()),
                "additional_special_tokens": additional_special(like),
                "bos_token": null,
                "clean_up_tokenization_spaces": false,
                "context_image_token": "<IMG_CONTEXT>",
                "end_image_token": "</img>",
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "extra_special_tokens": {
                    "context_image_token": "<IMG_CONTEXT>",
                    "end_image_token": "</img>",
                    "start_image_token": "<img>",
                },
                "model_max_length": 8192,
                "pad_token": "<|endoftext|>",
                "padding_side": "left",
                "processor_class": "InternVLProcessor",
                "split_special_tokens": false,
                "start_image_token": "<img>",
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": null,
            })
        }
        Family::Llava | Family::LlavaOnevision => {}
    }
    if onevision(like) {
        json!({
            "add_prefix_space": false,
            "added_tokens_decoder": added_decoder(&qwen_added()),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": null,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "padding_side": "right",
            "processor_class": "LlavaOnevisionProcessor",
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null,
        })
    } else {
        json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "added_tokens_decoder": added_decoder(&llama_special()),
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": false,
            "eos_token": "</s>",
            "legacy": false,
            "pad_token": "<pad>",
            "padding_side": "left",
            "processor_class": "LlavaProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": false,
        })
    }
}

fn special_tokens_map(like: Like) -> Value {
    let tok = |t: &str| {
        json!({
            "content": t,
            "lstrip": false,
            "normalized": false,
            "rstrip": false,
            "single_word": false,
        })
    };
    match like.family() {
        Family::Qwen2Vl | Family::InternVl => {
            let mut m = json!({
                "additional_special_tokens": additional_special(like),
                "eos_token": tok("<|im_end|>"),
                "pad_token": tok("<|endoftext|>"),
            });
            if like.family() == Family::InternVl {
                m["context_image_token"] = json!("<IMG_CONTEXT>");
                m["end_image_token"] = json!("</img>");
                m["start_image_token"] = json!("<img>");
            }
            return m;
        }
        Family::Llava | Family::LlavaOnevision => {}
    }
    if onevision(like) {
        json!({
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": tok("<|im_end|>"),
            "pad_token": tok("<|endoftext|>"),
        })
    } else {
        json!({
            "bos_token": tok("<s>"),
            "eos_token": tok("</s>"),
            "pad_token": tok("<pad>"),
            "unk_token": tok("<unk>"),
        })
    }
}
