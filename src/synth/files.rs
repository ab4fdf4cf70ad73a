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

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::{Like, Plan};
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
    let mut files: Vec<(&str, Value)> = vec![
        ("config.json", config(plan)),
        ("generation_config.json", generation_config(plan.like)),
        ("preprocessor_config.json", preprocessor_config(plan.like)),
        ("processor_config.json", processor_config(plan.like)),
        (
            "chat_template.json",
            json!({ "chat_template": chat_template(plan.like) }),
        ),
        ("tokenizer.json", tokenizer_json(plan.like)),
        ("tokenizer_config.json", tokenizer_config(plan.like)),
        ("special_tokens_map.json", special_tokens_map(plan.like)),
    ];
    if onevision(plan.like) {
        files.push((
            "video_preprocessor_config.json",
            video_preprocessor_config(),
        ));
        let added: Map<String, Value> = qwen_added()
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
    if onevision(plan.like) {
        // The slow tokenizer's merges: none (see the module comment).
        let path = dir.join("merges.txt");
        let text = "#version: 0.2\n";
        fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        bytes += text.len() as u64;
    }
    Ok(bytes)
}

fn onevision(like: Like) -> bool {
    like.spec().onevision
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

fn generation_config(like: Like) -> Value {
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

fn video_preprocessor_config() -> Value {
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

fn processor_config(like: Like) -> Value {
    if onevision(like) {
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
    }
}

/// The llava-hf processors' chat templates.
fn chat_template(like: Like) -> &'static str {
    if onevision(like) {
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    } else {
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    }
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
    if onevision(like) {
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
            "added_tokens": qwen_added().iter().map(|&(id, t)| added_token(id, t)).collect::<Vec<_>>(),
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
