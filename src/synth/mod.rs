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

pub use files::{llama_special, qwen_added, write_side_files};
pub use write::{write, SynthProgress, SynthReport};

use crate::error::{Error, Result};

/// The models `mbq synth --like` knows.
pub const LIKE_NAMES: [&str; 3] = ["llava-ov-0.5b", "llava-ov-7b", "llava-1.5-7b"];

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
}

impl Like {
    /// A short name of [`LIKE_NAMES`] or the hub id.
    pub fn parse(name: &str) -> Result<Like> {
        [Like::LlavaOv05b, Like::LlavaOv7b, Like::Llava15_7b]
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
        }
    }

    /// The hub repository it copies.
    pub fn hub_id(self) -> &'static str {
        match self {
            Like::LlavaOv05b => "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            Like::LlavaOv7b => "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            Like::Llava15_7b => "llava-hf/llava-1.5-7b-hf",
        }
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
                onevision: true,
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
                onevision: true,
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
                onevision: false,
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
        }
    }
}

/// A model's sizes, as far as the weights are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// LLaVA-OneVision (SigLIP + Qwen2, `image_newline`) or LLaVA-1.5.
    pub onevision: bool,
    pub vision: VisionSpec,
    pub text: TextSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisionSpec {
    /// CLIP (class embedding, pre-layernorm, no patch bias) or SigLIP.
    pub clip: bool,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub patch: usize,
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
    let mut t = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init| {
        t.push(PlannedTensor {
            name,
            shape,
            init,
            shard: 0,
        })
    };
    let (v, x) = (spec.vision, spec.text);
    // LlavaOnevisionForConditionalGeneration's own parameter comes before
    // its sub-modules in the state dict.
    if spec.onevision {
        let std = 1.0 / (x.hidden as f32).sqrt();
        add(
            "image_newline".into(),
            vec![x.hidden],
            Init { mean: 0.0, std },
        );
    }
    let vp = "vision_tower.vision_model";
    if v.clip {
        add(
            format!("{vp}.embeddings.class_embedding"),
            vec![v.hidden],
            LINEAR,
        );
    }
    add(
        format!("{vp}.embeddings.patch_embedding.weight"),
        vec![v.hidden, 3, v.patch, v.patch],
        LINEAR,
    );
    if !v.clip {
        add(
            format!("{vp}.embeddings.patch_embedding.bias"),
            vec![v.hidden],
            BIAS,
        );
    }
    add(
        format!("{vp}.embeddings.position_embedding.weight"),
        vec![v.positions(), v.hidden],
        LINEAR,
    );
    if v.clip {
        // (sic: transformers' CLIP spells it so)
        add(format!("{vp}.pre_layrnorm.weight"), vec![v.hidden], NORM);
        add(format!("{vp}.pre_layrnorm.bias"), vec![v.hidden], BIAS);
    }
    for l in 0..v.layers {
        let p = format!("{vp}.encoder.layers.{l}");
        // CLIP/SigLIP attention registers k, v, q, out in that order.
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            add(
                format!("{p}.self_attn.{proj}.weight"),
                vec![v.hidden, v.hidden],
                LINEAR,
            );
            add(format!("{p}.self_attn.{proj}.bias"), vec![v.hidden], BIAS);
        }
        add(format!("{p}.layer_norm1.weight"), vec![v.hidden], NORM);
        add(format!("{p}.layer_norm1.bias"), vec![v.hidden], BIAS);
        add(
            format!("{p}.mlp.fc1.weight"),
            vec![v.intermediate, v.hidden],
            LINEAR,
        );
        add(format!("{p}.mlp.fc1.bias"), vec![v.intermediate], BIAS);
        add(
            format!("{p}.mlp.fc2.weight"),
            vec![v.hidden, v.intermediate],
            LINEAR,
        );
        add(format!("{p}.mlp.fc2.bias"), vec![v.hidden], BIAS);
        add(format!("{p}.layer_norm2.weight"), vec![v.hidden], NORM);
        add(format!("{p}.layer_norm2.bias"), vec![v.hidden], BIAS);
    }
    add(format!("{vp}.post_layernorm.weight"), vec![v.hidden], NORM);
    add(format!("{vp}.post_layernorm.bias"), vec![v.hidden], BIAS);
    let mp = "multi_modal_projector";
    add(
        format!("{mp}.linear_1.weight"),
        vec![x.hidden, v.hidden],
        LINEAR,
    );
    add(format!("{mp}.linear_1.bias"), vec![x.hidden], BIAS);
    add(
        format!("{mp}.linear_2.weight"),
        vec![x.hidden, x.hidden],
        LINEAR,
    );
    add(format!("{mp}.linear_2.bias"), vec![x.hidden], BIAS);
    let tp = "language_model.model";
    add(
        format!("{tp}.embed_tokens.weight"),
        vec![x.vocab, x.hidden],
        LINEAR,
    );
    let head_dim = x.hidden / x.heads;
    let kv = x.kv_heads * head_dim;
    for l in 0..x.layers {
        let p = format!("{tp}.layers.{l}");
        for (proj, out) in [("q_proj", x.hidden), ("k_proj", kv), ("v_proj", kv)] {
            add(
                format!("{p}.self_attn.{proj}.weight"),
                vec![out, x.hidden],
                LINEAR,
            );
            if !x.llama {
                add(format!("{p}.self_attn.{proj}.bias"), vec![out], BIAS);
            }
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![x.hidden, x.hidden],
            LINEAR,
        );
        for (proj, shape) in [
            ("gate_proj", [x.intermediate, x.hidden]),
            ("up_proj", [x.intermediate, x.hidden]),
            ("down_proj", [x.hidden, x.intermediate]),
        ] {
            add(format!("{p}.mlp.{proj}.weight"), shape.to_vec(), LINEAR);
        }
        add(format!("{p}.input_layernorm.weight"), vec![x.hidden], NORM);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![x.hidden],
            NORM,
        );
    }
    add(format!("{tp}.norm.weight"), vec![x.hidden], NORM);
    if !x.tied {
        add(
            "language_model.lm_head.weight".into(),
            vec![x.vocab, x.hidden],
            LINEAR,
        );
    }

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
