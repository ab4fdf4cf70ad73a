//! config.json of `InternVLForConditionalGeneration` (the transformers-native
//! "-hf" InternVL2.5 / InternVL3 checkpoints). Both generations nest the
//! language model under `text_config` (Qwen2 or Llama; transformers 4
//! writes `rope_theta`, transformers 5 `rope_parameters`, both read by
//! [`crate::config`]'s text parser) and InternViT under `vision_config`
//! (`InternVLVisionConfig`, whose `image_size` / `patch_size` may be an
//! integer or a `[height, width]` pair). Keys left out take the defaults of
//! `InternVLConfig` / `InternVLVisionConfig`.

use std::path::Path;

use serde_json::Value;

use crate::config::{absent_keys, parse_text, Arch, Obj, VisionConfig, VisionKind, VlmConfig};
use crate::error::{Error, Result};

/// The vision-tower settings only InternViT has.
#[derive(Clone, Debug, PartialEq)]
pub struct InternVitExtra {
    /// `norm_type`: "rms_norm" (true) or "layer_norm" (false).
    pub rms_norm: bool,
    /// `attention_bias`: biases on q / k / v.
    pub qkv_bias: bool,
    /// `use_qk_norm`: RMSNorm (eps 1e-6) over the whole q and k rows.
    pub qk_norm: bool,
    /// `not use_mean_pooling`: a final LayerNorm (`vision_tower.layernorm`).
    pub final_norm: bool,
    /// `image_seq_length` as written (informational: the token count is
    /// computed from the tile and patch sizes).
    pub image_seq_length: usize,
}

/// An integer or a square `[n, n]` pair (`image_size`, `patch_size`).
fn square(o: &Obj, k: &str, default: usize) -> Result<usize> {
    let bad = |v: &Value| {
        Error::config(
            o.path,
            format!(
                "\"{}\": expected a positive integer or a square [height, width] pair, found {v}",
                o.key(k)
            ),
        )
    };
    match o.get(k) {
        None => Ok(default),
        Some(Value::Array(a)) => match a.as_slice() {
            [h, w] => match (h.as_u64(), w.as_u64()) {
                (Some(h), Some(w)) if h == w && h > 0 => Ok(h as usize),
                _ => Err(bad(o.get(k).unwrap_or(&Value::Null))),
            },
            _ => Err(bad(o.get(k).unwrap_or(&Value::Null))),
        },
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(bad(v)),
        },
    }
}

pub(crate) fn parse_internvl(top: &Obj, path: &Path) -> Result<VlmConfig> {
    let null = Value::Null;
    let vo = Obj {
        v: top.get("vision_config").unwrap_or(&null),
        path,
        ctx: "vision_config".into(),
    };
    let norm_type = vo.str("norm_type", "layer_norm")?;
    let rms_norm = match norm_type.as_str() {
        "layer_norm" => false,
        "rms_norm" => true,
        other => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "vision_config.norm_type".into(),
                found: other.to_string(),
                supported: "layer_norm, rms_norm".into(),
            })
        }
    };
    if !vo.bool("use_absolute_position_embeddings", true)? {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "vision_config.use_absolute_position_embeddings".into(),
            found: "false".into(),
            supported: "true (InternViT's absolute position embeddings)".into(),
        });
    }
    let vision = VisionConfig {
        kind: VisionKind::InternVit,
        hidden_size: vo.usize("hidden_size", 1024)?,
        intermediate_size: vo.usize("intermediate_size", 4096)?,
        num_hidden_layers: vo.usize("num_hidden_layers", 24)?,
        num_attention_heads: vo.usize("num_attention_heads", 16)?,
        num_channels: vo.usize("num_channels", 3)?,
        image_size: square(&vo, "image_size", 448)?,
        patch_size: square(&vo, "patch_size", 14)?,
        layer_norm_eps: vo.f32("layer_norm_eps", 1e-6)?,
        hidden_act: vo.act("hidden_act", "gelu")?,
        // The 0.5 pixel shuffle joins 2 x 2 patches into one token.
        spatial_merge_size: 2,
        temporal_patch_size: 1,
        out_hidden_size: 0,
        window_size: 0,
        fullatt_block_indexes: Vec::new(),
    };
    let extra = InternVitExtra {
        rms_norm,
        qkv_bias: vo.bool("attention_bias", false)?,
        qk_norm: vo.bool("use_qk_norm", false)?,
        final_norm: !vo.bool("use_mean_pooling", true)?,
        image_seq_length: top.usize("image_seq_length", 256)?,
    };
    let text_o = top.sub("text_config").unwrap_or(Obj {
        v: &null,
        path,
        ctx: "text_config".into(),
    });
    let text = parse_text(text_o.v, path, Arch::InternVl)?;
    let image_token_index = match top
        .get("image_token_id")
        .or_else(|| top.get("image_token_index"))
    {
        None => 151667,
        Some(v) => v.as_u64().map(|x| x as u32).ok_or_else(|| {
            Error::config(
                path,
                format!("\"image_token_id\": expected an integer, found {v}"),
            )
        })?,
    };
    let ratio = top.f32("downsample_ratio", 0.5)?;
    if ratio != 0.5 {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "downsample_ratio".into(),
            found: format!("{ratio}"),
            supported: "0.5 (the pixel shuffle of every InternVL -hf checkpoint)".into(),
        });
    }
    let layer = match top.get("vision_feature_layer") {
        None => -1,
        Some(v) => v.as_i64().ok_or_else(|| {
            Error::config(
                path,
                format!("\"vision_feature_layer\": expected an integer, found {v}"),
            )
        })?,
    };
    if layer != -1 {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "vision_feature_layer".into(),
            found: layer.to_string(),
            supported: "-1 (transformers' InternVL only runs the last layer's output)".into(),
        });
    }
    let strategy = top.str("vision_feature_select_strategy", "default")?;
    if strategy != "default" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "vision_feature_select_strategy".into(),
            found: strategy,
            supported: "default (the CLS token is dropped before the pixel shuffle)".into(),
        });
    }
    let absent = absent_keys(top.v, crate::config::SIZE_KEYS);
    let cfg = VlmConfig {
        path: path.to_path_buf(),
        arch: Arch::InternVl,
        vision,
        text,
        image_token_index,
        projector_hidden_act: top.act("projector_hidden_act", "gelu")?,
        multimodal_projector_bias: true,
        vision_feature_layer: vec![-1],
        vision_feature_select_strategy: "default".into(),
        image_grid_pinpoints: Vec::new(),
        vision_aspect_ratio: String::new(),
        absent,
        flat_text: false,
        internvl: Some(extra),
    };
    cfg.check()?;
    let v = &cfg.vision;
    let side = v.patches_per_side();
    if !v.image_size.is_multiple_of(v.patch_size) || !side.is_multiple_of(2) {
        return Err(Error::config(
            path,
            format!(
                "vision_config: image_size {} must be an even multiple of patch_size {} (the 0.5 pixel shuffle joins 2 x 2 patches)",
                v.image_size, v.patch_size
            ),
        ));
    }
    if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
        return Err(Error::config(
            path,
            format!(
                "vision_config: hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ),
        ));
    }
    Ok(cfg)
}

/// Tokens one tile becomes: the patches after the 0.5 pixel shuffle.
pub fn tokens_per_tile(v: &VisionConfig) -> usize {
    v.num_patches() / 4
}
