//! Multi-turn conversations over one loaded model: the history (user turns
//! with their images, assistant answers) is rendered through the chat
//! template each turn, and the KV cache is kept across turns so only the
//! part of the new prompt past what the cache already holds is prefilled.
//! Each image is encoded once, when its turn comes.

use std::time::Instant;

use serde_json::Value;

use crate::backend::Backend;
use crate::chat_template::{assistant_message, system_message, user_message_images};
use crate::error::Result;
use crate::generate::{
    build_chat_prompt, decode, embed_prompt, ms, per_s, GenerateOptions, Generation, Prompt,
    Timings,
};
use crate::model::Vlm;
use crate::preprocess::Preprocessed;
use crate::processor::Processor;

/// What one cache position holds: a text token, or row `row` of image
/// `image`'s features (image token ids are all alike: the image tells
/// them apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Token(u32),
    Image { image: u64, row: usize },
}

/// An image of the conversation: its pixels (for the prompt's token
/// count) and its features, computed once.
struct ChatImage<T> {
    id: u64,
    pre: Preprocessed,
    features: T,
}

/// A conversation with a model. [`ChatSession::turn`] adds a user message
/// (with images) and generates the answer, reusing the cache's common
/// prefix with the new prompt.
pub struct ChatSession<'a, B: Backend> {
    be: &'a B,
    model: &'a Vlm<B>,
    proc: &'a Processor,
    system: Option<String>,
    /// User and assistant messages, in order (without the system message).
    messages: Vec<Value>,
    /// The images of `messages`, in order.
    images: Vec<ChatImage<B::Tensor>>,
    /// Turns since the start or the last reset (each turn's sampler is
    /// seeded with `seed + turns`).
    turns: u64,
    next_image: u64,
    cache: Option<B::Cache>,
    /// What the cache holds at positions `0..cached.len()`.
    cached: Vec<Slot>,
}

impl<'a, B: Backend> ChatSession<'a, B> {
    pub fn new(be: &'a B, model: &'a Vlm<B>, proc: &'a Processor) -> Self {
        ChatSession {
            be,
            model,
            proc,
            system: None,
            messages: Vec::new(),
            images: Vec::new(),
            turns: 0,
            next_image: 0,
            cache: None,
            cached: Vec::new(),
        }
    }

    /// A system message before the conversation (it stays across resets).
    pub fn with_system(mut self, system: Option<&str>) -> Self {
        self.system = system.map(str::to_string);
        self
    }

    /// The conversation as the chat template takes it: the system message
    /// (if any), then the user and assistant messages.
    pub fn messages(&self) -> Vec<Value> {
        self.system
            .iter()
            .map(|s| system_message(s))
            .chain(self.messages.iter().cloned())
            .collect()
    }

    /// The number of images in the conversation.
    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// The number of positions the cache holds (of the last prompt and its
    /// answer).
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// The cache's capacity, 0 before the first turn.
    pub fn cache_capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| self.be.cache_dims(c).2)
    }

    /// Forgets the conversation and its images (the system message stays).
    /// The cache is kept: a new conversation reuses what it shares with
    /// the old one's beginning (the system message).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.images.clear();
        self.turns = 0;
    }

    /// Drops the cache: the next turn prefills its whole prompt.
    pub fn clear_cache(&mut self) {
        self.cache = None;
        self.cached.clear();
    }

    /// One user turn: `text` with `images` (shown before the text, as
    /// [`crate::chat_template::user_message`] puts them). Renders the whole
    /// conversation, prefills what the cache does not hold yet, generates
    /// the answer (`on_text` receives it as it comes) and adds both
    /// messages to the conversation. On an error (a prompt over the
    /// context: [`crate::Error::ContextLength`]) the conversation is as
    /// before. `prompt_tokens` is the whole prompt, `timings.prefill_tokens`
    /// the part that was prefilled.
    pub fn turn(
        &mut self,
        text: &str,
        images: &[Preprocessed],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let (be, model) = (self.be, self.model);
        let mut messages = self.messages();
        messages.push(user_message_images(text, images.len()));
        let pres: Vec<&Preprocessed> = self
            .images
            .iter()
            .map(|i| &i.pre)
            .chain(images.iter())
            .collect();
        let prompt = build_chat_prompt(model, self.proc, &Value::Array(messages), &pres)?;

        let mut timings = Timings::default();
        let t0 = Instant::now();
        let mut new_images = Vec::with_capacity(images.len());
        for (i, pre) in images.iter().enumerate() {
            new_images.push(ChatImage {
                id: self.next_image + i as u64,
                pre: pre.clone(),
                features: model.encode_image(be, pre)?.features,
            });
        }
        timings.image_encode_ms = ms(t0);

        let slots = self.slots(&prompt, &new_images);
        let n = prompt.ids.len();
        if n == 0 {
            return Err(crate::Error::invalid(
                "the chat template rendered an empty prompt",
            ));
        }
        let ctx = model.cfg.text.max_position_embeddings;
        let needed = (n + opts.max_new_tokens).min(ctx);
        let have = self.cache_capacity();
        if have < needed {
            self.cache = None;
            self.cached.clear();
        }
        let cache = match &mut self.cache {
            Some(cache) => cache,
            none => {
                // Room for this turn and about one more (the answer, then a
                // message as long), or twice the old cache.
                let room = n.saturating_add(opts.max_new_tokens.saturating_mul(2));
                let capacity = room.max(have.saturating_mul(2)).min(ctx);
                none.insert(be.new_cache(model.text.layers.len(), model.text.kv_dim(), capacity)?)
            }
        };

        // Prefill from the first position the cache does not hold (at least
        // the last one: its logits start the answer). The cache's rows past
        // it are overwritten; attention reads only positions before.
        let common = self
            .cached
            .iter()
            .zip(&slots)
            .take_while(|(a, b)| a == b)
            .count();
        let start = common.min(n - 1);
        self.cached.truncate(start);
        let t1 = Instant::now();
        let features: Vec<&B::Tensor> = self
            .images
            .iter()
            .chain(&new_images)
            .map(|i| &i.features)
            .collect();
        let x = embed_prompt(be, model, &prompt, &features)?;
        let x = if start > 0 {
            be.rows(&x, start, n - start)?
        } else {
            x
        };
        let logits = be
            .download(
                &model
                    .text
                    .forward_at(be, x, cache, start, prompt.rope_pos())?,
            )?
            .data;
        self.cached = slots;
        timings.prefill_ms = ms(t1);
        timings.prefill_tokens = n - start;
        timings.prefill_tok_s = per_s(n - start, timings.prefill_ms);

        let turn_opts = GenerateOptions {
            seed: opts.seed.wrapping_add(self.turns),
            ..opts.clone()
        };
        let (text_out, tokens, stop) = decode(
            be,
            model,
            self.proc,
            cache,
            prompt.rope_pos(),
            logits,
            n,
            &turn_opts,
            &mut timings,
            on_text,
        )?;

        // The cache holds every token but the last (never fed).
        self.cached.extend(
            tokens[..tokens.len().saturating_sub(1)]
                .iter()
                .map(|&t| Slot::Token(t)),
        );
        self.messages
            .push(user_message_images(text, new_images.len()));
        self.messages.push(assistant_message(&text_out));
        self.next_image += new_images.len() as u64;
        self.images.extend(new_images);
        self.turns += 1;
        Ok(Generation {
            text: text_out,
            tokens,
            prompt_tokens: n,
            timings,
            stop,
        })
    }

    /// The slots of `prompt`: its image spans are the session's images then
    /// `new`, in order.
    fn slots(&self, prompt: &Prompt, new: &[ChatImage<B::Tensor>]) -> Vec<Slot> {
        let mut slots: Vec<Slot> = prompt.ids.iter().map(|&t| Slot::Token(t)).collect();
        let ids = self.images.iter().chain(new).map(|i| i.id);
        for (&(at, len), image) in prompt.image_spans.iter().zip(ids) {
            for row in 0..len {
                slots[at + row] = Slot::Image { image, row };
            }
        }
        slots
    }
}
