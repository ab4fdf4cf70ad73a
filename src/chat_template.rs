//! Chat templates rendered with transformers' semantics: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, and a `tojson` that writes what Python's `json.dumps`
//! writes (", " and ": " separators, no HTML escaping).

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use crate::error::{Error, Result};

pub struct ChatTemplate {
    pub path: PathBuf,
    pub source: String,
    /// bos_token, eos_token, ... given to the template as variables.
    special: Vec<(String, String)>,
}

impl ChatTemplate {
    /// Looks in `chat_template.jinja`, then `chat_template.json`, then
    /// `tokenizer_config.json` (a string, or a list of named templates of
    /// which "default" is used), as transformers' processors do.
    pub fn find(
        dir: &Path,
        tok_cfg: &Value,
        tok_cfg_path: &Path,
        special: Vec<(String, String)>,
    ) -> Result<Option<ChatTemplate>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Ok(Some(ChatTemplate {
                path: jinja,
                source,
                special,
            }));
        }
        let json = dir.join("chat_template.json");
        if json.is_file() {
            let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&json, format!("not valid JSON: {e}")))?;
            let source = v
                .get("chat_template")
                .and_then(|s| s.as_str())
                .ok_or_else(|| Error::config(&json, "expected a string \"chat_template\""))?
                .to_string();
            return Ok(Some(ChatTemplate {
                path: json,
                source,
                special,
            }));
        }
        let source = match tok_cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(source.map(|source| ChatTemplate {
            path: tok_cfg_path.to_path_buf(),
            source,
            special,
        }))
    }

    /// Renders `messages` with `add_generation_prompt`.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let err = |e: minijinja::Error| Error::Template {
            path: self.path.clone(),
            msg: format!("{e:#}"),
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_filter("tojson", tojson);
        let source = rewrite_generation_tags(&self.source);
        env.add_template("chat", &source).map_err(err)?;
        let tmpl = env.get_template("chat").map_err(err)?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        tmpl.render(JValue::from_serialize(&ctx)).map_err(err)
    }
}

/// A user message as the HF processors take it: `{"role": "user", "content":
/// [{"type": "image"}, {"type": "text", "text": prompt}]}` (the image item
/// only when there is an image).
pub fn user_message(prompt: &str, with_image: bool) -> Value {
    user_message_images(prompt, usize::from(with_image))
}

/// [`user_message`] with `images` image items before the text.
pub fn user_message_images(prompt: &str, images: usize) -> Value {
    let mut content = vec![serde_json::json!({"type": "image"}); images];
    content.push(serde_json::json!({"type": "text", "text": prompt}));
    serde_json::json!({"role": "user", "content": content})
}

/// A system message: `{"role": "system", "content": [{"type": "text",
/// "text": text}]}`.
pub fn system_message(text: &str) -> Value {
    serde_json::json!({"role": "system", "content": [{"type": "text", "text": text}]})
}

/// An assistant message: `{"role": "assistant", "content": [{"type":
/// "text", "text": text}]}`, the shape the LLaVA templates read.
pub fn assistant_message(text: &str) -> Value {
    serde_json::json!({"role": "assistant", "content": [{"type": "text", "text": text}]})
}

/// transformers' `{% generation %}...{% endgeneration %}` (its
/// AssistantTracker extension) only marks assistant text and renders its
/// body unchanged: rewrite it to `{% if true %}...{% endif %}`, keeping the
/// whitespace-control marks.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i + 2]);
        rest = &rest[i + 2..];
        let marks = rest.len() - rest.trim_start_matches(['-', '+']).len();
        let after_marks = &rest[marks..];
        let ws = after_marks.len() - after_marks.trim_start().len();
        let body = &after_marks[ws..];
        let word_len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let replacement = match &body[..word_len] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        if let Some(r) = replacement {
            out.push_str(&rest[..marks + ws]);
            out.push_str(r);
            rest = &body[word_len..];
        }
    }
    out.push_str(rest);
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_dump(&v, indent, 0, &mut out);
    Ok(out)
}

fn py_dump(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_dump(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                py_dump(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true %}b{% endif -%}c{% if x %}"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        // json.dumps({"a": [1, "x<y"], "b": {}}) == '{"a": [1, "x<y"], "b": {}}'
        let v = serde_json::json!({"a": [1, "x<y"], "b": {}});
        let mut s = String::new();
        py_dump(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, "x<y"], "b": {}}"#);
        // json.dumps({"a": [1]}, indent=2) == '{\n  "a": [\n    1\n  ]\n}'
        let mut s = String::new();
        py_dump(&serde_json::json!({"a": [1]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1\n  ]\n}");
    }
}
