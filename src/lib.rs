//! mbq: modality-balanced quantization for vision-language models, and a
//! runtime that runs them on the CPU and (in later modules) on any GPU.
//!
//! Layers, bottom up: [`tensor`] and [`weights`] (safetensors, mmap) ->
//! [`config`] (HF config.json with transformers' defaults) -> [`backend`]
//! (one op interface; [`backend::cpu`] is the reference) -> [`model`]
//! (vision tower, decoder, LLaVA / OneVision composition) -> [`preprocess`],
//! [`anyres`], [`processor`], [`chat_template`] (the HF processor) ->
//! [`generate`] (prefill + decode).

pub mod anyres;
pub mod backend;
pub mod bench;
pub mod calib;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod model;
pub mod preprocess;
pub mod processor;
pub mod quant;
pub mod runtime;
pub mod shapes;
pub mod tensor;
pub mod weights;

pub use error::{Error, Result};
