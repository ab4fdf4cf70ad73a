//! Bad input a user can feed in, one case per finding of issue 17: each is
//! made in a scratch directory (a copy of a small model with one file
//! changed) and must give a clear error naming the file, key or option,
//! never a panic or an abort.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{copy_dir, fixtures, scratch};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"))
}

/// Runs a binary expecting a clean failure: exit code 1 (not 101, a
/// panic, nor a signal, an abort), no "panicked", an `error: ` line.
/// Returns stderr.
fn expect_error_of(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status {:?} for {args:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(
        !stderr.contains("memory allocation"),
        "abort for {args:?}: {stderr}"
    );
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
    stderr
}

fn expect_error(args: &[&str]) -> String {
    expect_error_of(env!("CARGO_BIN_EXE_mbq-run"), args)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn image() -> String {
    s(&fixtures().join("images/odd2.png"))
}

/// A writable copy of the llava_qwen fixture model.
fn model_copy(name: &str) -> PathBuf {
    let d = scratch(&format!("bad_input_{name}")).join("model");
    copy_dir(&fixtures().join("models/llava_qwen"), &d);
    d
}

/// mbq-run on `model` with an image, expecting a clean failure.
fn run_model(model: &Path) -> String {
    expect_error(&[
        "--model",
        &s(model),
        "--image",
        &image(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--backend",
        "cpu",
    ])
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn assert_has(e: &str, parts: &[&str]) {
    println!("{}", e.trim());
    for p in parts {
        assert!(e.contains(p), "expected {p:?} in: {e}");
    }
}

// ---------------------------------------------------------------- 1 tokenizer

#[test]
fn tokenizer_json_syntax_error_in_decoder() {
    let m = model_copy("tok_syntax");
    let p = m.join("tokenizer.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let i = text.find("\"decoder\"").expect("a decoder");
    let j = i + text[i..].find('{').unwrap() + 1;
    let bad = format!("{}\"type\": \"ByteLevel\",, ]{}", &text[..j], &text[j..]);
    std::fs::write(&p, bad).unwrap();
    let e = run_model(&m);
    assert_has(&e, &["tokenizer.json", "not valid JSON"]);
}

#[test]
fn tokenizer_invalid_precompiled_normalizer() {
    // (charsmap, what the message says): unparsable; a trie that
    // indexes past its end (the tokenizers crate panics when it
    // normalizes); a trie size of 4 GiB (it would allocate that first).
    for (i, (map, says)) in [
        ("AAAA", "too few for its header"),
        ("BAAAAAAAAAA=", "not a usable tokenizer"),
        ("/////wAAAAA=", "declares a trie of 4294967295 bytes"),
    ]
    .into_iter()
    .enumerate()
    {
        let m = model_copy(&format!("tok_precompiled_{i}"));
        edit_json(&m.join("tokenizer.json"), |t| {
            t["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                {"type": "Precompiled", "precompiled_charsmap": map}]});
        });
        let e = run_model(&m);
        assert_has(&e, &["tokenizer.json", says]);
    }
}

#[test]
fn image_token_beyond_the_vocabulary() {
    let m = model_copy("tok_image_id");
    edit_json(&m.join("config.json"), |c| {
        c["image_token_index"] = 999999.into()
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &[
            "tokenizer.json",
            "image token",
            "999999",
            "vocabulary of 404",
        ],
    );
}

#[test]
fn eos_token_beyond_the_vocabulary() {
    let m = model_copy("tok_eos_id");
    edit_json(&m.join("generation_config.json"), |c| {
        c["eos_token_id"] = 70000.into()
    });
    let e = run_model(&m);
    assert_has(&e, &["tokenizer.json", "end-of-sequence", "70000", "404"]);
}

#[test]
fn pad_token_beyond_the_vocabulary() {
    let m = model_copy("tok_pad_id");
    edit_json(&m.join("config.json"), |c| c["pad_token_id"] = 5000.into());
    let e = run_model(&m);
    assert_has(&e, &["tokenizer.json", "padding token", "5000", "404"]);
}

/// The tokenizer lacks the image token: named with the file, not reported
/// as "0 image tokens" in the prompt.
#[test]
fn tokenizer_without_the_image_token() {
    let m = model_copy("tok_no_image");
    edit_json(&m.join("tokenizer.json"), |t| {
        t["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a["content"] != "<image>");
    });
    let e = run_model(&m);
    assert_has(&e, &["tokenizer.json", "image token", "403"]);
}

// ------------------------------------------------------------- 2 config sizes

#[test]
fn huge_text_layer_count() {
    let m = model_copy("huge_text_layers");
    edit_json(&m.join("config.json"), |c| {
        c["text_config"]["num_hidden_layers"] = 1_000_000_000_000u64.into()
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &[
            "config.json",
            "text_config.num_hidden_layers",
            "1000000000000",
            "holds 2 decoder layers",
        ],
    );
}

#[test]
fn huge_vision_layer_count() {
    let m = model_copy("huge_vision_layers");
    edit_json(&m.join("config.json"), |c| {
        c["vision_config"]["num_hidden_layers"] = 1_000_000_000_000u64.into()
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &["config.json", "vision_config.num_hidden_layers", "holds 2"],
    );
}

#[test]
fn zero_hidden_size() {
    let m = model_copy("zero_hidden");
    edit_json(&m.join("config.json"), |c| {
        c["text_config"]["hidden_size"] = 0.into()
    });
    let e = run_model(&m);
    assert_has(&e, &["config.json", "text_config.hidden_size", "is 0"]);
}

#[test]
fn missing_text_config_is_named() {
    let m = model_copy("no_text_config");
    edit_json(&m.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("text_config");
    });
    let e = run_model(&m);
    assert_has(&e, &["config.json", "\"text_config\" is missing"]);
}

#[test]
fn missing_patch_size_is_named() {
    let m = model_copy("no_patch_size");
    edit_json(&m.join("config.json"), |c| {
        c["vision_config"]
            .as_object_mut()
            .unwrap()
            .remove("patch_size");
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &["config.json", "\"vision_config.patch_size\" is missing"],
    );
}

/// `mbq shapes` with a huge count streams: it is still writing (not
/// aborted) after a while, and a later run removes what the killed run left.
#[test]
fn shapes_huge_count_streams_and_stale_temp_is_removed() {
    let d = scratch("bad_input_shapes");
    let out = d.join("ds");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(["shapes", "--count", "1000000000", "--out", &s(&out)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(3));
    let status = child.try_wait().unwrap();
    assert!(
        status.is_none(),
        "mbq shapes --count 1000000000 ended early: {status:?}"
    );
    let tmp = d.join(format!(".ds.tmp-{pid}"));
    let images = std::fs::read_dir(tmp.join("images")).unwrap().count();
    assert!(images > 0, "nothing written yet");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(tmp.is_dir(), "the killed run's temporary directory");

    let o = run(
        env!("CARGO_BIN_EXE_mbq"),
        &["shapes", "--count", "1", "--out", &s(&out)],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!tmp.exists(), "stale {} was not removed", tmp.display());
    assert_has(&stderr, &["removed", &format!(".ds.tmp-{pid}")]);
}

// ----------------------------------------------------------------- 3 images

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

#[test]
fn png_declaring_huge_dimensions() {
    let d = scratch("bad_input_huge_png");
    let p = d.join("huge.png");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut png, b"IEND", &[]);
    std::fs::write(&p, png).unwrap();
    let e = expect_error(&[
        "--model",
        &s(&fixtures().join("models/llava_qwen")),
        "--image",
        &s(&p),
        "--prompt",
        "hi",
        "--backend",
        "cpu",
    ]);
    assert_has(&e, &["huge.png", "30000x30000", "16384x16384"]);
}

// ----------------------------------------------------------- 4 packed model

/// A copy of the bundled W3 model with model.mbq.safetensors rewritten through
/// `edit` (its tensors and metadata).
fn packed_copy(
    name: &str,
    edit: impl FnOnce(
        &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
        &mut HashMap<String, String>,
    ),
) -> PathBuf {
    let d = scratch(&format!("bad_input_{name}")).join("model");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes-w3"),
        &d,
    );
    let p = d.join("model.mbq.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut items: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut items, &mut metadata);
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .iter()
        .map(|(n, dt, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(metadata), &p).unwrap();
    d
}

fn run_text(model: &Path) -> String {
    expect_error(&[
        "--model",
        &s(model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
        "--backend",
        "cpu",
    ])
}

#[test]
fn packed_metadata_bits_contradicts_tensors() {
    let m = packed_copy("meta_bits", |_, meta| {
        meta.insert("mbq.bits".into(), "5".into());
    });
    let e = run_text(&m);
    assert_has(
        &e,
        &["model.mbq.safetensors", "\"mbq.bits\" is \"5\"", "say 3"],
    );
}

#[test]
fn packed_metadata_group_size_contradicts_tensors() {
    for g in ["100", "64"] {
        let m = packed_copy(&format!("meta_group_{g}"), |_, meta| {
            meta.insert("mbq.group_size".into(), g.into());
        });
        let e = run_text(&m);
        assert_has(
            &e,
            &[
                "model.mbq.safetensors",
                &format!("\"mbq.group_size\" is \"{g}\""),
                "say 128",
            ],
        );
    }
}

#[test]
fn packed_metadata_list_not_json() {
    let m = packed_copy("meta_packed", |_, meta| {
        meta.insert("mbq.packed".into(), "q_proj, k_proj".into());
    });
    let e = run_text(&m);
    assert_has(
        &e,
        &["model.mbq.safetensors", "\"mbq.packed\"", "not a JSON list"],
    );
}

#[test]
fn scales_zeros_of_another_group_size() {
    let m = packed_copy("sz_group", |items, _| {
        let (name, _, shape, bytes) = items
            .iter_mut()
            .find(|(n, ..)| n.ends_with("layers.0.mlp.up_proj.scales_zeros"))
            .unwrap();
        assert_eq!(shape[2], 2, "{name}");
        // Twice the groups: a group size of 64 where the file says 128.
        shape[1] *= 2;
        let mut doubled = bytes.clone();
        doubled.extend(bytes.iter());
        *bytes = doubled;
    });
    let e = run_text(&m);
    assert_has(
        &e,
        &[
            "model.mbq.safetensors",
            "\"mbq.group_size\" is \"128\"",
            "layers.0.mlp.up_proj",
            "say 64",
        ],
    );
}

// --------------------------------------------------------- 5 clear messages

#[test]
fn deleted_preprocessor_config_is_named() {
    let m = model_copy("no_preproc");
    std::fs::remove_file(m.join("preprocessor_config.json")).unwrap();
    let e = run_model(&m);
    assert_has(&e, &["preprocessor_config.json", "not found"]);
    assert!(!e.contains("key \"image_processor_type\""), "{e}");
}

#[test]
fn short_safetensors_in_plain_words() {
    for (name, keep) in [("st_tiny", 4usize), ("st_half", 0)] {
        let m = model_copy(name);
        let p = m.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let keep = if keep == 0 { bytes.len() / 2 } else { keep };
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = run_model(&m);
        assert_has(&e, &["model.safetensors", "invalid safetensors", "bytes"]);
        for debug_name in [
            "HeaderTooSmall",
            "MetadataIncompleteBuffer",
            "InvalidHeader",
        ] {
            assert!(!e.contains(debug_name), "{e}");
        }
    }
}

#[cfg(unix)]
#[test]
fn os_error_is_printed_once() {
    let m = model_copy("symlink_loop");
    let p = m.join("config.json");
    std::fs::remove_file(&p).unwrap();
    std::os::unix::fs::symlink(&p, &p).unwrap();
    let e = run_model(&m);
    assert_has(&e, &["config.json"]);
    let line = e.lines().find(|l| l.starts_with("error: ")).unwrap();
    let reason = "symbolic links";
    assert_eq!(line.matches(reason).count(), 1, "{line}");
}

#[test]
fn unwritable_output_names_the_output() {
    let d = scratch("bad_input_unwritable");
    let file = d.join("a_file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("out");
    let e = expect_error_of(
        env!("CARGO_BIN_EXE_mbq"),
        &[
            "quantize",
            "--w-bit",
            "4",
            "--model",
            &s(&fixtures().join("models/llava_qwen128")),
            "--out",
            &s(&out),
        ],
    );
    let line = e.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(line.contains(&s(&out)), "{line}");
    assert!(!line.contains(".tmp-"), "{line}");
}

#[test]
fn wrong_kind_of_path_says_what_it_is() {
    // A file where the model directory should be.
    let m = model_copy("kind_model");
    let e = expect_error(&["--model", &s(&m.join("config.json")), "--prompt", "hi"]);
    assert_has(
        &e,
        &["config.json", "is a file", "expected a model directory"],
    );
    // A directory where tokenizer.json should be.
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    std::fs::create_dir(m.join("tokenizer.json")).unwrap();
    let e = run_model(&m);
    assert_has(
        &e,
        &[
            "tokenizer.json",
            "is a directory",
            "expected the tokenizer file",
        ],
    );
    // A directory given as the image.
    let e = expect_error(&[
        "--model",
        &s(&fixtures().join("models/llava_qwen")),
        "--image",
        &s(&m),
        "--prompt",
        "hi",
    ]);
    assert_has(&e, &["is a directory", "expected an image file"]);
}

#[test]
fn unknown_bundled_model_lists_names_and_places() {
    let e = expect_error(&["--model", "tiny-shapez", "--prompt", "hi"]);
    assert_has(
        &e,
        &[
            "tiny-shapez",
            "tiny-shapes, tiny-shapes-w3",
            "looked for them in",
        ],
    );
}

#[test]
fn negative_numbers_reach_our_range_check() {
    let e = expect_error(&["--temperature", "-1", "--prompt", "hi"]);
    assert_has(&e, &["--temperature must be >= 0, got -1"]);
    let e = expect_error(&["--top-p", "-0.5", "--prompt", "hi"]);
    assert_has(&e, &["--top-p must be in (0, 1], got -0.5"]);
}

// ------------------------------------------------------ 6 stale temp dirs

/// The id of a process that has ended.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn stale_quantize_temp_dir_is_removed() {
    let d = scratch("bad_input_stale_quant");
    let out = d.join("q");
    let pid = dead_pid();
    let stale = d.join(format!(".q.tmp-{pid}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), "partial").unwrap();
    let o = run(
        env!("CARGO_BIN_EXE_mbq"),
        &[
            "quantize",
            "--w-bit",
            "4",
            "--model",
            &s(&fixtures().join("models/llava_qwen128")),
            "--out",
            &s(&out),
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stale.exists(), "{} left", stale.display());
    assert!(out.join("model.mbq.safetensors").is_file());
    assert_has(
        &stderr,
        &["removed", &format!(".q.tmp-{pid}"), "no longer running"],
    );
}

// ------------------------------------------------- Qwen2-VL / Qwen2.5-VL configs

/// A writable copy of fixture model `fixture`.
fn family_copy(fixture: &str, name: &str) -> PathBuf {
    let d = scratch(&format!("bad_input_{name}")).join("model");
    copy_dir(&fixtures().join("models").join(fixture), &d);
    d
}

#[test]
fn qwen2vl_unknown_rope_type_is_named() {
    let m = family_copy("qwen2vl", "qwen_rope_type");
    edit_json(&m.join("config.json"), |c| {
        c["rope_scaling"]["type"] = "yarn".into()
    });
    let e = run_model(&m);
    assert_has(&e, &["config.json", "rope_scaling.type", "yarn", "mrope"]);
}

#[test]
fn qwen2vl_mrope_section_that_does_not_fit_head_dim() {
    let m = family_copy("qwen2vl", "qwen_mrope_section");
    edit_json(&m.join("config.json"), |c| {
        c["rope_scaling"]["mrope_section"] = serde_json::json!([4, 6, 5])
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &[
            "config.json",
            "rope_scaling.mrope_section",
            "[4, 6, 5]",
            "head_dim / 2 = 16",
        ],
    );
    edit_json(&m.join("config.json"), |c| {
        c["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("mrope_section");
    });
    assert_has(&run_model(&m), &["rope_scaling.mrope_section\" is missing"]);
}

#[test]
fn qwen2vl_flat_text_keys_are_named_as_written() {
    // Transformers 4 files keep the language model's keys at the top level.
    let m = family_copy("qwen2vl", "qwen_flat_layers");
    edit_json(&m.join("config.json"), |c| {
        c["num_hidden_layers"] = 7.into()
    });
    let e = run_model(&m);
    assert_has(
        &e,
        &[
            "config.json",
            "\"num_hidden_layers\" is 7",
            "holds 2 decoder layers",
        ],
    );
    assert!(!e.contains("text_config"), "{e}");
}

#[test]
fn qwen25vl_bad_window_settings_are_named() {
    let m = family_copy("qwen25vl", "qwen25_window");
    edit_json(&m.join("config.json"), |c| {
        c["vision_config"]["window_size"] = 50.into()
    });
    assert_has(
        &run_model(&m),
        &[
            "config.json",
            "vision_config.window_size",
            "50",
            "multiple of",
        ],
    );
    edit_json(&m.join("config.json"), |c| {
        c["vision_config"]["window_size"] = 56.into();
        c["vision_config"]["fullatt_block_indexes"] = serde_json::json!([1, 9]);
    });
    assert_has(
        &run_model(&m),
        &["vision_config.fullatt_block_indexes", "block 9", "depth 4"],
    );
}

#[test]
fn qwen2vl_image_with_extreme_aspect_ratio() {
    let d = scratch("bad_input_qwen_aspect");
    let img = d.join("strip.png");
    image::RgbImage::from_pixel(402, 2, image::Rgb([90, 120, 200]))
        .save(&img)
        .unwrap();
    let e = expect_error(&[
        "--model",
        &s(&fixtures().join("models/qwen2vl")),
        "--image",
        &s(&img),
        "--prompt",
        "hi",
        "--backend",
        "cpu",
    ]);
    assert_has(&e, &["aspect ratio", "200"]);
}

#[test]
fn qwen2vl_image_grid_beyond_the_context() {
    // max_pixels allows 16 merged tokens: a context of 40 cannot hold the
    // prompt with them.
    let m = family_copy("qwen2vl", "qwen_context");
    edit_json(&m.join("config.json"), |c| {
        c["max_position_embeddings"] = 40.into()
    });
    let e = expect_error(&[
        "--model",
        &s(&m),
        "--image",
        &s(&fixtures().join("images/big.png")),
        "--prompt",
        "hi",
        "--backend",
        "cpu",
    ]);
    assert_has(&e, &["context", "40"]);
}
