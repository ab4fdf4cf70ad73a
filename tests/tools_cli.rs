//! The `mbq` tools as a user runs them: `quantize` progress in a log file
//! (stderr not a terminal), `inspect` of a bundled model (text and
//! `--json`), and `bench gemv` on the CPU at tiny shapes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{calib_shapes, fixtures, scratch, tiny_shapes};

fn mbq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
}

/// `mbq quantize --method awq` with stderr (and stdout) going to one file:
/// plain progress lines for every stage, written while the run goes (seen
/// in the file before the process exits, and before the final summary).
#[test]
fn quantize_progress_is_written_to_a_log_file_while_it_runs() {
    let dir = scratch("tools_cli_progress");
    let out = dir.join("out");
    let log_path = dir.join("quantize.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = mbq()
        .args([
            "quantize",
            "--method",
            "awq",
            "--w-bit",
            "3",
            "--n-samples",
            "4",
        ])
        .arg("--calib")
        .arg(calib_shapes())
        .arg("--image-folder")
        .arg(fixtures().join("calib_shapes"))
        .arg("--model")
        .arg(tiny_shapes())
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("failed to start mbq");
    // Poll the log while the process runs: a layer's progress line must be
    // there before it exits.
    let t0 = Instant::now();
    let mut seen_while_running = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        seen_while_running |= text.contains("layer 1/4 scale search");
        assert!(t0.elapsed() < Duration::from_secs(600), "quantize hangs");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "mbq quantize failed:\n{text}");
    assert!(
        seen_while_running,
        "no progress line in the log before the run ended:\n{text}"
    );
    // No indicatif escape sequences in a file.
    assert!(
        !text.contains('\u{1b}'),
        "terminal escapes in the log:\n{text}"
    );
    let line_of = |needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in the log:\n{text}"))
    };
    let summary = line_of("awq packed 28 linears");
    let mut last = 0;
    for stage in [
        "encoding calibration images: 4/4 samples",
        "layer 1/4 scale search:",
        "layer 2/4 scale search:",
        "layer 3/4 scale search:",
        "layer 4/4 scale search: 60/60 grid points (100%), done in",
        "packing: 28/28 linears",
    ] {
        let at = line_of(stage);
        assert!(
            at >= last && at < summary,
            "{stage:?} out of order (line {at}, summary {summary}):\n{text}"
        );
        last = at;
    }
    // Each progress line has a timestamp since the start, non-decreasing.
    let stamps: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix('[')?.split_once(" s]"))
        .map(|(t, _)| t.trim().parse::<f64>().unwrap())
        .collect();
    assert!(stamps.len() >= 10, "too few timestamped lines:\n{text}");
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_names_the_bundled_w3_model_and_its_quantization() {
    let o = mbq().args(["inspect", "tiny-shapes-w3"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "mbq inspect failed: {stderr}");
    assert!(stderr.contains("bundled model tiny-shapes-w3"), "{stderr}");
    for want in [
        "architecture  LlavaForConditionalGeneration",
        "vision        siglip: 3 layers, hidden 128",
        "text          qwen2: 4 layers, hidden 128, intermediate 384, 4 heads (2 kv",
        "vocab 448",
        "quantization  mbq W3 g128 (format v1)",
        "packed      28 linears in 4 layers (0-3)",
        "q_proj 4",
        "U32 28 tensors",
        "calibration   mbq on cpu, 128 samples",
        "layer 3",
        "attn_in",
        "model.mbq.safetensors",
        "total",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("VlmConfig"), "a debug dump:\n{stdout}");

    // The unquantized model says so.
    let o = mbq().arg("inspect").arg(tiny_shapes()).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(stdout.contains("quantization  none"), "{stdout}");
    assert!(!stdout.contains("calibration "), "{stdout}");
}

#[test]
fn inspect_json_is_one_object_with_the_same_facts() {
    let o = mbq()
        .args(["inspect", "tiny-shapes-w3", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for key in [
        "path",
        "architecture",
        "model_type",
        "vision",
        "text",
        "weights",
        "quantization",
        "calibration",
        "files",
        "total_bytes",
    ] {
        assert!(j.get(key).is_some(), "no {key:?} in {j}");
    }
    assert_eq!(j["text"]["layers"], 4);
    assert_eq!(j["text"]["kv_heads"], 2);
    assert_eq!(j["vision"]["kind"], "siglip");
    let q = &j["quantization"];
    assert_eq!(q["method"], "mbq");
    assert_eq!(q["bits"], 3);
    assert_eq!(q["group_size"], 128);
    assert!(q["act_bits"].is_null());
    assert_eq!(q["packed"], 28);
    assert_eq!(q["packed_by_kind"]["down_proj"], 4);
    assert_eq!(j["weights"]["language_model"]["U32"]["tensors"], 28);
    let c = &j["calibration"];
    assert_eq!(c["method"], "mbq");
    assert_eq!(c["samples"], 128);
    assert_eq!(c["layers"].as_array().unwrap().len(), 4);
    assert!(c["layers"][0]["alphas"]["attn_in"].is_number());
    let files = j["files"].as_array().unwrap();
    let sum: u64 = files.iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
    assert_eq!(j["total_bytes"].as_u64().unwrap(), sum);
    assert!(files.iter().any(|f| f["name"] == "model.mbq.safetensors"));
}

#[test]
fn inspect_of_a_missing_model_is_an_error_not_a_panic() {
    let o = mbq()
        .args(["inspect", "/nonexistent/model/dir"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `mbq bench gemv` on the CPU at tiny shapes: min / median / max of the
/// repetitions, the machine and commit in the header, f16 (as stored, no
/// longer an f32 copy) for the CPU's dense weights, and the cache note
/// (tiny weights always fit).
#[test]
fn bench_gemv_reports_spread_machine_and_labels() {
    let args = [
        "bench",
        "gemv",
        "--backend",
        "cpu",
        "--shapes",
        "256x128",
        "--iters",
        "2",
        "--reps",
        "3",
        "--rotate-mib",
        "1",
    ];
    let o = mbq().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "(commit ",
        " UTC; machine: ",
        " cores",
        "min (us)",
        "median",
        "max",
        "     f16 ",
        "w3g128",
        "w4g128",
        "cpu: ",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains(" f32 "),
        "the CPU's dense GEMV reads f16 as stored:\n{stdout}"
    );
    if mbq::bench::l3_bytes().is_some() {
        assert!(stdout.contains("L3 cache"), "no cache note:\n{stdout}");
    }

    let o = mbq().args(args).arg("--json").output().unwrap();
    assert!(o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for key in ["commit", "date", "machine", "backends"] {
        assert!(j.get(key).is_some(), "no {key:?} in {j}");
    }
    assert!(j["machine"]["cores"].as_u64().unwrap() >= 1);
    let b = &j["backends"][0];
    assert_eq!(b["backend"], "cpu");
    assert!(b["device"].as_str().unwrap().contains("cores"));
    let r = &b["gemv"][0];
    assert_eq!(r["weights"], "f16");
    let (min, med, max) = (
        r["min_us"].as_f64().unwrap(),
        r["median_us"].as_f64().unwrap(),
        r["max_us"].as_f64().unwrap(),
    );
    assert!(min <= med && med <= max, "{r}");
}

/// `mbq bench gemv` refuses shapes it cannot bench (not IN x OUT, a zero
/// side, IN not a multiple of the packed kinds' group of 128) and zero
/// `--iters` / `--reps`; `mbq bench decode` an unknown synthetic model,
/// `--layers` outside its depth (or without `--synthetic`), zero
/// `--prompt` / `--tokens` and neither `--model` nor `--synthetic`: each
/// with an error naming the option and the value, before any backend is
/// opened.
#[test]
fn bench_rejects_bad_options_before_any_backend() {
    let cases: [(&[&str], &str); 11] = [
        (&["gemv", "--shapes", "256x128,3584x"], "\"3584x\""),
        (&["gemv", "--shapes", "0x128"], "zero"),
        (&["gemv", "--shapes", "256x0"], "zero"),
        (&["gemv", "--shapes", "100x128"], "multiple of 128"),
        (&["gemv", "--iters", "0"], "--iters"),
        (&["gemv", "--reps", "0"], "--reps"),
        (&["decode", "--synthetic", "llava-9b"], "\"llava-9b\""),
        (
            &["decode", "--synthetic", "llava-ov-7b", "--layers", "0"],
            "--layers 0",
        ),
        (
            &["decode", "--synthetic", "llava-ov-7b", "--tokens", "0"],
            "--tokens",
        ),
        (
            &["decode", "--synthetic", "llava-ov-7b", "--prompt", "0"],
            "--prompt",
        ),
        (&["decode"], "--model DIR or --synthetic NAME"),
    ];
    for (args, want) in cases {
        let o = mbq()
            .arg("bench")
            .args(args)
            .args(["--backend", "cpu"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("device-to-device copy"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // `--layers` cuts a synthetic model only: with `--model` it is an
    // error, not silently ignored.
    let o = mbq()
        .args(["bench", "decode", "--backend", "cpu", "--layers", "2"])
        .arg("--model")
        .arg(fixtures().join("models/llava_qwen128"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("device-to-device copy"), "{stderr}");
    assert!(
        stderr.contains("--layers") && stderr.contains("--synthetic"),
        "{stderr}"
    );
}

/// `mbq bench decode --weights` runs the kinds named, in their order (a
/// model directory's W4 made by RTN in a temporary directory); the "vs
/// dense" ratio is against the f16 row wherever it stands, and `-` without
/// one. A kind it does not know is an error naming the option, before any
/// backend is opened.
#[test]
fn bench_decode_runs_the_weight_kinds_named() {
    let model = fixtures().join("models/llava_qwen128");
    let run = |weights: &str| {
        let o = mbq()
            .args([
                "bench",
                "decode",
                "--backend",
                "cpu",
                "--prompt",
                "2",
                "--tokens",
                "2",
            ])
            .arg("--model")
            .arg(&model)
            .args(["--weights", weights, "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        j["backends"][0]["decode"].as_array().unwrap().clone()
    };
    let rows = run("w4,f16");
    let labels: Vec<&str> = rows
        .iter()
        .map(|r| r["weights"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["w4g128", "f16"]);
    let (w4, f16) = (&rows[0], &rows[1]);
    let want = f16["ms_per_token"].as_f64().unwrap() / w4["ms_per_token"].as_f64().unwrap();
    assert!(
        (w4["speedup_vs_f16"].as_f64().unwrap() - want).abs() < 1e-9,
        "{w4}"
    );
    assert_eq!(f16["speedup_vs_f16"].as_f64().unwrap(), 1.0);

    let rows = run("w3");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["weights"], "w3g128");
    assert!(
        rows[0]["speedup_vs_f16"].is_null(),
        "no dense row: {}",
        rows[0]
    );

    let o = mbq()
        .args(["bench", "decode", "--backend", "cpu", "--weights", "f16,w5"])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--weights") && stderr.contains("\"w5\""),
        "{stderr}"
    );
    assert!(!stderr.contains("device-to-device copy"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
