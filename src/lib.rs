//! mbq: modality-balanced quantization for vision-language models, and a
//! runtime that runs them on the CPU, on any GPU through wgpu, and on NVIDIA
//! GPUs through CUDA.
//!
//! Layers, bottom up (a module imports only from layers below it):
//! [`tensor`], [`error`] -> [`weights`] (safetensors, mmap, checkpoint name
//! prefixes) -> [`config`] (HF config.json with transformers' defaults) ->
//! [`quant`] (the packed format and the quantizers; the writer of packed
//! directories) -> [`backend`] (one op interface and its backward ops;
//! [`backend::cpu`] is the reference; [`backend::open`] opens one) ->
//! [`model`] (the network, defined once: vision tower, decoder layer with
//! taps, LLaVA / OneVision composition) -> [`preprocess`], [`anyres`],
//! [`preprocess_qwen`], [`preprocess_internvl`],
//! [`processor`], [`chat_template`] (the HF processor) -> [`generate`]
//! (prefill + decode), [`chat`] (multi-turn sessions reusing the cache) ->
//! [`runtime`], [`eval`], [`bench`], [`calib`]
//! (MBQ / AWQ / SmoothQuant as clients of `model`) -> the binaries.
//! [`synth`] (random-weight checkpoints laid out like real hub models)
//! uses only [`error`] and the writer's temporary-directory helper.

pub mod anyres;
pub mod backend;
pub mod bench;
pub mod calib;
pub mod chat;
pub mod chat_template;
pub mod config;
pub mod config_internvl;
pub mod config_qwen;
pub mod error;
pub mod eval;
pub mod generate;
pub mod image_processor;
pub mod inspect;
pub mod model;
pub mod preprocess;
pub mod preprocess_internvl;
pub mod preprocess_qwen;
pub mod processor;
pub mod progress;
pub mod quant;
pub mod runtime;
pub mod sampling;
pub mod serve;
pub mod shapes;
pub mod store;
pub mod synth;
pub mod tensor;
pub mod verify;
pub mod weights;

pub use error::{Error, Result};
