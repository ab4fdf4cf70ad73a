//! `mbq quantize` end to end with calibration: every method at W3 g128 and
//! W4A8 on the bundled tiny-shapes model and the committed calibration set
//! (tests/fixtures/calib_shapes, `mbq shapes --seed 2000`); the outputs run
//! on the CPU and on wgpu with the same greedy ids; the report and picture
//! are written; an interrupted run resumes to the same bytes.

mod common;
mod wgpu_common;

use std::path::{Path, PathBuf};

use common::{calib_options, calib_shapes, scratch, tiny_shapes};
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::calib::search::GRID;
use mbq::calib::{quantize_model, Method, QuantizeOptions};
use mbq::generate::{generate, GenerateOptions};
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;
use serde_json::Value;
use wgpu_common::gpu;

/// Greedy tokens compared between backends.
const GREEDY_TOKENS: usize = 8;
/// Calibration samples per run (the test set has 42).
const N_SAMPLES: usize = 10;

fn options(method: Method, w_bit: u32, a_bit: Option<u32>, out: PathBuf) -> QuantizeOptions {
    calib_options(method, w_bit, a_bit, N_SAMPLES, out)
}

fn greedy<B: Backend>(be: &B, dir: &Path) -> Vec<u32> {
    let model = Vlm::load(be, dir).unwrap();
    let proc = Processor::load(dir, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(dir).unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/s1000_000000.png");
    let pre = preprocess(&img_cfg, &load_image(&image).unwrap()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: GREEDY_TOKENS,
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    generate(
        be,
        &model,
        &proc,
        "Describe the image.",
        Some(&pre),
        &opts,
        |_| {},
    )
    .unwrap()
    .tokens
}

fn report(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("calibration_report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_method_quantizes_and_runs_on_cpu_and_wgpu() {
    let tmp = scratch("calibrate_methods");
    let runs = [
        (Method::Rtn, 3, None),
        (Method::Awq, 3, None),
        (Method::Mbq, 3, None),
        (Method::Rtn, 4, Some(8)),
        (Method::Smoothquant, 4, Some(8)),
        (Method::Mbq, 4, Some(8)),
    ];
    let layers = 4;
    for (method, w_bit, a_bit) in runs {
        let name = format!("{}-w{w_bit}a{}", method.name(), a_bit.unwrap_or(16));
        let out = tmp.join(&name);
        let got = quantize_model(&options(method, w_bit, a_bit, out.clone()), |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.written.packed.len(), 7 * layers, "{name}");
        let meta = &mbq::weights::WeightFiles::open(&out).unwrap().metadata;
        assert_eq!(meta["mbq.method"], method.name(), "{name}");
        assert_eq!(
            meta.get("mbq.act_bits").map(String::as_str),
            a_bit.map(|_| "8"),
            "{name}"
        );

        if method == Method::Rtn {
            assert!(!out.join("calibration_report.json").exists(), "{name}");
        } else {
            let r = report(&out);
            assert_eq!(r["method"], method.name(), "{name}");
            assert_eq!(r["n_samples"], N_SAMPLES, "{name}");
            let svg = std::fs::read_to_string(out.join("calibration_report.svg")).unwrap();
            assert!(
                svg.starts_with("<svg") || svg.starts_with("<?xml"),
                "{name}"
            );
            let ls = r["layers"].as_array().unwrap();
            assert_eq!(ls.len(), layers, "{name}");
            for (i, l) in ls.iter().enumerate() {
                assert_eq!(l["index"], i, "{name}");
                let groups = l["groups"].as_array().unwrap();
                let names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
                // tiny-shapes uses GQA (4 heads, 2 kv heads): no attn_out.
                let want: &[&str] = if method == Method::Smoothquant {
                    &["attn_in", "mlp_in"]
                } else {
                    &["attn_in", "mlp_in", "mlp_out"]
                };
                assert_eq!(names, want, "{name} layer {i}");
                for g in groups {
                    let losses: Vec<f64> = g["losses"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap())
                        .collect();
                    let loss = g["loss"].as_f64().unwrap();
                    if method == Method::Smoothquant {
                        assert_eq!(g["alpha"], 0.5);
                        assert_eq!(losses, vec![loss]);
                    } else {
                        assert_eq!(losses.len(), GRID, "{name}");
                        let k = losses
                            .iter()
                            .position(|&v| v == loss)
                            .expect("the loss is a grid point's");
                        assert_eq!(g["alpha"].as_f64().unwrap(), k as f64 / GRID as f64);
                        assert!(losses.iter().all(|&v| v >= loss));
                    }
                }
                if method == Method::Mbq {
                    let (grad, ratio) = (&l["grad"], &l["ratio"]);
                    for part in ["attn", "mlp"] {
                        let v = grad[part]["vision"].as_f64().unwrap();
                        let c = grad[part]["caption"].as_f64().unwrap();
                        assert!(c > 0.0 && v >= 0.0, "{name} layer {i} {part}");
                        // The clamp only raises the raw ratio.
                        assert!(ratio[part].as_f64().unwrap() >= v / c, "{name}");
                    }
                } else {
                    assert!(l.get("grad").is_none() && l.get("ratio").is_none());
                }
            }
        }

        let cpu = greedy(&Cpu, &out);
        let gpu_ids = greedy(gpu(), &out);
        assert_eq!(cpu, gpu_ids, "{name}: greedy ids CPU vs wgpu");
    }
}

#[test]
fn an_interrupted_calibration_resumes_to_the_same_output() {
    let tmp = scratch("calibrate_resume");
    let whole = tmp.join("whole");
    quantize_model(&options(Method::Mbq, 3, None, whole.clone()), |_| {}).unwrap();

    let parts = tmp.join("parts");
    let mut o = options(Method::Mbq, 3, None, parts.clone());
    o.stop_after_layer = Some(1);
    let e = quantize_model(&o, |_| {})
        .err()
        .expect("stops after layer 1");
    assert!(e.to_string().contains("stopped after layer 1"), "{e}");
    assert!(!parts.exists(), "no output before the run ends");
    let ckpt = tmp.join(".parts.calib-checkpoint");
    assert!(ckpt.join("state.json").is_file());

    // Without --resume the checkpoint is neither used nor discarded.
    o.stop_after_layer = None;
    let e = quantize_model(&o, |_| {}).err().expect("needs --resume");
    assert!(e.to_string().contains("--resume"), "{e}");
    assert!(ckpt.join("state.json").is_file());

    // Other settings: refused, naming the difference.
    let mut other = o.clone();
    other.resume = true;
    other.seed = 7;
    let e = quantize_model(&other, |_| {})
        .err()
        .expect("settings differ");
    assert!(e.to_string().contains("seed"), "{e}");

    o.resume = true;
    let mut notes = Vec::new();
    quantize_model(&o, |p| {
        if let mbq::calib::CalibProgress::Note(n) = p {
            notes.push(n)
        }
    })
    .unwrap();
    assert!(
        notes.iter().any(|n| n.contains("2 of 4 layers done")),
        "{notes:?}"
    );
    assert!(!ckpt.exists(), "the checkpoint is removed at the end");
    let a = std::fs::read(whole.join("model.mbq.safetensors")).unwrap();
    let b = std::fs::read(parts.join("model.mbq.safetensors")).unwrap();
    assert!(a == b, "resumed output differs from the uninterrupted one");
    assert_eq!(report(&whole)["layers"], report(&parts)["layers"]);
}

#[test]
fn bad_calibration_options_are_clear_errors() {
    let tmp = scratch("calibrate_errors");
    let err = |o: QuantizeOptions| quantize_model(&o, |_| {}).err().unwrap().to_string();
    let mut o = options(Method::Mbq, 3, None, tmp.join("a"));
    o.calib = None;
    assert!(err(o).contains("--calib"));
    let e = err(options(Method::Smoothquant, 4, None, tmp.join("b")));
    assert!(e.contains("--a-bit 8"), "{e}");
    let e = err(options(Method::Mbq, 3, Some(8), tmp.join("c")));
    assert!(e.contains("--w-bit 4"), "{e}");
    let mut o = options(Method::Awq, 3, None, tmp.join("d"));
    o.calib = Some(tmp.join("missing.jsonl"));
    let e = err(o);
    assert!(e.contains("missing.jsonl"), "{e}");
    // An existing output is refused before any work, and left alone.
    std::fs::create_dir_all(tmp.join("e")).unwrap();
    std::fs::write(tmp.join("e/keep"), b"mine").unwrap();
    let e = err(options(Method::Mbq, 3, None, tmp.join("e")));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(tmp.join("e/keep")).unwrap(), b"mine");
    for d in ["a", "b", "c", "d"] {
        assert!(!tmp.join(d).exists(), "{d}");
    }
}

/// The CLI as a user runs it: `mbq quantize --method mbq` killed (SIGKILL)
/// after its first layer checkpoint, then `--resume`: the same bytes as an
/// uninterrupted CLI run.
#[test]
fn a_killed_cli_calibration_resumes_to_the_same_output() {
    use std::process::{Command, Stdio};
    let tmp = scratch("calibrate_kill");
    let mbq = env!("CARGO_BIN_EXE_mbq");
    let calib = calib_shapes();
    let model = tiny_shapes();
    let cmd = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(mbq);
        c.args([
            "quantize",
            "--method",
            "mbq",
            "--w-bit",
            "3",
            "--n-samples",
            "42",
        ])
        .arg("--calib")
        .arg(&calib)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(out)
        .args(extra);
        c
    };
    let whole = tmp.join("whole");
    let r = cmd(&whole, &[]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let parts = tmp.join("parts");
    let state = tmp.join(".parts.calib-checkpoint/state.json");
    let mut child = cmd(&parts, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["layers_done"].as_u64())
            .unwrap_or(0);
        if done >= 1 {
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the run ended ({s}) before its first checkpoint could be seen");
        }
        assert!(
            t0.elapsed().as_secs() < 600,
            "no checkpoint after 10 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before the end");
    assert!(!parts.exists(), "a killed run leaves no output");

    let r = cmd(&parts, &["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let a = std::fs::read(whole.join("model.mbq.safetensors")).unwrap();
    let b = std::fs::read(parts.join("model.mbq.safetensors")).unwrap();
    assert!(a == b, "resumed output differs from the uninterrupted one");
    // The stdout summary names the chosen alphas per layer.
    let r = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(r.contains("layer 3:") && r.contains("attn_in alpha"), "{r}");
}
