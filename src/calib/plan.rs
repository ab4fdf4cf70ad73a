//! What `mbq quantize` is asked to do ([`QuantizeOptions`]), checked once
//! into a [`Plan`]: the quantizer, and the settings that key the report
//! and the checkpoint.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::kept::FeatureDtype;
use super::method::{LossKind, Method, QuantKind};
use super::search::GRID;
use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::quant::format::{PackedLinear, META_ACT_BITS};
use crate::quant::w4a8::quantize_linear_w4_per_channel;
use crate::quant::writer::{check_bits_group, quantize_rows};

/// Everything `mbq quantize` is asked to do.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub method: Method,
    pub w_bit: u32,
    /// `Some(8)`: W4A8 (per-channel INT4 weights, per-token INT8 activations).
    pub a_bit: Option<u32>,
    pub group_size: usize,
    pub calib: Option<PathBuf>,
    pub image_folder: Option<PathBuf>,
    pub n_samples: usize,
    pub seed: u64,
    pub loss: LossKind,
    pub model: PathBuf,
    pub out: PathBuf,
    /// Where the scale search runs (`auto` resolves as `mbq-run` does).
    pub backend: BackendKind,
    pub resume: bool,
    /// Testing aid: stop with [`Error::Invalid`] right after layer `k`'s
    /// checkpoint, as a kill would.
    pub stop_after_layer: Option<usize>,
    /// The scale search makes its FP features for at most this many
    /// calibration tokens at a time (whole samples): it bounds the search's
    /// memory (at 7B about 150 KB a token in f32); the result does not
    /// depend on it.
    pub search_chunk_tokens: usize,
    /// How the samples' layer inputs and the search's features are kept
    /// between steps (f16 halves their memory; `auto`: f16 for an f16
    /// model).
    pub feature_dtype: FeatureDtype,
}

/// The checked options.
#[derive(Clone, Debug)]
pub struct Plan {
    /// How the output's linears are quantized (and the search's quantizer).
    pub quant: QuantKind,
    /// `--w-bit` and `--group-size` as given (recorded in the output).
    pub bits: u32,
    pub group_size: usize,
    /// The calibration file, for methods that need one.
    pub calib: Option<PathBuf>,
}

impl Plan {
    /// Checks the options' combination: bits and group size, W4A8's
    /// constraints, what each method needs.
    pub fn new(o: &QuantizeOptions) -> Result<Plan> {
        match o.a_bit {
            None => check_bits_group(o.w_bit, o.group_size)?,
            Some(8) => {
                if o.w_bit != 4 {
                    return Err(Error::invalid(format!(
                        "--a-bit 8 needs --w-bit 4 (W4A8), got --w-bit {}",
                        o.w_bit
                    )));
                }
                check_bits_group(4, o.group_size)?;
            }
            Some(a) => {
                return Err(Error::invalid(format!(
                    "--a-bit {a}: only 8 (W4A8) is supported"
                )))
            }
        }
        let quant = match o.a_bit {
            Some(_) => QuantKind::W4A8,
            None => QuantKind::Weight {
                bits: o.w_bit,
                group_size: o.group_size,
            },
        };
        if !o.method.needs_calibration() {
            return Ok(Plan {
                quant,
                bits: o.w_bit,
                group_size: o.group_size,
                calib: None,
            });
        }
        if o.method.needs_act_quant() && o.a_bit.is_none() {
            return Err(Error::invalid(format!(
                "--method {} is a weight-activation method: give --w-bit 4 --a-bit 8",
                o.method.name()
            )));
        }
        if o.w_bit == 8 && o.a_bit.is_none() {
            return Err(Error::invalid(format!(
                "--method {}: --w-bit 3 or 4 (8-bit weights need no search; use rtn)",
                o.method.name()
            )));
        }
        if o.search_chunk_tokens == 0 {
            return Err(Error::invalid(
                "--search-chunk-tokens 0: give at least 1 (calibration tokens per feature chunk)",
            ));
        }
        let Some(calib) = o.calib.clone() else {
            return Err(Error::invalid(format!(
                "--method {} needs --calib FILE (LLaVA JSON/JSONL) and usually --image-folder DIR",
                o.method.name()
            )));
        };
        Ok(Plan {
            quant,
            bits: o.w_bit,
            group_size: o.group_size,
            calib: Some(calib),
        })
    }

    /// Packs one linear of the output (the writer's quantizer).
    pub fn pack(&self, name: &str, w: &[f32], out: usize, inp: usize) -> Result<PackedLinear> {
        match self.quant {
            QuantKind::W4A8 => quantize_linear_w4_per_channel(name, w, out, inp, self.group_size),
            QuantKind::Weight { bits, group_size } => {
                quantize_rows(name, w, out, inp, bits, group_size)
            }
        }
    }

    /// Metadata the output's safetensors carry beyond the packed format's.
    pub fn extra_meta(&self) -> Vec<(String, String)> {
        match self.quant {
            QuantKind::W4A8 => vec![(META_ACT_BITS.to_string(), "8".to_string())],
            QuantKind::Weight { .. } => Vec::new(),
        }
    }
}

/// The run's settings, as the report's top level and the checkpoint's key.
pub fn settings(
    o: &QuantizeOptions,
    n: usize,
    calib: &Path,
    backend: BackendKind,
) -> Map<String, Value> {
    let abs = |p: &Path| {
        p.canonicalize()
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let mut m = Map::new();
    m.insert("method".into(), json!(o.method.name()));
    m.insert("w_bit".into(), json!(o.w_bit));
    m.insert("a_bit".into(), json!(o.a_bit));
    m.insert(
        "group_size".into(),
        if o.a_bit.is_some() {
            json!("per-channel")
        } else {
            json!(o.group_size)
        },
    );
    m.insert("loss".into(), json!(o.loss.name()));
    m.insert("grid".into(), json!(GRID));
    m.insert("n_samples".into(), json!(n));
    m.insert("seed".into(), json!(o.seed));
    m.insert("model".into(), json!(abs(&o.model)));
    m.insert("calib".into(), json!(abs(calib)));
    m.insert(
        "image_folder".into(),
        json!(o.image_folder.as_deref().map(abs)),
    );
    let backend = match backend {
        BackendKind::Wgpu => "wgpu",
        BackendKind::Cuda => "cuda",
        _ => "cpu",
    };
    m.insert("backend".into(), json!(backend));
    // Where MBQ's gradient pass ran: the same backend as the search.
    m.insert(
        "sensitivity_backend".into(),
        json!(o.method.needs_sensitivity().then_some(backend)),
    );
    m.insert("mbq_version".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}
