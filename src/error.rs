//! The library's error type: every variant says what went wrong and where
//! (file, tensor, option), with the expected and the found value when there
//! is one. Binaries wrap it in `anyhow`; the library never panics on input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written. The OS error is
    /// part of the message and not also a `source` (anyhow's `{:#}` would
    /// print it twice).
    #[error("{path}: {}", io_message(err))]
    Io { path: PathBuf, err: std::io::Error },

    /// A file that must exist is not there.
    #[error("{path}: not found ({what})")]
    Missing { path: PathBuf, what: String },

    /// A JSON config (config.json, preprocessor_config.json, ...) is malformed
    /// or holds a value we cannot use.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// `model_type` / `architectures` names a model this crate cannot run.
    #[error("{path}: unsupported {what} \"{found}\"; supported: {supported}")]
    Unsupported {
        path: PathBuf,
        what: String,
        found: String,
        supported: String,
    },

    /// A safetensors file is truncated, corrupt or of an unknown dtype.
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    /// A tensor the model needs is absent from every weight file.
    #[error("tensor \"{name}\" not found in {path}")]
    MissingTensor { name: String, path: PathBuf },

    /// A tensor has the wrong shape.
    #[error("tensor \"{name}\": expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer ({path}): {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// The chat template could not be found, parsed or rendered.
    #[error("chat template ({path}): {msg}")]
    Template { path: PathBuf, msg: String },

    /// An image file could not be decoded.
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },

    /// The request is inconsistent with the model (too long a prompt, an image
    /// with no image slot, a bad option value, ...).
    #[error("{0}")]
    Invalid(String),

    /// The prompt does not fit the model's context.
    #[error("the prompt is {tokens} tokens (after image-token expansion), the model's context is {context} (max_position_embeddings in config.json)")]
    ContextLength { tokens: usize, context: usize },

    /// A backend is not compiled in or has no device.
    #[error("backend {backend}: {msg}")]
    Backend { backend: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// `path` exists but is not what was expected (a directory where a
    /// file should be, or the reverse); `None` when it does not exist or
    /// is of the `want_dir` kind.
    pub fn wrong_kind(path: &std::path::Path, want_dir: bool, expected: &str) -> Option<Self> {
        let md = std::fs::metadata(path).ok()?;
        let what = if md.is_dir() {
            if want_dir {
                return None;
            }
            "a directory"
        } else if md.is_file() {
            if !want_dir {
                return None;
            }
            "a file"
        } else {
            "neither a file nor a directory"
        };
        Some(Error::Config {
            path: path.to_path_buf(),
            msg: format!("is {what}; expected {expected}"),
        })
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// The OS error in words, without Rust's " (os error N)" suffix.
pub fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
