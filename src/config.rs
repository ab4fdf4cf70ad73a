//! `config.json` of a Hugging Face VLM, read with the same defaults as
//! transformers' config classes (LlavaConfig, LlavaOnevisionConfig,
//! CLIPVisionConfig, SiglipVisionConfig, LlamaConfig, Qwen2Config): a
//! checkpoint written by transformers leaves out every value equal to its
//! class default. Both transformers 4 (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`) spellings
//! are read.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llava",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "internvl",
];
pub const SUPPORTED_VISION_TYPES: &[&str] = &["clip_vision_model", "siglip_vision_model"];
pub const SUPPORTED_TEXT_TYPES: &[&str] = &["llama", "qwen2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlavaForConditionalGeneration` (CLIP or SigLIP tower, any decoder).
    Llava,
    /// `LlavaOnevisionForConditionalGeneration` (anyres tiling).
    LlavaOnevision,
    /// `Qwen2VLForConditionalGeneration` (native-resolution vision tower
    /// with 2-D RoPE and a 2x2 merger, M-RoPE in the language model).
    Qwen2Vl,
    /// `Qwen2_5_VLForConditionalGeneration` (Qwen2-VL with RMSNorm + SwiGLU
    /// vision blocks and windowed attention).
    Qwen25Vl,
    /// `InternVLForConditionalGeneration` (the "-hf" InternVL2.5 / InternVL3
    /// checkpoints: InternViT, 0.5 pixel shuffle, MLP projector).
    InternVl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionKind {
    Clip,
    Siglip,
    /// `Qwen2VisionTransformerPretrainedModel`.
    Qwen2Vl,
    /// `Qwen2_5_VisionTransformerPretrainedModel`.
    Qwen25Vl,
    /// `InternVLVisionModel` (InternViT: CLS token, absolute position
    /// embeddings, layer scales).
    InternVit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextKind {
    Llama,
    Qwen2,
}

/// Activation functions named in configs (transformers' `ACT2FN` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `gelu`: exact erf form.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x).
    QuickGelu,
    /// `silu` / `swish`.
    Silu,
    Relu,
}

impl Act {
    pub fn parse(name: &str, path: &Path, key: &str) -> Result<Act> {
        Ok(match name {
            "gelu" => Act::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Act::GeluTanh,
            "quick_gelu" => Act::QuickGelu,
            "silu" | "swish" => Act::Silu,
            "relu" => Act::Relu,
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("activation in \"{key}\""),
                    found: other.to_string(),
                    supported: "gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu, relu".into(),
                })
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    pub hidden_act: Act,
    /// Qwen2-VL: the side of the block of patches the merger joins into one
    /// token (1 for CLIP / SigLIP).
    pub spatial_merge_size: usize,
    /// Qwen2-VL: frames per patch (an image is one frame, duplicated).
    pub temporal_patch_size: usize,
    /// Qwen2-VL: the merger's output width (the language model's hidden
    /// size); 0 where a separate projector follows the tower.
    pub out_hidden_size: usize,
    /// Qwen2.5-VL: the side of an attention window in pixels (0: every
    /// block attends over the whole image).
    pub window_size: usize,
    /// Qwen2.5-VL: the blocks that attend over the whole image.
    pub fullatt_block_indexes: Vec<usize>,
}

impl VisionConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
    /// Tokens the tower outputs per image: patches (+ CLS for CLIP).
    pub fn num_positions(&self) -> usize {
        self.num_patches()
            + usize::from(matches!(
                self.kind,
                VisionKind::Clip | VisionKind::InternVit
            ))
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f32,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

#[derive(Clone, Debug)]
pub struct TextConfig {
    pub kind: TextKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Bias on q/k/v (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`; Qwen2 never).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Act,
    pub tie_word_embeddings: bool,
    /// M-RoPE (Qwen2-VL): how many of the `head_dim / 2` frequencies take
    /// the temporal, height and width position, in that order.
    pub mrope_section: Option<Vec<usize>>,
}

#[derive(Clone, Debug)]
pub struct VlmConfig {
    pub path: PathBuf,
    pub arch: Arch,
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_index: u32,
    pub projector_hidden_act: Act,
    pub multimodal_projector_bias: bool,
    /// Hidden-state indices (python style, negative from the end) whose
    /// outputs are concatenated along channels; one entry in practice.
    pub vision_feature_layer: Vec<i64>,
    /// "default" drops the CLS token; "full" keeps every position.
    pub vision_feature_select_strategy: String,
    /// OneVision: [height, width] pairs.
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// OneVision: e.g. "anyres_max_9".
    pub vision_aspect_ratio: String,
    /// InternVL: InternViT's own settings (`None` for other families).
    pub internvl: Option<crate::config_internvl::InternVitExtra>,
    /// The size keys config.json leaves out (filled with transformers'
    /// defaults), e.g. `text_config` or `vision_config.patch_size`: when a
    /// size does not match the weights, the message says the key is missing.
    pub absent: Vec<String>,
    /// The text settings are at the top level (Qwen2-VL's transformers-4
    /// files), not under `text_config`: messages name keys that way.
    pub flat_text: bool,
}

/// The keys [`VlmConfig::absent`] reports on.
pub(crate) const SIZE_KEYS: &[&str] = &[
    "text_config",
    "vision_config",
    "text_config.vocab_size",
    "text_config.hidden_size",
    "text_config.intermediate_size",
    "text_config.num_hidden_layers",
    "vision_config.hidden_size",
    "vision_config.intermediate_size",
    "vision_config.num_hidden_layers",
    "vision_config.num_channels",
    "vision_config.image_size",
    "vision_config.patch_size",
];

/// The dotted `keys` (`section.key`) that `v` leaves out or sets to null.
pub(crate) fn absent_keys(v: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .filter(|k| {
            k.split('.')
                .try_fold(v, |o, part| o.get(part).filter(|x| !x.is_null()))
                .is_none()
        })
        .map(|k| k.to_string())
        .collect()
}

/// Typed access to one JSON object with the file name for errors.
pub(crate) struct Obj<'a> {
    pub v: &'a Value,
    pub path: &'a Path,
    pub ctx: String,
}

impl<'a> Obj<'a> {
    pub(crate) fn key(&self, k: &str) -> String {
        if self.ctx.is_empty() {
            k.to_string()
        } else {
            format!("{}.{}", self.ctx, k)
        }
    }
    pub(crate) fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }
    pub(crate) fn usize(&self, k: &str, default: usize) -> Result<usize> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!(
                        "\"{}\": expected a non-negative integer, found {v}",
                        self.key(k)
                    ),
                )
            }),
        }
    }
    pub(crate) fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(_) => self.usize(k, 0).map(Some),
        }
    }
    pub(crate) fn f32(&self, k: &str, default: f32) -> Result<f32> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("\"{}\": expected a number, found {v}", self.key(k)),
                )
            }),
        }
    }
    pub(crate) fn bool(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("\"{}\": expected true or false, found {v}", self.key(k)),
                )
            }),
        }
    }
    pub(crate) fn str(&self, k: &str, default: &str) -> Result<String> {
        match self.get(k) {
            None => Ok(default.to_string()),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("\"{}\": expected a string, found {v}", self.key(k)),
                )
            }),
        }
    }
    pub(crate) fn act(&self, k: &str, default: &str) -> Result<Act> {
        Act::parse(&self.str(k, default)?, self.path, &self.key(k))
    }
    pub(crate) fn sub(&self, k: &str) -> Option<Obj<'a>> {
        self.get(k).filter(|v| v.is_object()).map(|v| Obj {
            v,
            path: self.path,
            ctx: self.key(k),
        })
    }
}

impl VlmConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<VlmConfig> {
        if let Some(e) = Error::wrong_kind(dir, true, "a model directory (with config.json)") {
            return Err(e);
        }
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                what: "model directory".into(),
            });
        }
        let path = dir.join("config.json");
        if let Some(e) = Error::wrong_kind(&path, false, "the model config file") {
            return Err(e);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                path: path.clone(),
                what: "model config".into(),
            },
            _ => Error::io(&path, e),
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, &path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<VlmConfig> {
        let top = Obj {
            v,
            path,
            ctx: String::new(),
        };
        let model_type = top.str("model_type", "")?;
        let arch = match model_type.as_str() {
            "llava" => Arch::Llava,
            "llava_onevision" => Arch::LlavaOnevision,
            "qwen2_vl" => return crate::config_qwen::parse_qwen2vl(&top, path, Arch::Qwen2Vl),
            "qwen2_5_vl" => return crate::config_qwen::parse_qwen2vl(&top, path, Arch::Qwen25Vl),
            "internvl" => return crate::config_internvl::parse_internvl(&top, path),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: "model_type".into(),
                    found: other.to_string(),
                    supported: SUPPORTED_MODEL_TYPES.join(", "),
                })
            }
        };
        let null = Value::Null;
        let vision_v = top.get("vision_config").unwrap_or(&null);
        let text_v = top.get("text_config").unwrap_or(&null);
        let vision = parse_vision(vision_v, path, arch)?;
        let text = parse_text(text_v, path, arch)?;

        let (image_token_default, strategy_default, layer_default) = match arch {
            Arch::Llava => (32000, "default", -2),
            Arch::LlavaOnevision | Arch::Qwen2Vl | Arch::Qwen25Vl | Arch::InternVl => {
                (151646, "full", -1)
            }
        };
        let image_token_index = top
            .get("image_token_index")
            .or_else(|| top.get("image_token_id"))
            .map(|v| {
                v.as_u64().map(|x| x as u32).ok_or_else(|| {
                    Error::config(
                        path,
                        format!("\"image_token_index\": expected an integer, found {v}"),
                    )
                })
            })
            .transpose()?
            .unwrap_or(image_token_default);
        let vision_feature_layer = match top.get("vision_feature_layer") {
            None => vec![layer_default],
            Some(Value::Number(n)) => vec![n.as_i64().ok_or_else(|| {
                Error::config(path, "\"vision_feature_layer\": expected an integer")
            })?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        Error::config(path, "\"vision_feature_layer\": expected integers")
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!(
                        "\"vision_feature_layer\": expected an integer or a list, found {other}"
                    ),
                ))
            }
        };
        let strategy = top.str("vision_feature_select_strategy", strategy_default)?;
        if strategy != "default" && strategy != "full" {
            return Err(Error::config(
                path,
                format!("\"vision_feature_select_strategy\": expected \"default\" or \"full\", found \"{strategy}\""),
            ));
        }
        let image_grid_pinpoints = match top.get("image_grid_pinpoints") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| match p.as_array().map(|x| x.as_slice()) {
                    Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                        (Some(h), Some(w)) => Ok((h as usize, w as usize)),
                        _ => Err(()),
                    },
                    _ => Err(()),
                })
                .collect::<std::result::Result<Vec<_>, ()>>()
                .map_err(|_| {
                    Error::config(
                        path,
                        "\"image_grid_pinpoints\": expected a list of [height, width] pairs",
                    )
                })?,
            Some(_) => {
                return Err(Error::config(
                    path,
                    "\"image_grid_pinpoints\": expected a list of [height, width] pairs",
                ))
            }
            None if arch == Arch::LlavaOnevision => {
                // LlavaOnevisionConfig's default: every (384 i, 384 j), i, j in 1..=6.
                let mut p = Vec::new();
                for i in 1..=6 {
                    for j in 1..=6 {
                        p.push((384 * i, 384 * j));
                    }
                }
                p
            }
            None => Vec::new(),
        };
        let vision_aspect_ratio = top.str("vision_aspect_ratio", "anyres_max_9")?;
        let absent = absent_keys(v, SIZE_KEYS);
        let cfg = VlmConfig {
            path: path.to_path_buf(),
            arch,
            vision,
            text,
            image_token_index,
            projector_hidden_act: top.act("projector_hidden_act", "gelu")?,
            multimodal_projector_bias: top.bool("multimodal_projector_bias", true)?,
            vision_feature_layer,
            vision_feature_select_strategy: strategy,
            image_grid_pinpoints,
            vision_aspect_ratio,
            absent,
            flat_text: false,
            internvl: None,
        };
        cfg.check()?;
        Ok(cfg)
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(&self.path, m));
        let v = &self.vision;
        // A stride-`patch` convolution: trailing pixels past the last whole
        // patch are ignored (SigLIP 384 / 14 -> 27 x 27), as in PyTorch.
        let native = matches!(v.kind, VisionKind::Qwen2Vl | VisionKind::Qwen25Vl);
        if v.patch_size == 0 || (!native && v.image_size < v.patch_size) {
            return bad(format!(
                "vision_config: image_size {} is smaller than patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        let t = &self.text;
        for (key, value) in [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.head_dim", t.head_dim),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
        ] {
            if value == 0 {
                let key = self.key_name(key);
                return bad(format!("\"{key}\" is 0; expected a positive size"));
            }
        }
        if t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
            || !t.head_dim.is_multiple_of(2)
        {
            return bad(format!(
                "\"{}\" {} must be a multiple of \"{}\" {} and head_dim {} even",
                self.key_name("text_config.num_attention_heads"),
                t.num_attention_heads,
                self.key_name("text_config.num_key_value_heads"),
                t.num_key_value_heads,
                t.head_dim
            ));
        }
        let n = v.num_hidden_layers as i64;
        for &l in &self.vision_feature_layer {
            // hidden_states has num_hidden_layers + 1 entries.
            if l > n || l < -(n + 1) {
                return bad(format!(
                    "vision_feature_layer {l} is out of range for {n} vision layers"
                ));
            }
        }
        if self.arch == Arch::LlavaOnevision && self.image_grid_pinpoints.is_empty() {
            return bad("image_grid_pinpoints is empty".into());
        }
        Ok(())
    }

    /// True when config.json leaves `key` out (one of the size keys, see
    /// [`VlmConfig::absent`]), or its section altogether.
    pub fn is_absent(&self, key: &str) -> bool {
        let section = key.split('.').next().unwrap_or(key);
        self.absent.iter().any(|k| k == key || k == section)
    }

    /// `key` (`text_config.*`) as this file spells it.
    pub fn key_name<'k>(&self, key: &'k str) -> &'k str {
        if self.flat_text {
            key.strip_prefix("text_config.").unwrap_or(key)
        } else {
            key
        }
    }

    /// `"key" N`, or `"key" is missing (transformers' default N used)`.
    pub fn describe(&self, key: &str, value: usize) -> String {
        if self.is_absent(key) {
            let section = key.split('.').next().unwrap_or(key);
            if section != key && self.absent.iter().any(|k| k == section) {
                format!("\"{section}\" is missing (transformers' default {key} {value} used)")
            } else {
                format!("\"{key}\" is missing (transformers' default {value} used)")
            }
        } else {
            format!("\"{}\" is {value}", self.key_name(key))
        }
    }

    /// Index into the vision tower's hidden states (0 = embeddings).
    pub fn feature_layer_indices(&self) -> Vec<usize> {
        let n = self.vision.num_hidden_layers as i64 + 1;
        self.vision_feature_layer
            .iter()
            .map(|&l| if l < 0 { (n + l) as usize } else { l as usize })
            .collect()
    }

    /// Width of the features entering the projector.
    pub fn vision_feature_dim(&self) -> usize {
        self.vision.hidden_size * self.vision_feature_layer.len()
    }

    /// Image tokens per vision tile after the feature-select strategy.
    pub fn tokens_per_tile(&self) -> usize {
        if self.vision_feature_select_strategy == "default" {
            self.vision.num_positions() - 1
        } else {
            self.vision.num_positions()
        }
    }
}

fn parse_vision(v: &Value, path: &Path, arch: Arch) -> Result<VisionConfig> {
    let o = Obj {
        v,
        path,
        ctx: "vision_config".into(),
    };
    let default_type = match arch {
        Arch::Llava => "clip_vision_model",
        Arch::LlavaOnevision | Arch::Qwen2Vl | Arch::Qwen25Vl | Arch::InternVl => {
            "siglip_vision_model"
        }
    };
    let mt = o.str("model_type", default_type)?;
    // Class defaults: (hidden, intermediate, patch, image, layers, heads,
    // layer_norm_eps, act). When `vision_config` is absent altogether the
    // composite config builds the tower with its own overrides instead:
    // LlavaConfig a CLIP ViT-L/14-336, LlavaOnevisionConfig a SigLIP-so400m.
    let present = v.is_object();
    let (kind, (h, i, p, s, l, a), eps, act) = match mt.as_str() {
        "clip_vision_model" => (
            VisionKind::Clip,
            if present {
                (768, 3072, 32, 224, 12, 12)
            } else {
                (1024, 4096, 14, 336, 24, 16)
            },
            1e-5,
            "quick_gelu",
        ),
        "siglip_vision_model" => (
            VisionKind::Siglip,
            if present {
                (768, 3072, 16, 224, 12, 12)
            } else {
                (1152, 4304, 14, 384, 26, 16)
            },
            1e-6,
            "gelu_pytorch_tanh",
        ),
        other => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "vision_config.model_type".into(),
                found: other.to_string(),
                supported: SUPPORTED_VISION_TYPES.join(", "),
            })
        }
    };
    Ok(VisionConfig {
        kind,
        hidden_size: o.usize("hidden_size", h)?,
        intermediate_size: o.usize("intermediate_size", i)?,
        num_hidden_layers: o.usize("num_hidden_layers", l)?,
        num_attention_heads: o.usize("num_attention_heads", a)?,
        num_channels: o.usize("num_channels", 3)?,
        image_size: o.usize("image_size", s)?,
        patch_size: o.usize("patch_size", p)?,
        layer_norm_eps: o.f32("layer_norm_eps", eps)?,
        hidden_act: o.act("hidden_act", act)?,
        spatial_merge_size: 1,
        temporal_patch_size: 1,
        out_hidden_size: 0,
        window_size: 0,
        fullatt_block_indexes: Vec::new(),
    })
}

pub(crate) fn parse_text(v: &Value, path: &Path, arch: Arch) -> Result<TextConfig> {
    let o = Obj {
        v,
        path,
        ctx: "text_config".into(),
    };
    let default_type = match arch {
        Arch::Llava => "llama",
        Arch::LlavaOnevision | Arch::Qwen2Vl | Arch::Qwen25Vl | Arch::InternVl => "qwen2",
    };
    let mt = o.str("model_type", default_type)?;
    let kind = match mt.as_str() {
        "llama" => TextKind::Llama,
        "qwen2" => TextKind::Qwen2,
        other => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "text_config.model_type".into(),
                found: other.to_string(),
                supported: SUPPORTED_TEXT_TYPES.join(", "),
            })
        }
    };
    // (vocab, hidden, intermediate, layers, heads, kv heads default, max pos, rms eps)
    let (vocab, hidden, inter, layers, heads, max_pos) = match kind {
        TextKind::Llama => (32000, 4096, 11008, 32, 32, 2048),
        TextKind::Qwen2 => (151936, 4096, 22016, 32, 32, 32768),
    };
    let hidden_size = o.usize("hidden_size", hidden)?;
    let num_attention_heads = o.usize("num_attention_heads", heads)?;
    let num_key_value_heads = match kind {
        // LlamaConfig: None -> num_attention_heads.
        TextKind::Llama => o
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        TextKind::Qwen2 => o.usize("num_key_value_heads", 32)?,
    };
    if num_attention_heads == 0 {
        return Err(Error::config(
            path,
            "text_config.num_attention_heads must be > 0",
        ));
    }
    let head_dim = o
        .opt_usize("head_dim")?
        .unwrap_or(hidden_size / num_attention_heads);
    let attention_bias = o.bool("attention_bias", false)?;
    let mut max_position_embeddings = o.usize("max_position_embeddings", max_pos)?;
    // Qwen2 with use_sliding_window attends to a window on some layers; the
    // runtime implements full attention, which is the same computation for
    // sequences no longer than the window, so the context is capped there.
    if kind == TextKind::Qwen2 && o.bool("use_sliding_window", false)? {
        if let Some(w) = o.opt_usize("sliding_window")? {
            max_position_embeddings = max_position_embeddings.min(w);
        }
    }
    let (rope_theta, rope_scaling) = parse_rope(&o)?;
    Ok(TextConfig {
        kind,
        vocab_size: o.usize("vocab_size", vocab)?,
        hidden_size,
        intermediate_size: o.usize("intermediate_size", inter)?,
        num_hidden_layers: o.usize("num_hidden_layers", layers)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: o.f32("rms_norm_eps", 1e-6)?,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        qkv_bias: kind == TextKind::Qwen2 || attention_bias,
        o_bias: kind == TextKind::Llama && attention_bias,
        mlp_bias: kind == TextKind::Llama && o.bool("mlp_bias", false)?,
        hidden_act: o.act("hidden_act", "silu")?,
        tie_word_embeddings: o.bool("tie_word_embeddings", false)?,
        mrope_section: None,
    })
}

/// The RoPE settings object (`rope_parameters` of transformers 5, else
/// `rope_scaling` of transformers 4) and `rope_theta` (top level first,
/// then inside that object, else `default_theta`).
pub(crate) fn rope_params<'a>(o: &Obj<'a>, default_theta: f32) -> Result<(f32, Option<Obj<'a>>)> {
    let params = o.sub("rope_parameters").or_else(|| o.sub("rope_scaling"));
    let theta = match (&params, o.get("rope_theta")) {
        (_, Some(_)) => o.f32("rope_theta", default_theta)?,
        (Some(p), None) => p.f32("rope_theta", default_theta)?,
        (None, None) => default_theta,
    };
    Ok((theta, params))
}

/// `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5).
fn parse_rope(o: &Obj) -> Result<(f32, RopeScaling)> {
    let (theta, params) = rope_params(o, 10000.0)?;
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let ty = match p.get("rope_type").or_else(|| p.get("type")) {
        Some(v) => v.as_str().unwrap_or("").to_string(),
        None => "default".into(),
    };
    let scaling = match ty.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: p.f32("factor", 1.0)?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: p.f32("factor", 8.0)?,
            low_freq_factor: p.f32("low_freq_factor", 1.0)?,
            high_freq_factor: p.f32("high_freq_factor", 4.0)?,
            original_max_position_embeddings: p.f32("original_max_position_embeddings", 8192.0)?,
        },
        other => {
            return Err(Error::Unsupported {
                path: o.path.to_path_buf(),
                what: format!("{}.rope_type", p.ctx),
                found: other.to_string(),
                supported: "default, linear, llama3".into(),
            })
        }
    };
    Ok((theta, scaling))
}
