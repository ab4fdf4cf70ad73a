//! Tensors and checkpoints made by the formats' own packers
//! (tests/fixtures/interop/, made by make_interop_fixtures.py with
//! gptqmodel 7.7 and compressed-tensors 0.20.1) load into the packed format
//! exactly (GPTQ, AWQ, compressed-tensors), and the GPTQ and AWQ
//! checkpoints run in mbq-run on the CPU and on wgpu with transformers'
//! greedy ids on the dequantized weights.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures;
use half::f16;
use mbq::quant::compressed::CtStrategy;
use mbq::quant::format::PackedLinear;
use mbq::quant::gptq::GptqZeros;
use mbq::quant::import::{foreign_format, read_foreign, Foreign};
use mbq::quant::writer::quantize_rows;
use mbq::weights::WeightFiles;

fn layouts() -> (WeightFiles, serde_json::Value) {
    let dir = fixtures().join("interop");
    let w = WeightFiles::open_file(&dir.join("layouts.safetensors")).unwrap();
    let j =
        serde_json::from_str(&std::fs::read_to_string(dir.join("layouts.json")).unwrap()).unwrap();
    (w, j)
}

fn bytes(w: &WeightFiles, name: &str) -> Vec<u8> {
    w.raw(name).unwrap().2.to_vec()
}

fn f16s(w: &WeightFiles, name: &str) -> Vec<f16> {
    bytes(w, name)
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Every code, zero and scale of `p` equals the case's `q`, `z`, `s`.
fn assert_same_integers(p: &PackedLinear, w: &WeightFiles, case: &str, what: &str) {
    let (q, z, s) = (
        bytes(w, &format!("{case}.q")),
        bytes(w, &format!("{case}.z")),
        f16s(w, &format!("{case}.s")),
    );
    let groups = p.groups();
    for r in 0..p.out {
        for g in 0..groups {
            let codes = p.group_codes(r, g);
            let want = &q[r * p.inp + g * p.group_size..r * p.inp + (g + 1) * p.group_size];
            assert_eq!(codes, want, "{case} {what}: codes of row {r}, group {g}");
            let (sc, zr) = (
                p.scales_zeros[(r * groups + g) * 2],
                p.scales_zeros[(r * groups + g) * 2 + 1],
            );
            assert_eq!(
                zr.to_f32(),
                z[r * groups + g] as f32,
                "{case} {what}: zero of row {r}, group {g}"
            );
            assert_eq!(
                sc.to_bits(),
                s[r * groups + g].to_bits(),
                "{case} {what}: scale of row {r}, group {g}"
            );
        }
    }
}

#[test]
fn reference_packed_tensors_repack_to_the_same_integers() {
    let (w, j) = layouts();
    let mut checked = Vec::new();
    for (case, c) in j["cases"].as_object().unwrap() {
        let (bits, group) = (
            c["bits"].as_u64().unwrap() as u32,
            c["group_size"].as_u64().unwrap() as usize,
        );
        let (out, inp) = (
            c["out"].as_u64().unwrap() as usize,
            c["in"].as_u64().unwrap() as usize,
        );
        for packer in c["packers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
        {
            let foreign = match packer {
                "gptq" => Foreign::Gptq {
                    bits,
                    group_size: group,
                    zeros: GptqZeros::V1,
                },
                "awq" => Foreign::Awq { group_size: group },
                "ct" => Foreign::Compressed {
                    bits,
                    strategy: CtStrategy::Group(group),
                    symmetric: c["sym"].as_bool().unwrap(),
                    act_bits: None,
                },
                _ => continue,
            };
            let p = read_foreign(&w.pp(format!("{case}.{packer}")), &foreign, out, inp).unwrap();
            assert_eq!((p.bits, p.group_size), (bits, group));
            assert_same_integers(&p, &w, case, packer);
            checked.push(format!("{case}.{packer}"));
        }
    }
    // GPTQ at 3, 4 and 8 bits, AWQ at 4, compressed-tensors at all; zero 0
    // is among the asymmetric cases.
    assert_eq!(checked.len(), 22, "{checked:?}");
    let z = bytes(&w, "b4g128.z");
    assert!(z.contains(&0) && z.contains(&15));
}

const CHECKPOINTS: [(&str, &str); 3] = [
    ("llava_qwen128_gptq_w4g128", "llava_qwen128_w4g128_odd2"),
    ("llava_qwen128_gptq_w3g128", "llava_qwen128_w3g128_odd2"),
    ("llava_qwen128_awq_w4g128", "llava_qwen128_w4g128_odd2"),
];

/// The checkpoints hold the MBQ reference's RTN integers: each repacked
/// linear is bit for bit what `mbq quantize --method rtn` packs from the
/// dense model (whose outputs tests/quantize.rs checks against
/// transformers' logits).
#[test]
fn checkpoints_load_as_mbq_rtn_packs_them() {
    let dense = WeightFiles::open(&fixtures().join("models/llava_qwen128")).unwrap();
    for (name, _) in CHECKPOINTS {
        let w = WeightFiles::open(&fixtures().join("interop").join(name)).unwrap();
        let foreign = foreign_format(w.quantization_config.as_ref())
            .unwrap()
            .unwrap();
        let mut n = 0;
        for dn in dense.names() {
            let Some(p) = dn
                .strip_suffix(".weight")
                .filter(|p| w.contains(&format!("{p}.qweight")))
            else {
                continue;
            };
            let t = dense.get_any(dn).unwrap();
            let (out, inp) = (t.shape[0], t.shape[1]);
            let ours =
                quantize_rows(p, &t.data, out, inp, foreign.bits(), foreign.group_size()).unwrap();
            let (got, act_bits) = mbq::quant::import::read_linear(&w.pp(p), out, inp).unwrap();
            assert_eq!(act_bits, None);
            assert_eq!(got, ours, "{name}: {p}");
            n += 1;
        }
        assert_eq!(n, 14, "{name}: 2 layers x 7 linears");
    }
}

fn run(model: &Path, case: &serde_json::Value, backend: &str) -> Vec<i64> {
    let o = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args(["--model", &model.to_string_lossy()])
        .args([
            "--image",
            &fixtures()
                .join(case["image"].as_str().unwrap())
                .to_string_lossy(),
        ])
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .args([
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            "12",
            "--backend",
            backend,
        ])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}: {err}", model.display());
    let line = String::from_utf8_lossy(&o.stdout);
    let j: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

#[test]
fn gptq_and_awq_checkpoints_give_transformers_greedy_ids_on_cpu_and_wgpu() {
    for (name, golden) in CHECKPOINTS {
        let gdir = fixtures().join("quant").join(golden);
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(gdir.join("case.json")).unwrap())
                .unwrap();
        let g = WeightFiles::open_file(&gdir.join("golden.safetensors")).unwrap();
        let want: Vec<i64> = bytes(&g, "greedy_ids")
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(want.len(), 12);
        let model = fixtures().join("interop").join(name);
        for backend in ["cpu", "wgpu"] {
            assert_eq!(run(&model, &case, backend), want, "{name} on {backend}");
        }
    }
}

#[test]
fn unsupported_checkpoints_are_clear_errors() {
    let tmp = common::scratch("import-bad");
    let src = fixtures().join("interop/llava_qwen128_gptq_w4g128");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "bits2",
            serde_json::json!({"quant_method": "gptq", "bits": 2, "group_size": 128}),
            "\"bits\"",
        ),
        (
            "perchannel",
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": -1}),
            "group_size",
        ),
        (
            "marlin",
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}),
            "marlin",
        ),
        ("hqq", serde_json::json!({"quant_method": "hqq"}), "hqq"),
    ];
    for (label, qc, needle) in cases {
        let dir = tmp.join(label);
        common::copy_dir(&src, &dir);
        let mut c = cfg.clone();
        c["quantization_config"] = qc;
        std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        let w = WeightFiles::open(&dir).unwrap();
        let e = foreign_format(w.quantization_config.as_ref())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains(needle),
            "{label}: {e}"
        );
        let o = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
            .args([
                "--model",
                &dir.to_string_lossy(),
                "--prompt",
                "hi",
                "--backend",
                "cpu",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(needle) && !stderr.contains("panicked"),
            "{label}: {stderr}"
        );
    }
    // Act-order: a g_idx that is not i / group_size is refused, naming the tensor.
    let dir = tmp.join("actorder");
    common::copy_dir(&src, &dir);
    let w = WeightFiles::open(&dir).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    let names: Vec<String> = w.names().map(str::to_string).collect();
    for n in &names {
        let (dtype, shape, data) = w.raw(n).unwrap();
        let mut data = data.to_vec();
        if n == "language_model.model.layers.0.self_attn.q_proj.g_idx" {
            data[..4].copy_from_slice(&1i32.to_le_bytes());
        }
        tensors.insert(n.clone(), (dtype, shape.to_vec(), data));
    }
    drop(w);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args([
            "--model",
            &dir.to_string_lossy(),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("q_proj.g_idx") && stderr.contains("act-order"),
        "{stderr}"
    );
}

fn mbq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(args)
        .output()
        .unwrap()
}

/// `mbq quantize` on a GPTQ / AWQ checkpoint repacks it into mbq's own
/// directory, bit for bit, and refuses to re-quantize or calibrate it.
#[test]
fn quantize_repacks_checkpoints_as_they_are() {
    let tmp = common::scratch("import-repack");
    for (name, _) in CHECKPOINTS {
        let src = fixtures().join("interop").join(name);
        let bits = if name.contains("w3") { "3" } else { "4" };
        let out = tmp.join(name);
        let o = mbq(&[
            "quantize",
            "--model",
            &src.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
            "--w-bit",
            bits,
        ]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout.contains("checkpoint repacked"), "{stdout}");
        assert!(
            !out.join("quantize_config.json").exists()
                && out.join("model.mbq.safetensors").is_file()
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["quantization_config"]["quant_method"], "mbq", "{name}");
        let (sw, ow) = (
            WeightFiles::open(&src).unwrap(),
            WeightFiles::open(&out).unwrap(),
        );
        let method = if name.contains("awq") { "awq" } else { "gptq" };
        assert_eq!(ow.metadata["mbq.method"], method);
        let list: Vec<String> = serde_json::from_str(&ow.metadata["mbq.packed"]).unwrap();
        assert_eq!(list.len(), 14);
        for p in &list {
            let (q, _, _) = ow.raw(&format!("{p}.qweight")).unwrap();
            assert_eq!(q, safetensors::Dtype::U32);
            let (out_f, inp) = {
                let (_, s, _) = ow.raw(&format!("{p}.scales_zeros")).unwrap();
                (s[0], s[1] * 128)
            };
            let (theirs, _) = mbq::quant::import::read_linear(&sw.pp(p), out_f, inp).unwrap();
            let (ours, _) = mbq::quant::import::read_linear(&ow.pp(p), out_f, inp).unwrap();
            assert_eq!(ours, theirs, "{name}: {p}");
            // Nothing of the source's layout is left, the bias is kept.
            assert!(!ow.contains(&format!("{p}.qzeros")) && !ow.contains(&format!("{p}.g_idx")));
            if p.contains("q_proj") {
                assert_eq!(
                    ow.raw(&format!("{p}.bias")).unwrap(),
                    sw.raw(&format!("{p}.bias")).unwrap()
                );
            }
        }
    }
    // Other bits, or a calibrated method: refused, naming what works.
    let src = fixtures().join("interop/llava_qwen128_gptq_w4g128");
    for args in [
        vec!["--w-bit", "3"],
        vec!["--w-bit", "4", "--group-size", "64"],
        vec!["--w-bit", "4", "--method", "mbq", "--calib", "x.jsonl"],
    ] {
        let out = tmp.join("refused");
        let mut a = vec![
            "quantize",
            "--model",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(args.iter().copied());
        let o = mbq(&a);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && e.contains("GPTQ checkpoint")
                && e.contains("--w-bit 4 --group-size 128"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("panicked") && !out.exists(), "{e}");
    }
}
