//! `mbq quantize` as a user runs it: the packed model it writes runs through
//! `mbq-run` to transformers' greedy ids for the same RTN-quantized model
//! (tests/fixtures/quant/, made by make_quant_fixtures.py), every other
//! tensor and file is copied unchanged, the input is never modified, and
//! every misuse is a clear error that leaves nothing behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixtures, rel_err, scratch};
use mbq::backend::cpu::{Cpu, CpuWeight};
use mbq::backend::Backend;
use mbq::generate::{prefill, Prompt};
use mbq::model::Vlm;
use mbq::quant::format::{META_BITS, META_FORMAT, META_GROUP_SIZE, META_METHOD, META_PACKED};
use mbq::weights::WeightFiles;

/// Last-position logits relative to their scale (f32 vs f32, same weights).
const LOGITS_REL_TOL: f32 = 1e-4;
/// W3 at group 128: 3 bits per code plus an f16 scale and zero per 128.
const W3G128_MAX_BITS_PER_WEIGHT: f64 = 3.25;

fn mbq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(args)
        .output()
        .expect("failed to start mbq")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Every file under `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for (k, v) in snapshot(&p) {
                m.insert(PathBuf::from(p.file_name().unwrap()).join(k), v);
            }
        } else {
            m.insert(
                PathBuf::from(p.file_name().unwrap()),
                std::fs::read(&p).unwrap(),
            );
        }
    }
    m
}

/// Entries of `dir` whose name starts with `.`  (left-over temporary dirs).
fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn quantize(model: &Path, out: &Path, bits: u32, group: usize) -> Output {
    mbq(&[
        "quantize",
        "--method",
        "rtn",
        "--w-bit",
        &bits.to_string(),
        "--group-size",
        &group.to_string(),
        "--model",
        &s(model),
        "--out",
        &s(out),
    ])
}

struct QuantCase {
    name: String,
    bits: u32,
    group: usize,
    model: PathBuf,
    image: PathBuf,
    prompt: String,
    golden: WeightFiles,
    fp_golden: WeightFiles,
}

fn quant_case(name: &str) -> QuantCase {
    let dir = fixtures().join("quant").join(name);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let fp = fixtures()
        .join("cases")
        .join(j["fp_case"].as_str().unwrap());
    QuantCase {
        name: name.to_string(),
        bits: j["bits"].as_u64().unwrap() as u32,
        group: j["group_size"].as_u64().unwrap() as usize,
        model: fixtures().join(j["model"].as_str().unwrap()),
        image: fixtures().join(j["image"].as_str().unwrap()),
        prompt: j["prompt"].as_str().unwrap().to_string(),
        golden: WeightFiles::open_file(&dir.join("golden.safetensors")).unwrap(),
        fp_golden: WeightFiles::open_file(&fp.join("golden.safetensors")).unwrap(),
    }
}

fn i64s(w: &WeightFiles, name: &str) -> Vec<i64> {
    let (_, _, b) = w.raw(name).unwrap();
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The packed model's logits with HF's image features, in process.
fn logits(out: &Path, c: &QuantCase) -> Vec<f32> {
    let model = Vlm::load(&Cpu, out).unwrap();
    // The decoder linears are really packed (not silently loaded dense).
    for l in &model.text.layers {
        for lin in l.linears() {
            assert!(matches!(lin.w, CpuWeight::Packed(_)), "{}", c.name);
        }
    }
    let ids: Vec<u32> = i64s(&c.golden, "input_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let tok = model.cfg.image_token_index;
    let count = ids.iter().filter(|&&t| t == tok).count();
    let prompt = Prompt {
        image_spans: ids
            .iter()
            .position(|&t| t == tok)
            .map(|f| (f, count))
            .into_iter()
            .collect(),
        ids: ids.clone(),
        mrope: None,
    };
    let feats = Cpu
        .upload(&c.golden.get_any("image_features").unwrap())
        .unwrap();
    let feats = feats
        .reshape(vec![count, model.cfg.text.hidden_size])
        .unwrap();
    let mut cache = Cpu
        .new_cache(model.text.layers.len(), model.text.kv_dim(), ids.len() + 1)
        .unwrap();
    prefill(&Cpu, &model, &prompt, Some(&feats), &mut cache).unwrap()
}

fn check_quantized_case(name: &str) {
    let c = quant_case(name);
    let dir = scratch(&format!("quantize-{name}"));
    let out = dir.join("packed");
    let before = snapshot(&c.model);
    let t0 = std::time::Instant::now();
    let o = quantize(&c.model, &out, c.bits, c.group);
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{name}: {} ({secs:.2} s wall)", stdout.trim());
    assert_eq!(snapshot(&c.model), before, "{name}: the input changed");
    assert!(
        hidden_entries(&dir).is_empty(),
        "{name}: temporary dir left behind"
    );

    // Every non-weight file, unchanged; every non-packed tensor, byte for byte.
    let input = WeightFiles::open(&c.model).unwrap();
    let packed = WeightFiles::open(&out).unwrap();
    let got = snapshot(&out);
    for (f, bytes) in &before {
        if f == Path::new("config.json") {
            // The input's config plus mbq's quantization_config.
            let mut cfg: serde_json::Value = serde_json::from_slice(&got[f]).unwrap();
            let q = cfg
                .as_object_mut()
                .unwrap()
                .remove("quantization_config")
                .unwrap_or_else(|| panic!("{name}: no quantization_config"));
            assert_eq!(
                cfg,
                serde_json::from_slice::<serde_json::Value>(bytes).unwrap()
            );
            assert_eq!(q["quant_method"], "mbq", "{name}");
            assert_eq!(q["format_version"], 1, "{name}");
            assert_eq!(q["bits"], c.bits, "{name}");
            assert_eq!(q["group_size"], c.group, "{name}");
            assert_eq!(q["method"], "rtn", "{name}");
            assert_eq!(q["weights_file"], "model.mbq.safetensors", "{name}");
            assert!(
                got.contains_key(Path::new("model.mbq.safetensors")),
                "{name}"
            );
        } else if f != Path::new("model.safetensors") {
            assert_eq!(
                got.get(f),
                Some(bytes),
                "{name}: {} not copied as is",
                f.display()
            );
        }
    }
    assert_eq!(got.len(), before.len(), "{name}: extra files in the output");
    let m = &packed.metadata;
    assert_eq!(m[META_FORMAT], "1");
    assert_eq!(m[META_BITS], c.bits.to_string());
    assert_eq!(m[META_GROUP_SIZE], c.group.to_string());
    assert_eq!(m[META_METHOD], "rtn");
    let list: Vec<String> = serde_json::from_str(&m[META_PACKED]).unwrap();
    assert_eq!(list.len(), 14, "{name}: 2 layers x 7 linears");
    let (mut weights, mut bytes) = (0usize, 0usize);
    for n in input.names() {
        let p = n.strip_suffix(".weight").unwrap_or(n);
        if list.iter().any(|l| l == p) {
            assert!(!packed.contains(n), "{name}: {n} still dense");
            let (_, shape, _) = input.raw(n).unwrap();
            let (_, _, q) = packed.raw(&format!("{p}.qweight")).unwrap();
            let (_, _, sz) = packed.raw(&format!("{p}.scales_zeros")).unwrap();
            weights += shape[0] * shape[1];
            bytes += q.len() + sz.len();
        } else {
            assert_eq!(input.raw(n).unwrap(), packed.raw(n).unwrap(), "{name}: {n}");
        }
    }
    let bpw = bytes as f64 * 8.0 / weights as f64;
    println!("{name}: {weights} weights packed at {bpw} bits/weight");
    if c.bits == 3 && c.group == 128 {
        assert!(
            bpw <= W3G128_MAX_BITS_PER_WEIGHT,
            "{name}: {bpw} bits/weight"
        );
    }

    // mbq-run on the output: transformers' greedy ids and prompt length.
    let run = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args([
            "--model",
            &s(&out),
            "--image",
            &s(&c.image),
            "--prompt",
            &c.prompt,
        ])
        .args([
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            "12",
            "--backend",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let tokens: Vec<i64> = j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let greedy = i64s(&c.golden, "greedy_ids");
    assert_eq!(greedy.len(), 12);
    assert_eq!(tokens, greedy, "{name}: greedy ids");
    assert_eq!(
        j["prompt_tokens"].as_u64().unwrap() as usize,
        i64s(&c.golden, "input_ids").len(),
        "{name}: prompt length"
    );

    // In process: the last logits of the packed model.
    let reference = c.golden.get_any("logits_last").unwrap().data;
    let e = rel_err(&logits(&out, &c), &reference);
    let vs_fp = rel_err(
        &reference,
        &c.fp_golden.get_any("logits_last").unwrap().data,
    );
    println!("{name}: logits rel err {e:.2e} (quantized vs FP reference differ by {vs_fp:.2e})");
    assert!(e <= LOGITS_REL_TOL, "{name}: logits rel err {e}");
    assert!(
        vs_fp > 100.0 * LOGITS_REL_TOL,
        "{name}: the goldens do not tell W{} from FP",
        c.bits
    );
}

#[test]
fn w3_g128_model_reproduces_transformers() {
    check_quantized_case("llava_qwen128_w3g128_odd2");
}

#[test]
fn w4_g128_model_reproduces_transformers() {
    check_quantized_case("llava_qwen128_w4g128_odd2");
}

fn expect_failure(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected a failure; stderr: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn existing_output_is_an_error_and_stays_untouched() {
    let dir = scratch("quantize-existing");
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let model = fixtures().join("models/llava_qwen128");
    for target in [&out, &empty] {
        let before = snapshot(target);
        let e = expect_failure(&quantize(&model, target, 4, 128));
        assert!(
            e.contains(&s(target)) && e.contains("already exists"),
            "{e}"
        );
        assert_eq!(snapshot(target), before);
    }
    assert!(hidden_entries(&dir).is_empty());
}

#[test]
fn indivisible_group_size_is_a_clear_error_naming_the_tensor() {
    let dir = scratch("quantize-indivisible");
    let out = dir.join("out");
    // llava_qwen's decoder is 64 wide: group 128 does not divide it.
    let e = expect_failure(&quantize(
        &fixtures().join("models/llava_qwen"),
        &out,
        3,
        128,
    ));
    assert!(
        e.contains("layers.0.self_attn.q_proj.weight") && e.contains("64") && e.contains("128"),
        "{e}"
    );
    assert!(!out.exists());
    assert!(hidden_entries(&dir).is_empty(), "temporary dir left behind");
}

#[test]
fn bad_options_are_clear_errors() {
    let dir = scratch("quantize-options");
    let out = s(&dir.join("out"));
    let model = s(&fixtures().join("models/llava_qwen128"));
    let run = |extra: &[&str]| {
        let mut a = vec!["quantize", "--model", &model, "--out", &out];
        a.extend_from_slice(extra);
        expect_failure(&mbq(&a))
    };
    for m in ["mbq", "awq"] {
        let e = run(&["--method", m, "--w-bit", "4"]);
        assert!(
            e.contains(&format!("--method {m} needs --calib FILE")),
            "{e}"
        );
    }
    let e = run(&["--method", "smoothquant", "--w-bit", "4"]);
    assert!(e.contains("give --w-bit 4 --a-bit 8"), "{e}");
    let e = run(&["--method", "mbq", "--w-bit", "3", "--a-bit", "8"]);
    assert!(e.contains("--a-bit 8 needs --w-bit 4"), "{e}");
    let e = run(&["--method", "mbq", "--w-bit", "4", "--backend", "metal"]);
    assert!(e.contains("--backend") && e.contains("metal"), "{e}");
    let e = run(&["--method", "gptq", "--w-bit", "4"]);
    assert!(e.contains("gptq") && e.contains("rtn"), "{e}");
    let e = run(&["--w-bit", "5"]);
    assert!(e.contains("5-bit") && e.contains("3, 4, 8"), "{e}");
    let e = run(&["--w-bit", "4", "--group-size", "48"]);
    assert!(e.contains("48") && e.contains("32, 64, 128"), "{e}");
    let missing = s(&dir.join("nope"));
    let e = expect_failure(&mbq(&[
        "quantize", "--w-bit", "4", "--model", &missing, "--out", &out,
    ]));
    assert!(e.contains(&missing), "{e}");
    assert!(!dir.join("out").exists());
    assert!(hidden_entries(&dir).is_empty());
}
