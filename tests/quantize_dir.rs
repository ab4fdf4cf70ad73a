//! `quant::writer::quantize_rtn_dir` on model directories of every shape it
//! meets: sharded input, extra files and folders, a weight that cannot be
//! quantized (the temporary directory goes), an output inside the input;
//! and the loader's format-version check on what it wrote.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{copy_dir, fixtures, scratch};
use mbq::backend::cpu::Cpu;
use mbq::model::Vlm;
use mbq::quant::format::{MBQ_WEIGHTS_FILE, META_FORMAT};
use mbq::quant::writer::{quantize_rtn_dir, Progress};
use mbq::weights::WeightFiles;
use safetensors::tensor::TensorView;

fn model() -> std::path::PathBuf {
    fixtures().join("models/llava_qwen128")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes `tensors` of `w` (all when None) to `path` with `meta`, with
/// `patch` applied to the bytes of the named tensors.
fn rewrite(
    w: &WeightFiles,
    names: &[&str],
    meta: HashMap<String, String>,
    path: &Path,
    patch: &HashMap<&str, Vec<u8>>,
) {
    let views: Vec<(String, TensorView)> = names
        .iter()
        .map(|n| {
            let (d, shape, bytes) = w.raw(n).unwrap();
            let bytes = patch.get(n).map(|b| b.as_slice()).unwrap_or(bytes);
            (
                n.to_string(),
                TensorView::new(d, shape.to_vec(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn pt_meta() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

#[test]
fn sharded_input_gives_the_same_single_file_and_progress_is_reported() {
    let dir = scratch("quantize-sharded");
    let single_out = dir.join("from_single");
    let mut events = Vec::new();
    let r = quantize_rtn_dir(&model(), &single_out, 4, 64, |p| {
        events.push(match p {
            Progress::Start { linears } => format!("start {linears}"),
            Progress::Packed { done, total, .. } => format!("{done}/{total}"),
            Progress::Writing => "writing".into(),
            Progress::Note(n) => format!("note {n}"),
        })
    })
    .unwrap();
    let expected: Vec<String> = std::iter::once("start 14".to_string())
        .chain((1..=14).map(|k| format!("{k}/14")))
        .chain(std::iter::once("writing".to_string()))
        .collect();
    assert_eq!(events, expected);
    assert_eq!(r.packed.len(), 14);
    assert_eq!(r.bits_per_weight(), 4.5, "W4 g64: 4 + 32 / 64");

    // The same model in two shards with an index.
    let sharded = dir.join("sharded");
    copy_dir(&model(), &sharded);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let w = WeightFiles::open(&model()).unwrap();
    let mut names: Vec<&str> = w.names().collect();
    names.sort_unstable();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        rewrite(&w, part, pt_meta(), &sharded.join(file), &HashMap::new());
        for n in part {
            map.insert(n.to_string(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded_out = dir.join("from_sharded");
    quantize_rtn_dir(&sharded, &sharded_out, 4, 64, |_| {}).unwrap();
    assert_eq!(
        entries(&sharded_out),
        entries(&single_out),
        "no shard or index copied"
    );
    assert_eq!(
        std::fs::read(sharded_out.join(MBQ_WEIGHTS_FILE)).unwrap(),
        std::fs::read(single_out.join(MBQ_WEIGHTS_FILE)).unwrap()
    );
}

#[test]
fn extra_folders_are_copied_and_other_weight_formats_are_not() {
    let dir = scratch("quantize-extra");
    let input = dir.join("in");
    copy_dir(&model(), &input);
    std::fs::create_dir(input.join("extra")).unwrap();
    std::fs::write(input.join("extra/notes.txt"), "kept").unwrap();
    std::fs::write(input.join("pytorch_model.bin"), "unquantized weights").unwrap();
    let out = dir.join("out");
    let r = quantize_rtn_dir(&input, &out, 8, 32, |_| {}).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("extra/notes.txt")).unwrap(),
        "kept"
    );
    assert!(!out.join("pytorch_model.bin").exists());
    assert_eq!(
        r.skipped_files,
        vec![Path::new("pytorch_model.bin").to_path_buf()]
    );
    assert!(r.copied_files.iter().any(|f| f == Path::new("config.json")));
}

#[test]
fn unquantizable_weight_removes_the_temporary_directory() {
    let dir = scratch("quantize-nonfinite");
    let input = dir.join("in");
    copy_dir(&model(), &input);
    let w = WeightFiles::open(&model()).unwrap();
    let names: Vec<&str> = w.names().collect();
    // Layer 1's down_proj gets an inf. Linears are packed as the output file
    // is written, in name order: it is the 8th, after the temp dir exists
    // and 7 linears are written into it.
    let bad = "language_model.model.layers.1.mlp.down_proj.weight";
    let mut bytes = w.raw(bad).unwrap().2.to_vec();
    bytes[10..12].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    let patch = HashMap::from([(bad, bytes)]);
    std::fs::remove_file(input.join("model.safetensors")).unwrap();
    rewrite(
        &w,
        &names,
        pt_meta(),
        &input.join("model.safetensors"),
        &patch,
    );
    let out = dir.join("out");
    let mut packed = 0;
    let e = quantize_rtn_dir(&input, &out, 3, 128, |p| {
        if let Progress::Packed { .. } = p {
            packed += 1
        }
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        packed, 7,
        "the error came after the temp dir was made and 7 linears were written"
    );
    assert!(
        e.contains(bad) && e.contains("inf") && e.contains("[0, 5]"),
        "{e}"
    );
    assert_eq!(entries(&dir), vec!["in".to_string()], "no OUT, no temp dir");
}

#[test]
fn output_inside_the_input_is_refused() {
    let dir = scratch("quantize-inside");
    let input = dir.join("in");
    copy_dir(&model(), &input);
    let before = entries(&input);
    let e = quantize_rtn_dir(&input, &input.join("q"), 4, 128, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside the input"), "{e}");
    assert_eq!(entries(&input), before);
}

#[test]
fn loader_rejects_an_unknown_or_missing_format_version() {
    let dir = scratch("quantize-version");
    let out = dir.join("q");
    quantize_rtn_dir(&model(), &out, 3, 128, |_| {}).unwrap();
    assert!(Vlm::load(&Cpu, &out).is_ok(), "version 1 loads");
    let w = WeightFiles::open(&out).unwrap();
    let names: Vec<&str> = w.names().collect();
    for (version, expect) in [
        (Some("2"), "\"2\" is not supported"),
        (Some("1.3"), ""),
        (None, "no"),
    ] {
        let d = dir.join(format!("v{}", version.unwrap_or("none")));
        copy_dir(&out, &d);
        let mut meta = w.metadata.clone();
        match version {
            Some(v) => meta.insert(META_FORMAT.to_string(), v.to_string()),
            None => meta.remove(META_FORMAT),
        };
        rewrite(&w, &names, meta, &d.join(MBQ_WEIGHTS_FILE), &HashMap::new());
        match Vlm::load(&Cpu, &d) {
            Ok(_) => assert!(expect.is_empty(), "version {version:?} must be rejected"),
            Err(e) => {
                let m = e.to_string();
                assert!(
                    !expect.is_empty(),
                    "version {version:?} (minor) must load: {m}"
                );
                assert!(
                    m.contains(META_FORMAT) || m.contains("format version"),
                    "{m}"
                );
                assert!(m.contains(expect) && m.contains(MBQ_WEIGHTS_FILE), "{m}");
            }
        }
    }
}
