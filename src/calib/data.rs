//! The MBQ calibration set (docs/MBQ.md, section 1): image-caption
//! pairs in LLaVA's conversation format, each wrapped in the model's chat
//! template, tokenized with the image tokens expanded, and labelled by
//! position: vision (the expanded image tokens) and caption (every token
//! after the generation prompt: the answer and the template's end-of-turn
//! tokens, as LLaVA-NeXT's preprocessing labels them). Everything else
//! (system prompt, user text, role headers) is neither.
//!
//! The file is a JSON array or JSONL (one object per line, blank lines
//! ignored), told apart by its first non-space character (`[`). An item:
//! `{"id", "image" (optional), "conversations": [{"from": "human", "value":
//! "<image>\n..."}, {"from": "gpt", "value": "..."}]}`.
//!
//! Choices:
//! - Only the first exchange is used: the first human turn and the gpt turn
//!   after it (later turns of a multi-turn item are ignored). `user` and
//!   `assistant` are accepted for `human` and `gpt`.
//! - The `<image>` placeholder (before or after the text, with the newline
//!   next to it) is removed from the human text, which is then trimmed, as
//!   LLaVA's `preprocess_multimodal` does; the image goes into the user
//!   message as the HF processors take it (`{"type": "image"}` before the
//!   text, see [`crate::chat_template::user_message`]). An item with an image
//!   and no placeholder still gets its image; an item with a placeholder
//!   and no image is skipped.
//! - The answer is used as written (not trimmed); a blank one is skipped.
//! - Items are visited in a seeded shuffle of all item indices (`StdRng`,
//!   `SliceRandom::shuffle`) until `n_samples` valid ones are found; the
//!   invalid ones met on the way are returned in [`CalibSet::skipped`].
//! - Images are decoded and preprocessed at load time (then dropped), so a
//!   sample that loads also embeds; [`embed_sample`] does it again.

use std::fmt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::backend::Backend;
use crate::chat_template::{assistant_message, user_message, ChatTemplate};
use crate::error::{Error, Result};
use crate::image_processor::ImageProcessor;
use crate::model::rope::Mrope;
use crate::model::Vlm;
use crate::preprocess::load_image;
use crate::processor::Processor;

/// The LLaVA data format's image placeholder in a human turn.
const PLACEHOLDER: &str = "<image>";

/// An item of the calibration file that was not used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibItemError {
    /// 0-based index of the item in the file (array element or non-blank line).
    pub index: usize,
    /// 1-based line of the item (JSONL only).
    pub line: Option<usize>,
    pub id: Option<String>,
    pub reason: String,
}

impl fmt::Display for CalibItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item {}", self.index)?;
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        if let Some(id) = &self.id {
            write!(f, " \"{id}\"")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// One calibration sample, ready for a forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibSample {
    pub id: String,
    /// Token ids, image tokens expanded.
    pub ids: Vec<u32>,
    /// True at the expanded image-token positions (one contiguous run).
    pub vision: Vec<bool>,
    /// True at every token after the generation prompt (answer + the
    /// template's end-of-turn tokens).
    pub caption: Vec<bool>,
    /// The resolved image path.
    pub image: Option<PathBuf>,
    /// M-RoPE models with an image: the tokens' (t, h, w) positions.
    pub mrope: Option<Mrope>,
}

impl CalibSample {
    /// First position and count of the image tokens, if any.
    pub fn vision_span(&self) -> Option<(usize, usize)> {
        let first = self.vision.iter().position(|&v| v)?;
        Some((first, self.vision.iter().filter(|&&v| v).count()))
    }

    pub fn num_vision(&self) -> usize {
        self.vision.iter().filter(|&&v| v).count()
    }

    pub fn num_caption(&self) -> usize {
        self.caption.iter().filter(|&&v| v).count()
    }
}

#[derive(Clone, Debug)]
pub struct CalibSet {
    /// In the seeded shuffle order.
    pub samples: Vec<CalibSample>,
    /// The invalid items met before `n_samples` valid ones were found.
    pub skipped: Vec<CalibItemError>,
    /// Items in the file (valid, invalid and not visited).
    pub total_items: usize,
}

/// The items of a file, parsed lazily (JSONL) or all at once (JSON array).
enum Items<'a> {
    /// (1-based line, text) of every non-blank line.
    Lines(Vec<(usize, &'a str)>),
    Array(Vec<Value>),
}

impl Items<'_> {
    fn len(&self) -> usize {
        match self {
            Items::Lines(l) => l.len(),
            Items::Array(a) => a.len(),
        }
    }

    /// The item's line and its JSON value (or why it has none).
    fn get(&self, i: usize) -> (Option<usize>, std::result::Result<Value, String>) {
        match self {
            Items::Lines(l) => {
                let (line, text) = l[i];
                let v = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"));
                (Some(line), v)
            }
            Items::Array(a) => (None, Ok(a[i].clone())),
        }
    }
}

/// What an item asks for, before rendering.
struct Item {
    id: Option<String>,
    prompt: String,
    answer: String,
    image: Option<String>,
}

/// The item's id as a string (JSON strings as is, numbers written out).
fn item_id(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Removes every `<image>` placeholder and the newline next to it (the one
/// after it, else the one before it), then trims.
fn strip_placeholder(text: &str) -> String {
    let mut out = text.to_string();
    while let Some(at) = out.find(PLACEHOLDER) {
        let end = at + PLACEHOLDER.len();
        let (start, end) = if out[end..].starts_with("\r\n") {
            (at, end + 2)
        } else if out[end..].starts_with('\n') {
            (at, end + 1)
        } else if out[..at].ends_with('\n') {
            (at - 1, end)
        } else {
            (at, end)
        };
        out.replace_range(start..end, "");
    }
    out.trim().to_string()
}

fn parse_item(v: &Value) -> std::result::Result<Item, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "\"image\" must be one path string, found {}",
                short_json(other)
            ))
        }
    };
    let turns = match obj.get("conversations") {
        Some(Value::Array(t)) if !t.is_empty() => t,
        Some(Value::Array(_)) => return Err("\"conversations\" is empty".into()),
        Some(_) => return Err("\"conversations\" is not an array".into()),
        None => return Err("no \"conversations\"".into()),
    };
    let from = |t: &Value| t.get("from").and_then(|f| f.as_str()).map(str::to_string);
    let is_human = |t: &Value| matches!(from(t).as_deref(), Some("human") | Some("user"));
    let is_gpt = |t: &Value| matches!(from(t).as_deref(), Some("gpt") | Some("assistant"));
    let h = turns
        .iter()
        .position(is_human)
        .ok_or("no human turn in \"conversations\"")?;
    let human = turns[h]
        .get("value")
        .and_then(|x| x.as_str())
        .ok_or("the human turn has no \"value\" string")?;
    let g = turns[h + 1..]
        .iter()
        .position(|t| is_human(t) || is_gpt(t))
        .map(|k| h + 1 + k)
        .filter(|&k| is_gpt(&turns[k]))
        .ok_or("no gpt answer after the first human turn")?;
    let answer = turns[g]
        .get("value")
        .and_then(|x| x.as_str())
        .ok_or("the gpt turn has no \"value\" string")?;
    if answer.trim().is_empty() {
        return Err("the gpt answer is empty".into());
    }
    if image.is_none() && human.contains(PLACEHOLDER) {
        return Err(
            "the human turn has an <image> placeholder but the item has no \"image\"".into(),
        );
    }
    let prompt = strip_placeholder(human);
    if prompt.contains(PLACEHOLDER) {
        return Err("more than one <image> placeholder".into());
    }
    Ok(Item {
        id: item_id(v),
        prompt,
        answer: answer.to_string(),
        image,
    })
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// Wraps, tokenizes and labels one item.
fn build_sample<B: Backend>(
    model: &Vlm<B>,
    proc: &Processor,
    tmpl: &ChatTemplate,
    img_cfg: &ImageProcessor,
    item: &Item,
    image_path: Option<PathBuf>,
    fallback_id: String,
) -> std::result::Result<CalibSample, String> {
    // The image: decoded and preprocessed here only to know it works and
    // how many tokens it expands to.
    let (n_img, grids) = match &image_path {
        Some(path) => {
            if !path.is_file() {
                return Err(format!("image not found: {}", path.display()));
            }
            let img = load_image(path).map_err(|e| e.to_string())?;
            let pre = img_cfg
                .preprocess(&img)
                .map_err(|e| format!("image {}: {e}", path.display()))?;
            let at = |e: crate::Error| format!("image {}: {e}", path.display());
            (
                model.num_image_tokens(&pre).map_err(at)?,
                model.mrope_grids(&[&pre]).map_err(at)?,
            )
        }
        None => (0, None),
    };
    let with_image = image_path.is_some();
    let user = user_message(&item.prompt, with_image);
    let prefix = tmpl
        .render(&Value::Array(vec![user.clone()]), true)
        .map_err(|e| e.to_string())?;
    let full = tmpl
        .render(
            &Value::Array(vec![user, assistant_message(&item.answer)]),
            false,
        )
        .map_err(|e| e.to_string())?;
    if !full.starts_with(&prefix) {
        return Err(format!(
            "the chat template renders the conversation ({:?}) not starting with its generation prompt ({:?})",
            full, prefix
        ));
    }
    let ids = proc.encode(&full, n_img).map_err(|e| e.to_string())?;
    let prefix_ids = proc.encode(&prefix, n_img).map_err(|e| e.to_string())?;
    if !ids.starts_with(&prefix_ids) {
        return Err(format!(
            "the tokens of the generation prompt ({} tokens) are not a prefix of the conversation's tokens (the answer merges with the prompt's last token)",
            prefix_ids.len()
        ));
    }
    if ids.len() == prefix_ids.len() {
        return Err("no caption tokens after the generation prompt".into());
    }
    let ctx = model.cfg.text.max_position_embeddings;
    if ids.len() > ctx {
        return Err(format!(
            "{} tokens (after image-token expansion), longer than the model's context {ctx} (max_position_embeddings)",
            ids.len()
        ));
    }
    let tok = model.cfg.image_token_index;
    let vision: Vec<bool> = ids.iter().map(|&t| t == tok).collect();
    let count = vision.iter().filter(|&&v| v).count();
    if count > 0 || n_img > 0 {
        let first = vision.iter().position(|&v| v).unwrap_or(0);
        let contiguous = vision[first..first + count].iter().all(|&v| v);
        if count != n_img || !contiguous || first + count > prefix_ids.len() {
            return Err(format!(
                "the tokenized sample holds {count} image tokens (id {tok}), expected {n_img} in one run inside the prompt{}",
                if n_img > 0 && count == 0 {
                    " (does the chat template have an image slot?)"
                } else {
                    ""
                }
            ));
        }
    }
    let caption = (0..ids.len()).map(|i| i >= prefix_ids.len()).collect();
    let mrope = match grids {
        Some(grids) if count > 0 => {
            let first = vision.iter().position(|&v| v).unwrap_or(0);
            Some(Mrope::new(ids.len(), &[(first, count)], &grids).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    Ok(CalibSample {
        id: item.id.clone().unwrap_or(fallback_id),
        ids,
        vision,
        caption,
        image: image_path,
        mrope,
    })
}

/// Reads a calibration file and returns up to `n_samples` valid samples in
/// a seeded shuffle order, with the invalid items met on the way.
///
/// Image paths are relative to `image_folder`, or to the file's directory
/// when it is None. Errors (naming the file) when the file cannot be read,
/// is neither a JSON array nor JSONL, the model has no chat template, or no
/// item is valid.
pub fn load_calib_set<B: Backend>(
    model: &Vlm<B>,
    proc: &Processor,
    img_cfg: &ImageProcessor,
    file: &Path,
    image_folder: Option<&Path>,
    n_samples: usize,
    seed: u64,
) -> Result<CalibSet> {
    if n_samples == 0 {
        return Err(Error::invalid(
            "the number of calibration samples must be at least 1",
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let items = if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| Error::config(file, format!("not a valid JSON array: {e}")))?;
        Items::Array(v)
    } else {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect();
        if !lines.is_empty()
            && !lines
                .iter()
                .any(|(_, l)| serde_json::from_str::<Value>(l).is_ok())
        {
            return Err(Error::config(
                file,
                "neither a JSON array nor JSONL (no line is a JSON value)",
            ));
        }
        Items::Lines(lines)
    };
    let total_items = items.len();
    if total_items == 0 {
        return Err(Error::config(file, "no calibration items"));
    }
    let tmpl = proc.template.as_ref().ok_or_else(|| {
        Error::invalid(
            "the model has no chat template (looked in chat_template.jinja, chat_template.json, tokenizer_config.json); calibration samples are wrapped in it",
        )
    })?;
    let base = match image_folder {
        Some(d) => d.to_path_buf(),
        None => file.parent().map(Path::to_path_buf).unwrap_or_default(),
    };

    let mut order: Vec<usize> = (0..total_items).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for index in order {
        if samples.len() == n_samples {
            break;
        }
        let (line, value) = items.get(index);
        let fallback_id = match line {
            Some(l) => format!("line{l}"),
            None => format!("item{index}"),
        };
        let id = value.as_ref().ok().and_then(item_id);
        let result = value.and_then(|v| parse_item(&v)).and_then(|item| {
            let path = item.image.as_ref().map(|p| base.join(p));
            build_sample(model, proc, tmpl, img_cfg, &item, path, fallback_id)
        });
        match result {
            Ok(s) => samples.push(s),
            Err(reason) => skipped.push(CalibItemError {
                index,
                line,
                id,
                reason,
            }),
        }
    }
    if samples.is_empty() {
        let first: Vec<String> = skipped.iter().take(3).map(|e| e.to_string()).collect();
        return Err(Error::config(
            file,
            format!(
                "no valid calibration item among {total_items} ({})",
                first.join("; ")
            ),
        ));
    }
    Ok(CalibSet {
        samples,
        skipped,
        total_items,
    })
}

/// The decoder input embeddings `[n, hidden]` of a sample: the token
/// embeddings with the image features in place of the image tokens (as
/// [`crate::generate::prefill`] builds them).
pub fn embed_sample<B: Backend>(
    be: &B,
    model: &Vlm<B>,
    img_cfg: &ImageProcessor,
    s: &CalibSample,
) -> Result<B::Tensor> {
    let mut x = model.text.embed(be, &s.ids)?;
    match (&s.image, s.vision_span()) {
        (Some(path), Some((at, n))) => {
            if !s.vision[at..at + n].iter().all(|&v| v) {
                return Err(Error::invalid(format!(
                    "sample {}: the image-token positions are not one run",
                    s.id
                )));
            }
            let img = load_image(path)?;
            let pre = img_cfg.preprocess(&img)?;
            let feats = model.encode_image(be, &pre)?.features;
            let (rows, _) = be.dims(&feats);
            if rows != n {
                return Err(Error::invalid(format!(
                    "sample {}: the image gives {rows} feature rows for {n} image tokens",
                    s.id
                )));
            }
            be.set_rows(&mut x, at, &feats)?;
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(Error::invalid(format!(
                "sample {}: an image but no image-token positions",
                s.id
            )))
        }
        (None, Some(_)) => {
            return Err(Error::invalid(format!(
                "sample {}: image-token positions but no image",
                s.id
            )))
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::tensor::Tensor;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    struct Fx {
        model: Vlm<Cpu>,
        proc: Processor,
        img_cfg: ImageProcessor,
    }

    fn tiny() -> Fx {
        let dir = root().join("models/tiny-shapes");
        let model = Vlm::load(&Cpu, &dir).unwrap();
        let proc = Processor::load(&dir, model.cfg.image_token_index).unwrap();
        let img_cfg = ImageProcessor::load(&dir).unwrap();
        Fx {
            model,
            proc,
            img_cfg,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mbq-calib-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn images() -> PathBuf {
        root().join("tests/fixtures/shapes_eval")
    }

    fn item(id: &str, image: Option<&str>, human: &str, gpt: &str) -> String {
        let mut v = serde_json::json!({"id": id, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": gpt}]});
        if let Some(i) = image {
            v["image"] = Value::String(i.into());
        }
        v.to_string()
    }

    fn decode(p: &Processor, ids: &[u32]) -> String {
        p.tokenizer.decode(ids, false).unwrap()
    }

    fn masked(ids: &[u32], m: &[bool]) -> Vec<u32> {
        ids.iter()
            .zip(m)
            .filter(|(_, &b)| b)
            .map(|(&t, _)| t)
            .collect()
    }

    #[test]
    fn strip_placeholder_before_or_after() {
        assert_eq!(strip_placeholder("<image>\nWhat is it?"), "What is it?");
        assert_eq!(strip_placeholder("What is it?\n<image>"), "What is it?");
        assert_eq!(strip_placeholder("What <image> is it?"), "What  is it?");
        assert_eq!(strip_placeholder("no image"), "no image");
    }

    #[test]
    fn labels_vision_and_caption_positions() {
        let fx = tiny();
        let dir = temp_dir("labels");
        let file = dir.join("calib.jsonl");
        let lines = [
            item(
                "img",
                Some("images/s1000_000000.png"),
                "<image>\nDescribe the image.",
                "a purple circle",
            ),
            item(
                "after",
                Some("images/s1000_000001.png"),
                "Describe it.\n<image>",
                "two shapes",
            ),
            item(
                "text",
                None,
                "What is a square?",
                "a shape with four equal sides",
            ),
        ];
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let set = load_calib_set(
            &fx.model,
            &fx.proc,
            &fx.img_cfg,
            &file,
            Some(&images()),
            10,
            42,
        )
        .unwrap();
        assert_eq!(set.total_items, 3);
        assert!(set.skipped.is_empty(), "{:?}", set.skipped);
        assert_eq!(set.samples.len(), 3);
        let tok = fx.model.cfg.image_token_index;
        let pre = fx
            .img_cfg
            .preprocess(&image::RgbImage::new(64, 64))
            .unwrap();
        let n_img = fx.model.num_image_tokens(&pre).unwrap();
        for s in &set.samples {
            assert_eq!(s.ids.len(), s.vision.len());
            assert_eq!(s.ids.len(), s.caption.len());
            let answer = match s.id.as_str() {
                "img" => "a purple circle",
                "after" => "two shapes",
                "text" => "a shape with four equal sides",
                other => panic!("unexpected id {other}"),
            };
            // Caption = the answer and the template's end of turn, exactly.
            assert_eq!(
                decode(&fx.proc, &masked(&s.ids, &s.caption)),
                format!("{answer}<|im_end|>\n")
            );
            // The caption is the tail of the sequence.
            let first_cap = s.caption.iter().position(|&c| c).unwrap();
            assert!(s.caption[first_cap..].iter().all(|&c| c));
            // Nothing is both.
            assert!(!s.vision.iter().zip(&s.caption).any(|(&v, &c)| v && c));
            if s.id == "text" {
                assert_eq!(s.num_vision(), 0);
                assert!(s.image.is_none());
                assert!(!s.ids.contains(&tok));
            } else {
                assert_eq!(s.num_vision(), n_img);
                let (at, n) = s.vision_span().unwrap();
                assert_eq!(n, n_img);
                assert!(s.ids[at..at + n].iter().all(|&t| t == tok));
                assert_eq!(s.ids.iter().filter(|&&t| t == tok).count(), n_img);
                assert!(s.image.as_ref().unwrap().is_file());
                // The user text without the placeholder, after the image.
                let text = decode(&fx.proc, &s.ids[at + n..first_cap]);
                assert!(text.starts_with("\nDescribe"), "{text:?}");
                assert!(!text.contains("<image>"));
            }
            // The prompt is the template's generation prompt.
            let prompt = decode(&fx.proc, &s.ids[..first_cap]);
            assert!(prompt.starts_with("<|im_start|>user\n"), "{prompt:?}");
            assert!(
                prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"),
                "{prompt:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_items_are_skipped_with_reasons() {
        let fx = tiny();
        let dir = temp_dir("skips");
        // Images relative to the file's directory (no image folder).
        std::fs::create_dir_all(dir.join("img")).unwrap();
        std::fs::copy(
            images().join("images/s1000_000002.png"),
            dir.join("img/a.png"),
        )
        .unwrap();
        std::fs::write(dir.join("img/broken.png"), b"not a png").unwrap();
        let file = dir.join("calib.jsonl");
        let no_gpt = serde_json::json!({"id": "nogpt", "conversations": [
            {"from": "human", "value": "hello"}]})
        .to_string();
        let empty = serde_json::json!({"id": "empty", "conversations": []}).to_string();
        let lines = [
            item("good", Some("img/a.png"), "<image>\nDescribe.", "a cross"), // line 1
            String::new(),                                                    // blank line 2
            item("missing", Some("img/nope.png"), "<image>\nDescribe.", "x"), // line 3
            "{\"id\": \"bad\", \"conversations\": [".to_string(),             // line 4
            no_gpt,                                                           // line 5
            empty,                                                            // line 6
            item("broken", Some("img/broken.png"), "<image>\nDescribe.", "x"), // line 7
            item("good2", None, "Say hi.", "hi"),                             // line 8
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let set = load_calib_set(&fx.model, &fx.proc, &fx.img_cfg, &file, None, 100, 7).unwrap();
        assert_eq!(set.total_items, 7);
        let mut ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["good", "good2"]);
        assert_eq!(
            set.samples.iter().find(|s| s.id == "good").unwrap().image,
            Some(dir.join("img/a.png"))
        );
        assert_eq!(set.skipped.len(), 5, "{:?}", set.skipped);
        let find = |line: usize| {
            set.skipped
                .iter()
                .find(|e| e.line == Some(line))
                .unwrap_or_else(|| panic!("line {line} not skipped: {:?}", set.skipped))
        };
        let missing = find(3);
        assert_eq!(missing.index, 1);
        assert_eq!(missing.id.as_deref(), Some("missing"));
        assert!(missing.reason.contains("not found"), "{}", missing.reason);
        assert!(
            missing
                .reason
                .contains(&dir.join("img/nope.png").display().to_string()),
            "{}",
            missing.reason
        );
        let bad = find(4);
        assert_eq!(bad.index, 2);
        assert_eq!(bad.id, None);
        assert!(bad.reason.contains("not valid JSON"), "{}", bad.reason);
        let nogpt = find(5);
        assert_eq!(nogpt.id.as_deref(), Some("nogpt"));
        assert!(nogpt.reason.contains("no gpt answer"), "{}", nogpt.reason);
        assert!(find(6).reason.contains("empty"), "{}", find(6).reason);
        let broken = find(7);
        assert!(broken.reason.contains("broken.png"), "{}", broken.reason);
        // The Display form names the item.
        let shown = nogpt.to_string();
        assert!(
            shown.contains("line 5") && shown.contains("nogpt"),
            "{shown}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seeded_order_and_sample_count() {
        let fx = tiny();
        let dir = temp_dir("order");
        let file = dir.join("calib.json");
        // A JSON array this time, half with images.
        let items: Vec<Value> = (0..24)
            .map(|i| {
                let image = (i % 2 == 0).then(|| format!("images/s1000_{:06}.png", i % 10));
                let human = if image.is_some() {
                    format!("<image>\nQuestion {i}?")
                } else {
                    format!("Question {i}?")
                };
                serde_json::from_str(&item(&format!("q{i}"), image.as_deref(), &human, "yes"))
                    .unwrap()
            })
            .collect();
        std::fs::write(&file, serde_json::to_string_pretty(&items).unwrap()).unwrap();
        let load = |n: usize, seed: u64| {
            load_calib_set(
                &fx.model,
                &fx.proc,
                &fx.img_cfg,
                &file,
                Some(&images()),
                n,
                seed,
            )
            .unwrap()
        };
        let order = |s: &CalibSet| s.samples.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        let a = load(24, 1);
        let b = load(24, 1);
        let c = load(24, 2);
        assert_eq!(a.total_items, 24);
        assert!(a.skipped.is_empty());
        assert_eq!(order(&a), order(&b));
        assert_ne!(order(&a), order(&c));
        let mut sorted = order(&c);
        sorted.sort();
        let mut all: Vec<String> = (0..24).map(|i| format!("q{i}")).collect();
        all.sort();
        assert_eq!(sorted, all);
        // Fewer samples: the first ones of the same order.
        let few = load(5, 1);
        assert_eq!(order(&few), order(&a)[..5]);
        // More than there are: all of them.
        assert_eq!(load(1000, 1).samples.len(), 24);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_or_empty_files_are_errors() {
        let fx = tiny();
        let dir = temp_dir("errors");
        let load = |file: &Path| {
            load_calib_set(&fx.model, &fx.proc, &fx.img_cfg, file, None, 4, 0)
                .err()
                .unwrap()
                .to_string()
        };
        let missing = dir.join("nope.jsonl");
        assert!(load(&missing).contains("nope.jsonl"));
        let garbage = dir.join("garbage.txt");
        std::fs::write(&garbage, "hello\nworld\n").unwrap();
        let e = load(&garbage);
        assert!(e.contains("garbage.txt") && e.contains("JSONL"), "{e}");
        let bad_array = dir.join("bad.json");
        std::fs::write(&bad_array, "[{\"id\": 1},").unwrap();
        assert!(load(&bad_array).contains("bad.json"));
        let none_valid = dir.join("none.jsonl");
        std::fs::write(&none_valid, "{\"id\": \"a\"}\n").unwrap();
        let e = load(&none_valid);
        assert!(
            e.contains("none.jsonl") && e.contains("no valid") && e.contains("conversations"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn embed_sample_puts_image_features_in_place() {
        let fx = tiny();
        let dir = temp_dir("embed");
        let file = dir.join("calib.jsonl");
        let lines = [
            item(
                "img",
                Some("images/s1000_000003.png"),
                "<image>\nDescribe.",
                "shapes",
            ),
            item("text", None, "Describe.", "nothing"),
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let set = load_calib_set(
            &fx.model,
            &fx.proc,
            &fx.img_cfg,
            &file,
            Some(&images()),
            2,
            0,
        )
        .unwrap();
        let hidden = fx.model.cfg.text.hidden_size;
        for s in &set.samples {
            let x: Tensor = embed_sample(&Cpu, &fx.model, &fx.img_cfg, s).unwrap();
            assert_eq!(x.shape, vec![s.ids.len(), hidden]);
            let tokens = fx.model.text.embed(&Cpu, &s.ids).unwrap();
            let row = |t: &Tensor, i: usize| t.data[i * hidden..(i + 1) * hidden].to_vec();
            match s.vision_span() {
                Some((at, n)) => {
                    let img = load_image(s.image.as_ref().unwrap()).unwrap();
                    let pre = fx.img_cfg.preprocess(&img).unwrap();
                    let f = fx.model.encode_image(&Cpu, &pre).unwrap().features;
                    assert_eq!(f.rows(), n);
                    assert_eq!(x.data[at * hidden..(at + n) * hidden], f.data[..]);
                    for i in (0..s.ids.len()).filter(|&i| !s.vision[i]) {
                        assert_eq!(row(&x, i), row(&tokens, i));
                    }
                }
                None => assert_eq!(x, tokens),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
