//! Random-weight checkpoints with the exact layout of real hub models, to
//! measure memory and time at real size without the real weights
//! (`mbq synth`).
//!
//! [`plan`] lists every tensor a transformers-4 `save_pretrained` of the
//! hub checkpoint holds (name, shape, dtype) in the model's state-dict order
//! and assigns them to shards as transformers does (5 GB shards filled in
//! that order); [`write`] writes that plan as a Hugging Face model
//! directory: the safetensors files (each header first, computed from the
//! shapes, then the data generated chunk by chunk, so memory stays bounded
//! whatever the model's size), the index when sharded, and the configs and
//! tokenizer of [`files`]. The values are deterministic in the seed:
//! uniform with a per-kind mean and standard deviation (linears and
//! embeddings std 0.02, norm weights 1 +- 0.02, biases std 0.01), which
//! keeps an f16 forward pass finite and far from degenerate.
//!
//! The output is built in a temporary sibling directory (`.OUT.tmp-<pid>`)
//! and renamed to OUT at the end: OUT either does not exist or is complete.

mod files;

pub use files::{llama_special, qwen_added, write_side_files};

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

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

    /// The real checkpoint's sizes (see [`files`] for where they come from
    /// and which could not be confirmed).
    pub fn spec(self) -> Spec {
        // SigLIP so400m-patch14-384 without its last layer and head, as
        // transformers' convert_llava_onevision_weights_to_hf.py builds it.
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

/// What [`write`] reports while it works.
#[derive(Debug)]
pub enum SynthProgress<'a> {
    /// Before the first byte: the tensor data to write, over all files.
    Start { total_bytes: u64, files: usize },
    /// Tensor data written so far.
    Bytes { done: u64, total: u64 },
    /// Something to tell the user (a stale temporary directory removed).
    Note(&'a str),
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub parameters: u64,
    /// Bytes of all files written.
    pub bytes: u64,
    pub files: Vec<String>,
    pub seconds: f64,
}

/// Elements per independently seeded chunk: the values do not depend on
/// how the work is split across threads.
const CHUNK: usize = 1 << 18;
/// Elements generated per write (a multiple of [`CHUNK`]); 64 MiB of f16.
const BATCH: usize = 128 * CHUNK;

/// Writes the synthetic checkpoint of `plan` to `out` (which must not
/// exist); `seed` picks the values.
pub fn write(
    plan: &Plan,
    out: &Path,
    seed: u64,
    mut progress: impl FnMut(SynthProgress<'_>),
) -> Result<SynthReport> {
    let t0 = Instant::now();
    if fs::symlink_metadata(out).is_ok() {
        return Err(Error::invalid(format!(
            "--out {}: already exists; mbq synth never overwrites, choose another directory",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("--out {}: not a directory name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Missing {
            path: parent,
            what: "the parent directory of --out".into(),
        });
    }
    for note in crate::quant::writer::remove_stale_temp_dirs(&parent, &name) {
        progress(SynthProgress::Note(&note));
    }
    let tmp_path = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if fs::symlink_metadata(&tmp_path).is_ok() {
        return Err(Error::invalid(format!(
            "{}: a temporary directory of that name already exists (left by an interrupted run?); remove it",
            tmp_path.display()
        )));
    }
    fs::create_dir(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    let mut tmp = TempDir {
        path: tmp_path,
        armed: true,
    };

    let total = plan.total_bytes();
    progress(SynthProgress::Start {
        total_bytes: total,
        files: plan.files.len(),
    });
    let mut done = 0u64;
    let mut bytes = 0u64;
    for (shard, file) in plan.files.iter().enumerate() {
        bytes += write_shard(plan, shard, &tmp.path.join(file), seed, |n| {
            done += n;
            progress(SynthProgress::Bytes { done, total });
        })?;
    }
    if plan.sharded() {
        bytes += files::write_index(plan, &tmp.path)?;
    }
    bytes += files::write_side_files(plan, &tmp.path)?;
    sync_dir(&tmp.path)?;
    publish(&tmp.path, out)?;
    tmp.armed = false;
    Ok(SynthReport {
        output: out.to_path_buf(),
        tensors: plan.tensors.len(),
        parameters: plan.parameters(),
        bytes,
        files: plan.files.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The safetensors header of one file: its tensors sorted by name (as the
/// Python writer orders tensors of one dtype), offsets in that order,
/// padded with spaces to a multiple of 8. Returns the header and the
/// file's tensors in data order.
fn shard_header(plan: &Plan, shard: usize) -> (String, Vec<&PlannedTensor>) {
    let mut ts: Vec<&PlannedTensor> = plan.tensors.iter().filter(|t| t.shard == shard).collect();
    ts.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for t in &ts {
        let end = off + t.numel() * 2;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        // Tensor names are plain ASCII identifiers: no JSON escaping needed.
        let _ = write!(
            h,
            ",\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{off},{end}]}}",
            t.name,
            plan.dtype.st_name(),
            shape.join(",")
        );
        off = end;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    (h, ts)
}

fn write_shard(
    plan: &Plan,
    shard: usize,
    path: &Path,
    seed: u64,
    mut wrote: impl FnMut(u64),
) -> Result<u64> {
    let (header, ts) = shard_header(plan, shard);
    let io = |e| Error::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut written = 8 + header.len() as u64;
    let max = ts.iter().map(|t| t.numel()).max().unwrap_or(0);
    let mut buf = vec![0u16; (max.min(BATCH as u64)) as usize];
    for t in ts {
        let id = tensor_id(&t.name);
        let numel = t.numel() as usize;
        let mut start = 0usize;
        while start < numel {
            let n = (numel - start).min(BATCH);
            let out = &mut buf[..n];
            fill(out, start, t.init, plan.dtype, seed, id);
            w.write_all(bytemuck::cast_slice(out)).map_err(io)?;
            start += n;
            written += 2 * n as u64;
            wrote(2 * n as u64);
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// A tensor's stream id: a hash of its name, so a tensor's values do not
/// change with `--layers` or with the shard it lands in.
fn tensor_id(name: &str) -> u64 {
    // FNV-1a.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64: the generator and the seed mixer.
#[inline]
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with the 16-bit values of elements `start..start + out.len()`
/// of a tensor (`start` a multiple of [`CHUNK`]).
fn fill(out: &mut [u16], start: usize, init: Init, dtype: SynthDtype, seed: u64, id: u64) {
    // Uniform on (-1/2, 1/2) has std 1/sqrt(12).
    let scale = init.std * 12f32.sqrt() / 65536.0;
    let offset = init.mean - init.std * 12f32.sqrt() * 0.5 + scale * 0.5;
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; CHUNK],
        |vals, (c, chunk)| {
            let index = (start / CHUNK + c) as u64;
            let mut s = seed ^ id.rotate_left(17);
            let mut state = splitmix(&mut s) ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03);
            let vals = &mut vals[..chunk.len()];
            for four in vals.chunks_mut(4) {
                let r = splitmix(&mut state);
                for (k, v) in four.iter_mut().enumerate() {
                    let u = ((r >> (16 * k)) & 0xffff) as f32;
                    *v = offset + u * scale;
                }
            }
            match dtype {
                SynthDtype::F16 => {
                    let h: &mut [f16] = bytemuck::cast_slice_mut(chunk);
                    h.convert_from_f32_slice(vals);
                }
                SynthDtype::Bf16 => {
                    let h: &mut [bf16] = bytemuck::cast_slice_mut(chunk);
                    h.convert_from_f32_slice(vals);
                }
            }
        },
    );
}

/// Removes the temporary directory unless the output was renamed into place.
struct TempDir {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    let _ = dir;
    Ok(())
}

/// Renames the finished temporary directory to `out` without replacing
/// anything: on Unix `out` is first created empty (which fails if anything
/// is there) and the rename then replaces that empty directory.
fn publish(tmp: &Path, out: &Path) -> Result<()> {
    let exists = || {
        Error::invalid(format!(
            "--out {}: already exists; mbq synth never overwrites, choose another directory",
            out.display()
        ))
    };
    #[cfg(unix)]
    {
        fs::create_dir(out).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists(),
            _ => Error::io(out, e),
        })?;
        fs::rename(tmp, out).map_err(|e| {
            let _ = fs::remove_dir(out);
            Error::io(out, e)
        })
    }
    #[cfg(not(unix))]
    {
        if fs::symlink_metadata(out).is_ok() {
            return Err(exists());
        }
        fs::rename(tmp, out).map_err(|e| Error::io(out, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, start: usize, seed: u64) -> Vec<u16> {
        let mut v = vec![0u16; len];
        fill(&mut v, start, LINEAR, SynthDtype::F16, seed, tensor_id("t"));
        v
    }

    #[test]
    fn values_do_not_depend_on_how_the_writes_are_split() {
        let whole = values(3 * CHUNK + 5, 0, 1);
        let mut parts = values(2 * CHUNK, 0, 1);
        parts.extend(values(CHUNK + 5, 2 * CHUNK, 1));
        assert_eq!(whole, parts);
        assert_ne!(whole, values(3 * CHUNK + 5, 0, 2));
        let f: Vec<f32> = whole.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        let n = f.len() as f32;
        let mean = f.iter().sum::<f32>() / n;
        let std = (f.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "{mean} {std}"
        );
        assert!(f.iter().all(|x| x.abs() <= 0.02 * 3f32.sqrt() + 1e-4));
    }

    #[test]
    fn header_is_aligned_and_in_name_order() {
        let p = plan(
            Like::LlavaOv05b,
            &SynthOptions {
                layers: Some(1),
                vision_layers: Some(1),
                vocab: Some(64),
                ..SynthOptions::default()
            },
        )
        .unwrap();
        let (h, ts) = shard_header(&p, 0);
        assert_eq!(h.len() % 8, 0);
        assert!(ts.windows(2).all(|w| w[0].name < w[1].name));
        let v: serde_json::Value = serde_json::from_str(&h).unwrap();
        assert_eq!(v.as_object().unwrap().len(), p.tensors.len() + 1);
    }
}
