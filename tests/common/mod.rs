//! Shared helpers for the integration tests: the committed golden fixtures
//! made by tests/fixtures/make_fixtures.py (HF transformers on the CPU).
#![allow(dead_code)]

pub mod reports;

use std::path::{Path, PathBuf};

use mbq::tensor::Tensor;
use mbq::weights::WeightFiles;
use safetensors::tensor::Dtype;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The bundled FP16 model, models/tiny-shapes.
pub fn tiny_shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes")
}

/// The committed calibration set (`mbq shapes --seed 2000`).
pub fn calib_shapes() -> PathBuf {
    fixtures().join("calib_shapes/questions.jsonl")
}

/// `mbq quantize` of tiny-shapes on `n_samples` of the committed
/// calibration set (group 128, seed 42, MAE, the CPU) into `out`.
pub fn calib_options(
    method: mbq::calib::Method,
    w_bit: u32,
    a_bit: Option<u32>,
    n_samples: usize,
    out: PathBuf,
) -> mbq::calib::QuantizeOptions {
    mbq::calib::QuantizeOptions {
        method,
        w_bit,
        a_bit,
        group_size: 128,
        calib: Some(calib_shapes()),
        image_folder: Some(fixtures().join("calib_shapes")),
        n_samples,
        seed: 42,
        loss: mbq::calib::LossKind::Mae,
        model: tiny_shapes(),
        out,
        backend: mbq::backend::BackendKind::Cpu,
        resume: false,
        stop_after_layer: None,
        search_chunk_tokens: 8192,
        feature_dtype: mbq::calib::kept::FeatureDtype::Auto,
    }
}

/// One golden case: its case.json and golden.safetensors.
pub struct Case {
    pub name: String,
    pub model: PathBuf,
    /// `None` for a text-only case.
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub rendered_prompt: String,
    pub max_new_tokens: usize,
    pub golden: WeightFiles,
}

impl Case {
    pub fn f32(&self, name: &str) -> Tensor {
        self.golden
            .get_any(name)
            .unwrap_or_else(|e| panic!("{}: golden tensor {name}: {e}", self.name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.golden.contains(name)
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let (dtype, _, bytes) = self
            .golden
            .raw(name)
            .unwrap_or_else(|e| panic!("{}: golden tensor {name}: {e}", self.name));
        assert_eq!(dtype, Dtype::I64, "{}: {name} should be int64", self.name);
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Every case under tests/fixtures/cases, sorted by name. Panics (fails the
/// test) when there are none: a missing fixture must not pass silently.
pub fn cases() -> Vec<Case> {
    let dir = fixtures().join("cases");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no golden cases in {}", dir.display());
    names.into_iter().map(|n| load_case(&n)).collect()
}

pub fn load_case(name: &str) -> Case {
    let dir = fixtures().join("cases").join(name);
    let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = |k: &str| {
        j[k].as_str()
            .unwrap_or_else(|| panic!("{name}: case.json lacks {k}"))
            .to_string()
    };
    Case {
        name: name.to_string(),
        model: fixtures().join(s("model")),
        image: j["image"].as_str().map(|i| fixtures().join(i)),
        prompt: s("prompt"),
        rendered_prompt: s("rendered_prompt"),
        max_new_tokens: j["max_new_tokens"].as_u64().unwrap_or(12) as usize,
        golden: WeightFiles::open_file(&dir.join("golden.safetensors")).unwrap(),
    }
}

// A test crate may load this through several helper modules (common,
// wgpu_common / cuda_common, backend_ops): harmless copies of free functions.
#[allow(clippy::duplicate_mod)]
#[path = "../op_check/mod.rs"]
mod op_check;
/// max |a - b| / max |b|, the error relative to the reference's scale.
#[allow(unused_imports)]
pub use op_check::rel_err;

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A scratch directory under the target dir, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a directory (flat: model directories have no subfolders).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
