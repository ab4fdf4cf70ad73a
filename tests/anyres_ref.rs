//! OneVision geometry, token counts and feature packing against transformers
//! 4.57.6 (processor) and torch 2.9.1 (LlavaOnevisionModel.pack_image_features).

mod imgref;

use imgref::{f32s_at, pair, read_bin, read_json, uint, Rng};
use mbq::anyres;

fn pinpoints(reference: &serde_json::Value, set: &str) -> Vec<(usize, usize)> {
    reference["pinpoint_sets"][set]
        .as_array()
        .expect("pins")
        .iter()
        .map(pair)
        .collect()
}

#[test]
fn geometry_and_token_counts_match() {
    let reference = read_json("anyres_ref.json");
    let cases = reference["geometry"].as_array().expect("geometry");
    for case in cases {
        let pins = pinpoints(&reference, case["pins"].as_str().expect("pins"));
        let size = (uint(case, "h"), uint(case, "w"));
        let (tile, patch) = (uint(case, "tile"), uint(case, "patch"));
        let what = format!("{case}");
        assert_eq!(
            anyres::select_best_resolution(size, &pins).expect("best"),
            pair(&case["best"]),
            "{what}"
        );
        assert_eq!(
            anyres::grid_shape(size, &pins, tile).expect("grid"),
            pair(&case["grid"]),
            "{what}"
        );
        assert_eq!(
            anyres::num_tiles(size, &pins, tile).expect("tiles"),
            uint(case, "num_patches"),
            "{what}"
        );
        let aspect = case["aspect"].as_str().expect("aspect");
        let full = case["full"].as_bool().expect("full");
        let tokens = anyres::onevision_num_image_tokens(size, &pins, tile, patch, aspect, full)
            .expect("tokens");
        assert_eq!(tokens, uint(case, "tokens"), "{what}");
    }
    println!("geometry: {} cases identical", cases.len());
}

#[test]
fn pack_matches_torch() {
    let reference = read_json("anyres_ref.json");
    let bin = read_bin("pack_f32.bin");
    let cases = reference["pack"].as_array().expect("pack");
    let mut max_diff = 0f32;
    for case in cases {
        let pins = pinpoints(&reference, case["pins"].as_str().expect("pins"));
        let (tile, patch, dim) = (uint(case, "tile"), uint(case, "patch"), uint(case, "dim"));
        let size = (uint(case, "h"), uint(case, "w"));
        let ntiles = uint(case, "num_tiles");
        let side = tile / patch;
        let mut rng = Rng::new(case["seed"].as_u64().expect("seed"));
        let feats: Vec<f32> = (0..ntiles * side * side * dim).map(|_| rng.f32()).collect();
        let newline: Vec<f32> = (0..dim).map(|_| rng.f32()).collect();
        let aspect = case["aspect"].as_str().expect("aspect");
        let (out, rows) = anyres::pack_onevision_features(
            &feats,
            ntiles,
            side * side,
            dim,
            size,
            &pins,
            tile,
            patch,
            aspect,
            &newline,
        )
        .expect("pack");
        assert_eq!(rows, uint(case, "rows"), "{case}");
        assert_eq!(out.len(), rows * dim);
        let want = f32s_at(&bin, uint(case, "offset"), rows * dim);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            let d = (a - b).abs();
            assert!(d <= 1e-5, "{case}: value {i}: {a} vs torch {b}");
            max_diff = max_diff.max(d);
        }
        let count = anyres::onevision_num_image_tokens(size, &pins, tile, patch, aspect, true)
            .expect("count");
        assert_eq!(count, rows, "processor count vs packed rows: {case}");
    }
    println!(
        "pack: {} cases, max |diff| vs torch = {max_diff:e}",
        cases.len()
    );
}

#[test]
fn pack_rejects_inconsistent_input() {
    let pins = [(32, 32), (32, 64)];
    let newline = [0.0f32; 2];
    // wrong feature count
    assert!(anyres::pack_onevision_features(
        &[0.0; 10],
        3,
        16,
        2,
        (10, 20),
        &pins,
        32,
        8,
        "anyres_max_9",
        &newline
    )
    .is_err());
    // tile count that does not match the grid (1x2 grid + base = 3 tiles)
    assert!(anyres::pack_onevision_features(
        &[0.0; 4 * 16 * 2],
        4,
        16,
        2,
        (10, 20),
        &pins,
        32,
        8,
        "anyres_max_9",
        &newline
    )
    .is_err());
    // tokens per tile not (tile/patch)^2
    assert!(anyres::pack_onevision_features(
        &[0.0; 3 * 9 * 2],
        3,
        9,
        2,
        (10, 20),
        &pins,
        32,
        8,
        "anyres_max_9",
        &newline
    )
    .is_err());
    // bad aspect ratio string
    assert!(anyres::pack_onevision_features(
        &[0.0; 3 * 16 * 2],
        3,
        16,
        2,
        (10, 20),
        &pins,
        32,
        8,
        "anyres",
        &newline
    )
    .is_err());
    // empty image, no pinpoints
    assert!(anyres::select_best_resolution((0, 5), &pins).is_err());
    assert!(anyres::select_best_resolution((5, 5), &[]).is_err());
    // a single tile: tokens + one newline
    let (out, rows) = anyres::pack_onevision_features(
        &[1.0; 4],
        1,
        2,
        2,
        (5, 5),
        &pins,
        32,
        8,
        "anyres_max_9",
        &[7.0, 8.0],
    )
    .expect("single");
    assert_eq!((rows, out), (3, vec![1.0, 1.0, 1.0, 1.0, 7.0, 8.0]));
}
