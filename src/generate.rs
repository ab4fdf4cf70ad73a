//! Prompt building, prefill and decoding with the KV cache: greedy when the
//! temperature is 0, otherwise temperature + top-k + top-p sampling with a
//! seed; the sampling defaults of a model's `generation_config.json`.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::Backend;
use crate::chat_template::user_message;
use crate::error::{Error, Result};
use crate::model::llava::Vlm;
use crate::preprocess::Preprocessed;
use crate::processor::Processor;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens before top-p; 0 = off.
    pub top_k: usize,
    pub seed: u64,
    /// Keep generating after an EOS token.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

/// The sampling settings of a model's `generation_config.json`, with
/// transformers' semantics: `do_sample` false or absent means greedy
/// whatever `temperature` says; with `do_sample` true a missing
/// `temperature` is 1.0, `top_p` 1.0 and `top_k` 50 (`GenerationConfig`'s
/// defaults). A `null` value counts as absent.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingDefaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

impl Default for SamplingDefaults {
    /// No generation_config.json: greedy.
    fn default() -> Self {
        SamplingDefaults {
            do_sample: false,
            temperature: None,
            top_p: None,
            top_k: None,
        }
    }
}

impl SamplingDefaults {
    /// Reads `dir/generation_config.json`; greedy defaults when it is absent.
    pub fn load(dir: &Path) -> Result<SamplingDefaults> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(SamplingDefaults::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        SamplingDefaults::from_json(&path, &json)
    }

    /// The sampling keys of a parsed generation_config.json (`path` names
    /// it in errors).
    pub fn from_json(path: &Path, json: &serde_json::Value) -> Result<SamplingDefaults> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object"))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let bad = |key: &str, want: &str, v: &serde_json::Value| {
            Error::config(path, format!("\"{key}\" must be {want}, found {v}"))
        };
        let do_sample = match get("do_sample") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("do_sample", "true or false", v))?,
        };
        let temperature = match get("temperature") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(t) if t >= 0.0 => Some(t as f32),
                _ => return Err(bad("temperature", "a number >= 0", v)),
            },
        };
        let top_p = match get("top_p") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(p) if p > 0.0 && p <= 1.0 => Some(p as f32),
                _ => return Err(bad("top_p", "a number in (0, 1]", v)),
            },
        };
        let top_k = match get("top_k") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(k) => {
                    Some(usize::try_from(k).map_err(|_| bad("top_k", "an integer >= 0", v))?)
                }
                None => return Err(bad("top_k", "an integer >= 0", v)),
            },
        };
        Ok(SamplingDefaults {
            do_sample,
            temperature,
            top_p,
            top_k,
        })
    }

    /// `(temperature, top_p, top_k)` for a request: each explicit value
    /// wins; the others come from the config. Greedy (temperature 0) when
    /// the config does not sample and no temperature is given; an explicit
    /// temperature samples with the config's top-p / top-k where it has
    /// them (else 1.0 and off).
    pub fn resolve(
        &self,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
    ) -> (f32, f32, usize) {
        if self.do_sample {
            (
                temperature.or(self.temperature).unwrap_or(1.0),
                top_p.or(self.top_p).unwrap_or(1.0),
                top_k.or(self.top_k).unwrap_or(50),
            )
        } else {
            (
                temperature.unwrap_or(0.0),
                top_p.or(self.top_p).unwrap_or(1.0),
                top_k.or(self.top_k).unwrap_or(0),
            )
        }
    }

    /// [`SamplingDefaults::resolve`] into `opts`.
    pub fn apply(
        &self,
        opts: &mut GenerateOptions,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
    ) {
        (opts.temperature, opts.top_p, opts.top_k) = self.resolve(temperature, top_p, top_k);
    }
}

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
}

impl Prompt {
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
        .map(|p| model.num_image_tokens(p.image_size))
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
    Prompt::new(ids, model.cfg.image_token_index, &counts)
}

/// Picks the next token from last-position logits: greedy at temperature
/// 0; otherwise, as transformers' warpers in their order, the logits over
/// the temperature, then top-k (the `top_k` most likely tokens and any tied
/// with the last of them), then top-p (the smallest most-likely set whose
/// mass reaches `top_p`, at least one token), then a draw.
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: &GenerateOptions) -> Self {
        Sampler {
            temperature: opts.temperature,
            top_p: opts.top_p,
            top_k: opts.top_k,
            rng: StdRng::seed_from_u64(opts.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l - max) / self.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Top-k: the k most likely and those tied with the k-th, the rest
        // renormalized.
        if self.top_k > 0 && self.top_k < probs.len() {
            let kth = probs[self.top_k - 1].1;
            let keep = probs.iter().take_while(|p| p.1 >= kth).count();
            probs.truncate(keep);
            let mass: f32 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= mass);
        }
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        let kept = &probs[..keep];
        let mass: f32 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for p in kept {
            u -= p.1;
            if u <= 0.0 {
                return p.0 as u32;
            }
        }
        kept[kept.len() - 1].0 as u32
    }
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

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
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
    let logits = model.text.forward(be, x, cache, 0)?;
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
    };
    let x = embed_prompt(be, model, &full, image_features.as_slice())?;
    let ids = full.ids;
    let mut cache = be.new_cache(text.layers.len(), text.kv_dim(), ids.len())?;
    let x = text.hidden(be, x, &mut cache, 0)?;
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
        .download(&model.text.forward(be, x, &mut cache, 0)?)?
        .data;
    timings.prefill_ms = ms(t1);
    timings.prefill_tokens = prompt.ids.len();
    timings.prefill_tok_s = per_s(prompt.ids.len(), timings.prefill_ms);

    let (text, tokens, stop) = decode(
        be,
        model,
        proc,
        &mut cache,
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
        logits = be.download(&model.text.forward(be, x, cache, pos)?)?.data;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults(v: serde_json::Value) -> Result<SamplingDefaults> {
        SamplingDefaults::from_json(Path::new("m/generation_config.json"), &v)
    }

    #[test]
    fn generation_config_without_do_sample_is_greedy() {
        // do_sample absent or false: greedy whatever temperature says.
        for cfg in [
            json!({"eos_token_id": 2}),
            json!({"do_sample": false, "temperature": 0.7, "top_p": 0.9}),
            json!({"do_sample": null, "temperature": 0.7}),
        ] {
            let d = defaults(cfg.clone()).unwrap();
            assert_eq!(d.resolve(None, None, None).0, 0.0, "{cfg}");
        }
        // An explicit temperature samples, with the config's top-p.
        let d = defaults(json!({"temperature": 0.7, "top_p": 0.9})).unwrap();
        assert_eq!(d.resolve(Some(0.5), None, None), (0.5, 0.9, 0));
        assert_eq!(
            SamplingDefaults::default().resolve(None, None, None),
            (0.0, 1.0, 0)
        );
    }

    #[test]
    fn generation_config_do_sample_uses_hf_defaults() {
        let d = defaults(json!({"do_sample": true})).unwrap();
        assert_eq!(d.resolve(None, None, None), (1.0, 1.0, 50));
        let d = defaults(json!({"do_sample": true, "temperature": 0.6, "top_p": 0.8, "top_k": 20}))
            .unwrap();
        assert_eq!(d.resolve(None, None, None), (0.6, 0.8, 20));
        // Explicit values win, an explicit temperature 0 is greedy.
        assert_eq!(d.resolve(Some(0.0), None, None), (0.0, 0.8, 20));
        assert_eq!(d.resolve(Some(0.9), Some(0.5), Some(0)), (0.9, 0.5, 0));
        let mut o = GenerateOptions::default();
        d.apply(&mut o, None, Some(1.0), None);
        assert_eq!((o.temperature, o.top_p, o.top_k), (0.6, 1.0, 20));
    }

    #[test]
    fn generation_config_bad_values_name_the_file_and_key() {
        for (cfg, key) in [
            (json!({"do_sample": "yes"}), "do_sample"),
            (
                json!({"do_sample": true, "temperature": "hot"}),
                "temperature",
            ),
            (json!({"temperature": -1.0}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": 2.5}), "top_k"),
            (json!({"top_k": -1}), "top_k"),
        ] {
            let e = defaults(cfg.clone()).unwrap_err().to_string();
            assert!(
                e.contains("m/generation_config.json") && e.contains(&format!("\"{key}\"")),
                "{cfg}: {e}"
            );
        }
        let e = defaults(json!([1])).unwrap_err().to_string();
        assert!(e.contains("generation_config.json"), "{e}");
    }

    #[test]
    fn generation_config_missing_file_is_greedy_and_bad_json_is_an_error() {
        let dir = std::env::temp_dir().join(format!("mbq_gencfg_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("generation_config.json"));
        assert_eq!(
            SamplingDefaults::load(&dir).unwrap(),
            SamplingDefaults::default()
        );
        std::fs::write(dir.join("generation_config.json"), "{ not json").unwrap();
        let e = SamplingDefaults::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("JSON"),
            "{e}"
        );
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"do_sample": true, "top_k": 3}"#,
        )
        .unwrap();
        assert_eq!(SamplingDefaults::load(&dir).unwrap().top_k, Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(&GenerateOptions {
            temperature,
            top_p,
            top_k,
            seed,
            ..GenerateOptions::default()
        })
    }

    #[test]
    fn top_k_keeps_only_the_k_most_likely() {
        let logits = [0.0, 3.0, 1.0, 2.9, 2.8, -1.0];
        let mut seen = [0usize; 6];
        let mut s = sampler(5.0, 1.0, 2, 7);
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        // Only tokens 1 and 3, both often (a high temperature flattens).
        assert_eq!(seen[0] + seen[2] + seen[4] + seen[5], 0, "{seen:?}");
        assert!(seen[1] > 500 && seen[3] > 500, "{seen:?}");
        // top_k 1 is greedy.
        let mut s = sampler(5.0, 1.0, 1, 7);
        assert!((0..100).all(|_| s.sample(&logits) == 1));
        // Ties with the k-th are kept (as TopKLogitsWarper's `<` threshold).
        let tied = [1.0, 2.0, 2.0, 0.0];
        let mut s = sampler(1.0, 1.0, 1, 3);
        let picks: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&tied)).collect();
        assert_eq!(picks, [1, 2].into_iter().collect());
    }

    #[test]
    fn top_k_applies_before_top_p() {
        // Probabilities [0.45, 0.35, 0.11, 0.09]: top-p 0.85 alone keeps 3
        // tokens (0.80 < 0.85); top-k 3 first renormalizes them to [0.495,
        // 0.385, 0.121], and top-p 0.85 then keeps 2 (0.879).
        let logits = [0.45f32.ln(), 0.35f32.ln(), 0.11f32.ln(), 0.09f32.ln()];
        let picks = |top_k| {
            let mut s = sampler(1.0, 0.85, top_k, 11);
            (0..2000)
                .map(|_| s.sample(&logits))
                .collect::<std::collections::BTreeSet<u32>>()
        };
        assert_eq!(picks(3), [0, 1].into_iter().collect());
        assert_eq!(picks(0), [0, 1, 2].into_iter().collect());
        // Same seed and options: the same draws.
        let (mut a, mut b) = (sampler(0.8, 0.95, 3, 5), sampler(0.8, 0.95, 3, 5));
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
        // Off (0) or k >= vocab: the plain top-p sampler's draws.
        let (mut a, mut b) = (sampler(0.8, 0.95, 0, 5), sampler(0.8, 0.95, 4, 5));
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
    }
}
