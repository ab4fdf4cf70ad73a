//! `resize_rgb8` must equal Pillow's `Image.resize` byte for byte.

mod imgref;

use imgref::{hash_u8, make_image, read_json, uint};
use mbq::preprocess::{resize_rgb8, Filter};

#[test]
fn resize_matches_pillow_exactly() {
    let reference = read_json("preprocess_ref.json");
    let cases = reference["resize"].as_array().expect("resize cases");
    let mut failures = Vec::new();
    for case in cases {
        let img = make_image(case).to_rgb8();
        let filter =
            Filter::from_pil(case["filter"].as_i64().expect("filter")).expect("supported filter");
        let out = resize_rgb8(
            &img,
            uint(case, "tw") as u32,
            uint(case, "th") as u32,
            filter,
        )
        .expect("resize");
        if hash_u8(out.as_raw()) != case["hash"].as_str().expect("hash") {
            failures.push(format!(
                "{}x{} -> {}x{} filter {} seed {}",
                case["w"], case["h"], case["tw"], case["th"], case["filter"], case["seed"]
            ));
        }
    }
    println!(
        "resize: {} cases, {} differ from PIL",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "differs from PIL: {failures:#?}");
}

#[test]
fn resize_rejects_empty_sizes() {
    let img = image::RgbImage::new(4, 4);
    assert!(resize_rgb8(&img, 0, 3, Filter::Bicubic).is_err());
    assert!(resize_rgb8(&image::RgbImage::new(0, 4), 3, 3, Filter::Bilinear).is_err());
    // Same size is a copy.
    let img = make_image(&serde_json::json!({"seed": 1, "w": 5, "h": 7, "mode": "RGB", "kind": 0}))
        .to_rgb8();
    assert_eq!(resize_rgb8(&img, 5, 7, Filter::Bicubic).expect("copy"), img);
}
