//! The server's engine: one thread that owns the backend and the model and
//! runs every request, continuously batched.
//!
//! Each step runs one forward of the decoder over a batch
//! ([`crate::model::text::TextModel::forward_batch`]): one row per sequence
//! that is decoding, followed by the whole prompts of newly admitted
//! requests (their prefill, interleaved with the others' decoding). Each
//! sequence has its own KV cache. At most `max_batch` sequences run; more
//! requests wait in arrival order. A request whose client went away (its
//! event receiver dropped, or its cancel flag set) is dropped at the next
//! step.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{self, Backend, BackendJob, BackendKind, BackendOptions, Grad};
use crate::config::VlmConfig;
use crate::error::{Error, Result};
use crate::generate::{build_chat_prompt, embed_prompt, GenerateOptions, Stepper};
use crate::model::decoder::SeqKv;
use crate::model::rope::{rope_pos, Mrope};
use crate::model::Vlm;
use crate::preprocess::Preprocessed;
use crate::processor::Processor;
use crate::weights::WeightFiles;

/// Most prompt rows prefilled in one step (more new requests wait for the
/// next step; one request is always admitted, however long).
pub const PREFILL_ROWS_PER_STEP: usize = 2048;

/// One request for the engine.
pub struct Job {
    /// Messages in the chat template's shape (see [`super::api::ChatRequest`]).
    pub messages: Value,
    pub images: Vec<Preprocessed>,
    /// `max_new_tokens` is capped at what the context leaves.
    pub options: GenerateOptions,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
    /// Set when the client is gone.
    pub cancel: Arc<AtomicBool>,
}

/// What the engine tells a request, in this order: `Started` or `Failed`,
/// then `Text`s, then `Done`.
#[derive(Debug)]
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        text: String,
        stop: &'static str,
        completion_tokens: usize,
    },
    Failed(Error),
}

/// Counters the `/health` endpoint shows.
#[derive(Default, Debug)]
pub struct Stats {
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
    pub completed: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub failed: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    pub steps: AtomicUsize,
}

/// What the engine loaded, for `/v1/models` and the start-up message.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub backend: &'static str,
    pub device: String,
    pub context: usize,
}

pub struct EngineOptions {
    pub model: PathBuf,
    pub backend: BackendKind,
    pub backend_options: BackendOptions,
    pub max_batch: usize,
}

/// A running engine: send [`Job`]s; dropping every sender stops it once the
/// running requests are done.
pub struct Engine {
    pub jobs: mpsc::Sender<Job>,
    pub info: EngineInfo,
    pub stats: Arc<Stats>,
    pub thread: std::thread::JoinHandle<Result<()>>,
}

impl Engine {
    /// Opens the backend and loads the model on the engine's thread; returns
    /// once it is ready (or failed to load). `note` gets the progress lines.
    pub fn start(opts: EngineOptions, note: impl Fn(&str) + Send + 'static) -> Result<Engine> {
        if opts.max_batch == 0 {
            return Err(Error::invalid("--max-batch must be at least 1"));
        }
        let (jobs, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("mbq-engine".into())
            .spawn(move || {
                let be = match backend::open(opts.backend, &opts.backend_options, |m| note(m)) {
                    Ok(be) => be,
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = ready_tx.send(Err(e));
                        return Err(Error::invalid(msg));
                    }
                };
                be.run(EngineJob {
                    opts: &opts,
                    rx,
                    ready: ready_tx,
                    stats: st,
                })
            })
            .map_err(|e| Error::invalid(format!("cannot start the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Engine {
                jobs,
                info,
                stats,
                thread,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(Error::invalid("the engine thread stopped while loading")),
            },
        }
    }
}

struct EngineJob<'a> {
    opts: &'a EngineOptions,
    rx: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<EngineInfo>>,
    stats: Arc<Stats>,
}

impl BackendJob for EngineJob<'_> {
    type Output = ();
    fn run<B: Grad>(self, be: &B, device: &str) -> Result<()> {
        let loaded = (|| {
            let cfg = VlmConfig::load(&self.opts.model)?;
            let proc = Processor::load(&self.opts.model, cfg.image_token_index)?;
            let weights = WeightFiles::open(&self.opts.model)?;
            let model = Vlm::from_weights(be, cfg, &weights)?;
            Ok::<_, Error>((model, proc))
        })();
        let (model, proc) = match loaded {
            Ok(m) => m,
            Err(e) => {
                let msg = e.to_string();
                let _ = self.ready.send(Err(e));
                return Err(Error::invalid(msg));
            }
        };
        let info = EngineInfo {
            backend: be.name(),
            device: device.to_string(),
            context: model.cfg.text.max_position_embeddings,
        };
        let _ = self.ready.send(Ok(info));
        Scheduler {
            be,
            model: &model,
            proc: &proc,
            max_batch: self.opts.max_batch,
            stats: &self.stats,
        }
        .run(self.rx)
    }
}

/// A request between its arrival and its admission.
struct Waiting {
    job: Job,
    prompt: crate::generate::Prompt,
}

/// A request that is running: its cache, its decoding state, and what the
/// next step feeds it.
struct Running<'p, B: Backend> {
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    cache: B::Cache,
    /// M-RoPE models with images: the prompt's (t, h, w) positions.
    mrope: Option<Mrope>,
    steps: Stepper<'p>,
    feed: Feed<B::Tensor>,
}

enum Feed<T> {
    /// The prompt's embeddings (this request's first step).
    Prompt(T),
    /// The last sampled token at its position.
    Token(u32, usize),
}

struct Scheduler<'a, B: Backend> {
    be: &'a B,
    model: &'a Vlm<B>,
    proc: &'a Processor,
    max_batch: usize,
    stats: &'a Stats,
}

impl<'a, B: Backend> Scheduler<'a, B> {
    fn run(&self, rx: mpsc::Receiver<Job>) -> Result<()> {
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut running: Vec<Running<'a, B>> = Vec::new();
        let mut open = true;
        loop {
            // Block only when there is nothing to do.
            if running.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.arrive(job, &mut waiting),
                    Err(_) => return Ok(()),
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(job) => self.arrive(job, &mut waiting),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            waiting.retain(|w| {
                let gone = gone(&w.job.events, &w.job.cancel);
                if gone {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            });
            running.retain(|r| {
                let gone = gone(&r.events, &r.cancel);
                if gone {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "request cancelled by its client after {} tokens",
                        r.steps.tokens().len()
                    );
                }
                !gone
            });
            self.admit(&mut waiting, &mut running);
            self.stats.queued.store(waiting.len(), Ordering::Relaxed);
            self.stats.active.store(running.len(), Ordering::Relaxed);
            if running.is_empty() {
                if !open && waiting.is_empty() {
                    return Ok(());
                }
                continue;
            }
            if let Err(e) = self.step(&mut running) {
                // A failed step fails the requests in it; the server goes on.
                eprintln!("error: a batched step failed: {e}");
                for r in running.drain(..) {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = r.events.send(Event::Failed(Error::invalid(e.to_string())));
                }
            }
            self.stats.active.store(running.len(), Ordering::Relaxed);
        }
    }

    /// Renders and tokenizes a new request's prompt; a request that cannot
    /// run (a prompt over the context, a template error) fails at once.
    fn arrive(&self, job: Job, waiting: &mut VecDeque<Waiting>) {
        let images: Vec<&Preprocessed> = job.images.iter().collect();
        match build_chat_prompt(self.model, self.proc, &job.messages, &images) {
            Ok(prompt) => {
                let _ = job.events.send(Event::Started {
                    prompt_tokens: prompt.ids.len(),
                });
                waiting.push_back(Waiting { job, prompt });
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }

    /// Moves waiting requests into the batch (images encoded, prompts
    /// embedded, caches made), up to `max_batch` and the prefill budget.
    fn admit(&self, waiting: &mut VecDeque<Waiting>, running: &mut Vec<Running<'a, B>>) {
        let mut rows = 0;
        let mut admitted = 0;
        while running.len() < self.max_batch {
            let Some(n) = waiting.front().map(|w| w.prompt.ids.len()) else {
                break;
            };
            if admitted > 0 && rows + n > PREFILL_ROWS_PER_STEP {
                break;
            }
            let Some(w) = waiting.pop_front() else { break };
            rows += n;
            admitted += 1;
            match self.start(w) {
                Ok(r) => running.push(r),
                Err((events, e)) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn start(
        &self,
        w: Waiting,
    ) -> std::result::Result<Running<'a, B>, (UnboundedSender<Event>, Error)> {
        let Waiting { job, mut prompt } = w;
        let mrope = prompt.mrope.take();
        let be = self.be;
        let ready = (|| {
            let mut features = Vec::with_capacity(job.images.len());
            for pre in &job.images {
                features.push(self.model.encode_image(be, pre)?.features);
            }
            let refs: Vec<&B::Tensor> = features.iter().collect();
            let x = embed_prompt(be, self.model, &prompt, &refs)?;
            let ctx = self.model.cfg.text.max_position_embeddings;
            let n = prompt.ids.len();
            let mut options = job.options.clone();
            options.max_new_tokens = options.max_new_tokens.min(ctx - n);
            let capacity = (n + options.max_new_tokens).min(ctx);
            let cache = be.new_cache(
                self.model.text.layers.len(),
                self.model.text.kv_dim(),
                capacity,
            )?;
            let steps = Stepper::new(self.proc, &options, &job.stop, n, capacity);
            Ok::<_, Error>((x, cache, steps))
        })();
        match ready {
            Ok((x, cache, steps)) => Ok(Running {
                events: job.events,
                cancel: job.cancel,
                cache,
                mrope,
                steps,
                feed: Feed::Prompt(x),
            }),
            Err(e) => Err((job.events, e)),
        }
    }

    /// One batched forward: the decoding rows (one token each, embedded
    /// together), then each new prompt; samples every sequence's next token.
    fn step(&self, running: &mut Vec<Running<'a, B>>) -> Result<()> {
        let be = self.be;
        let text = &self.model.text;
        // Decoding sequences first, then prompts, so the decode rows embed
        // in one call.
        running.sort_by_key(|r| matches!(r.feed, Feed::Prompt(_)));
        let tokens: Vec<u32> = running
            .iter()
            .filter_map(|r| match r.feed {
                Feed::Token(t, _) => Some(t),
                Feed::Prompt(_) => None,
            })
            .collect();
        let mut parts = Vec::with_capacity(running.len());
        if !tokens.is_empty() {
            parts.push(text.embed(be, &tokens)?);
        }
        let mut shape = Vec::with_capacity(running.len());
        for r in running.iter_mut() {
            match std::mem::replace(&mut r.feed, Feed::Token(0, 0)) {
                Feed::Token(_, pos) => shape.push((pos, 1)),
                Feed::Prompt(p) => {
                    shape.push((0, be.dims(&p).0));
                    parts.push(p);
                }
            }
        }
        let x = be.concat_all(parts)?;
        let mut seqs: Vec<SeqKv<'_, B>> = running
            .iter_mut()
            .zip(&shape)
            .map(|(r, &(pos0, rows))| SeqKv {
                cache: &mut r.cache,
                pos0,
                rows,
                rope: rope_pos(r.mrope.as_ref()),
            })
            .collect();
        let logits = be.download(&text.forward_batch(be, x, &mut seqs)?)?;
        drop(seqs);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let vocab = logits.data.len() / running.len();
        let mut done = Vec::new();
        for (i, (r, l)) in running
            .iter_mut()
            .zip(logits.data.chunks(vocab))
            .enumerate()
        {
            let events = &r.events;
            let mut send = |t: &str| {
                let _ = events.send(Event::Text(t.to_string()));
            };
            match r.steps.step(l, &mut send)? {
                Some((t, pos)) => r.feed = Feed::Token(t, pos),
                None => done.push(i),
            }
        }
        for i in done.into_iter().rev() {
            let r = running.remove(i);
            let events = r.events;
            let mut send = |t: &str| {
                let _ = events.send(Event::Text(t.to_string()));
            };
            let (text, tokens, stop) = r.steps.finish(&mut send);
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            self.stats
                .generated_tokens
                .fetch_add(tokens.len(), Ordering::Relaxed);
            let _ = events.send(Event::Done {
                text,
                stop,
                completion_tokens: tokens.len(),
            });
        }
        Ok(())
    }
}

fn gone(events: &UnboundedSender<Event>, cancel: &AtomicBool) -> bool {
    events.is_closed() || cancel.load(Ordering::Relaxed)
}
