//! Full image processors against transformers 4.57.6's slow processors, and
//! `load_image` against `transformers.image_utils.load_image` (PIL).

mod imgref;

use std::collections::BTreeSet;
use std::path::Path;

use imgref::{f32s_at, hash_u8, make_image, read_bin, read_json, ref_dir, uint, Rng};
use mbq::error::Error;
use mbq::preprocess::{self, ImageProcessorConfig, ProcessorKind, SizeSpec};

/// Bytes of the u8 tiles in HF's `[tiles, 3, h, w]` order.
fn tiles_chw(tiles: &[image::RgbImage]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tiles {
        for c in 0..3 {
            for p in t.pixels() {
                out.push(p.0[c]);
            }
        }
    }
    out
}

#[test]
fn processors_match_transformers() {
    let reference = read_json("preprocess_ref.json");
    let bin = read_bin("processor_f32.bin");
    let cases = reference["processor"].as_array().expect("processor cases");
    let mut worst = std::collections::BTreeMap::<String, (f32, usize, usize)>::new();
    for case in cases {
        let name = case["config"].as_str().expect("config");
        let cfg = preprocess::load(&ref_dir().join("configs").join(name)).expect("config loads");
        let img = preprocess::to_rgb8(&make_image(case));
        let what = format!(
            "{name} {}x{} {} seed {}",
            case["w"], case["h"], case["mode"], case["seed"]
        );

        let shape: Vec<usize> = case["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|v| v.as_u64().expect("dim") as usize)
            .collect();
        let tiles = preprocess::preprocess_tiles_u8(&cfg, &img).expect("tiles");
        assert_eq!(
            hash_u8(&tiles_chw(&tiles)),
            case["u8_hash"].as_str().expect("hash"),
            "u8 tiles differ: {what}"
        );

        let out = preprocess::preprocess(&cfg, &img).expect("preprocess");
        assert_eq!(
            vec![out.num_tiles, 3, out.height, out.width],
            shape,
            "shape: {what}"
        );
        assert_eq!(out.pixel_values.len(), shape.iter().product::<usize>());
        assert_eq!(out.image_size, (uint(case, "h"), uint(case, "w")));
        if let Some(size) = case.get("image_size") {
            assert_eq!(out.image_size, imgref::pair(size));
        }

        let entry = worst.entry(name.to_string()).or_insert((0.0, 0, 0));
        entry.1 += 1;
        let mut check = |i: usize, want: f32| {
            let d = (out.pixel_values[i] - want).abs();
            assert!(
                d <= 1e-5,
                "{what}: pixel_values[{i}] = {} vs HF {want}",
                out.pixel_values[i]
            );
            entry.0 = entry.0.max(d);
            entry.2 += 1;
        };
        if let Some(off) = case.get("sample_offset") {
            // sorted distinct indices drawn as in make_ref.py
            let mut rng = Rng::new(case["seed"].as_u64().expect("seed") ^ 0x5A5A);
            let n = out.pixel_values.len() as u64;
            let idx: BTreeSet<usize> = (0..200).map(|_| rng.below(n) as usize).collect();
            assert_eq!(idx.len(), uint(case, "n_samples"));
            let vals = f32s_at(&bin, off.as_u64().expect("offset") as usize, idx.len());
            for (i, want) in idx.into_iter().zip(vals) {
                check(i, want);
            }
        }
        if let Some(off) = case.get("full_offset") {
            let full = f32s_at(
                &bin,
                off.as_u64().expect("offset") as usize,
                out.pixel_values.len(),
            );
            for (i, want) in full.into_iter().enumerate() {
                check(i, want);
            }
        }
    }
    for (name, (d, n, values)) in &worst {
        println!("{name}: {n} images, {values} values compared, max |diff| = {d:e}");
    }
}

#[test]
fn load_image_matches_pil() {
    let reference = read_json("load_image_ref.json");
    let bin = read_bin("load_image_u8.bin");
    let mut exact = 0;
    let mut report = Vec::new();
    for case in reference["cases"].as_array().expect("cases") {
        let file = case["file"].as_str().expect("file");
        let img = preprocess::load_image(&ref_dir().join("images").join(file)).expect(file);
        assert_eq!(
            (img.width() as usize, img.height() as usize),
            (uint(case, "w"), uint(case, "h")),
            "{file}"
        );
        let off = case["offset"].as_u64().expect("offset") as usize;
        let want = &bin[off..off + img.as_raw().len()];
        let max = img
            .as_raw()
            .iter()
            .zip(want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        let differing = img
            .as_raw()
            .iter()
            .zip(want)
            .filter(|(a, b)| a != b)
            .count();
        if max == 0 {
            exact += 1;
        } else {
            report.push(format!(
                "{file} (PIL mode {}): {differing} bytes differ, max {max}",
                case["pil_mode"]
            ));
        }
        // Lossless formats must be exact; lossy decoders may differ by rounding.
        let lossy = file.ends_with(".jpg") || file.starts_with("lossy");
        assert!(
            lossy || max == 0,
            "{file}: {differing} bytes differ from PIL (max {max})"
        );
        assert!(
            max <= 3,
            "{file}: {differing} bytes differ from PIL (max {max})"
        );
    }
    println!("load_image: {exact} files bit-exact with PIL");
    for line in &report {
        println!("  {line}");
    }
}

#[test]
fn load_image_errors_name_the_path() {
    let bad = ref_dir().join("images").join("not_an_image.png");
    match preprocess::load_image(&bad) {
        Err(Error::Image { path, .. }) => assert_eq!(path, bad),
        other => panic!("expected Error::Image, got {other:?}"),
    }
    let missing = ref_dir().join("images").join("no_such_file.png");
    match preprocess::load_image(&missing) {
        Err(Error::Image { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Error::Image, got {other:?}"),
    }
}

fn write_config(dir: &Path, file: &str, json: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join(file);
    std::fs::write(&path, json).expect("write");
    path
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mbq-imgref-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn config_defaults_follow_the_transformers_classes() {
    let dir = scratch("defaults");
    write_config(
        &dir,
        "preprocessor_config.json",
        r#"{"image_processor_type": "CLIPImageProcessor"}"#,
    );
    let clip = preprocess::load(&dir).expect("clip");
    assert_eq!(clip.kind, ProcessorKind::Clip);
    assert_eq!(clip.size, SizeSpec::ShortestEdge(224));
    assert_eq!(clip.crop_size, (224, 224));
    assert!(clip.do_center_crop && clip.do_convert_rgb && !clip.do_pad);
    assert_eq!(clip.image_mean, [0.48145466, 0.4578275, 0.40821073]);

    write_config(
        &dir,
        "preprocessor_config.json",
        r#"{"image_processor_type": "SiglipImageProcessorFast", "do_center_crop": true}"#,
    );
    let siglip = preprocess::load(&dir).expect("siglip");
    assert_eq!(siglip.kind, ProcessorKind::Siglip);
    assert_eq!(
        siglip.size,
        SizeSpec::HeightWidth {
            height: 224,
            width: 224
        }
    );
    assert!(!siglip.do_center_crop && !siglip.do_convert_rgb);
    assert_eq!(siglip.image_std, [0.5; 3]);

    write_config(
        &dir,
        "preprocessor_config.json",
        r#"{"image_processor_type": "LlavaOnevisionImageProcessor", "size": 32, "crop_size": 7}"#,
    );
    let ov = preprocess::load(&dir).expect("ov");
    assert_eq!(ov.size, SizeSpec::ShortestEdge(32));
    assert_eq!(ov.image_grid_pinpoints.len(), 36);
    assert_eq!(ov.image_grid_pinpoints[1], (384, 768));
    assert!(ov.do_pad && ov.do_convert_rgb);
    assert_eq!(ov.image_mean, [0.48145466, 0.4578275, 0.40821073]);

    // preprocessor_config.json wins over processor_config.json.
    write_config(
        &dir,
        "processor_config.json",
        r#"{"image_processor": {"image_processor_type": "SiglipImageProcessor"}}"#,
    );
    assert_eq!(
        preprocess::load(&dir).expect("both").kind,
        ProcessorKind::LlavaOnevision
    );
    std::fs::remove_file(dir.join("preprocessor_config.json")).expect("rm");
    let v5 = ImageProcessorConfig::load(&dir).expect("v5");
    assert_eq!(v5.kind, ProcessorKind::Siglip);
    assert!(v5.path.ends_with("processor_config.json"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_errors_are_specific() {
    let dir = scratch("errors");
    match preprocess::load(&dir) {
        Err(Error::Missing { path, .. }) => assert!(path.ends_with("preprocessor_config.json")),
        other => panic!("expected Missing, got {other:?}"),
    }
    let cases = [
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "resample": 1}"#,
            "resample",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 3}}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "size": 0}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "crop_size": {"shortest_edge": 3}}"#,
            "crop_size",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]}"#,
            "image_mean",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "do_resize": "yes"}"#,
            "do_resize",
        ),
        (
            r#"{"image_processor_type": "SiglipImageProcessor", "size": {"shortest_edge": 3}}"#,
            "size",
        ),
        (
            r#"{"image_processor_type": "LlavaOnevisionImageProcessor", "image_grid_pinpoints": [[384]]}"#,
            "image_grid_pinpoints",
        ),
        (r#"{"size": 3}"#, "image_processor_type"),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "#,
            "invalid JSON",
        ),
    ];
    for (json, key) in cases {
        let path = write_config(&dir, "preprocessor_config.json", json);
        match preprocess::load(&dir) {
            Err(Error::Config { path: p, msg }) => {
                assert_eq!(p, path);
                assert!(msg.contains(key), "{msg} should name {key}");
            }
            other => panic!("{json}: expected Config error, got {other:?}"),
        }
    }
    write_config(
        &dir,
        "preprocessor_config.json",
        r#"{"image_processor_type": "Qwen2VLImageProcessor"}"#,
    );
    assert!(matches!(
        preprocess::load(&dir),
        Err(Error::Unsupported { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
