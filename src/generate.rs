//! Prompt building, prefill and decoding with the KV cache (sampling is in
//! [`crate::sampling`], re-exported here).

use std::time::Instant;

use crate::backend::Backend;
use crate::chat_template::user_message;
use crate::error::{Error, Result};
use crate::model::rope::{rope_pos, Mrope, RopePos};
use crate::model::Vlm;
use crate::preprocess::Preprocessed;
use crate::processor::Processor;
pub use crate::sampling::{argmax, GenerateOptions, Sampler, SamplingDefaults};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub image_encode_ms: f64,
    pub prefill_ms: f64,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_ms: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
}

/// `image encode .. ms | prefill .. tok in .. ms (.. tok/s) | decode ..`,
/// as the command-line tools print it.
impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image encode {:.1} ms | prefill {} tok in {:.1} ms ({:.1} tok/s) | decode {} tok in {:.1} ms ({:.1} tok/s)",
            self.image_encode_ms,
            self.prefill_tokens,
            self.prefill_ms,
            self.prefill_tok_s,
            self.decode_tokens,
            self.decode_ms,
            self.decode_tok_s
        )
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub timings: Timings,
    /// Why generation ended: "eos", "max_new_tokens" or "context".
    pub stop: &'static str,
}

/// A prompt ready for prefill: ids with the image tokens expanded.
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Each image's first image-token position and count, in order.
    pub image_spans: Vec<(usize, usize)>,
    /// M-RoPE models with images: the (t, h, w) position of each prompt
    /// token and the delta of the positions after it.
    pub mrope: Option<Mrope>,
}

impl Prompt {
    /// Sets [`Prompt::mrope`] when `model` uses M-RoPE and the prompt holds
    /// `images` (in the order of its image spans).
    pub fn with_mrope<B: Backend>(
        mut self,
        model: &Vlm<B>,
        images: &[&Preprocessed],
    ) -> Result<Self> {
        if let Some(grids) = model.mrope_grids(images)?.filter(|g| !g.is_empty()) {
            self.mrope = Some(Mrope::new(self.ids.len(), &self.image_spans, &grids)?);
        }
        Ok(self)
    }

    /// Where the prompt's rows (and the tokens generated after it) sit for RoPE.
    pub fn rope_pos(&self) -> RopePos<'_> {
        rope_pos(self.mrope.as_ref())
    }

    /// The image spans of `ids`: runs of `image_token`, one per image, each
    /// `counts[i]` long. An error if the ids hold anything else.
    pub fn new(ids: Vec<u32>, image_token: u32, counts: &[usize]) -> Result<Prompt> {
        let total = ids.iter().filter(|&&t| t == image_token).count();
        let expected: usize = counts.iter().sum();
        let bad = || {
            Error::invalid(format!(
                "the tokenized prompt holds {total} image tokens (id {image_token}), expected {expected} in runs of {counts:?}"
            ))
        };
        if total != expected {
            return Err(bad());
        }
        let mut spans = Vec::with_capacity(counts.len());
        let mut at = 0;
        for &n in counts {
            let start = at
                + ids[at..]
                    .iter()
                    .position(|&t| t == image_token)
                    .ok_or_else(bad)?;
            if start + n > ids.len() || ids[start..start + n].iter().any(|&t| t != image_token) {
                return Err(bad());
            }
            spans.push((start, n));
            at = start + n;
        }
        Ok(Prompt {
            ids,
            image_spans: spans,
            mrope: None,
        })
    }
}

/// Renders the chat template for one user turn, expands the image tokens and
/// tokenizes, as the HF processor does; checks the prompt fits the context.
pub fn build_prompt<B: Backend>(
    model: &Vlm<B>,
    proc: &Processor,
    prompt: &str,
    image: Option<&Preprocessed>,
) -> Result<Prompt> {
    let messages = serde_json::json!([user_message(prompt, image.is_some())]);
    build_chat_prompt(model, proc, &messages, image.as_slice())
}

/// [`build_prompt`] for a whole conversation: `messages` as the HF chat
/// templates take them (`{"role", "content": [{"type": "text", "text"} |
/// {"type": "image"}]}`), `images` in the order their `{"type": "image"}`
/// parts appear; ends with the generation prompt.
pub fn build_chat_prompt<B: Backend>(
    model: &Vlm<B>,
    proc: &Processor,
    messages: &serde_json::Value,
    images: &[&Preprocessed],
) -> Result<Prompt> {
    let counts = images
        .iter()
        .map(|p| model.num_image_tokens(p))
        .collect::<Result<Vec<_>>>()?;
    let text = proc.render_messages(messages, images.len())?;
    let ids = proc.encode_images(&text, &counts)?;
    let ctx = model.cfg.text.max_position_embeddings;
    if ids.len() >= ctx {
        return Err(Error::ContextLength {
            tokens: ids.len(),
            context: ctx,
        });
    }
    Prompt::new(ids, model.cfg.image_token_index, &counts)?.with_mrope(model, images)
}

/// The decoding loop's bookkeeping, shared by [`generate`] and the server's
/// batched engine: samples each next token, streams the text as it becomes
/// printable (holding back a partial character or the start of a stop
/// string), and decides when to stop.
pub struct Stepper<'p> {
    proc: &'p Processor,
    sampler: Sampler,
    max_new_tokens: usize,
    ignore_eos: bool,
    stop_strings: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    /// The text sent to `on_text` so far.
    shown: String,
    pos: usize,
    capacity: usize,
    stop: &'static str,
}

impl<'p> Stepper<'p> {
    /// After a prompt of `prompt_len` tokens in a cache of `capacity` rows.
    pub fn new(
        proc: &'p Processor,
        opts: &GenerateOptions,
        stop_strings: &[String],
        prompt_len: usize,
        capacity: usize,
    ) -> Self {
        Stepper {
            proc,
            sampler: Sampler::new(opts),
            max_new_tokens: opts.max_new_tokens,
            ignore_eos: opts.ignore_eos,
            stop_strings: stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            tokens: Vec::new(),
            text: String::new(),
            shown: String::new(),
            pos: prompt_len,
            capacity,
            stop: "max_new_tokens",
        }
    }

    /// Takes the last position's logits and samples the next token. Returns
    /// the token to run next and its position, or `None` when generation is
    /// over.
    pub fn step(
        &mut self,
        logits: &[f32],
        on_text: &mut impl FnMut(&str),
    ) -> Result<Option<(u32, usize)>> {
        if self.max_new_tokens == 0 {
            return Ok(None);
        }
        let next = self.sampler.sample(logits);
        self.tokens.push(next);
        let mut text = self.proc.decode(&self.tokens)?;
        let cut = self
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(cut) = cut {
            text.truncate(cut);
            self.text = text;
            self.stop = "stop";
            return Ok(None);
        }
        if !text.ends_with('\u{FFFD}') {
            // Hold back the longest end of the text that could start a stop string.
            let hold = self
                .stop_strings
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|&n| s.is_char_boundary(n))
                        .map(move |n| &s[..n])
                })
                .filter(|p| text.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            let upto = text.len() - hold;
            if upto > self.shown.len() && text.starts_with(&self.shown) {
                on_text(&text[self.shown.len()..upto]);
                self.shown = text[..upto].to_string();
            }
        }
        self.text = text;
        if !self.ignore_eos && self.proc.eos_ids.contains(&next) {
            self.stop = "eos";
            return Ok(None);
        }
        if self.tokens.len() >= self.max_new_tokens {
            return Ok(None);
        }
        if self.pos >= self.capacity {
            self.stop = "context";
            return Ok(None);
        }
        self.pos += 1;
        Ok(Some((next, self.pos - 1)))
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Ends generation: sends the text not yet sent, returns the whole text
    /// (cut before a stop string), the tokens and why it stopped: "eos",
    /// "stop" (a stop string), "max_new_tokens" or "context".
    pub fn finish(self, on_text: &mut impl FnMut(&str)) -> (String, Vec<u32>, &'static str) {
        if self.text.len() > self.shown.len() && self.text.starts_with(&self.shown) {
            on_text(&self.text[self.shown.len()..]);
        }
        (self.text, self.tokens, self.stop)
    }
}

/// The prompt's embeddings `[n, hidden]` with each image's features in its
/// span.
pub fn embed_prompt<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    prompt: &Prompt,
    image_features: &[&B::Tensor],
) -> Result<B::Tensor> {
    let mut x = model.text.embed(be, &prompt.ids)?;
    if image_features.len() != prompt.image_spans.len() {
        return Err(Error::invalid(format!(
            "{} image(s) for {} image span(s) in the prompt",
            image_features.len(),
            prompt.image_spans.len()
        )));
    }
    for (&(at, n), f) in prompt.image_spans.iter().zip(image_features) {
        let (rows, _) = be.dims(f);
        if rows != n {
            return Err(Error::invalid(format!(
                "the image gives {rows} feature rows for {n} image tokens"
            )));
        }
        be.set_rows(&mut x, at, f)?;
    }
    Ok(x)
}

/// Prefill: embeds the prompt, puts the image features in place, runs the
/// decoder over it. Returns the last-position logits.
pub fn prefill<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    prompt: &Prompt,
    image_features: Option<&B::Tensor>,
    cache: &mut B::Cache,
) -> Result<Vec<f32>> {
    let x = embed_prompt(be, model, prompt, image_features.as_slice())?;
    let logits = model.text.forward_at(be, x, cache, 0, prompt.rope_pos())?;
    Ok(be.download(&logits)?.data)
}

/// Teacher forcing: runs `prompt` followed by `target` through the decoder
/// in one pass (image features in place) and returns the logits that
/// predict each target token, `[target.len()][vocab]` (row `i` is the
/// distribution of `target[i]` given everything before it).
pub fn target_logits<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    prompt: &Prompt,
    image_features: Option<&B::Tensor>,
    target: &[u32],
) -> Result<Vec<Vec<f32>>> {
    if target.is_empty() || prompt.ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = prompt.ids.clone();
    ids.extend_from_slice(target);
    let ctx = model.cfg.text.max_position_embeddings;
    if ids.len() > ctx {
        return Err(Error::invalid(format!(
            "prompt + target are {} tokens, the model's context is {ctx}",
            ids.len()
        )));
    }
    let text = &model.text;
    let full = Prompt {
        ids,
        image_spans: prompt.image_spans.clone(),
        mrope: None,
    };
    let x = embed_prompt(be, model, &full, image_features.as_slice())?;
    let ids = full.ids;
    let mut cache = be.new_cache(text.layers.len(), text.kv_dim(), ids.len())?;
    let x = text.hidden_at(be, x, &mut cache, 0, prompt.rope_pos())?;
    // Row p predicts token p + 1: the target's predictors start one row
    // before it.
    let from = prompt.ids.len() - 1;
    let logits = text.logits(be, &be.rows(&x, from, target.len())?)?;
    let host = be.download(&logits)?;
    let vocab = host.data.len() / target.len();
    Ok(host.data.chunks(vocab).map(|r| r.to_vec()).collect())
}

/// Negative log-likelihood (natural log) of `token` under `logits`.
pub fn nll(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    match logits.get(token as usize) {
        Some(&l) => lse - l as f64,
        None => f64::INFINITY,
    }
}

/// The whole request: encode the image, prefill, decode. `on_text` receives
/// the text as it is produced.
pub fn generate<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    proc: &Processor,
    prompt: &str,
    image: Option<&Preprocessed>,
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    let messages = serde_json::json!([user_message(prompt, image.is_some())]);
    generate_chat(be, model, proc, &messages, image.as_slice(), opts, on_text)
}

/// [`generate`] for a whole conversation (`messages` and `images` as
/// [`build_chat_prompt`] takes them), in a fresh cache.
pub fn generate_chat<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    proc: &Processor,
    messages: &serde_json::Value,
    images: &[&Preprocessed],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut timings = Timings::default();
    let prompt = build_chat_prompt(model, proc, messages, images)?;
    let t0 = Instant::now();
    let embeds = images
        .iter()
        .map(|p| model.encode_image(be, p))
        .collect::<Result<Vec<_>>>()?;
    timings.image_encode_ms = ms(t0);

    let ctx = model.cfg.text.max_position_embeddings;
    let capacity = (prompt.ids.len() + opts.max_new_tokens).min(ctx);
    let mut cache = be.new_cache(model.text.layers.len(), model.text.kv_dim(), capacity)?;
    let t1 = Instant::now();
    let features: Vec<&B::Tensor> = embeds.iter().map(|e| &e.features).collect();
    let x = embed_prompt(be, model, &prompt, &features)?;
    let logits = be
        .download(
            &model
                .text
                .forward_at(be, x, &mut cache, 0, prompt.rope_pos())?,
        )?
        .data;
    timings.prefill_ms = ms(t1);
    timings.prefill_tokens = prompt.ids.len();
    timings.prefill_tok_s = per_s(prompt.ids.len(), timings.prefill_ms);

    let (text, tokens, stop) = decode(
        be,
        model,
        proc,
        &mut cache,
        prompt.rope_pos(),
        logits,
        prompt.ids.len(),
        opts,
        &mut timings,
        on_text,
    )?;
    Ok(Generation {
        text,
        tokens,
        prompt_tokens: prompt.ids.len(),
        timings,
        stop,
    })
}

/// The decode loop after a prefill: `logits` are the last prompt
/// position's, `pos` the prompt's length (the cache holds positions
/// `0..pos`); runs until EOS (unless `ignore_eos`), `max_new_tokens` or the
/// cache's capacity ([`Stepper`] decides). Every token but the last is fed
/// to the cache (it holds `pos + tokens.len() - 1` positions after). Fills
/// the decode timings; returns the text, the tokens and why it stopped.
#[allow(clippy::too_many_arguments)]
pub fn decode<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    proc: &Processor,
    cache: &mut B::Cache,
    rope: RopePos<'_>,
    mut logits: Vec<f32>,
    pos: usize,
    opts: &GenerateOptions,
    timings: &mut Timings,
    mut on_text: impl FnMut(&str),
) -> Result<(String, Vec<u32>, &'static str)> {
    let (_, _, capacity) = be.cache_dims(cache);
    let mut steps = Stepper::new(proc, opts, &[], pos, capacity);
    let t2 = Instant::now();
    while let Some((next, pos)) = steps.step(&logits, &mut on_text)? {
        let x = model.text.embed(be, &[next])?;
        logits = be
            .download(&model.text.forward_at(be, x, cache, pos, rope)?)?
            .data;
    }
    timings.decode_ms = ms(t2);
    let (text, tokens, stop) = steps.finish(&mut on_text);
    // The first token comes from the prefill logits: decode steps = len - 1.
    timings.decode_tokens = tokens.len().saturating_sub(1);
    timings.decode_tok_s = per_s(timings.decode_tokens, timings.decode_ms);
    Ok((text, tokens, stop))
}

pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn per_s(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 / (ms / 1e3)
    } else {
        0.0
    }
}
