//! Device timing: on an adapter with `TIMESTAMP_QUERY` (lavapipe has it)
//! the wgpu backend times a GEMV with GPU timestamps; the CPU backend
//! cannot time and says so; `mbq bench gemv` reports which timing it used.
//!
//! One test owns the wgpu backend's timer (timing is backend-wide), so
//! everything that times on the device runs inside it, in order.

mod wgpu_common;

use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::bench;
use mbq::tensor::Tensor;
use wgpu_common::{gpu, random, rng};

#[test]
fn wgpu_times_a_gemv_on_the_device() {
    let g = gpu();
    let period = g.timestamp_period();
    println!("adapter {}; timestamp period {period:?} ns", g.adapter());
    if g.adapter().contains("llvmpipe") {
        assert!(period.is_some(), "lavapipe offers TIMESTAMP_QUERY");
    }
    let Some(period) = period else {
        // Another adapter without timestamps: the wall-clock fallback.
        assert!(!g.begin_timing().unwrap());
        assert_eq!(g.end_timing().unwrap(), None);
        return;
    };
    assert!(period > 0.0);

    // Not timing: nothing to report.
    assert_eq!(g.end_timing().unwrap(), None);
    // Timing nothing: zero.
    assert!(g.begin_timing().unwrap());
    assert_eq!(g.end_timing().unwrap(), Some(0.0));

    let mut r = rng(5);
    let (inp, out) = (1000, 300);
    let w = g.weight(&random(&mut r, out, inp, 0.1)).unwrap();
    let x = g.upload(&random(&mut r, 1, inp, 1.0)).unwrap();
    g.download(&g.linear(&x, &w, None).unwrap()).unwrap(); // compile
    let time = |n: usize| -> f64 {
        assert!(g.begin_timing().unwrap());
        let mut y = None;
        for _ in 0..n {
            y = Some(g.linear(&x, &w, None).unwrap());
        }
        g.download(&y.unwrap()).unwrap();
        g.end_timing().unwrap().expect("timing was started")
    };
    let one = time(1);
    println!("one GEMV {inp}x{out}: {:.1} us on the device", one * 1e6);
    assert!(one > 0.0 && one < 10.0, "{one} s");
    // Many launches, across more than one batch (MAX_BATCH_OPS = 256).
    let many = time(300);
    println!("300 GEMVs: {:.1} us on the device", many * 1e6);
    assert!(many > one, "300 launches ({many} s) vs one ({one} s)");

    // The benchmark uses the timestamps and keeps the wall clock.
    let rows = bench::bench_gemv(g, 256, 128, 3, 3, 0).unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row.timing, "gpu timestamps");
        assert!(row.median_us > 0.0 && row.wall_us > 0.0, "{row:?}");
    }
    assert!(bench::gemv_table("wgpu", &rows).contains("gpu timestamps"));

    // Decode: per-token device span of a tiny synthetic decoder.
    let mut cfg = bench::synthetic_config("llava-1.5-7b").unwrap();
    (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) = (128, 256, 300);
    (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) = (2, 4, 4);
    cfg.head_dim = 32;
    let model = bench::synthetic_text_model(g, &cfg, bench::WeightKind::W4, 3).unwrap();
    let d = bench::bench_decode(g, &model, bench::WeightKind::W4, 4, 3).unwrap();
    println!("{d:?}");
    assert_eq!(d.timing, "gpu timestamps");
    assert!(
        d.ms_per_token > 0.0 && d.device_ms_per_token.is_some_and(|t| t > 0.0),
        "{d:?}"
    );
}

#[test]
fn cpu_backend_has_no_device_timer() {
    let cpu = Cpu;
    assert!(!cpu.begin_timing().unwrap());
    let x = cpu
        .upload(&Tensor::new(vec![1, 4], vec![1.0; 4]).unwrap())
        .unwrap();
    let w = cpu
        .weight(&Tensor::new(vec![2, 4], vec![0.5; 8]).unwrap())
        .unwrap();
    cpu.linear(&x, &w, None).unwrap();
    assert_eq!(cpu.end_timing().unwrap(), None);
    let rows = bench::bench_gemv(&cpu, 256, 128, 2, 2, 0).unwrap();
    assert!(rows.iter().all(|r| r.timing == "wall clock"));
    assert!(bench::gemv_table("cpu", &rows).contains("wall clock"));
    // The speedup is a median of the repetitions' f16/kind ratios: 1 for
    // f16 itself, and between the extreme ratios the spreads allow.
    assert_eq!(rows[0].speedup_vs_f16, 1.0);
    for r in &rows[1..] {
        let (lo, hi) = (rows[0].min_us / r.max_us, rows[0].max_us / r.min_us);
        assert!(lo <= r.speedup_vs_f16 && r.speedup_vs_f16 <= hi, "{r:?}");
    }
}

/// `mbq bench gemv --backend cpu,wgpu`: both backends in one run, one
/// side-by-side table with each backend's copy bandwidth and the fraction
/// of it each GEMV reached; `--json` carries the same numbers.
#[test]
fn bench_prints_backends_side_by_side_with_copy_bandwidth() {
    let _ = gpu(); // fails loudly without an adapter
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "gemv",
            "--backend",
            "cpu,wgpu",
            "--shapes",
            "256x128",
            "--iters",
            "2",
            "--reps",
            "2",
        ];
        args.extend_from_slice(extra);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mbq"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let text = run(&[]);
    let side = text
        .split("device-to-device copy")
        .nth(1)
        .unwrap_or_else(|| panic!("no side-by-side table:\n{text}"));
    let header = side.lines().nth(1).unwrap();
    assert!(
        header.contains("| ") && header.contains("cpu") && header.contains("wgpu"),
        "{side}"
    );
    // The dense row is labelled by what ran when every backend ran the
    // same (f16 on both: the CPU reads f16 as stored), else "dense".
    for kind in ["f16", "w3g128", "w4g128"] {
        let row = side
            .lines()
            .find(|l| l.contains("256x128") && l.contains(kind))
            .unwrap_or_else(|| panic!("no {kind} row:\n{side}"));
        assert_eq!(row.matches('%').count(), 2, "{row}");
    }
    let j: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let all = j["backends"].as_array().unwrap();
    assert_eq!(all.len(), 2);
    for b in all {
        let gb = b["copy"]["gb_s"].as_f64().unwrap();
        assert!(gb.is_finite() && gb > 0.0, "{b}");
        assert_eq!(b["gemv"].as_array().unwrap().len(), 3);
    }
}

/// The weight bytes a decode step reads, by hand for a small config.
#[test]
fn decode_weight_bytes_by_hand() {
    let mut cfg = bench::synthetic_config("llava-1.5-7b").unwrap();
    cfg.num_hidden_layers = 2;
    // Llama-7B: hidden 4096, 32 heads x 128, no GQA, intermediate 11008,
    // vocab 32064 (llava-1.5).
    let (h, im, v) = (4096.0, 11008.0, cfg.vocab_size as f64);
    let per_layer = 4.0 * h * h + 3.0 * h * im;
    let dense = bench::decode_weight_bytes(&cfg, bench::WeightKind::F16, 2.0);
    assert_eq!(dense, 2.0 * per_layer * 2.0 + v * h * 2.0);
    let w3 = bench::decode_weight_bytes(&cfg, bench::WeightKind::W3, 2.0);
    assert_eq!(w3, 2.0 * per_layer * 3.25 / 8.0 + v * h * 2.0);
}
