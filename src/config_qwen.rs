//! config.json of `Qwen2VLForConditionalGeneration` and
//! `Qwen2_5_VLForConditionalGeneration`, in both on-disk
//! generations: the Hub files written by transformers 4 keep the language
//! model's keys at the top level with `rope_theta` and
//! `rope_scaling: {"type": "mrope", "mrope_section": [...]}`; transformers 5
//! nests them under `text_config` with
//! `rope_parameters: {"rope_type": "default", "mrope_section", "rope_theta"}`.
//! Keys left out take the defaults of `Qwen2VLConfig` / `Qwen2VLTextConfig` /
//! `Qwen2VLVisionConfig` (and their Qwen2.5-VL counterparts). The two
//! vision configs name sizes differently: Qwen2-VL's `embed_dim` is the
//! tower's width and `hidden_size` the merger's output; Qwen2.5-VL's
//! `hidden_size` is the tower's width and `out_hidden_size` the merger's.

use std::path::Path;

use serde_json::Value;

use crate::config::{
    absent_keys, rope_params, Act, Arch, Obj, RopeScaling, TextConfig, TextKind, VisionConfig,
    VisionKind, VlmConfig,
};
use crate::error::{Error, Result};

/// The keys [`VlmConfig::absent`] reports on, as this layout names them.
const SIZE_KEYS: &[&str] = &[
    "vision_config",
    "vision_config.embed_dim",
    "vision_config.depth",
    "vision_config.hidden_size",
    "vision_config.out_hidden_size",
    "vision_config.patch_size",
];

pub(crate) fn parse_qwen2vl(top: &Obj, path: &Path, arch: Arch) -> Result<VlmConfig> {
    let null = Value::Null;
    let vision_v = top.get("vision_config").unwrap_or(&null);
    let vision = match arch {
        Arch::Qwen25Vl => parse_vision_25(vision_v, path)?,
        _ => parse_vision(vision_v, path)?,
    };
    // transformers 4 files (and `Qwen2VLConfig(text_config=None)`) take the
    // text settings from the top level.
    let nested = top.sub("text_config");
    let flat_text = nested.is_none();
    let text_o = nested.unwrap_or(Obj {
        v: top.v,
        path,
        ctx: String::new(),
    });
    let text = parse_text(&text_o, top, arch)?;
    let image_token_index = match top.get("image_token_id") {
        None => 151655,
        Some(v) => v.as_u64().map(|x| x as u32).ok_or_else(|| {
            Error::config(
                path,
                format!("\"image_token_id\": expected an integer, found {v}"),
            )
        })?,
    };
    let absent = absent_keys(top.v, SIZE_KEYS);
    let cfg = VlmConfig {
        path: path.to_path_buf(),
        arch,
        vision,
        text,
        image_token_index,
        projector_hidden_act: Act::Gelu,
        multimodal_projector_bias: true,
        vision_feature_layer: vec![-1],
        vision_feature_select_strategy: "full".into(),
        image_grid_pinpoints: Vec::new(),
        vision_aspect_ratio: String::new(),
        absent,
        flat_text,
        internvl: None,
    };
    cfg.check()?;
    let v = &cfg.vision;
    if v.spatial_merge_size == 0 || v.temporal_patch_size == 0 || v.out_hidden_size == 0 {
        return Err(Error::config(
            path,
            format!(
                "vision_config: spatial_merge_size {}, temporal_patch_size {} and the merger's output size {} must be positive",
                v.spatial_merge_size, v.temporal_patch_size, v.out_hidden_size
            ),
        ));
    }
    if !v.hidden_size.is_multiple_of(v.num_attention_heads)
        || !(v.hidden_size / v.num_attention_heads).is_multiple_of(4)
    {
        return Err(Error::config(
            path,
            format!(
                "vision_config: embed_dim {} over num_heads {} must give a head size that is a multiple of 4 (2-D rotary embedding)",
                v.hidden_size, v.num_attention_heads
            ),
        ));
    }
    if v.out_hidden_size != cfg.text.hidden_size {
        return Err(Error::config(
            path,
            format!(
                "vision_config: the merger's output size {} differs from the language model's hidden_size {}",
                v.out_hidden_size, cfg.text.hidden_size
            ),
        ));
    }
    Ok(cfg)
}

fn parse_vision(v: &Value, path: &Path) -> Result<VisionConfig> {
    let o = Obj {
        v,
        path,
        ctx: "vision_config".into(),
    };
    let embed = o.usize("embed_dim", 1280)?;
    let ratio = o.f32("mlp_ratio", 4.0)?;
    let channels = match o.get("in_channels") {
        Some(_) => o.usize("in_channels", 3)?,
        None => o.usize("in_chans", 3)?,
    };
    let patch = o.usize("patch_size", 14)?;
    let merge = o.usize("spatial_merge_size", 2)?;
    Ok(VisionConfig {
        kind: VisionKind::Qwen2Vl,
        hidden_size: embed,
        // `Qwen2VisionTransformer`: `int(embed_dim * mlp_ratio)`.
        intermediate_size: (embed as f32 * ratio) as usize,
        num_hidden_layers: o.usize("depth", 32)?,
        num_attention_heads: o.usize("num_heads", 16)?,
        num_channels: channels,
        // Native resolution: no fixed image size; one merge block is the
        // smallest image.
        image_size: patch * merge,
        patch_size: patch,
        layer_norm_eps: 1e-6,
        hidden_act: o.act("hidden_act", "quick_gelu")?,
        spatial_merge_size: merge,
        temporal_patch_size: o.usize("temporal_patch_size", 2)?,
        out_hidden_size: o.usize("hidden_size", 3584)?,
        window_size: 0,
        fullatt_block_indexes: Vec::new(),
    })
}

fn parse_vision_25(v: &Value, path: &Path) -> Result<VisionConfig> {
    let o = Obj {
        v,
        path,
        ctx: "vision_config".into(),
    };
    let channels = match o.get("in_channels") {
        Some(_) => o.usize("in_channels", 3)?,
        None => o.usize("in_chans", 3)?,
    };
    let patch = o.usize("patch_size", 14)?;
    let merge = o.usize("spatial_merge_size", 2)?;
    let depth = o.usize("depth", 32)?;
    let key = o.key("fullatt_block_indexes");
    let full = match o.get("fullatt_block_indexes") {
        None => vec![7, 15, 23, 31],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::config(path, format!("\"{key}\": expected a list of block indices"))
            })?,
        Some(other) => {
            return Err(Error::config(
                path,
                format!("\"{key}\": expected a list of block indices, found {other}"),
            ))
        }
    };
    if let Some(&b) = full.iter().find(|&&b| b >= depth) {
        return Err(Error::config(
            path,
            format!("\"{key}\" names block {b}, but the tower has depth {depth}"),
        ));
    }
    let window_size = o.usize("window_size", 112)?;
    if window_size < patch * merge || !window_size.is_multiple_of(patch * merge) {
        return Err(Error::config(
            path,
            format!(
                "\"{}\" is {window_size}; expected a positive multiple of patch_size x spatial_merge_size = {}",
                o.key("window_size"),
                patch * merge
            ),
        ));
    }
    Ok(VisionConfig {
        kind: VisionKind::Qwen25Vl,
        hidden_size: o.usize("hidden_size", 3584)?,
        intermediate_size: o.usize("intermediate_size", 3420)?,
        num_hidden_layers: depth,
        num_attention_heads: o.usize("num_heads", 16)?,
        num_channels: channels,
        image_size: patch * merge,
        patch_size: patch,
        layer_norm_eps: 1e-6,
        hidden_act: o.act("hidden_act", "silu")?,
        spatial_merge_size: merge,
        temporal_patch_size: o.usize("temporal_patch_size", 2)?,
        out_hidden_size: o.usize("out_hidden_size", 3584)?,
        window_size,
        fullatt_block_indexes: full,
    })
}

fn parse_text(o: &Obj, top: &Obj, arch: Arch) -> Result<TextConfig> {
    let path = o.path;
    let family = match arch {
        Arch::Qwen25Vl => "qwen2_5_vl",
        _ => "qwen2_vl",
    };
    let text_type = format!("{family}_text");
    let mt = o.str("model_type", &text_type)?;
    if o.ctx == "text_config" && mt != text_type && mt != family {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "text_config.model_type".into(),
            found: mt,
            supported: text_type,
        });
    }
    let hidden_size = o.usize("hidden_size", 8192)?;
    let heads = o.usize("num_attention_heads", 64)?;
    if heads == 0 {
        return Err(Error::config(
            path,
            format!("\"{}\" must be > 0", o.key("num_attention_heads")),
        ));
    }
    let head_dim = hidden_size / heads;
    let (rope_theta, mrope_section) = parse_mrope(o, head_dim)?;
    let tie = match o.get("tie_word_embeddings") {
        Some(_) => o.bool("tie_word_embeddings", false)?,
        None => top.bool("tie_word_embeddings", false)?,
    };
    let mut max_position_embeddings = o.usize("max_position_embeddings", 32768)?;
    if o.bool("use_sliding_window", false)? {
        if let Some(w) = o.opt_usize("sliding_window")? {
            max_position_embeddings = max_position_embeddings.min(w);
        }
    }
    Ok(TextConfig {
        kind: TextKind::Qwen2,
        vocab_size: o.usize("vocab_size", 152064)?,
        hidden_size,
        intermediate_size: o.usize("intermediate_size", 29568)?,
        num_hidden_layers: o.usize("num_hidden_layers", 80)?,
        num_attention_heads: heads,
        num_key_value_heads: o.usize("num_key_value_heads", 8)?,
        head_dim,
        rms_norm_eps: o.f32("rms_norm_eps", 1e-5)?,
        rope_theta,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        hidden_act: o.act("hidden_act", "silu")?,
        tie_word_embeddings: tie,
        mrope_section: Some(mrope_section),
    })
}

/// `rope_theta` and `mrope_section` from `rope_scaling` (transformers 4:
/// `"type": "mrope"`, which transformers rewrites to `"default"`) or
/// `rope_parameters` (transformers 5: `"rope_type": "default"`). The
/// sections must add up to `head_dim / 2`.
fn parse_mrope(o: &Obj, head_dim: usize) -> Result<(f32, Vec<usize>)> {
    let path = o.path;
    let (theta, params) = rope_params(o, 1e6)?;
    let Some(p) = params else {
        return Err(Error::config(
            path,
            format!(
                "\"{}\" is missing: Qwen2-VL needs rope_scaling (transformers 4) or rope_parameters (transformers 5) with \"mrope_section\"",
                o.key("rope_scaling")
            ),
        ));
    };
    let type_key = if p.get("rope_type").is_some() {
        "rope_type"
    } else {
        "type"
    };
    let ty = match p.get(type_key) {
        Some(v) => v.as_str().unwrap_or("").to_string(),
        None => "default".into(),
    };
    if ty != "mrope" && ty != "default" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: p.key(type_key),
            found: ty,
            supported: "mrope, default (with mrope_section)".into(),
        });
    }
    let key = p.key("mrope_section");
    let section: Vec<usize> = match p.get("mrope_section") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                Error::config(path, format!("\"{key}\": expected a list of integers"))
            })?,
        Some(other) => {
            return Err(Error::config(
                path,
                format!("\"{key}\": expected a list of three integers, found {other}"),
            ))
        }
        None => return Err(Error::config(path, format!("\"{key}\" is missing"))),
    };
    if section.len() != 3 || section.iter().sum::<usize>() != head_dim / 2 {
        return Err(Error::config(
            path,
            format!(
                "\"{key}\" is {section:?}; expected three sizes adding up to head_dim / 2 = {}",
                head_dim / 2
            ),
        ));
    }
    Ok((theta, section))
}
