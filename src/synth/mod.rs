//! Random-weight checkpoints with the exact layout of real hub models, to
//! measure memory and time at real size without the real weights
//! (`mbq synth`).
//!
//! [`plan`] lists every tensor a transformers-4 `save_pretrained` of the
//! hub checkpoint holds (name, shape, dtype) in the model's state-dict order
//! and assigns them to shards as transformers does (5 GB shards filled in
//! that order); [`write()`] writes that plan as a Hugging Face model
//! directory: the safetensors files (each header first, computed from the
//! shapes, then the data generated chunk by chunk, so memory stays bounded
//! whatever the model's size), the index when sharded, and the configs and
//! tokenizer of `files.rs`. The values are deterministic in the seed:
//! uniform with a per-kind mean and standard deviation (linears and
//! embeddings std 0.02, norm weights 1 +- 0.02, biases std 0.01), which
//! keeps an f16 forward pass finite and far from degenerate.
//!
//! The output is built in a temporary sibling directory (`.OUT.tmp-<pid>`)
//! and renamed to OUT at the end: OUT either does not exist or is complete.

mod files;
mod write;

pub use files::{internvl_added, llama_special, qwen2vl_added, qwen_added, write_side_files};
pub(crate) use write::splitmix;
pub use write::{write, SynthProgress, SynthReport};

use crate::error::{Error, Result};

/// The models `mbq synth --like` knows.
pub const LIKE_NAMES: [&str; 5] = [
    "llava-ov-0.5b",
    "llava-ov-7b",
    "llava-1.5-7b",
    "qwen2-vl-7b",
    "internvl3-8b",
];

/// transformers' `save_pretrained` default `max_shard_size` ("5GB").
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The hub checkpoint a synthetic one copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Like {
    /// llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    LlavaOv05b,
    /// llava-hf/llava-onevision-qwen2-7b-ov-hf
    LlavaOv7b,
    /// llava-hf/llava-1.5-7b-hf
    Llava15_7b,
    /// Qwen/Qwen2-VL-7B-Instruct
    Qwen2Vl7b,
    /// OpenGVLab/InternVL3-8B-hf
    InternVl3_8b,
}

/// The checkpoint layouts (tensor names, side files) the models share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// LlavaForConditionalGeneration: CLIP tower, `language_model.*`.
    Llava,
    /// LlavaOnevisionForConditionalGeneration: SigLIP tower,
    /// `image_newline`, `language_model.*`.
    LlavaOnevision,
    /// Qwen2VLForConditionalGeneration as transformers 4 saves it:
    /// `visual.*` (tower and merger), `model.*`, `lm_head`.
    Qwen2Vl,
    /// InternVLForConditionalGeneration as transformers 4 saves it (its
    /// `_checkpoint_conversion_mapping` reversed): `vision_tower.*`
    /// (InternViT), `multi_modal_projector.*`, `language_model.*`.
    InternVl,
}

impl Like {
    /// A short name of [`LIKE_NAMES`] or the hub id.
    pub fn parse(name: &str) -> Result<Like> {
        [
            Like::LlavaOv05b,
            Like::LlavaOv7b,
            Like::Llava15_7b,
            Like::Qwen2Vl7b,
            Like::InternVl3_8b,
        ]
        .into_iter()
        .find(|l| name == l.name() || name == l.hub_id())
        .ok_or_else(|| {
            Error::invalid(format!(
                "--like: unknown model \"{name}\"; known: {}",
                LIKE_NAMES.join(", ")
            ))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Like::LlavaOv05b => LIKE_NAMES[0],
            Like::LlavaOv7b => LIKE_NAMES[1],
            Like::Llava15_7b => LIKE_NAMES[2],
            Like::Qwen2Vl7b => LIKE_NAMES[3],
            Like::InternVl3_8b => LIKE_NAMES[4],
        }
    }

    /// The hub repository it copies.
    pub fn hub_id(self) -> &'static str {
        match self {
            Like::LlavaOv05b => "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            Like::LlavaOv7b => "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            Like::Llava15_7b => "llava-hf/llava-1.5-7b-hf",
            Like::Qwen2Vl7b => "Qwen/Qwen2-VL-7B-Instruct",
            Like::InternVl3_8b => "OpenGVLab/InternVL3-8B-hf",
        }
    }

    pub fn family(self) -> Family {
        self.spec().family
    }

    /// The real checkpoint's sizes (see `files.rs` for where they come from
    /// and which could not be confirmed).
    pub fn spec(self) -> Spec {
        // SigLIP so400m-patch14-384 without its last layer and head, as
        // transformers' LLaVA-OneVision weight conversion builds it.
        let siglip = VisionSpec {
            clip: false,
            hidden: 1152,
            intermediate: 4304,
            layers: 26,
            heads: 16,
            patch: 14,
            image: 384,
        };
        match self {
            Like::LlavaOv05b => Spec {
                family: Family::LlavaOnevision,
                vision: siglip,
                // Qwen2-0.5B-Instruct; vocab 151936 + 2 (<image>, <video>)
                // padded to a multiple of 64 by the conversion.
                text: TextSpec {
                    llama: false,
                    hidden: 896,
                    intermediate: 4864,
                    layers: 24,
                    heads: 14,
                    kv_heads: 2,
                    vocab: 152000,
                    tied: true,
                },
            },
            Like::LlavaOv7b => Spec {
                family: Family::LlavaOnevision,
                vision: siglip,
                // Qwen2-7B-Instruct; vocab 152064 + 2 padded to 64.
                text: TextSpec {
                    llama: false,
                    hidden: 3584,
                    intermediate: 18944,
                    layers: 28,
                    heads: 28,
                    kv_heads: 4,
                    vocab: 152128,
                    tied: false,
                },
            },
            Like::Llava15_7b => Spec {
                family: Family::Llava,
                // CLIP ViT-L/14-336 (every layer is saved, the projector
                // reads layer -2).
                vision: VisionSpec {
                    clip: true,
                    hidden: 1024,
                    intermediate: 4096,
                    layers: 24,
                    heads: 16,
                    patch: 14,
                    image: 336,
                },
                // Vicuna-7B v1.5 (Llama 2); vocab 32000 + 2 (<image>,
                // <pad>) padded to 64.
                text: TextSpec {
                    llama: true,
                    hidden: 4096,
                    intermediate: 11008,
                    layers: 32,
                    heads: 32,
                    kv_heads: 32,
                    vocab: 32064,
                    tied: false,
                },
            },
            Like::Qwen2Vl7b => Spec {
                family: Family::Qwen2Vl,
                // Qwen2VisionTransformer: embed_dim 1280, depth 32, 16
                // heads, mlp_ratio 4, patch 14 (temporal 2, merge 2: see
                // QWEN_TEMPORAL_PATCH, QWEN_MERGE); native resolution, no
                // fixed image size.
                vision: VisionSpec {
                    clip: false,
                    hidden: 1280,
                    intermediate: 5120,
                    layers: 32,
                    heads: 16,
                    patch: 14,
                    image: 0,
                },
                // Qwen2-7B widths; vocab 152064 (151657 tokens padded by
                // Qwen), untied.
                text: TextSpec {
                    llama: false,
                    hidden: 3584,
                    intermediate: 18944,
                    layers: 28,
                    heads: 28,
                    kv_heads: 4,
                    vocab: 152064,
                    tied: false,
                },
            },
            Like::InternVl3_8b => Spec {
                family: Family::InternVl,
                // InternViT-300M-448px-V2_5: cls token and 1025 position
                // embeddings, q/k/v biases, LayerNorm, no qk norm, layer
                // scales, no final norm (use_mean_pooling).
                vision: VisionSpec {
                    clip: false,
                    hidden: 1024,
                    intermediate: 4096,
                    layers: 24,
                    heads: 16,
                    patch: 14,
                    image: 448,
                },
                // Qwen2.5-7B widths; vocab 151674 = Qwen2.5's 151665 tokens
                // + InternVL's 9 added ones (no padding), untied.
                text: TextSpec {
                    llama: false,
                    hidden: 3584,
                    intermediate: 18944,
                    layers: 28,
                    heads: 28,
                    kv_heads: 4,
                    vocab: 151674,
                    tied: false,
                },
            },
        }
    }
}

/// Qwen2-VL's `temporal_patch_size` (frames per patch; an image is
/// repeated to fill them).
pub const QWEN_TEMPORAL_PATCH: usize = 2;
/// Qwen2-VL's `spatial_merge_size`: the merger joins 2 x 2 patches.
pub const QWEN_MERGE: usize = 2;

/// A model's sizes, as far as the weights are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub family: Family,
    pub vision: VisionSpec,
    pub text: TextSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisionSpec {
    /// LLaVA's tower: CLIP (class embedding, pre-layernorm, no patch bias)
    /// or SigLIP. False for the other families.
    pub clip: bool,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub patch: usize,
    /// The tile size (0 for Qwen2-VL's native resolution).
    pub image: usize,
}

impl VisionSpec {
    /// Position embeddings: one per patch, plus CLIP's class token.
    pub fn positions(&self) -> usize {
        let side = self.image / self.patch;
        side * side + usize::from(self.clip)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextSpec {
    /// Llama (no q/k/v bias) or Qwen2 (q/k/v bias).
    pub llama: bool,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// Tied embeddings: no `lm_head` tensor is saved.
    pub tied: bool,
}

/// The weights' dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDtype {
    F16,
    Bf16,
}

impl SynthDtype {
    pub fn parse(s: &str) -> Result<SynthDtype> {
        match s {
            "f16" | "float16" => Ok(SynthDtype::F16),
            "bf16" | "bfloat16" => Ok(SynthDtype::Bf16),
            other => Err(Error::invalid(format!(
                "--dtype: expected f16 or bf16, found \"{other}\""
            ))),
        }
    }
    /// The safetensors name.
    pub fn st_name(self) -> &'static str {
        match self {
            SynthDtype::F16 => "F16",
            SynthDtype::Bf16 => "BF16",
        }
    }
    /// The `torch_dtype` of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDtype::F16 => "float16",
            SynthDtype::Bf16 => "bfloat16",
        }
    }
}

/// How a synthetic model differs from the real one.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub dtype: SynthDtype,
    /// Decoder layers (default: the real count); widths stay real.
    pub layers: Option<usize>,
    /// Vision-tower layers (default: the real count). For tests and quick
    /// runs only.
    pub vision_layers: Option<usize>,
    /// Rows of the embeddings and lm_head (default: the real vocabulary).
    /// For tests only: the tokenizer keeps the real ids, so prompts then
    /// tokenize beyond the embeddings.
    pub vocab: Option<usize>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            dtype: SynthDtype::F16,
            layers: None,
            vision_layers: None,
            vocab: None,
        }
    }
}

/// How a tensor's values are drawn: uniform with this mean and standard
/// deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Init {
    pub mean: f32,
    pub std: f32,
}

const LINEAR: Init = Init {
    mean: 0.0,
    std: 0.02,
};
const BIAS: Init = Init {
    mean: 0.0,
    std: 0.01,
};
const NORM: Init = Init {
    mean: 1.0,
    std: 0.02,
};

/// One tensor of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Index of the file that holds it (0-based).
    pub shard: usize,
}

impl PlannedTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Everything a synthetic checkpoint holds.
#[derive(Clone, Debug)]
pub struct Plan {
    pub like: Like,
    /// The sizes written (the real ones with the options applied).
    pub spec: Spec,
    pub dtype: SynthDtype,
    /// In the model's state-dict order (the order shards are filled in).
    pub tensors: Vec<PlannedTensor>,
    /// File names, `model.safetensors` or `model-0000i-of-0000N.safetensors`.
    pub files: Vec<String>,
}

impl Plan {
    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
    /// Bytes of tensor data (the index's `total_size`).
    pub fn total_bytes(&self) -> u64 {
        self.parameters() * 2
    }
    /// Tensor data bytes of each file.
    pub fn file_bytes(&self) -> Vec<u64> {
        let mut b = vec![0u64; self.files.len()];
        for t in &self.tensors {
            b[t.shard] += t.numel() * 2;
        }
        b
    }
    pub fn sharded(&self) -> bool {
        self.files.len() > 1
    }
}

/// The tensors of `like` with `opts` applied, sharded as transformers 4
/// shards them.
pub fn plan(like: Like, opts: &SynthOptions) -> Result<Plan> {
    let mut spec = like.spec();
    for (opt, value) in [
        ("--layers", opts.layers),
        ("--vision-layers", opts.vision_layers),
        ("--vocab", opts.vocab),
    ] {
        if value == Some(0) {
            return Err(Error::invalid(format!("{opt}: must be at least 1")));
        }
    }
    if let Some(l) = opts.layers {
        spec.text.layers = l;
    }
    if let Some(l) = opts.vision_layers {
        spec.vision.layers = l;
    }
    if let Some(v) = opts.vocab {
        spec.text.vocab = v;
    }
    let mut t = Tensors(Vec::new());
    match spec.family {
        Family::Llava | Family::LlavaOnevision => llava_tensors(&spec, &mut t),
        Family::Qwen2Vl => qwen2vl_tensors(&spec, &mut t),
        Family::InternVl => internvl_tensors(&spec, &mut t),
    }
    let mut t = t.0;

    // transformers' sharding: tensors in state-dict order, a new shard when
    // the next tensor would take the current one past the limit (and it is
    // not empty).
    let mut shard = 0;
    let mut size = 0u64;
    let mut any = false;
    for p in t.iter_mut() {
        let bytes = p.numel() * 2;
        if any && size + bytes > MAX_SHARD_BYTES {
            shard += 1;
            size = 0;
        }
        p.shard = shard;
        size += bytes;
        any = true;
    }
    let n = shard + 1;
    let files = if n == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    Ok(Plan {
        like,
        spec,
        dtype: opts.dtype,
        tensors: t,
        files,
    })
}

/// The planned tensors in state-dict order (shards not yet assigned).
struct Tensors(Vec<PlannedTensor>);

impl Tensors {
    fn add(&mut self, name: impl Into<String>, shape: Vec<usize>, init: Init) {
        self.0.push(PlannedTensor {
            name: name.into(),
            shape,
            init,
            shard: 0,
        })
    }

    /// A linear layer's weight `[out, in]` and bias `[out]`.
    fn linear(&mut self, prefix: &str, out: usize, inp: usize) {
        self.add(format!("{prefix}.weight"), vec![out, inp], LINEAR);
        self.add(format!("{prefix}.bias"), vec![out], BIAS);
    }

    /// A LayerNorm's weight and bias.
    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.add(format!("{prefix}.weight"), vec![dim], NORM);
        self.add(format!("{prefix}.bias"), vec![dim], BIAS);
    }

    /// The Llama / Qwen2 decoder under `tp` (embeddings, layers, final
    /// norm) and the LM head `head` unless tied, in their state-dict order.
    fn decoder(&mut self, x: &TextSpec, tp: &str, head: &str) {
        self.add(
            format!("{tp}.embed_tokens.weight"),
            vec![x.vocab, x.hidden],
            LINEAR,
        );
        let head_dim = x.hidden / x.heads;
        let kv = x.kv_heads * head_dim;
        for l in 0..x.layers {
            let p = format!("{tp}.layers.{l}");
            for (proj, out) in [("q_proj", x.hidden), ("k_proj", kv), ("v_proj", kv)] {
                self.add(
                    format!("{p}.self_attn.{proj}.weight"),
                    vec![out, x.hidden],
                    LINEAR,
                );
                if !x.llama {
                    self.add(format!("{p}.self_attn.{proj}.bias"), vec![out], BIAS);
                }
            }
            self.add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![x.hidden, x.hidden],
                LINEAR,
            );
            for (proj, shape) in [
                ("gate_proj", [x.intermediate, x.hidden]),
                ("up_proj", [x.intermediate, x.hidden]),
                ("down_proj", [x.hidden, x.intermediate]),
            ] {
                self.add(format!("{p}.mlp.{proj}.weight"), shape.to_vec(), LINEAR);
            }
            self.add(format!("{p}.input_layernorm.weight"), vec![x.hidden], NORM);
            self.add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![x.hidden],
                NORM,
            );
        }
        self.add(format!("{tp}.norm.weight"), vec![x.hidden], NORM);
        if !x.tied {
            self.add(format!("{head}.weight"), vec![x.vocab, x.hidden], LINEAR);
        }
    }
}

/// LLaVA-1.5 and LLaVA-OneVision: CLIP / SigLIP tower, two-layer projector,
/// `language_model.*`.
fn llava_tensors(spec: &Spec, t: &mut Tensors) {
    let (v, x) = (spec.vision, spec.text);
    // LlavaOnevisionForConditionalGeneration's own parameter comes before
    // its sub-modules in the state dict.
    if spec.family == Family::LlavaOnevision {
        let std = 1.0 / (x.hidden as f32).sqrt();
        t.add("image_newline", vec![x.hidden], Init { mean: 0.0, std });
    }
    let vp = "vision_tower.vision_model";
    if v.clip {
        t.add(
            format!("{vp}.embeddings.class_embedding"),
            vec![v.hidden],
            LINEAR,
        );
    }
    t.add(
        format!("{vp}.embeddings.patch_embedding.weight"),
        vec![v.hidden, 3, v.patch, v.patch],
        LINEAR,
    );
    if !v.clip {
        t.add(
            format!("{vp}.embeddings.patch_embedding.bias"),
            vec![v.hidden],
            BIAS,
        );
    }
    t.add(
        format!("{vp}.embeddings.position_embedding.weight"),
        vec![v.positions(), v.hidden],
        LINEAR,
    );
    if v.clip {
        // (sic: transformers' CLIP spells it so)
        t.layer_norm(&format!("{vp}.pre_layrnorm"), v.hidden);
    }
    for l in 0..v.layers {
        let p = format!("{vp}.encoder.layers.{l}");
        // CLIP/SigLIP attention registers k, v, q, out in that order.
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            t.linear(&format!("{p}.self_attn.{proj}"), v.hidden, v.hidden);
        }
        t.layer_norm(&format!("{p}.layer_norm1"), v.hidden);
        t.linear(&format!("{p}.mlp.fc1"), v.intermediate, v.hidden);
        t.linear(&format!("{p}.mlp.fc2"), v.hidden, v.intermediate);
        t.layer_norm(&format!("{p}.layer_norm2"), v.hidden);
    }
    t.layer_norm(&format!("{vp}.post_layernorm"), v.hidden);
    let mp = "multi_modal_projector";
    t.linear(&format!("{mp}.linear_1"), x.hidden, v.hidden);
    t.linear(&format!("{mp}.linear_2"), x.hidden, x.hidden);
    t.decoder(&x, "language_model.model", "language_model.lm_head");
}

/// Qwen2-VL as its hub checkpoint (transformers 4) names it: the tower and
/// merger under `visual`, the decoder under `model`, then `lm_head`.
/// `Qwen2VisionTransformerPretrainedModel` registers patch_embed (a Conv3d
/// without bias; its rotary `inv_freq` buffer is not saved), blocks
/// (norm1, norm2, attn.qkv, attn.proj, mlp.fc1, mlp.fc2; LayerNorms with
/// bias) and the merger (ln_q over the tower width, then mlp.0 and mlp.2
/// over the 2 x 2 merged width, GELU between).
fn qwen2vl_tensors(spec: &Spec, t: &mut Tensors) {
    let (v, x) = (spec.vision, spec.text);
    t.add(
        "visual.patch_embed.proj.weight",
        vec![v.hidden, 3, QWEN_TEMPORAL_PATCH, v.patch, v.patch],
        LINEAR,
    );
    for l in 0..v.layers {
        let p = format!("visual.blocks.{l}");
        t.layer_norm(&format!("{p}.norm1"), v.hidden);
        t.layer_norm(&format!("{p}.norm2"), v.hidden);
        t.linear(&format!("{p}.attn.qkv"), 3 * v.hidden, v.hidden);
        t.linear(&format!("{p}.attn.proj"), v.hidden, v.hidden);
        t.linear(&format!("{p}.mlp.fc1"), v.intermediate, v.hidden);
        t.linear(&format!("{p}.mlp.fc2"), v.hidden, v.intermediate);
    }
    let merged = v.hidden * QWEN_MERGE * QWEN_MERGE;
    t.layer_norm("visual.merger.ln_q", v.hidden);
    t.linear("visual.merger.mlp.0", merged, merged);
    t.linear("visual.merger.mlp.2", x.hidden, merged);
    t.decoder(&x, "model", "lm_head");
}

/// InternVL (-hf) as transformers 4 saves it. In each module the state
/// dict lists its own parameters before its sub-modules': the embeddings'
/// cls_token and position_embeddings before the patch Conv2d, a layer's
/// lambda_1 / lambda_2 before attention (q, k, v, projection_layer), mlp
/// (fc1, fc2), layernorm_before, layernorm_after. No final LayerNorm
/// (use_mean_pooling). The projector: LayerNorm over the 2 x 2 pixel
/// shuffled width, linear_1 to the text width, GELU, linear_2.
fn internvl_tensors(spec: &Spec, t: &mut Tensors) {
    let (v, x) = (spec.vision, spec.text);
    let side = v.image / v.patch;
    let e = "vision_tower.embeddings";
    t.add(format!("{e}.cls_token"), vec![1, 1, v.hidden], LINEAR);
    t.add(
        format!("{e}.position_embeddings"),
        vec![1, side * side + 1, v.hidden],
        LINEAR,
    );
    t.add(
        format!("{e}.patch_embeddings.projection.weight"),
        vec![v.hidden, 3, v.patch, v.patch],
        LINEAR,
    );
    t.add(
        format!("{e}.patch_embeddings.projection.bias"),
        vec![v.hidden],
        BIAS,
    );
    // The layer scales: real checkpoints hold small learned values; 0.1 is
    // InternVLVisionConfig's layer_scale_init_value.
    let scale = Init {
        mean: 0.1,
        std: 0.02,
    };
    for l in 0..v.layers {
        let p = format!("vision_tower.encoder.layer.{l}");
        t.add(format!("{p}.lambda_1"), vec![v.hidden], scale);
        t.add(format!("{p}.lambda_2"), vec![v.hidden], scale);
        for proj in ["q_proj", "k_proj", "v_proj", "projection_layer"] {
            t.linear(&format!("{p}.attention.{proj}"), v.hidden, v.hidden);
        }
        t.linear(&format!("{p}.mlp.fc1"), v.intermediate, v.hidden);
        t.linear(&format!("{p}.mlp.fc2"), v.hidden, v.intermediate);
        t.layer_norm(&format!("{p}.layernorm_before"), v.hidden);
        t.layer_norm(&format!("{p}.layernorm_after"), v.hidden);
    }
    let shuffled = v.hidden * 4;
    let mp = "multi_modal_projector";
    t.layer_norm(&format!("{mp}.layer_norm"), shuffled);
    t.linear(&format!("{mp}.linear_1"), x.hidden, shuffled);
    t.linear(&format!("{mp}.linear_2"), x.hidden, x.hidden);
    t.decoder(&x, "language_model.model", "language_model.lm_head");
}
