//! `mbq serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of
//! the batched [`engine`].
//!
//! Routes: `POST /v1/chat/completions` (JSON or, with `stream: true`,
//! server-sent events ending with `data: [DONE]`), `GET /v1/models`,
//! `GET /health`. Errors are OpenAI error objects ([`api::ApiError`]).
//! The HTTP side parses the request and decodes and preprocesses its
//! images (on tokio's blocking pool); the engine thread renders the prompt
//! and runs the model. SIGTERM or Ctrl-C stops accepting connections, lets
//! the running requests finish, then stops the engine.

pub mod api;
pub mod engine;
pub mod images;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use self::api::{ApiError, ChatRequest};
use self::engine::{Engine, EngineOptions, Event, Job, Stats};
use crate::backend::{BackendKind, BackendOptions};
use crate::error::{Error, Result};
use crate::generate::SamplingDefaults;
use crate::image_processor::ImageProcessor;
use crate::preprocess::Preprocessed;

/// The largest request body accepted (413 above it): room for a few
/// base64 images.
pub const DEFAULT_BODY_LIMIT: usize = 32 << 20;

pub struct ServeOptions {
    pub model: PathBuf,
    /// The id clients name in `model` (and `/v1/models` lists).
    pub model_id: String,
    pub backend: BackendKind,
    pub backend_options: BackendOptions,
    pub host: String,
    pub port: u16,
    pub max_batch: usize,
    pub max_images: usize,
    pub body_limit: usize,
    pub allow_local_files: Option<PathBuf>,
}

struct AppState {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    model_id: String,
    image_config: Option<ImageProcessor>,
    /// generation_config.json's sampling, for what a request leaves out.
    sampling: SamplingDefaults,
    allow_local: Option<PathBuf>,
    max_images: usize,
    body_limit: usize,
    stats: Arc<Stats>,
    draining: AtomicBool,
    created: u64,
}

type Shared = Arc<AppState>;

/// Loads the model, serves until SIGTERM / Ctrl-C, drains, returns.
pub fn serve(
    opts: ServeOptions,
    note: impl Fn(&str) + Send + Sync + Clone + 'static,
) -> Result<()> {
    if let Some(dir) = &opts.allow_local_files {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.clone(),
                what: "the directory of --allow-local-files".into(),
            });
        }
    }
    // A model without an image processor still serves text.
    let image_config = ImageProcessor::load(&opts.model).ok();
    let sampling = SamplingDefaults::load(&opts.model)?;
    let engine = Engine::start(
        EngineOptions {
            model: opts.model.clone(),
            backend: opts.backend,
            backend_options: opts.backend_options.clone(),
            max_batch: opts.max_batch,
        },
        note.clone(),
    )?;
    let state: Shared = Arc::new(AppState {
        jobs: Mutex::new(Some(engine.jobs.clone())),
        model_id: opts.model_id.clone(),
        image_config,
        sampling,
        allow_local: opts.allow_local_files.clone(),
        max_images: opts.max_images,
        body_limit: opts.body_limit,
        stats: engine.stats.clone(),
        draining: AtomicBool::new(false),
        created: now(),
    });
    let Engine {
        jobs, info, thread, ..
    } = engine;
    drop(jobs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the async runtime: {e}")))?;
    let served = rt.block_on(async {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::invalid(format!("cannot listen on {addr} (--host, --port): {e}")))?;
        let local: SocketAddr = listener
            .local_addr()
            .map_err(|e| Error::invalid(format!("{addr}: {e}")))?;
        note(&format!(
            "mbq serve: {} on {} ({}), batches of up to {}, context {} tokens; listening on http://{local}",
            opts.model_id, info.backend, info.device, opts.max_batch, info.context
        ));
        let st = state.clone();
        let n2 = note.clone();
        axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                st.draining.store(true, Ordering::Relaxed);
                n2("mbq serve: stopping: no new connections; finishing the running requests");
            })
            .await
            .map_err(|e| Error::invalid(format!("server error: {e}")))
    });
    // No more jobs: the engine finishes what runs and returns.
    state.jobs.lock().map(|mut j| j.take()).ok();
    drop(state);
    let engine = thread
        .join()
        .map_err(|_| Error::invalid("the engine thread panicked"))?;
    served?;
    engine?;
    note("mbq serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::bad(
                None,
                "no such route: POST /v1/chat/completions, GET /v1/models, GET /health",
            )
            .status(StatusCode::NOT_FOUND)
            .with_code("not_found")
        })
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": st.created, "owned_by": "mbq"}],
    }))
}

async fn health(State(st): State<Shared>) -> Json<Value> {
    let s = &st.stats;
    let get = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    Json(json!({
        "status": if st.draining.load(Ordering::Relaxed) { "draining" } else { "ok" },
        "model": st.model_id,
        "active": get(&s.active),
        "queued": get(&s.queued),
        "completed": get(&s.completed),
        "cancelled": get(&s.cancelled),
        "failed": get(&s.failed),
        "generated_tokens": get(&s.generated_tokens),
        "steps": get(&s.steps),
    }))
}

async fn chat(State(st): State<Shared>, req: Request) -> Response {
    match chat_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::bad(
        None,
        format!("the request body is over the server's limit of {limit} bytes"),
    )
    .status(StatusCode::PAYLOAD_TOO_LARGE)
    .with_code("request_too_large")
}

/// How far past the limit an over-large body is still read (and thrown
/// away) before the 413 goes out. A client that is still sending when the
/// server answers and closes gets a broken pipe instead of the answer
/// (reqwest, httpx and curl all do), so a body up to this much over the
/// limit is drained; anything larger has the connection closed on it.
const DRAIN_PAST_LIMIT: usize = 64 << 20;

/// Reads the request body, at most `limit` bytes of it. Over the limit the
/// rest is read and dropped (bounded by [`DRAIN_PAST_LIMIT`]) and the error
/// is a 413, so the client can read it.
async fn read_body(body: axum::body::Body, limit: usize) -> std::result::Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad(None, format!("cannot read the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > limit.saturating_add(DRAIN_PAST_LIMIT) {
            break;
        }
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

async fn chat_inner(st: Shared, req: Request) -> std::result::Result<Response, ApiError> {
    let bytes = read_body(req.into_body(), st.body_limit).await?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(None, format!("the request body is not valid JSON: {e}")))?;
    let req = api::parse_chat(&body)?;
    if let Some(m) = &req.model {
        if *m != st.model_id {
            return Err(ApiError::bad(
                Some("model".to_string()),
                format!(
                    "the model '{m}' does not exist; this server serves '{}'",
                    st.model_id
                ),
            )
            .status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
    }
    if req.images.len() > st.max_images {
        return Err(ApiError::bad(
            Some("messages".to_string()),
            format!(
                "the request has {} images, this server takes at most {} per request (--max-images)",
                req.images.len(),
                st.max_images
            ),
        )
        .with_code("too_many_images"));
    }
    let images = load_images(&st, &req).await?;
    let (tx, mut rx) = unbounded_channel();
    let mut options = req.options.clone();
    options.max_new_tokens = req.max_tokens.unwrap_or(usize::MAX);
    st.sampling
        .apply(&mut options, req.temperature, req.top_p, req.top_k);
    let job = Job {
        messages: req.messages.clone(),
        images,
        options,
        stop: req.stop.clone(),
        events: tx,
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let unavailable = || {
        ApiError::bad(None, "the server is shutting down")
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .with_code("unavailable")
    };
    {
        let jobs = st.jobs.lock().map_err(|_| unavailable())?;
        let Some(jobs) = jobs.as_ref() else {
            return Err(unavailable());
        };
        jobs.send(job).map_err(|_| unavailable())?;
    }
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(ApiError::from_engine(&e)),
        _ => return Err(unavailable()),
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = now();
    if req.stream {
        Ok(stream(rx, id, created, st.model_id.clone(), prompt_tokens, &req).into_response())
    } else {
        loop {
            match rx.recv().await {
                Some(Event::Text(_)) | Some(Event::Started { .. }) => {}
                Some(Event::Done {
                    text,
                    stop,
                    completion_tokens,
                }) => {
                    return Ok(Json(api::completion(
                        &id,
                        created,
                        &st.model_id,
                        &text,
                        stop,
                        prompt_tokens,
                        completion_tokens,
                    ))
                    .into_response())
                }
                Some(Event::Failed(e)) => return Err(ApiError::from_engine(&e)),
                None => return Err(unavailable()),
            }
        }
    }
}

/// Decodes and preprocesses the request's images on the blocking pool.
async fn load_images(
    st: &Shared,
    req: &ChatRequest,
) -> std::result::Result<Vec<Preprocessed>, ApiError> {
    if req.images.is_empty() {
        return Ok(Vec::new());
    }
    let Some(cfg) = st.image_config.clone() else {
        return Err(ApiError::bad(
            Some("messages".to_string()),
            "this model takes no images (its directory has no preprocessor_config.json)",
        ));
    };
    let parts = req.images.clone();
    let allow = st.allow_local.clone();
    tokio::task::spawn_blocking(move || {
        parts
            .iter()
            .map(|p| {
                let img = images::load_part(p, allow.as_deref())?;
                cfg.preprocess(&img).map_err(|e| {
                    ApiError::bad(
                        Some(format!("{}.image_url.url", p.at)),
                        format!("{}: {e}", p.at),
                    )
                    .with_code("invalid_image")
                })
            })
            .collect()
    })
    .await
    .map_err(|e| {
        ApiError::bad(None, format!("image decoding failed: {e}"))
            .status(StatusCode::INTERNAL_SERVER_ERROR)
    })?
}

/// The server-sent events of a streamed response: a first chunk with the
/// role, one per piece of text, one with the finish reason, the usage chunk
/// when asked (`stream_options.include_usage`), then `[DONE]`. Dropping the
/// stream (the client went away) drops the receiver, which cancels the
/// request in the engine.
fn stream(
    rx: UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    req: &ChatRequest,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<SseEvent, std::convert::Infallible>>>
{
    enum Phase {
        Role,
        Body,
        Usage(usize),
        Done,
        End,
    }
    let include_usage = req.include_usage;
    let state = (rx, Phase::Role);
    let events = futures_util::stream::unfold(state, move |(mut rx, phase)| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            let data = |v: Value| SseEvent::default().data(v.to_string());
            let chunk = |delta: Value, finish: Option<&str>| {
                data(api::chunk(&id, created, &model, delta, finish))
            };
            match phase {
                Phase::Role => Some((
                    Ok(chunk(json!({"role": "assistant", "content": ""}), None)),
                    (rx, Phase::Body),
                )),
                Phase::Body => match rx.recv().await {
                    Some(Event::Text(t)) => {
                        Some((Ok(chunk(json!({"content": t}), None)), (rx, Phase::Body)))
                    }
                    Some(Event::Done {
                        stop,
                        completion_tokens,
                        ..
                    }) => {
                        let next = if include_usage {
                            Phase::Usage(completion_tokens)
                        } else {
                            Phase::Done
                        };
                        Some((
                            Ok(chunk(json!({}), Some(api::finish_reason(stop)))),
                            (rx, next),
                        ))
                    }
                    Some(Event::Failed(e)) => Some((
                        Ok(data(ApiError::from_engine(&e).body())),
                        (rx, Phase::Done),
                    )),
                    Some(Event::Started { .. }) => Some((
                        Ok(SseEvent::default().comment("started")),
                        (rx, Phase::Body),
                    )),
                    None => Some((
                        Ok(data(
                            ApiError::bad(None, "the server stopped the request")
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .body(),
                        )),
                        (rx, Phase::Done),
                    )),
                },
                Phase::Usage(n) => {
                    let mut v = api::chunk(&id, created, &model, json!({}), None);
                    v["choices"] = json!([]);
                    v["usage"] = api::usage(prompt_tokens, n);
                    Some((Ok(data(v)), (rx, Phase::Done)))
                }
                Phase::Done => Some((Ok(SseEvent::default().data("[DONE]")), (rx, Phase::End))),
                Phase::End => None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
