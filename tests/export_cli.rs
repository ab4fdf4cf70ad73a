//! `mbq export` as a user runs it: a fixture quantized by `mbq quantize`
//! (rtn W4 g128, W3 g128, W4A8) exported to GPTQ and compressed-tensors.
//! The output directories carry every other file unchanged, hold the
//! format's tensors (names, dtypes, shapes) and quantization_config, decode
//! back to the source's packed linears bit for bit, and every other tensor
//! is copied byte for byte. W4A8 to GPTQ, an existing --out and an
//! unquantized model are refused with messages that say why.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixtures, scratch};
use half::f16;
use mbq::quant::compressed::{compressed_to_packed, CompressedTensors, CtStrategy};
use mbq::quant::format::{read_packed, MBQ_WEIGHTS_FILE, META_PACKED};
use mbq::quant::gptq::{gptq_to_packed, GptqTensors, GptqZeros};
use mbq::weights::WeightFiles;
use safetensors::tensor::Dtype;

fn mbq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Files (relative path -> bytes) of a directory tree.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = PathBuf::from(p.file_name().unwrap());
        if p.is_dir() {
            for (k, v) in snapshot(&p) {
                m.insert(rel.join(k), v);
            }
        } else {
            m.insert(rel, std::fs::read(&p).unwrap());
        }
    }
    m
}

fn quantized(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let model = fixtures().join("models/llava_qwen128");
    let mut args = vec![
        "quantize",
        "--method",
        "rtn",
        "--group-size",
        "128",
        "--model",
    ];
    let (m, o) = (s(&model), s(&out));
    args.push(&m);
    args.push("--out");
    args.push(&o);
    args.extend_from_slice(extra);
    ok(&mbq(&args), name);
    out
}

fn export(src: &Path, out: &Path, format: &str) -> Output {
    mbq(&[
        "export",
        "--format",
        format,
        "--model",
        &s(src),
        "--out",
        &s(out),
    ])
}

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f16s(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Checks the export `out` of the mbq model `src`: files, config, tensors,
/// and that every linear decodes back to the source's packed linear.
fn check_export(src: &Path, out: &Path, format: &str, bits: u32, act: bool) {
    let before = snapshot(src);
    let got = snapshot(out);
    for (f, bytes) in &before {
        let name = f.to_string_lossy();
        if name == MBQ_WEIGHTS_FILE || name == "config.json" {
            continue;
        }
        assert_eq!(got.get(f), Some(bytes), "{format}: {name} not carried over");
    }
    assert!(!got.contains_key(Path::new(MBQ_WEIGHTS_FILE)));
    assert!(got.contains_key(Path::new("model.safetensors")));

    // config.json: the source's, with the format's quantization_config.
    let cfg_of = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    let mut cfg = cfg_of(&got[Path::new("config.json")]);
    let q = cfg
        .as_object_mut()
        .unwrap()
        .remove("quantization_config")
        .unwrap();
    let mut src_cfg = cfg_of(&before[Path::new("config.json")]);
    src_cfg
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    assert_eq!(cfg, src_cfg, "{format}: config.json otherwise unchanged");
    match format {
        "gptq" => {
            assert_eq!(q["quant_method"], "gptq");
            assert_eq!(q["bits"], bits);
            assert_eq!(q["group_size"], 128);
            assert_eq!(q["desc_act"], false);
            assert_eq!(q["sym"], false);
            assert_eq!(q["checkpoint_format"], "gptq");
            let qc = cfg_of(&got[Path::new("quantize_config.json")]);
            assert_eq!(qc["bits"], bits);
            assert_eq!(qc["checkpoint_format"], "gptq");
        }
        _ => {
            assert_eq!(q["quant_method"], "compressed-tensors");
            assert_eq!(q["format"], "pack-quantized");
            let g = &q["config_groups"]["group_0"];
            assert_eq!(g["weights"]["num_bits"], bits);
            if act {
                assert_eq!(g["weights"]["strategy"], "channel");
                assert_eq!(g["weights"]["symmetric"], true);
                assert_eq!(g["input_activations"]["num_bits"], 8);
                assert_eq!(g["input_activations"]["strategy"], "token");
                assert_eq!(g["input_activations"]["dynamic"], true);
            } else {
                assert_eq!(g["weights"]["strategy"], "group");
                assert_eq!(g["weights"]["group_size"], 128);
                assert_eq!(g["weights"]["symmetric"], false);
                assert!(g["input_activations"].is_null());
            }
            let ignore: Vec<&str> = q["ignore"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(ignore.iter().all(|i| i.starts_with("re:")), "{ignore:?}");
            assert!(ignore.contains(&"re:.*vision_tower.*"), "{ignore:?}");
        }
    }

    // Tensors.
    let sw = WeightFiles::open(src).unwrap();
    let ew = WeightFiles::open(out).unwrap();
    assert!(
        ew.metadata.keys().all(|k| !k.starts_with("mbq.")),
        "{:?}",
        ew.metadata
    );
    assert_eq!(ew.metadata.get("format").map(String::as_str), Some("pt"));
    let packed: Vec<String> = serde_json::from_str(&sw.metadata[META_PACKED]).unwrap();
    assert_eq!(packed.len(), 14);
    for n in sw.names() {
        if n.ends_with(".qweight") || n.ends_with(".scales_zeros") {
            continue;
        }
        assert_eq!(
            ew.raw(n).unwrap(),
            sw.raw(n).unwrap(),
            "{format}: {n} copied"
        );
    }
    for p in &packed {
        let (out_f, words) = {
            let sh = sw.shape(&format!("{p}.qweight")).unwrap();
            (sh[0], sh[1])
        };
        let inp = words * 32 / bits as usize;
        let want = read_packed(&sw.pp(p), out_f, inp).unwrap();
        let t = |leaf: &str| ew.raw(&format!("{p}.{leaf}")).unwrap();
        let back = if format == "gptq" {
            let (d, sh, qw) = t("qweight");
            assert_eq!(
                (d, sh),
                (Dtype::I32, &[inp * bits as usize / 32, out_f][..])
            );
            let (d, sh, qz) = t("qzeros");
            assert_eq!(
                (d, sh),
                (Dtype::I32, &[inp / 128, out_f * bits as usize / 32][..])
            );
            let (d, sh, sc) = t("scales");
            assert_eq!((d, sh), (Dtype::F16, &[inp / 128, out_f][..]));
            let (d, sh, gi) = t("g_idx");
            assert_eq!((d, sh), (Dtype::I32, &[inp][..]));
            let g = GptqTensors {
                bits,
                group_size: 128,
                out: out_f,
                inp,
                qweight: i32s(qw),
                qzeros: i32s(qz),
                scales: f16s(sc),
                g_idx: i32s(gi),
            };
            gptq_to_packed(p, &g, GptqZeros::V1).unwrap()
        } else {
            let (d, sh, wp) = t("weight_packed");
            assert_eq!(
                (d, sh),
                (Dtype::I32, &[out_f, inp * bits as usize / 32][..])
            );
            let (d, sh, ws) = t("weight_scale");
            let cols = if act { 1 } else { inp / 128 };
            assert_eq!((d, sh), (Dtype::F16, &[out_f, cols][..]));
            let (d, sh, shape) = t("weight_shape");
            assert_eq!((d, sh), (Dtype::I64, &[2][..]));
            let shape: Vec<i64> = shape
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(shape, [out_f as i64, inp as i64]);
            let zp = if act {
                assert!(!ew.contains(&format!("{p}.weight_zero_point")));
                None
            } else {
                let (d, sh, zp) = t("weight_zero_point");
                assert_eq!(
                    (d, sh),
                    (Dtype::I32, &[out_f * bits as usize / 32, inp / 128][..])
                );
                Some(i32s(zp))
            };
            let c = CompressedTensors {
                bits,
                out: out_f,
                inp,
                strategy: if act {
                    CtStrategy::Channel
                } else {
                    CtStrategy::Group(128)
                },
                weight_packed: i32s(wp),
                weight_scale: f16s(ws),
                weight_zero_point: zp,
            };
            compressed_to_packed(p, &c, 128).unwrap()
        };
        assert_eq!(back, want, "{format}: {p} decodes back bit for bit");
        // mbq's own import (what `mbq-run` does with the export) gives the
        // source's packed linear back, bit for bit, and its activation bits.
        let (imported, act_bits) = mbq::quant::import::read_linear(&ew.pp(p), out_f, inp).unwrap();
        assert_eq!(imported, want, "{format}: {p} imported");
        assert_eq!(act_bits, act.then_some(8), "{format}: {p} activation bits");
        assert!(
            !ew.contains(&format!("{p}.scales_zeros")),
            "{p} left packed"
        );
        if format != "gptq" {
            assert!(!ew.contains(&format!("{p}.qweight")), "{p} left packed");
        }
    }
}

#[test]
fn weight_only_models_export_to_gptq_and_compressed_tensors() {
    let dir = scratch("export-cli");
    for bits in [4u32, 3] {
        let b = bits.to_string();
        let src = quantized(&dir, &format!("w{bits}"), &["--w-bit", &b]);
        for format in ["gptq", "compressed-tensors"] {
            let out = dir.join(format!("w{bits}-{format}"));
            let o = export(&src, &out, format);
            ok(&o, format);
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                stdout.contains(format) && stdout.contains(&format!("W{bits} g128")),
                "{stdout}"
            );
            check_export(&src, &out, format, bits, false);
        }
    }
}

#[test]
fn w4a8_goes_to_compressed_tensors_only() {
    let dir = scratch("export-cli-w4a8");
    let src = quantized(&dir, "w4a8", &["--w-bit", "4", "--a-bit", "8"]);
    let out = dir.join("gptq");
    let o = export(&src, &out, "gptq");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("GPTQ has no activation quantization")
            && e.contains("--format compressed-tensors"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
    let out = dir.join("ct");
    ok(&export(&src, &out, "compressed-tensors"), "w4a8 ct");
    check_export(&src, &out, "compressed-tensors", 4, true);
}

#[test]
fn existing_out_unquantized_model_and_bad_format_are_refused() {
    let dir = scratch("export-cli-refuse");
    let src = quantized(&dir, "w4", &["--w-bit", "4"]);
    let out = dir.join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "user file").unwrap();
    let o = export(&src, &out, "gptq");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("already exists") && e.contains("taken"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "user file"
    );

    let dense = fixtures().join("models/llava_qwen128");
    let o = export(&dense, &dir.join("dense"), "gptq");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("not an mbq quantized model") && e.contains("mbq quantize"),
        "{e}"
    );
    assert!(!dir.join("dense").exists());

    let o = export(&src, &dir.join("x"), "awq");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("awq") && e.contains("gptq, compressed-tensors"),
        "{e}"
    );
    // No temporary directory is left anywhere.
    let hidden: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
