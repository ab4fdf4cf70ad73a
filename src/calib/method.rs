//! The vocabulary of calibration: which method, how it quantizes, how it
//! weighs the tokens, and what each method needs (docs/MBQ.md).

use serde::{Deserialize, Serialize};

use super::group::Group;

/// A quantization method (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round to nearest (the MBQ reference quantizer, no calibration).
    Rtn,
    /// Modality-balanced quantization: scale search weighted by the
    /// measured vision/caption sensitivity.
    Mbq,
    /// AWQ: the same scale search with every token alike.
    Awq,
    /// SmoothQuant (alpha 0.5), W4A8 only.
    Smoothquant,
}

/// Where a method's per-channel scales come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scales {
    /// No scales (RTN).
    None,
    /// The grid search over alpha (MBQ, AWQ).
    Search,
    /// SmoothQuant's closed form.
    Fixed,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Mbq => "mbq",
            Method::Awq => "awq",
            Method::Smoothquant => "smoothquant",
        }
    }

    pub fn scales(self) -> Scales {
        match self {
            Method::Rtn => Scales::None,
            Method::Mbq | Method::Awq => Scales::Search,
            Method::Smoothquant => Scales::Fixed,
        }
    }

    /// Whether it needs a calibration set (`--calib`).
    pub fn needs_calibration(self) -> bool {
        self.scales() != Scales::None
    }

    /// Whether it needs the sensitivity pass (the gradient of the caption
    /// loss through the language model).
    pub fn needs_sensitivity(self) -> bool {
        self == Method::Mbq
    }

    /// Whether it only makes sense with quantized activations (W4A8).
    pub fn needs_act_quant(self) -> bool {
        self == Method::Smoothquant
    }

    /// How the search weighs the tokens of `group`, given the layer's
    /// (attention, MLP) vision/caption ratios (MBQ's only).
    pub fn weighting(self, group: Group, ratios: Option<(f64, f64)>) -> Weighting {
        match (self, ratios) {
            (Method::Mbq, Some((attn, mlp))) => Weighting::Modality {
                ratio: if group.is_attention() { attn } else { mlp },
            },
            _ => Weighting::Plain,
        }
    }

    /// The groups it scales in a layer; `attn_out` only where the layer
    /// allows it (v and o of one shape).
    pub fn groups(self, attn_out: bool) -> Vec<Group> {
        match self.scales() {
            Scales::None => Vec::new(),
            Scales::Fixed => vec![Group::AttnIn, Group::MlpIn],
            Scales::Search => Group::ALL
                .into_iter()
                .filter(|g| *g != Group::AttnOut || attn_out)
                .collect(),
        }
    }
}

/// The search's reconstruction loss (`--loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LossKind {
    /// Mean absolute error (the official configs).
    Mae,
    /// Mean squared error.
    Mse,
}

impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Mae => "mae",
            LossKind::Mse => "mse",
        }
    }
}

/// How the linears are quantized inside the search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    /// Group-wise asymmetric weights (the MBQ reference quantizer).
    Weight { bits: u32, group_size: usize },
    /// Per-output-channel symmetric INT4 weights, per-token INT8 activations.
    W4A8,
}

/// How the reconstruction error of the tokens is weighted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weighting {
    /// AWQ: every token alike.
    Plain,
    /// MBQ: caption tokens weight 1, vision tokens `ratio`, others 0.
    Modality { ratio: f64 },
}
