//! Text side of the HF processor: the tokenizer (`tokenizer.json`), the chat
//! template (`chat_template.jinja`, `chat_template.json` or
//! `tokenizer_config.json`, rendered as transformers renders it), image-token
//! expansion, and the EOS ids (`generation_config.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::{user_message, ChatTemplate};
use crate::error::{Error, Result};

pub struct Processor {
    pub tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pub template: Option<ChatTemplate>,
    /// The string of the image token (`<image>`), if the vocabulary has it.
    pub image_token: Option<String>,
    /// `image_token_index` of config.json.
    pub image_token_index: u32,
    pub eos_ids: Vec<u32>,
    /// InternVL: the strings around each image's run of image tokens
    /// (`<img>`, `</img>`), from the tokenizer's `start_image_token` /
    /// `end_image_token` when its `context_image_token` is the image token.
    pub image_wrap: Option<(String, String)>,
}

/// A tokenizer_config.json special-token name: top level (transformers 4
/// and 5 both write it there), or in `extra_special_tokens` (4.x) /
/// `model_specific_special_tokens` (5.x).
fn named_token(tok_cfg: &Value, key: &str) -> Option<String> {
    token_str(tok_cfg.get(key))
        .or_else(|| token_str(tok_cfg.get("extra_special_tokens").and_then(|m| m.get(key))))
        .or_else(|| {
            token_str(
                tok_cfg
                    .get("model_specific_special_tokens")
                    .and_then(|m| m.get(key)),
            )
        })
}

/// Reads `tokenizer.json` without letting the tokenizers crate panic on a
/// corrupt file: the JSON is checked first, and a panic inside the crate
/// (it has some on invalid normalizers) becomes an error naming the file.
fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let bad = |msg: String| Error::Tokenizer {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => bad("not UTF-8 text".into()),
        _ => Error::io(path, e),
    })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    check_precompiled(&json).map_err(bad)?;
    let parsed = catch_panic(|| text.parse::<Tokenizer>());
    let tokenizer = match parsed {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(bad(format!("not a valid tokenizer: {e}"))),
        Err(why) => {
            return Err(bad(format!(
                "not a valid tokenizer (the tokenizers library failed on it: {why})"
            )))
        }
    };
    // A corrupt normalizer or model may only fail when used: try it once
    // on a text with ASCII, accents, CJK and digits.
    let probe = "Hello, world! Größe 12.5% 日本語 \u{1F600}\n";
    match catch_panic(|| {
        tokenizer
            .encode(probe, true)
            .map(|e| tokenizer.decode(e.get_ids(), true))
    }) {
        Ok(Ok(Ok(_))) => Ok(tokenizer),
        Ok(Ok(Err(e))) | Ok(Err(e)) => Err(bad(format!(
            "not a usable tokenizer: it fails on a test text: {e}"
        ))),
        Err(why) => Err(bad(format!(
            "not a usable tokenizer: the tokenizers library failed on a test text ({why}); the file is corrupt (its normalizer or model?)"
        ))),
    }
}

/// A `Precompiled` normalizer's charsmap starts with the size of its trie
/// in bytes; the tokenizers crate allocates that much before checking it
/// against the data (an absurd size aborts the process), so it is checked
/// here first.
fn check_precompiled(v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::Array(a) => a.iter().try_for_each(check_precompiled),
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("Precompiled") {
                let map = o
                    .get("precompiled_charsmap")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let len = map.trim_end_matches('=').len() * 3 / 4;
                let head = base64_prefix(map);
                if head.len() < 4 {
                    return Err(format!(
                        "normalizer \"Precompiled\": \"precompiled_charsmap\" holds {len} bytes, too few for its header"
                    ));
                }
                let trie = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                if trie > len - 4 || !trie.is_multiple_of(4) {
                    return Err(format!(
                        "normalizer \"Precompiled\": \"precompiled_charsmap\" declares a trie of {trie} bytes but holds {} after its header",
                        len - 4
                    ));
                }
            }
            o.values().try_for_each(check_precompiled)
        }
        _ => Ok(()),
    }
}

/// The first bytes (up to 6) of a base64 text; fewer if it is not base64.
fn base64_prefix(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4).take(2) {
        let Some(vals) = chunk.iter().map(|&c| val(c)).collect::<Option<Vec<u32>>>() else {
            break;
        };
        if vals.len() < 4 {
            break;
        }
        let n = vals.iter().fold(0u32, |acc, v| (acc << 6) | v);
        out.extend([(n >> 16) as u8, (n >> 8) as u8, n as u8]);
    }
    out
}

/// Runs `f`, turning a panic into `Err(message)`; the panic hook is
/// silenced for the call (no backtrace on stderr) and restored afterwards.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(prev);
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into())
    })
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

/// A special token given as a string or as an AddedToken object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl Processor {
    /// Loads the tokenizer, chat template and EOS ids of a model directory;
    /// `image_token_index` comes from config.json.
    pub fn load(dir: &Path, image_token_index: u32) -> Result<Processor> {
        let tokenizer_path = dir.join("tokenizer.json");
        if let Some(e) = Error::wrong_kind(&tokenizer_path, false, "the tokenizer file") {
            return Err(e);
        }
        if !tokenizer_path.is_file() {
            return Err(Error::Missing {
                path: tokenizer_path,
                what: "tokenizer".into(),
            });
        }
        let tokenizer = load_tokenizer(&tokenizer_path)?;
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_json(&tok_cfg_path)?.unwrap_or(Value::Null);
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let mut special = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let v = token_str(tok_cfg.get(key)).or_else(|| token_str(special_map.get(key)));
            if let Some(v) = v {
                special.push((key.to_string(), v));
            }
        }
        let template = ChatTemplate::find(dir, &tok_cfg, &tok_cfg_path, special)?;
        let vocab = tokenizer.get_vocab_size(true);
        let out_of_vocab = |what: &str, id: u32| {
            Error::Tokenizer {
            path: tokenizer_path.clone(),
            msg: format!(
                "{what} has id {id}, beyond the vocabulary of {vocab} tokens (ids 0..{vocab}); the tokenizer does not belong to this config"
            ),
        }
        };
        if image_token_index as usize >= vocab {
            return Err(out_of_vocab(
                "the image token (\"image_token_index\" in config.json)",
                image_token_index,
            ));
        }
        let image_token = tokenizer.id_to_token(image_token_index);
        // InternVLProcessor: `<img>` + context tokens + `</img>` per image.
        let image_wrap = match (
            named_token(&tok_cfg, "context_image_token"),
            named_token(&tok_cfg, "start_image_token"),
            named_token(&tok_cfg, "end_image_token"),
        ) {
            (Some(ctx), Some(start), Some(end)) if Some(&ctx) == image_token.as_ref() => {
                Some((start, end))
            }
            _ => None,
        };

        // EOS: generation_config.json, then config.json, then the tokenizer.
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut eos_ids = ids(gen.get("eos_token_id"));
        if eos_ids.is_empty() {
            let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
            eos_ids = ids(cfg.get("eos_token_id"));
            if eos_ids.is_empty() {
                eos_ids = ids(cfg.get("text_config").and_then(|t| t.get("eos_token_id")));
            }
        }
        if eos_ids.is_empty() {
            if let Some(id) =
                token_str(tok_cfg.get("eos_token")).and_then(|t| tokenizer.token_to_id(&t))
            {
                eos_ids.push(id);
            }
        }
        if let Some(&id) = eos_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(out_of_vocab(
                "the end-of-sequence token (\"eos_token_id\" in generation_config.json or config.json)",
                id,
            ));
        }
        let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let pad = ids(cfg.get("pad_token_id"))
            .into_iter()
            .chain(ids(cfg
                .get("text_config")
                .and_then(|t| t.get("pad_token_id"))))
            .chain(ids(gen.get("pad_token_id")));
        for id in pad {
            if id as usize >= vocab {
                return Err(out_of_vocab(
                    "the padding token (\"pad_token_id\" in config.json or generation_config.json)",
                    id,
                ));
            }
        }
        Ok(Processor {
            tokenizer,
            tokenizer_path,
            template,
            image_token,
            image_token_index,
            eos_ids,
            image_wrap,
        })
    }

    /// The chat-template text for one user turn, with the generation prompt.
    pub fn render(&self, prompt: &str, with_image: bool) -> Result<String> {
        let messages = serde_json::json!([user_message(prompt, with_image)]);
        self.render_messages(&messages, usize::from(with_image))
    }

    /// The chat-template text for a conversation (messages as the HF
    /// templates take them), with the generation prompt; checks the text has
    /// one image slot per image.
    pub fn render_messages(&self, messages: &Value, images: usize) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| Error::Template {
            path: self.tokenizer_path.with_file_name("chat_template.json"),
            msg: "the model has no chat template (looked in chat_template.jinja, chat_template.json, tokenizer_config.json)".into(),
        })?;
        let text = t.render(messages, true)?;
        let Some(tok) = self.image_token.as_deref() else {
            if images == 0 {
                return Ok(text);
            }
            return Err(Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                msg: format!(
                    "an image was given but the vocabulary has no token with the image token id {} (\"image_token_index\" in config.json)",
                    self.image_token_index
                ),
            });
        };
        if images > 0 {
            let ids = self
                .tokenizer
                .encode(tok, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default();
            if ids != [self.image_token_index] {
                return Err(Error::Tokenizer {
                    path: self.tokenizer_path.clone(),
                    msg: format!(
                        "an image was given but the image token \"{tok}\" does not tokenize to its id {} (\"image_token_index\" in config.json): it gives {ids:?}; the tokenizer lacks it as a special (added) token",
                        self.image_token_index
                    ),
                });
            }
        }
        match text.matches(tok).count() {
            n if n == images => Ok(text),
            0 => Err(Error::Template {
                path: t.path.clone(),
                msg: format!(
                    "{images} image(s) were given but the chat template has no image slot (no \"{tok}\" in the rendered prompt)"
                ),
            }),
            n => Err(Error::Template {
                path: t.path.clone(),
                msg: format!("the rendered prompt holds {n} image slots for {images} image(s)"),
            }),
        }
    }

    /// Token ids of a rendered prompt, the `i`-th image token expanded to
    /// `counts[i]` copies (as the HF processor does before tokenizing).
    pub fn encode_images(&self, text: &str, counts: &[usize]) -> Result<Vec<u32>> {
        let expanded = match &self.image_token {
            Some(tok) if !counts.is_empty() => {
                let mut out = String::with_capacity(text.len());
                let mut parts = text.split(tok.as_str());
                out.push_str(parts.next().unwrap_or(""));
                for (i, part) in parts.enumerate() {
                    out.push_str(&self.expand(tok, counts.get(i).copied().unwrap_or(1)));
                    out.push_str(part);
                }
                out
            }
            _ => text.to_string(),
        };
        self.tokenize(expanded)
    }

    /// Token ids of a rendered prompt, each image token expanded to
    /// `image_tokens` copies (as the HF processor does before tokenizing).
    pub fn encode(&self, text: &str, image_tokens: usize) -> Result<Vec<u32>> {
        let expanded = match (&self.image_token, image_tokens) {
            (Some(tok), n) if n > 0 => text.replace(tok.as_str(), &self.expand(tok, n)),
            _ => text.to_string(),
        };
        self.tokenize(expanded)
    }

    /// One image slot expanded: `n` image tokens, wrapped in `<img>` ...
    /// `</img>` for InternVL.
    fn expand(&self, tok: &str, n: usize) -> String {
        match &self.image_wrap {
            Some((start, end)) => format!("{start}{}{end}", tok.repeat(n)),
            None => tok.repeat(n),
        }
    }

    fn tokenize(&self, expanded: String) -> Result<Vec<u32>> {
        let enc = catch_panic(|| self.tokenizer.encode(expanded, true))
            .map_err(|why| format!("the tokenizers library failed ({why})"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|msg| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                msg,
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        catch_panic(|| self.tokenizer.decode(ids, true))
            .map_err(|why| format!("the tokenizers library failed ({why})"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|msg| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                msg,
            })
    }
}
