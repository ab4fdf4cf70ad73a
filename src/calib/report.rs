//! The calibration report: what the sensitivity pass measured and what the
//! scale search chose, per decoder layer, as JSON (for tools); the SVG chart
//! for a person is drawn by [`super::report_svg`].
//!
//! JSON shape: the settings (method, w_bit, a_bit, model, ...) at the top
//! level, then `"layers": [{"index", "grad": {"attn": {"vision",
//! "caption"}, "mlp": {...}}, "ratio": {"attn", "mlp"}, "groups": [{"name",
//! "alpha", "loss", "losses"}]}]`. `grad` and `ratio` are absent for methods
//! without a sensitivity pass (awq, rtn, smoothquant).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use super::sensitivity::{LayerGrad, ModalityGrad};

/// The vision/caption weight of the loss (after the median clamp).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ratio {
    pub attn: f64,
    pub mlp: f64,
}

/// One searched group of a layer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GroupReport {
    /// attn_in, attn_out, mlp_in or mlp_out.
    pub name: String,
    /// The chosen alpha.
    pub alpha: f64,
    /// The loss at the chosen alpha.
    pub loss: f64,
    /// The loss at every alpha of the grid.
    pub losses: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerReport {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad: Option<LayerGrad>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ratio: Option<Ratio>,
    pub groups: Vec<GroupReport>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CalibReport {
    /// Written at the top level of the JSON object (must not hold "layers").
    #[serde(flatten)]
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub layers: Vec<LayerReport>,
}

/// Writes the report as pretty-printed JSON.
pub fn write_json(r: &CalibReport, path: &Path) -> Result<()> {
    let mut text = serde_json::to_string_pretty(r)
        .map_err(|e| Error::invalid(format!("calibration report: {e}")))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Reads a report written by [`write_json`].
pub fn read_json(path: &Path) -> Result<CalibReport> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("not a calibration report: {e}")))
}
