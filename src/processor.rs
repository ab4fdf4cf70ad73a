//! Text side of the HF processor: the tokenizer (`tokenizer.json`), the chat
//! template (`chat_template.jinja`, `chat_template.json` or
//! `tokenizer_config.json`, rendered as transformers renders it), image-token
//! expansion, and the EOS ids (`generation_config.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};

pub struct Processor {
    pub tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pub template: Option<ChatTemplate>,
    /// The string of the image token (`<image>`), if the vocabulary has it.
    pub image_token: Option<String>,
    pub eos_ids: Vec<u32>,
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
        if !tokenizer_path.is_file() {
            return Err(Error::Missing {
                path: tokenizer_path,
                what: "tokenizer".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Tokenizer {
            path: tokenizer_path.clone(),
            msg: e.to_string(),
        })?;
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
        let image_token = tokenizer.id_to_token(image_token_index);

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
        Ok(Processor {
            tokenizer,
            tokenizer_path,
            template,
            image_token,
            eos_ids,
        })
    }

    /// The chat-template text for one user turn, with the generation prompt.
    pub fn render(&self, prompt: &str, with_image: bool) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| Error::Template {
            path: self.tokenizer_path.with_file_name("chat_template.json"),
            msg: "the model has no chat template (looked in chat_template.jinja, chat_template.json, tokenizer_config.json)".into(),
        })?;
        let text = t.render_user(prompt, with_image)?;
        if with_image {
            let tok = self.image_token.as_deref().unwrap_or("<image>");
            match text.matches(tok).count() {
                1 => {}
                0 => {
                    return Err(Error::Template {
                        path: t.path.clone(),
                        msg: format!(
                            "an image was given but the chat template has no image slot (no \"{tok}\" in the rendered prompt)"
                        ),
                    })
                }
                n => {
                    return Err(Error::Template {
                        path: t.path.clone(),
                        msg: format!("the rendered prompt holds {n} image slots for one image"),
                    })
                }
            }
        }
        Ok(text)
    }

    /// Token ids of a rendered prompt, each image token expanded to
    /// `image_tokens` copies (as the HF processor does before tokenizing).
    pub fn encode(&self, text: &str, image_tokens: usize) -> Result<Vec<u32>> {
        let expanded = match (&self.image_token, image_tokens) {
            (Some(tok), n) if n > 0 => text.replace(tok.as_str(), &tok.repeat(n)),
            _ => text.to_string(),
        };
        let enc = self
            .tokenizer
            .encode(expanded, true)
            .map_err(|e| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                msg: e.to_string(),
            })
    }
}
