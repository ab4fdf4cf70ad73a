//! Benchmarks, generic over [`Backend`]: the fused packed GEMV against a
//! dense f16 GEMV at given shapes, and end-to-end decode of a synthetic
//! decoder of a real model's shape (FP16 vs W3 vs W4).
//!
//! GEMV timing: `iters` back-to-back launches closed by one small read-back
//! (which waits for the device), repeated `reps` times after warm-up; the
//! median per launch is reported. Where the backend can time on the device
//! ([`Backend::begin_timing`]: wgpu with `TIMESTAMP_QUERY`) the reported time
//! is GPU timestamps from the start of the first launch to the end of the
//! last ("gpu timestamps"); otherwise wall clock. The wall-clock time is
//! always kept (`wall_us`). Weights are rotated over enough copies that the
//! set is larger than a last-level cache (`min_bytes`).
//!
//! Decode timing: tokens/s is end to end (wall clock per step, logits read
//! back); with GPU timestamps the device span of each step (its first to
//! last kernel, idle gaps between batches included) is reported beside it.

use std::time::Instant;

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::backend::Backend;
use crate::config::{Act, RopeScaling, TextConfig, TextKind};
use crate::error::{Error, Result};
use crate::model::decoder::{Attention, DecoderLayer, DecoderSpec, Mlp};
use crate::model::text::TextModel;
use crate::model::Linear;
use crate::quant::format::PackedLinear;
use crate::quant::pseudo::quantize_linear;
use crate::synth::splitmix;
use crate::tensor::Tensor;
use crate::weights::StoredWeight;

mod machine;
pub mod serve;
mod table;

pub use machine::*;
pub use table::*;

/// The paper's LLaVA-OneVision-7B GEMV shapes, (in, out).
pub const PAPER_SHAPES: &[(usize, usize)] =
    &[(3584, 3584), (3584, 10752), (3584, 18944), (18944, 3584)];

/// Weight formats compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WeightKind {
    F16,
    W3,
    W4,
}

impl WeightKind {
    pub fn label(self) -> &'static str {
        match self {
            WeightKind::F16 => "dense",
            WeightKind::W3 => "w3g128",
            WeightKind::W4 => "w4g128",
        }
    }
    /// The kinds a `--weights` list names: `f16` (or `dense`), `w3`, `w4`
    /// (or their labels `w3g128`, `w4g128`), comma-separated, in the order
    /// given.
    pub fn parse_list(s: &str) -> Result<Vec<WeightKind>> {
        s.split(',')
            .map(|k| match k.trim() {
                "f16" | "dense" => Ok(WeightKind::F16),
                "w3" | "w3g128" => Ok(WeightKind::W3),
                "w4" | "w4g128" => Ok(WeightKind::W4),
                other => Err(Error::invalid(format!(
                    "--weights: unknown weight kind \"{other}\" in \"{s}\"; expected f16, w3 or w4, comma-separated"
                ))),
            })
            .collect()
    }
    /// Bytes of weight data per element (codes + f16 scale/zero per 128).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            WeightKind::F16 => 2.0,
            WeightKind::W3 => 3.25 / 8.0,
            WeightKind::W4 => 4.25 / 8.0,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GemvResult {
    pub inp: usize,
    pub out: usize,
    pub kind: WeightKind,
    /// What ran: `f16` or `f32` (dense, as the backend stores it: the CPU
    /// keeps f32), `w3g128`, `w4g128`.
    pub weights: &'static str,
    /// "gpu timestamps" or "wall clock": what `median_us` is.
    pub timing: &'static str,
    /// Median time per launch (device time with GPU timestamps).
    pub median_us: f64,
    /// Fastest and slowest repetition, per launch (same timing).
    pub min_us: f64,
    pub max_us: f64,
    /// Bytes of one weight copy, and of all the copies the launches
    /// rotated over (what a cache would have to hold).
    pub weight_bytes: f64,
    pub rotated_bytes: f64,
    /// Median wall-clock time per launch.
    pub wall_us: f64,
    pub gb_s: f64,
    /// The f16 time over this kind's, the median over the repetitions
    /// (each times every kind in turn).
    pub speedup_vs_f16: f64,
}

/// `n` values uniform in [-0.05, 0.05), in f16 as a checkpoint stores
/// them. Drawn in parallel, in chunks of 64 Ki values, each from its own
/// SplitMix64 stream keyed by `(seed, chunk)` (as `mbq synth` draws): the
/// same seed gives the same matrix on any number of threads. (One
/// `StdRng` stream of f32 took about a minute for a 7B model's embedding
/// and head on one core.)
fn random_f16_matrix(seed: u64, n: usize) -> Vec<f16> {
    use half::slice::HalfFloatSliceExt;
    const CHUNK: usize = 1 << 16;
    let mut v = vec![f16::ZERO; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; CHUNK],
        |buf, (i, c)| {
            let mut s = seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut state = splitmix(&mut s);
            let buf = &mut buf[..c.len()];
            for x in buf.iter_mut() {
                let u = (splitmix(&mut state) >> 40) as f32 / (1u32 << 24) as f32;
                *x = (u - 0.5) * 0.1;
            }
            c.convert_from_f32_slice(buf);
        },
    );
    v
}

/// A tensor's seed: `tensor` mixed into the model's `seed`.
fn tensor_seed(seed: u64, tensor: u64) -> u64 {
    let mut s = seed ^ tensor.rotate_left(17);
    splitmix(&mut s)
}

/// A weight made on the host once, to upload as many copies as wanted.
enum HostWeight {
    /// Stored as f16, as a checkpoint's (the CPU keeps it f16).
    Dense(StoredWeight),
    Packed(PackedLinear),
}

impl HostWeight {
    /// `w` (`[out, in]`, f16) as `kind`: kept as f16, or quantized (RTN,
    /// group 128).
    fn new(kind: WeightKind, w: Vec<f16>, out: usize, inp: usize) -> Result<Self> {
        let bits = match kind {
            WeightKind::F16 => return Ok(HostWeight::Dense(StoredWeight::f16(vec![out, inp], w)?)),
            WeightKind::W3 => 3,
            WeightKind::W4 => 4,
        };
        let w: Vec<f32> = w.par_iter().map(|x| x.to_f32()).collect();
        Ok(HostWeight::Packed(quantize_linear(
            "bench", &w, out, inp, bits, 128,
        )?))
    }

    fn upload<B: Backend>(&self, be: &B) -> Result<B::Weight> {
        match self {
            HostWeight::Dense(w) => be.stored_weight(w),
            HostWeight::Packed(p) => be.packed_weight(p),
        }
    }
}

/// What a benchmark's times are.
pub const GPU_TIMESTAMPS: &str = "gpu timestamps";
/// What a benchmark's times are without device timing.
pub const WALL_CLOCK: &str = "wall clock";

fn median(v: Vec<f64>) -> f64 {
    min_median_max(v).1
}

/// (min, median, max) of non-empty samples.
pub fn min_median_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// The label of a dense weight stored at `bytes` per element.
pub fn dense_label(bytes: f64) -> &'static str {
    if bytes >= 4.0 {
        "f32"
    } else {
        "f16"
    }
}

impl WeightKind {
    /// What ran on `be`: the dense kind is labelled by how the backend
    /// stores it ([`Backend::dense_weight_bytes`]).
    pub fn label_on<B: Backend>(self, be: &B) -> &'static str {
        match self {
            WeightKind::F16 => dense_label(be.dense_weight_bytes()),
            k => k.label(),
        }
    }
}

/// Times `x [1, in] . W^T` for each weight kind at one shape. The kinds
/// run in turn within each repetition (f16, W3, W4, then again), so that
/// a repetition's ratios compare times taken moments apart: on a shared
/// or throttling machine a slow spell then slows every kind of a
/// repetition, not one kind's whole series. `speedup_vs_f16` is the
/// median over the repetitions of the f16 time over the kind's.
pub fn bench_gemv<B: Backend>(
    be: &B,
    inp: usize,
    out: usize,
    iters: usize,
    reps: usize,
    min_bytes: usize,
) -> Result<Vec<GemvResult>> {
    if iters == 0 || reps == 0 {
        return Err(Error::invalid("bench: --iters and --reps must be > 0"));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let base = random_f16_matrix(1, out * inp);
    let x = be.upload(&Tensor::new(
        vec![1, inp],
        (0..inp).map(|_| rng.random::<f32>() - 0.5).collect(),
    )?)?;
    const KINDS: [WeightKind; 3] = [WeightKind::F16, WeightKind::W3, WeightKind::W4];
    // Each kind's copies (enough to rotate past `min_bytes` of cache).
    let mut sets: Vec<(f64, Vec<B::Weight>)> = Vec::with_capacity(KINDS.len());
    for kind in KINDS {
        let per = match kind {
            WeightKind::F16 => be.dense_weight_bytes(),
            _ => kind.bytes_per_weight(),
        };
        let bytes = (out * inp) as f64 * per;
        let copies = ((min_bytes as f64 / bytes).ceil() as usize).clamp(1, 8);
        let host = HostWeight::new(kind, base.clone(), out, inp)?;
        let weights: Vec<B::Weight> = (0..copies)
            .map(|_| host.upload(be))
            .collect::<Result<_>>()?;
        // Warm-up (compiles pipelines, faults pages in).
        for w in &weights {
            be.download(&be.linear(&x, w, None)?)?;
        }
        sets.push((bytes, weights));
    }
    // Per kind: wall-clock and device time per launch, a sample a rep.
    let mut times = vec![Vec::with_capacity(reps); KINDS.len()];
    let mut device = vec![Vec::with_capacity(reps); KINDS.len()];
    for _ in 0..reps {
        for (k, (_, weights)) in sets.iter().enumerate() {
            let timed = be.begin_timing()?;
            let t = Instant::now();
            let mut y = None;
            for i in 0..iters {
                y = Some(be.linear(&x, &weights[i % weights.len()], None)?);
            }
            if let Some(y) = y {
                be.download(&y)?;
            }
            times[k].push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
            if timed {
                if let Some(s) = be.end_timing()? {
                    device[k].push(s * 1e6 / iters as f64);
                }
            }
        }
    }
    // Device time where every kind has a sample from every rep.
    let on_device = device.iter().all(|d| d.len() == reps);
    let samples = if on_device { &device } else { &times };
    let mut results = Vec::new();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let (bytes, weights) = &sets[k];
        let ratios: Vec<f64> = (0..reps).map(|i| samples[0][i] / samples[k][i]).collect();
        let (min_us, us, max_us) = min_median_max(samples[k].clone());
        results.push(GemvResult {
            inp,
            out,
            kind,
            weights: kind.label_on(be),
            timing: if on_device {
                GPU_TIMESTAMPS
            } else {
                WALL_CLOCK
            },
            median_us: us,
            min_us,
            max_us,
            weight_bytes: *bytes,
            rotated_bytes: bytes * weights.len() as f64,
            wall_us: median(times[k].clone()),
            gb_s: bytes / (us * 1e-6) / 1e9,
            speedup_vs_f16: median(ratios),
        });
    }
    Ok(results)
}

/// A real model's decoder shape for synthetic benchmarks.
pub fn synthetic_config(name: &str) -> Result<TextConfig> {
    let (kind, hidden, inter, layers, heads, kv, vocab, theta) = match name {
        // Qwen2-7B, the language model of LLaVA-OneVision-7B.
        "llava-ov-7b" => (TextKind::Qwen2, 3584, 18944, 28, 28, 4, 152064, 1_000_000.0),
        // Vicuna-7B (Llama), the language model of LLaVA-1.5-7B.
        "llava-1.5-7b" => (TextKind::Llama, 4096, 11008, 32, 32, 32, 32064, 10_000.0),
        // Qwen2-VL-7B-Instruct's language model (M-RoPE, below).
        "qwen2-vl-7b" => (TextKind::Qwen2, 3584, 18944, 28, 28, 4, 152064, 1_000_000.0),
        // InternVL3-8B-hf: Qwen2.5-7B.
        "internvl3-8b" => (TextKind::Qwen2, 3584, 18944, 28, 28, 4, 151674, 1_000_000.0),
        other => {
            return Err(Error::invalid(format!(
                "--synthetic: unknown model \"{other}\"; known: {}",
                SYNTHETIC_MODELS.join(", ")
            )))
        }
    };
    Ok(TextConfig {
        kind,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-6,
        rope_theta: theta,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 4096,
        qkv_bias: kind == TextKind::Qwen2,
        o_bias: false,
        mlp_bias: false,
        hidden_act: Act::Silu,
        tie_word_embeddings: false,
        mrope_section: (name == "qwen2-vl-7b").then(|| vec![16, 24, 24]),
    })
}

/// The names [`synthetic_config`] knows.
pub const SYNTHETIC_MODELS: [&str; 4] =
    ["llava-ov-7b", "llava-1.5-7b", "qwen2-vl-7b", "internvl3-8b"];

/// A decoder with random weights of `cfg`'s shape, its linears in `kind`.
/// Embeddings and lm_head stay dense (as in a quantized model). The seven
/// linears of a layer are drawn (and quantized) once on the host and
/// uploaded for every layer: each layer has its own copy on the device
/// (the CPU backend copies too), so a step still reads every layer's
/// bytes, and a 28-layer 7B builds in seconds instead of minutes.
pub fn synthetic_text_model<B: Backend>(
    be: &B,
    cfg: &TextConfig,
    kind: WeightKind,
    seed: u64,
) -> Result<TextModel<B>> {
    let h = cfg.hidden_size;
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kvd = cfg.num_key_value_heads * cfg.head_dim;
    let im = cfg.intermediate_size;
    // (out, in, bias) of q, k, v, o, gate, up, down.
    let shapes = [
        (qd, h, cfg.qkv_bias),
        (kvd, h, cfg.qkv_bias),
        (kvd, h, cfg.qkv_bias),
        (h, qd, false),
        (im, h, false),
        (im, h, false),
        (h, im, false),
    ];
    let host = shapes
        .iter()
        .zip(1u64..)
        .map(|(&(out, inp, _), t)| {
            let w = random_f16_matrix(tensor_seed(seed, t), out * inp);
            HostWeight::new(kind, w, out, inp)
        })
        .collect::<Result<Vec<_>>>()?;
    let lin = |i: usize| -> Result<Linear<B>> {
        let (out, _, bias) = shapes[i];
        let b = if bias {
            Some(be.upload(&Tensor::new(vec![out], vec![0.01; out])?)?)
        } else {
            None
        };
        Ok(Linear {
            w: host[i].upload(be)?,
            b,
            act_quant: false,
        })
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        layers.push(DecoderLayer {
            input_layernorm: be.upload(&Tensor::new(vec![h], vec![1.0; h])?)?,
            attn: Attention {
                q: lin(0)?,
                k: lin(1)?,
                v: lin(2)?,
                o: lin(3)?,
            },
            post_attention_layernorm: be.upload(&Tensor::new(vec![h], vec![1.0; h])?)?,
            mlp: Mlp {
                gate: lin(4)?,
                up: lin(5)?,
                down: lin(6)?,
            },
        });
    }
    drop(host);
    let dense = |t: u64| {
        let w = random_f16_matrix(tensor_seed(seed, t), cfg.vocab_size * h);
        HostWeight::new(WeightKind::F16, w, cfg.vocab_size, h)?.upload(be)
    };
    Ok(TextModel {
        cfg: cfg.clone(),
        spec: DecoderSpec::new(cfg),
        embed_tokens: dense(0x5eed)?,
        layers,
        norm: be.upload(&Tensor::new(vec![h], vec![1.0; h])?)?,
        lm_head: Some(dense(0x5eed5eed)?),
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeResult {
    pub kind: WeightKind,
    /// What ran: `f16`/`f32` (dense as the backend stores it), `w3g128`, `w4g128`.
    pub weights: &'static str,
    pub layers: usize,
    pub tokens: usize,
    /// "gpu timestamps" when `device_ms_per_token` was measured, else
    /// "wall clock".
    pub timing: &'static str,
    /// Mean end-to-end (wall-clock) time per token: what tok/s and the
    /// speedups are computed from.
    pub ms_per_token: f64,
    /// Fastest, median and slowest step (wall clock).
    pub min_ms_per_token: f64,
    pub median_ms_per_token: f64,
    pub max_ms_per_token: f64,
    /// Mean device span per token (first to last kernel of a step), with
    /// GPU timestamps.
    pub device_ms_per_token: Option<f64>,
    pub tok_s: f64,
    pub speedup_vs_f16: f64,
    /// Weight bytes read per token (decoder linears in this format, the
    /// f16 lm_head), what the achieved bandwidth is computed from.
    pub weight_bytes_per_token: f64,
}

/// Bytes of weights a decode step reads: every decoder linear in `kind`
/// (dense at `dense_bytes` per weight) plus the dense lm_head.
pub fn decode_weight_bytes(cfg: &TextConfig, kind: WeightKind, dense_bytes: f64) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
    let im = cfg.intermediate_size as f64;
    let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * im;
    let per = match kind {
        WeightKind::F16 => dense_bytes,
        k => k.bytes_per_weight(),
    };
    cfg.num_hidden_layers as f64 * per_layer * per + cfg.vocab_size as f64 * h * dense_bytes
}

/// A device-to-device copy: the memory bandwidth ceiling the GEMV and
/// decode numbers are set against.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CopyResult {
    /// Bytes copied per launch (each is read once and written once).
    pub bytes: usize,
    pub timing: &'static str,
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    /// (read + write) bytes per second, at the median.
    pub gb_s: f64,
}

/// Times a `bytes`-long device-to-device copy (`set_rows` of a whole
/// tensor into another), `iters` per rep, median of `reps`, wall clock.
pub fn bench_copy<B: Backend>(
    be: &B,
    bytes: usize,
    iters: usize,
    reps: usize,
) -> Result<CopyResult> {
    if iters == 0 || reps == 0 {
        return Err(Error::invalid("bench: --iters and --reps must be > 0"));
    }
    const COLS: usize = 1024;
    let rows = (bytes / 4 / COLS).max(1);
    let src = be.upload(&Tensor::new(vec![rows, COLS], vec![1.0; rows * COLS])?)?;
    let mut dst = be.upload(&Tensor::zeros(vec![rows, COLS]))?;
    be.set_rows(&mut dst, 0, &src)?;
    be.download(&be.rows(&dst, 0, 1)?)?;
    // Wall clock (copies are not inside the timestamped compute passes);
    // the one-row read-back that waits for the device is in the span.
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..iters {
            be.set_rows(&mut dst, 0, &src)?;
        }
        be.download(&be.rows(&dst, 0, 1)?)?;
        times.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    let (min_us, us, max_us) = min_median_max(times);
    let timing = WALL_CLOCK;
    let bytes = rows * COLS * 4;
    Ok(CopyResult {
        bytes,
        timing,
        median_us: us,
        min_us,
        max_us,
        gb_s: 2.0 * bytes as f64 / (us * 1e-6) / 1e9,
    })
}

/// Decode `tokens` steps (after a `prompt`-token prefill) and time them.
pub fn bench_decode<B: Backend>(
    be: &B,
    model: &TextModel<B>,
    kind: WeightKind,
    prompt: usize,
    tokens: usize,
) -> Result<DecodeResult> {
    let cap = prompt + tokens + 1;
    let mut cache = be.new_cache(model.layers.len(), model.kv_dim(), cap)?;
    let ids: Vec<u32> = (0..prompt as u32)
        .map(|i| (i * 7919) % model.cfg.vocab_size as u32)
        .collect();
    let x = model.embed(be, &ids)?;
    let mut logits = be.download(&model.forward(be, x, &mut cache, 0)?)?;
    // One untimed step (pipeline compilation for the decode shapes).
    let mut pos = prompt;
    let step = |logits: &Tensor, pos: usize, cache: &mut B::Cache| -> Result<Tensor> {
        let next = crate::generate::argmax(&logits.data);
        let x = model.embed(be, &[next])?;
        be.download(&model.forward(be, x, cache, pos)?)
    };
    logits = step(&logits, pos, &mut cache)?;
    pos += 1;
    // Per step: wall clock around the step, device span from its first
    // kernel to its last (read back after the wall clock stops).
    let (mut wall, mut device, mut timed_steps) = (0.0, 0.0, 0);
    let mut steps = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        let timed = be.begin_timing()?;
        let t = Instant::now();
        logits = step(&logits, pos, &mut cache)?;
        let dt = t.elapsed().as_secs_f64();
        wall += dt;
        steps.push(dt * 1e3);
        if timed {
            if let Some(s) = be.end_timing()? {
                device += s;
                timed_steps += 1;
            }
        }
        pos += 1;
    }
    let n = tokens.max(1) as f64;
    let wall_ms = wall * 1e3 / n;
    let (timing, device_ms) = if tokens > 0 && timed_steps == tokens {
        (GPU_TIMESTAMPS, Some(device * 1e3 / n))
    } else {
        (WALL_CLOCK, None)
    };
    let (min_ms, median_ms, max_ms) = if steps.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        min_median_max(steps)
    };
    Ok(DecodeResult {
        kind,
        weights: kind.label_on(be),
        layers: model.layers.len(),
        tokens,
        timing,
        ms_per_token: wall_ms,
        min_ms_per_token: min_ms,
        median_ms_per_token: median_ms,
        max_ms_per_token: max_ms,
        device_ms_per_token: device_ms,
        tok_s: 1e3 / wall_ms,
        speedup_vs_f16: 0.0,
        weight_bytes_per_token: decode_weight_bytes(&model.cfg, kind, be.dense_weight_bytes()),
    })
}

/// Parses "3584x3584,3584x10752" (in x out) shapes: both sides positive,
/// IN a multiple of 128 (the group size of the packed kinds benched).
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|p| {
            let bad = |why: &str| {
                Error::invalid(format!(
                    "--shapes: \"{}\" {why}; expected IN x OUT pairs like 3584x3584,3584x10752",
                    p.trim()
                ))
            };
            let (a, b) = p
                .trim()
                .split_once('x')
                .ok_or_else(|| bad("is not IN x OUT"))?;
            let (inp, out): (usize, usize) = match (a.parse(), b.parse()) {
                (Ok(i), Ok(o)) => (i, o),
                _ => return Err(bad("is not two whole numbers")),
            };
            if inp == 0 || out == 0 {
                return Err(bad("has a zero dimension"));
            }
            if inp % 128 != 0 {
                return Err(bad(
                    "has IN not a multiple of 128 (the group size of the W3/W4 weights)",
                ));
            }
            Ok((inp, out))
        })
        .collect()
}

/// The decoder shape of `name` cut to its first `layers` layers (all when
/// `None`); an error naming `--layers` outside 1..=its depth.
pub fn synthetic_layers(name: &str, layers: Option<usize>) -> Result<TextConfig> {
    let mut cfg = synthetic_config(name)?;
    if let Some(l) = layers {
        if l == 0 || l > cfg.num_hidden_layers {
            return Err(Error::invalid(format!(
                "--layers {l}: expected 1..={} for {name}",
                cfg.num_hidden_layers
            )));
        }
        cfg.num_hidden_layers = l;
    }
    Ok(cfg)
}

/// Decode of a synthetic model (`layers` of its decoder layers; the full
/// depth when `None`) in each of `kinds` (FP16 vs W3 vs W4).
pub fn decode_synthetic<B: Backend>(
    be: &B,
    name: &str,
    layers: Option<usize>,
    prompt: usize,
    tokens: usize,
    kinds: &[WeightKind],
    mut note: impl FnMut(&str),
) -> Result<Vec<DecodeResult>> {
    let cfg = synthetic_layers(name, layers)?;
    let mut out = Vec::new();
    for &kind in kinds {
        note(&format!(
            "building {name} ({} layers) in {}",
            cfg.num_hidden_layers,
            kind.label_on(be)
        ));
        let model = synthetic_text_model(be, &cfg, kind, 7)?;
        out.push(bench_decode(be, &model, kind, prompt, tokens)?);
    }
    set_speedups(&mut out);
    Ok(out)
}

/// Each row's ratio to the dense row's time (NaN without a dense row).
fn set_speedups(out: &mut [DecodeResult]) {
    let f16 = out
        .iter()
        .find(|r| r.kind == WeightKind::F16)
        .map_or(f64::NAN, |r| r.ms_per_token);
    out.iter_mut()
        .for_each(|r| r.speedup_vs_f16 = f16 / r.ms_per_token);
}

/// Decode of a model directory's language model in each of `kinds`: FP
/// (as stored) and RTN W3 / W4 g128, whose quantized copies go to a
/// temporary directory.
pub fn decode_model_dir<B: Backend>(
    be: &B,
    dir: &std::path::Path,
    prompt: usize,
    tokens: usize,
    kinds: &[WeightKind],
    mut note: impl FnMut(&str),
) -> Result<Vec<DecodeResult>> {
    use crate::model::Vlm;
    let mut out = Vec::new();
    let tmp = std::env::temp_dir().join(format!("mbq-bench-{}", std::process::id()));
    for &kind in kinds {
        let bits = match kind {
            WeightKind::F16 => {
                let fp = Vlm::load(be, dir)?;
                out.push(bench_decode(be, &fp.text, kind, prompt, tokens)?);
                continue;
            }
            WeightKind::W3 => 3,
            WeightKind::W4 => 4,
        };
        let qdir = tmp.join(kind.label());
        note(&format!(
            "quantizing {} to {} in {}",
            dir.display(),
            kind.label(),
            qdir.display()
        ));
        let r = std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(&tmp, e))
            .and_then(|_| crate::quant::writer::quantize_rtn_dir(dir, &qdir, bits, 128, |_| {}))
            .and_then(|_| Vlm::load(be, &qdir))
            .and_then(|m| bench_decode(be, &m.text, kind, prompt, tokens));
        let _ = std::fs::remove_dir_all(&qdir);
        match r {
            Ok(r) => out.push(r),
            Err(e) => note(&format!("{}: skipped ({e})", kind.label())),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    set_speedups(&mut out);
    Ok(out)
}
