//! Qwen2-VL / Qwen2.5-VL and InternVL (-hf) image preprocessing against
//! transformers 4.57.6's slow (PIL) image processors; the generator
//! (tests/fixtures/family_prep/make_family_prep.py) also checked that
//! transformers 5 (PIL backend) gives the same values from the v4 configs and
//! from the configs it writes itself (configs/<name>_v5, configs/<name>_v5proc).

mod imgref;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use imgref::{f32s_at, hash_u8, make_image, uint, Rng};
use mbq::error::Error;
use mbq::preprocess::{self, Filter};
use mbq::preprocess_internvl::{self as internvl, InternVlImageConfig};
use mbq::preprocess_qwen::{self as qwen, QwenVlImageConfig};
use serde_json::{json, Value};

/// The resize is exact on `u8` (hash); rescale and normalize are the same
/// `f32` operations as numpy's, so the values should agree to the bit. The
/// bound leaves room for one rounding step of values up to ~2.6 in size.
const TOL: f32 = 1e-6;
const LAYOUTS: [&str; 3] = ["", "_v5", "_v5proc"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/family_prep")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(dir().join("family_prep_ref.json"))
        .expect("family_prep_ref.json (run tests/fixtures/family_prep/make_family_prep.py)");
    serde_json::from_str(&text).expect("valid json")
}

fn bin() -> Vec<u8> {
    std::fs::read(dir().join("family_prep_f32.bin")).expect("family_prep_f32.bin")
}

fn config_dir(name: &str) -> PathBuf {
    dir().join("configs").join(name)
}

/// The case's image as HF saw it: a committed PNG through load_image, or the
/// synthetic generator.
fn case_image(case: &Value) -> image::RgbImage {
    match case.get("file") {
        Some(f) => preprocess::load_image(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/images")
                .join(f.as_str().expect("file")),
        )
        .expect("image"),
        None => preprocess::to_rgb8(&make_image(case)),
    }
}

fn cases<'a>(reference: &'a Value, prefix: &str) -> Vec<&'a Value> {
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["config"].as_str().expect("config").starts_with(prefix))
        .collect()
}

fn shape(case: &Value) -> Vec<usize> {
    case["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|v| v.as_u64().expect("dim") as usize)
        .collect()
}

/// Compare `got` with the stored values (whole or sampled); returns (max |diff|, values compared).
fn compare_values(case: &Value, bin: &[u8], got: &[f32], what: &str) -> (f32, usize) {
    let mut pairs = Vec::new();
    if let Some(off) = case.get("full_offset") {
        let want = f32s_at(bin, off.as_u64().expect("offset") as usize, got.len());
        pairs.extend(got.iter().copied().zip(want).enumerate());
    } else {
        // sorted distinct indices drawn as in make_family_prep.py
        let mut rng = Rng::new(case["sample_seed"].as_u64().expect("sample_seed"));
        let n = got.len() as u64;
        let idx: BTreeSet<usize> = (0..200).map(|_| rng.below(n) as usize).collect();
        assert_eq!(idx.len(), uint(case, "n_samples"), "{what}: sample indices");
        let want = f32s_at(bin, uint(case, "sample_offset"), idx.len());
        pairs.extend(idx.into_iter().zip(want).map(|(i, w)| (i, (got[i], w))));
    }
    let mut max = 0f32;
    for (i, (a, b)) in &pairs {
        let d = (a - b).abs();
        assert!(d <= TOL, "{what}: value {i} = {a}, transformers {b}");
        max = max.max(d);
    }
    (max, pairs.len())
}

#[test]
fn smart_resize_matches_transformers() {
    let reference = reference();
    let rows = reference["smart_resize"].as_array().expect("rows");
    let (mut ok, mut errors) = (0, 0);
    for row in rows {
        let got = qwen::smart_resize(
            uint(row, "h"),
            uint(row, "w"),
            uint(row, "factor"),
            uint(row, "min"),
            uint(row, "max"),
        );
        match (row.get("out"), got) {
            (Some(out), Ok(hw)) => {
                assert_eq!(hw, imgref::pair(out), "{row}");
                ok += 1;
            }
            (None, Err(Error::Invalid(msg))) => {
                assert!(msg.contains("aspect ratio"), "{row}: {msg}");
                errors += 1;
            }
            (_, got) => panic!("{row}: got {got:?}"),
        }
    }
    assert!(errors > 0 && ok > 0);
    println!("smart_resize: {ok} sizes identical, {errors} aspect-ratio errors");
}

#[test]
fn qwen_pixels_match_transformers() {
    let reference = reference();
    let bin = bin();
    let mut worst = (0f32, 0usize, 0usize);
    for case in cases(&reference, "qwen") {
        let name = case["config"].as_str().expect("config");
        let img = case_image(case);
        for layout in LAYOUTS {
            let cfg = qwen::load(&config_dir(&format!("{name}{layout}"))).expect("config");
            let what = format!("{name}{layout} {}", case["image"]);
            if let Some(msg) = case.get("error") {
                match qwen::preprocess(&cfg, &img) {
                    Err(Error::Invalid(m)) => assert!(m.contains("aspect ratio"), "{what}: {m}"),
                    other => panic!("{what}: transformers says {msg}, got {other:?}"),
                }
                continue;
            }
            let resized = qwen::resized_u8(&cfg, &img).expect("resize");
            assert_eq!(
                hash_u8(resized.as_raw()),
                case["u8_hash"].as_str().expect("hash"),
                "{what}: resized u8 image differs"
            );
            let out = qwen::preprocess(&cfg, &img).expect("preprocess");
            let thw = &case["grid_thw"];
            let dim = |i: usize| thw[i].as_u64().expect("grid_thw") as usize;
            assert_eq!(out.grid_thw, (dim(0), dim(1), dim(2)), "{what}");
            assert_eq!(out.resized, imgref::pair(&case["resized"]), "{what}");
            assert_eq!(out.num_image_tokens, uint(case, "tokens"), "{what}");
            assert_eq!(
                cfg.num_image_tokens(img.height() as usize, img.width() as usize)
                    .expect("tokens"),
                out.num_image_tokens
            );
            assert_eq!(
                vec![out.pixel_values.len() / out.row_len, out.row_len],
                shape(case)
            );
            assert_eq!(out.pixel_values.len() % out.row_len, 0);
            let (d, n) = compare_values(case, &bin, &out.pixel_values, &what);
            worst = (worst.0.max(d), worst.1 + 1, worst.2 + n);
        }
    }
    println!(
        "qwen: {} images x layouts, {} values compared, max |diff| = {:e}",
        worst.1, worst.2, worst.0
    );
    assert!(worst.1 > 0);
}

#[test]
fn internvl_pixels_match_transformers() {
    let reference = reference();
    let bin = bin();
    let mut worst = (0f32, 0usize, 0usize);
    for case in cases(&reference, "internvl") {
        let name = case["config"].as_str().expect("config");
        let img = case_image(case);
        for layout in LAYOUTS {
            let cfg = internvl::load(&config_dir(&format!("{name}{layout}"))).expect("config");
            let what = format!("{name}{layout} {}", case["image"]);
            let tiles = internvl::tiles_u8(&cfg, &img).expect("tiles");
            let raw: Vec<u8> = tiles.iter().flat_map(|t| t.as_raw().clone()).collect();
            assert_eq!(
                hash_u8(&raw),
                case["u8_hash"].as_str().expect("hash"),
                "{what}: u8 tiles differ"
            );
            let out = internvl::preprocess(&cfg, &img).expect("preprocess");
            assert_eq!(out.num_tiles, uint(case, "num_patches"), "{what}");
            assert_eq!(
                cfg.num_tiles(img.height() as usize, img.width() as usize)
                    .expect("count"),
                out.num_tiles,
                "{what}"
            );
            assert_eq!(
                vec![out.num_tiles, 3, out.height, out.width],
                shape(case),
                "{what}"
            );
            let (c, r) = out.grid;
            assert_eq!(if c * r > 1 { c * r + 1 } else { 1 }, out.num_tiles);
            let (d, n) = compare_values(case, &bin, &out.pixel_values, &what);
            worst = (worst.0.max(d), worst.1 + 1, worst.2 + n);
        }
    }
    println!(
        "internvl: {} images x layouts, {} values compared, max |diff| = {:e}",
        worst.1, worst.2, worst.0
    );
    assert!(worst.1 > 0);
}

/// An InternVL config with these tiling settings, through the parser.
fn tiling_config(tile: (usize, usize), min: usize, max: usize) -> InternVlImageConfig {
    let cfg = json!({
        "image_processor_type": "GotOcr2ImageProcessor",
        "size": {"height": tile.0, "width": tile.1},
        "min_patches": min, "max_patches": max,
    });
    InternVlImageConfig::from_json(Path::new("inline.json"), &cfg).expect("tiling config")
}

#[test]
fn tiling_matches_transformers() {
    let reference = reference();
    for (key, want) in reference["candidates"].as_object().expect("candidates") {
        let (min, max) = key.split_once(',').expect("min,max");
        let got = internvl::candidate_grids(min.parse().expect("min"), max.parse().expect("max"));
        let want: Vec<(usize, usize)> = want
            .as_array()
            .expect("list")
            .iter()
            .map(imgref::pair)
            .collect();
        assert_eq!(got, want, "candidates {key}");
    }
    let rows = reference["tiling"].as_array().expect("tiling");
    let mut ties = 0;
    for row in rows {
        let tile = imgref::pair(&row["tile"]);
        let (min, max) = (uint(row, "min"), uint(row, "max"));
        let size = (uint(row, "h"), uint(row, "w"));
        let grid = internvl::optimal_tiled_canvas(size, tile, min, max).expect("grid");
        assert_eq!(grid, imgref::pair(&row["grid"]), "{row}");
        let cfg = tiling_config(tile, min, max);
        assert_eq!(
            cfg.num_tiles(size.0, size.1).expect("count"),
            uint(row, "num_patches"),
            "{row}"
        );
        // rows where another candidate has the same aspect ratio as the winner
        let ratio = grid.0 as f64 / grid.1 as f64;
        ties += internvl::candidate_grids(min, max)
            .iter()
            .any(|&(c, r)| (c, r) != grid && c as f64 / r as f64 == ratio) as usize;
    }
    assert!(ties > 10, "the table should exercise the tie rule ({ties})");
    println!("tiling: {} grids identical ({ties} with a tie)", rows.len());
}

#[test]
fn configs_of_both_generations_read_alike() {
    // Qwen2-VL-2B-Instruct's file (v4 keys) and what transformers 5 writes from it.
    for layout in LAYOUTS {
        let cfg = qwen::load(&config_dir(&format!("qwen_hub{layout}"))).expect("qwen_hub");
        assert_eq!(
            (cfg.min_pixels, cfg.max_pixels),
            (3136, 12845056),
            "{layout}"
        );
        assert_eq!(
            (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size),
            (14, 2, 2)
        );
        assert_eq!(cfg.factor(), 28);
        assert_eq!(cfg.resample, Filter::Bicubic);
        assert_eq!(cfg.norm.image_mean, preprocess::OPENAI_CLIP_MEAN);
        assert!(cfg.do_resize && cfg.norm.do_rescale && cfg.norm.do_normalize);
        let file = if layout == "_v5proc" {
            "processor_config.json"
        } else {
            "preprocessor_config.json"
        };
        assert!(cfg.path.ends_with(file), "{}", cfg.path.display());
    }
    // The three layouts of every config parse to the same settings.
    for name in [
        "qwen_tiny",
        "qwen_t3_bilinear",
        "qwen_hub",
        "internvl_tiny",
        "internvl_min2",
        "internvl_one",
        "internvl_hub",
    ] {
        let same = |a: &str, b: &str| {
            if name.starts_with("qwen") {
                let (mut x, mut y) = (
                    qwen::load(&config_dir(a)).expect(a),
                    qwen::load(&config_dir(b)).expect(b),
                );
                (x.path, x.processor_type) = (PathBuf::new(), String::new());
                (y.path, y.processor_type) = (PathBuf::new(), String::new());
                assert_eq!(x, y, "{a} vs {b}");
            } else {
                let (mut x, mut y) = (
                    internvl::load(&config_dir(a)).expect(a),
                    internvl::load(&config_dir(b)).expect(b),
                );
                (x.path, x.processor_type) = (PathBuf::new(), String::new());
                (y.path, y.processor_type) = (PathBuf::new(), String::new());
                assert_eq!(x, y, "{a} vs {b}");
            }
        };
        same(name, &format!("{name}_v5"));
        same(name, &format!("{name}_v5proc"));
    }
    // Class defaults where the file says nothing.
    let tiny = qwen::load(&config_dir("qwen_tiny")).expect("tiny");
    assert_eq!(tiny.norm.image_std, preprocess::OPENAI_CLIP_STD);
    assert_eq!(
        (tiny.min_pixels, tiny.max_pixels, tiny.factor()),
        (256, 1024, 8)
    );
    let t3 = qwen::load(&config_dir("qwen_t3_bilinear_v5")).expect("t3");
    assert_eq!(
        (t3.resample, t3.temporal_patch_size, t3.norm.image_mean),
        (Filter::Bilinear, 3, [0.5; 3])
    );
    let hub = internvl::load(&config_dir("internvl_hub_v5proc")).expect("internvl_hub");
    assert_eq!(
        (hub.tile, hub.min_patches, hub.max_patches),
        ((448, 448), 1, 12)
    );
    assert_eq!(hub.norm.image_mean, [0.485, 0.456, 0.406]);
    assert_eq!(hub.norm.image_std, [0.229, 0.224, 0.225]);
    assert!(!hub.crop_to_patches && hub.tiles_images());
    let bare = InternVlImageConfig::from_json(
        Path::new("x.json"),
        &json!({"image_processor_type": "GotOcr2ImageProcessorPil", "size": 32}),
    )
    .expect("bare");
    assert_eq!(
        (bare.tile, bare.min_patches, bare.max_patches),
        ((32, 32), 1, 12)
    );
    assert_eq!(bare.norm.image_mean, preprocess::OPENAI_CLIP_MEAN);
    // v5 `size` alone, and the v4 keys winning over it.
    let v5 = QwenVlImageConfig::from_json(
        Path::new("x.json"),
        &json!({"image_processor_type": "Qwen2VLImageProcessorFast",
                "size": {"shortest_edge": 100, "longest_edge": 200}}),
    )
    .expect("v5 size");
    assert_eq!((v5.min_pixels, v5.max_pixels), (100, 200));
    let both = QwenVlImageConfig::from_json(
        Path::new("x.json"),
        &json!({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 50,
                "size": {"shortest_edge": 100, "longest_edge": 200}}),
    )
    .expect("both");
    assert_eq!((both.min_pixels, both.max_pixels), (50, 200));
    let default = QwenVlImageConfig::from_json(
        Path::new("x.json"),
        &json!({"image_processor_type": "Qwen2VLImageProcessor"}),
    )
    .expect("defaults");
    assert_eq!(
        (default.min_pixels, default.max_pixels),
        (qwen::DEFAULT_MIN_PIXELS, qwen::DEFAULT_MAX_PIXELS)
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mbq-family-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn bad_configs_name_the_file_and_key() {
    let dir = scratch("bad");
    let qwen_cases = [
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 0}"#,
            "min_pixels",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": -5}"#,
            "max_pixels",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 2000, "max_pixels": 1000}"#,
            "min_pixels",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "size": {"shortest_edge": 10}}"#,
            "longest_edge",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "size": {"height": 10, "width": 10}}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "size": {"shortest_edge": 10, "longest_edge": "big"}}"#,
            "size.longest_edge",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "size": 448}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 0}"#,
            "patch_size",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "merge_size": 1.5}"#,
            "merge_size",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "temporal_patch_size": "2"}"#,
            "temporal_patch_size",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "resample": 1}"#,
            "resample",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5, 0.5]}"#,
            "image_mean",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.5, 0, 0.5]}"#,
            "image_std",
        ),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "do_resize": "yes"}"#,
            "do_resize",
        ),
        (r#"{"image_processor": [1, 2]}"#, "image_processor"),
        (
            r#"{"image_processor": {"min_pixels": 5}}"#,
            "image_processor_type",
        ),
        (r#"{"image_processor_type": 7}"#, "image_processor_type"),
        (
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "#,
            "invalid JSON",
        ),
    ];
    let internvl_cases = [
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "size": {"shortest_edge": 448}}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 0, "width": 448}}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "size": -448}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "max_patches": 0}"#,
            "max_patches",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "min_patches": "1"}"#,
            "min_patches",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "min_patches": 5, "max_patches": 4}"#,
            "min_patches",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": 1}"#,
            "crop_to_patches",
        ),
        (
            r#"{"image_processor_type": "GotOcr2ImageProcessor", "rescale_factor": "1/255"}"#,
            "rescale_factor",
        ),
    ];
    for (json, key) in qwen_cases {
        for file in ["preprocessor_config.json", "processor_config.json"] {
            let _ = std::fs::remove_file(dir.join("preprocessor_config.json"));
            let _ = std::fs::remove_file(dir.join("processor_config.json"));
            // the v5 file nests the settings (except the cases about nesting itself)
            let text = if file == "processor_config.json" && !json.contains("image_processor\"") {
                match serde_json::from_str::<Value>(json) {
                    Ok(v) => json!({"image_processor": v, "processor_class": "Qwen2VLProcessor"})
                        .to_string(),
                    Err(_) => continue,
                }
            } else {
                json.to_string()
            };
            let path = dir.join(file);
            std::fs::write(&path, text).expect("write");
            match qwen::load(&dir) {
                Err(Error::Config { path: p, msg }) => {
                    assert_eq!(p, path);
                    assert!(msg.contains(key), "{json}: \"{msg}\" should name {key}");
                }
                other => panic!("{json} ({file}): expected a Config error, got {other:?}"),
            }
        }
    }
    let _ = std::fs::remove_file(dir.join("processor_config.json"));
    let path = dir.join("preprocessor_config.json");
    for (json, key) in internvl_cases {
        std::fs::write(&path, json).expect("write");
        match internvl::load(&dir) {
            Err(Error::Config { path: p, msg }) => {
                assert_eq!(p, path);
                assert!(msg.contains(key), "{json}: \"{msg}\" should name {key}");
            }
            other => panic!("{json}: expected a Config error, got {other:?}"),
        }
    }
    // Each loader names the classes it reads when given another one.
    std::fs::write(
        &path,
        r#"{"image_processor_type": "GotOcr2ImageProcessorFast"}"#,
    )
    .expect("write");
    match qwen::load(&dir) {
        Err(Error::Unsupported { path: p, found, .. }) => {
            assert_eq!(
                (p, found.as_str()),
                (path.clone(), "GotOcr2ImageProcessorFast")
            )
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    std::fs::write(
        &path,
        r#"{"image_processor_type": "Qwen2VLImageProcessor"}"#,
    )
    .expect("write");
    assert!(matches!(
        internvl::load(&dir),
        Err(Error::Unsupported { .. })
    ));
    // Neither family goes through the LLaVA loader.
    assert!(matches!(
        preprocess::load(&dir),
        Err(Error::Unsupported { .. })
    ));
    std::fs::remove_file(&path).expect("rm");
    assert!(matches!(qwen::load(&dir), Err(Error::Missing { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn extreme_aspect_ratio_is_an_error_for_qwen_only() {
    let img = image::RgbImage::new(201, 1);
    let cfg = qwen::load(&config_dir("qwen_tiny")).expect("tiny");
    match qwen::preprocess(&cfg, &img) {
        Err(Error::Invalid(msg)) => {
            assert!(
                msg.contains("aspect ratio") && msg.contains("201x1"),
                "{msg}"
            )
        }
        other => panic!("expected the aspect-ratio error, got {other:?}"),
    }
    // exactly 200 is allowed (transformers tests `> 200`)
    assert!(qwen::preprocess(&cfg, &image::RgbImage::new(200, 1)).is_ok());
    assert!(qwen::smart_resize(0, 5, 28, 1, 10).is_err());
    // InternVL has no such limit (transformers tiles the 402x2 reference case into 6 + 1).
    let internvl_cfg = internvl::load(&config_dir("internvl_tiny")).expect("internvl");
    let out = internvl::preprocess(&internvl_cfg, &img).expect("tiles");
    assert_eq!((out.grid, out.num_tiles), ((6, 1), 7));
    assert!(internvl::preprocess(&internvl_cfg, &image::RgbImage::new(0, 4)).is_err());
}

#[test]
fn patchify_orders_rows_by_merge_block() {
    // A 3 x 4 x 8 image with patch 2, merge 2, two frames: each value encodes (c, y, x).
    let (h, w) = (4usize, 8usize);
    let chw: Vec<f32> = (0..3 * h * w).map(|i| i as f32).collect();
    let rows = qwen::patchify(&chw, h, w, 2, 2, 2).expect("patchify");
    let row_len = 3 * 2 * 2 * 2;
    assert_eq!(rows.len(), 8 * row_len);
    // row 2 is block (0, 0), position (1, 0): pixels y 2..4, x 0..2
    let r2 = &rows[2 * row_len..3 * row_len];
    let at = |c: usize, y: usize, x: usize| (c * h * w + y * w + x) as f32;
    assert_eq!(
        &r2[..8],
        &[
            at(0, 2, 0),
            at(0, 2, 1),
            at(0, 3, 0),
            at(0, 3, 1),
            at(0, 2, 0),
            at(0, 2, 1),
            at(0, 3, 0),
            at(0, 3, 1)
        ]
    );
    // row 4 starts block (0, 1): pixels y 0..2, x 4..6 of channel 0
    assert_eq!(rows[4 * row_len], at(0, 0, 4));
    assert!(qwen::patchify(&chw, h, w, 3, 2, 2).is_err());
}
