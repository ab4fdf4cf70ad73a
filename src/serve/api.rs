//! The OpenAI chat-completions API as `mbq serve` speaks it: the request
//! parsed and checked into a [`ChatRequest`], error objects, and the
//! response and stream-chunk JSON.
//!
//! Request fields read: `model`, `messages` (`role` system / user /
//! assistant; `content` a string or an array of `text` and `image_url`
//! parts), `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`,
//! `seed`, `stop` (a string or up to 4 strings), `stream`,
//! `stream_options.include_usage`, `n` (only 1), and vLLM's `ignore_eos`
//! and `top_k`. Sampling values a request leaves out come from the model's
//! generation_config.json (greedy when it does not sample), as vLLM does.
//! Other fields are ignored, as OpenAI-compatible servers do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::error::Error;
use crate::generate::GenerateOptions;

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`
/// with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the offending parameter.
    pub fn bad(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The engine's error for one request: a prompt over the context, an
    /// image or template problem (400), or a failure of the server (500).
    pub fn from_engine(e: &Error) -> Self {
        match e {
            Error::ContextLength { .. } => {
                ApiError::bad(Some("messages".to_string()), e.to_string())
                    .with_code("context_length_exceeded")
            }
            Error::Invalid(_) | Error::Image { .. } | Error::Template { .. } => {
                ApiError::bad(Some("messages".to_string()), e.to_string())
            }
            _ => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Where an image part's pixels are: `image_url.url` of the request.
#[derive(Clone, Debug)]
pub struct ImagePart {
    /// `messages[i].content[j]`, for errors.
    pub at: String,
    pub url: String,
}

/// A checked chat-completions request.
#[derive(Debug)]
pub struct ChatRequest {
    /// The `model` field, if given.
    pub model: Option<String>,
    /// The messages in the shape the HF chat templates take: content is an
    /// array of `{"type": "text", "text"}` and `{"type": "image"}` parts.
    pub messages: Value,
    /// The image parts in order of appearance.
    pub images: Vec<ImagePart>,
    /// `max_tokens` / `max_completion_tokens`; `None`: up to the context.
    pub max_tokens: Option<usize>,
    /// `temperature` and `top_p` as given; the model's
    /// generation_config.json fills in the missing ones (as vLLM does).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's `top_k` extension (-1 or 0: off).
    pub top_k: Option<usize>,
    /// Seed and `ignore_eos`; sampling is set by the server.
    pub options: GenerateOptions,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn number(body: &Value, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(ApiError::bad(
                Some(name.to_string()),
                format!("'{name}' must be a number in [{lo}, {hi}], got {v}"),
            )),
        },
    }
}

fn count(body: &Value, name: &str) -> Result<Option<u64>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x >= 1 => Ok(Some(x)),
            _ => Err(ApiError::bad(
                Some(name.to_string()),
                format!("'{name}' must be an integer >= 1, got {v}"),
            )),
        },
    }
}

fn flag(body: &Value, name: &str) -> Result<bool, ApiError> {
    match field(body, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad(
            Some(name.to_string()),
            format!("'{name}' must be true or false, got {v}"),
        )),
    }
}

/// Parses and checks a request body (JSON already parsed).
pub fn parse_chat(body: &Value) -> Result<ChatRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        ));
    }
    let model = match field(body, "model") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(v) => {
            return Err(ApiError::bad(
                Some("model".to_string()),
                format!("'model' must be a string, got {v}"),
            ))
        }
    };
    let (messages, images) = parse_messages(field(body, "messages"))?;
    let max_tokens = match count(body, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => count(body, "max_tokens")?,
    };
    if let Some(n) = count(body, "n")? {
        if n != 1 {
            return Err(ApiError::bad(
                Some("n".to_string()),
                format!("only one choice per request is supported ('n': 1), got {n}"),
            ));
        }
    }
    let temperature = number(body, "temperature", 0.0, 2.0)?.map(|t| t as f32);
    let top_p = match number(body, "top_p", 0.0, 1.0)? {
        Some(0.0) => {
            return Err(ApiError::bad(
                Some("top_p".to_string()),
                "'top_p' must be greater than 0",
            ))
        }
        p => p.map(|p| p as f32),
    };
    let top_k = match field(body, "top_k") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(-1) | Some(0) => Some(0),
            Some(k) if k > 0 => Some(k as usize),
            _ => {
                return Err(ApiError::bad(
                    Some("top_k".to_string()),
                    format!("'top_k' must be an integer >= 1 (or -1 / 0: off), got {v}"),
                ))
            }
        },
    };
    let seed = match field(body, "seed") {
        None => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| {
                ApiError::bad(
                    Some("seed".to_string()),
                    format!("'seed' must be an integer, got {v}"),
                )
            })?,
    };
    let stop = match field(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        Some(v) => {
            return Err(ApiError::bad(
                Some("stop".to_string()),
                format!("'stop' must be a string or an array of up to 4 strings, got {v}"),
            ))
        }
    };
    let stream = flag(body, "stream")?;
    let include_usage = match field(body, "stream_options") {
        None => false,
        Some(o) if o.is_object() => flag(o, "include_usage")?,
        Some(v) => {
            return Err(ApiError::bad(
                Some("stream_options".to_string()),
                format!("'stream_options' must be an object, got {v}"),
            ))
        }
    };
    let options = GenerateOptions {
        max_new_tokens: usize::MAX,
        seed,
        ignore_eos: flag(body, "ignore_eos")?,
        ..GenerateOptions::default()
    };
    Ok(ChatRequest {
        model,
        messages,
        images,
        max_tokens: max_tokens.map(|n| n.min(usize::MAX as u64) as usize),
        temperature,
        top_p,
        top_k,
        options,
        stop,
        stream,
        include_usage,
    })
}

/// OpenAI messages -> the HF template's messages and the image parts.
fn parse_messages(messages: Option<&Value>) -> Result<(Value, Vec<ImagePart>), ApiError> {
    let bad = |param: String, msg: String| ApiError::bad(Some(param), msg);
    let list = match messages {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => {
            return Err(bad(
                "messages".into(),
                "'messages' must be a non-empty array of messages".into(),
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    let mut images = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant")) => r,
            Some("developer") => "system",
            other => {
                return Err(bad(
                    format!("{at}.role"),
                    format!(
                        "{at}.role must be \"system\", \"user\" or \"assistant\", got {other:?}"
                    ),
                ))
            }
        };
        let mut parts = Vec::new();
        match m.get("content") {
            Some(Value::String(s)) => parts.push(json!({"type": "text", "text": s})),
            Some(Value::Array(items)) => {
                for (j, p) in items.iter().enumerate() {
                    let pat = format!("{at}.content[{j}]");
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                bad(
                                    format!("{pat}.text"),
                                    format!("{pat}: a text part needs a string 'text'"),
                                )
                            })?;
                            parts.push(json!({"type": "text", "text": text}));
                        }
                        Some("image_url") => {
                            if role != "user" {
                                return Err(bad(
                                    pat.clone(),
                                    format!("{pat}: images are accepted in user messages only"),
                                ));
                            }
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => u.clone(),
                                Some(o) => o
                                    .get("url")
                                    .and_then(Value::as_str)
                                    .map(String::from)
                                    .ok_or_else(|| {
                                        bad(
                                            format!("{pat}.image_url.url"),
                                            format!("{pat}: an image_url part needs 'image_url': {{\"url\": ...}}"),
                                        )
                                    })?,
                                None => {
                                    return Err(bad(
                                        format!("{pat}.image_url"),
                                        format!("{pat}: an image_url part needs 'image_url': {{\"url\": ...}}"),
                                    ))
                                }
                            };
                            images.push(ImagePart { at: pat, url });
                            parts.push(json!({"type": "image"}));
                        }
                        other => {
                            return Err(bad(
                                format!("{pat}.type"),
                                format!(
                                "{pat}: part type must be \"text\" or \"image_url\", got {other:?}"
                            ),
                            ))
                        }
                    }
                }
            }
            other => {
                return Err(bad(
                    format!("{at}.content"),
                    format!(
                        "{at}.content must be a string or an array of parts, got {}",
                        other
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "nothing".into())
                    ),
                ))
            }
        }
        out.push(json!({"role": role, "content": parts}));
    }
    Ok((Value::Array(out), images))
}

/// OpenAI's finish_reason for [`crate::generate::Stepper`]'s stop.
pub fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "eos" | "stop" => "stop",
        _ => "length",
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The whole (non-streamed) response.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    stop: &str,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(stop),
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    })
}

/// One `chat.completion.chunk` of a stream.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_and_array_content_become_template_parts() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "What color?"}
                ]},
            ],
            "max_tokens": 5,
            "stop": "\n",
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let r = parse_chat(&body).unwrap();
        assert_eq!(
            r.messages,
            json!([
                {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
            ])
        );
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].at, "messages[1].content[0]");
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.temperature, None);
    }

    #[test]
    fn bad_fields_name_the_parameter() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (body, param) in [
            (json!({"messages": []}), "messages"),
            (json!({"messages": msgs, "temperature": 3}), "temperature"),
            (json!({"messages": msgs, "top_p": 0}), "top_p"),
            (json!({"messages": msgs, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": msgs, "n": 2}), "n"),
            (json!({"messages": msgs, "stop": [1]}), "stop"),
            (json!({"messages": msgs, "stream": "yes"}), "stream"),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
                "messages[0].content[0].type",
            ),
        ] {
            let e = parse_chat(&body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn finish_reasons_follow_openai() {
        assert_eq!(finish_reason("eos"), "stop");
        assert_eq!(finish_reason("stop"), "stop");
        assert_eq!(finish_reason("max_new_tokens"), "length");
        assert_eq!(finish_reason("context"), "length");
    }
}
