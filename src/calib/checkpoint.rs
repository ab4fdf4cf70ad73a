//! The calibration checkpoint, `.<OUT>.calib-checkpoint/` beside OUT:
//! `state.json` (settings, sensitivity, reports, the number of finished
//! layers) is replaced atomically after `layer-<i>.safetensors` (the
//! scaled f32 weights of layer i) is in place. `--resume` restores the
//! finished layers and goes on; the output is bit-identical to an
//! uninterrupted run's.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::group::HostLayer;
use super::report::LayerReport;
use super::sensitivity::LayerGrad;
use crate::error::{Error, Result};
use crate::quant::safetensors_out::{self, OutTensor};
use crate::weights::WeightFiles;

/// The checkpoint's contents.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub settings: Map<String, Value>,
    pub sample_ids: Vec<String>,
    /// Per layer, the mean |grad| over the calibration set (MBQ).
    pub grads: Option<Vec<LayerGrad>>,
    pub layers_done: usize,
    pub layers: Vec<LayerReport>,
    pub layer_seconds: Vec<f64>,
    pub sensitivity_seconds: f64,
    /// Where each stage ran and how long it took (the report's `stages`).
    #[serde(default)]
    pub stages: Vec<StageRecord>,
}

/// One stage of a calibration: its name (`embed`, `sensitivity`,
/// `search`), the device it ran on as the backend describes it, and its
/// wall-clock seconds (over every run of a resumed calibration).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub device: String,
    pub seconds: f64,
}

impl State {
    /// Records `stage` (replacing an earlier record of it).
    pub fn record_stage(&mut self, stage: &str, device: &str, seconds: f64) {
        self.stages.retain(|s| s.stage != stage);
        self.stages.push(StageRecord {
            stage: stage.into(),
            device: device.into(),
            seconds,
        });
    }
}

impl State {
    pub fn new(settings: Map<String, Value>, sample_ids: Vec<String>) -> Self {
        State {
            settings,
            sample_ids,
            grads: None,
            layers_done: 0,
            layers: Vec::new(),
            layer_seconds: Vec::new(),
            sensitivity_seconds: 0.0,
            stages: Vec::new(),
        }
    }
}

/// The checkpoint folder of output `out`.
pub fn dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.calib-checkpoint"))
}

/// What differs between two settings maps, for the resume error.
pub fn diff_settings(a: &Map<String, Value>, b: &Map<String, Value>) -> String {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} there, {} now", b.get(k).unwrap_or(&Value::Null)))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn layer_file(ckpt: &Path, i: usize) -> PathBuf {
    ckpt.join(format!("layer-{i}.safetensors"))
}

/// Writes `path` through a temporary file, an fsync and a rename.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves layer `i`'s (scaled) weights as `model.layers.<i>.*` in f32.
pub fn save_layer(ckpt: &Path, layer: &HostLayer, i: usize) -> Result<()> {
    fs::create_dir_all(ckpt).map_err(|e| Error::io(ckpt, e))?;
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = layer
        .host_tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                format!("model.layers.{i}.{name}"),
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let tensors = owned
        .iter()
        .map(|(n, s, b)| OutTensor {
            name: n.clone(),
            dtype: safetensors::tensor::Dtype::F32,
            shape: s.clone(),
            data: b.into(),
        })
        .collect();
    write_atomic(&layer_file(ckpt, i), |p| {
        safetensors_out::write(p, &BTreeMap::new(), tensors).map(|_| ())
    })
}

/// Replaces layer `i`'s weights by the checkpoint's.
pub fn restore_layer(ckpt: &Path, layer: &mut HostLayer, i: usize) -> Result<()> {
    let w = WeightFiles::open_file(&layer_file(ckpt, i))?;
    let get = |leaf: &str| w.get_any(&format!("model.layers.{i}.{leaf}"));
    layer.input_layernorm = get("input_layernorm.weight")?;
    layer.post_attention_layernorm = get("post_attention_layernorm.weight")?;
    for (name, lin) in crate::weights::DECODER_LINEARS
        .iter()
        .zip(layer.linears_mut())
    {
        lin.w = get(&format!("{name}.weight"))?;
        if lin.b.is_some() {
            lin.b = Some(get(&format!("{name}.bias"))?);
        }
    }
    Ok(())
}

pub fn write_state(ckpt: &Path, st: &State) -> Result<()> {
    fs::create_dir_all(ckpt).map_err(|e| Error::io(ckpt, e))?;
    let text = serde_json::to_string(st).map_err(|e| Error::invalid(e.to_string()))?;
    let path = ckpt.join("state.json");
    write_atomic(&path, |p| fs::write(p, text).map_err(|e| Error::io(p, e)))
}

pub fn read_state(ckpt: &Path) -> Result<State> {
    let path = ckpt.join("state.json");
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("not a calibration checkpoint: {e}")))
}
