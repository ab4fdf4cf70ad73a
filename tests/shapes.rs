//! `mbq shapes`: same seed, same bytes; the JSONL is the LLaVA format; every
//! answer agrees with the scene it was drawn from (and with the pixels).

mod common;

use std::path::Path;
use std::process::Command;

use common::scratch;
use mbq::shapes::{caption, generate, render, Colour, ShapeKind, COLOURS, SHAPES};

fn mbq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mbq"))
        .args(args)
        .output()
        .expect("failed to start mbq")
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let d = scratch("shapes_det");
    let run = |seed: &str, name: &str| {
        let out = d.join(name);
        let o = mbq(&[
            "shapes",
            "--seed",
            seed,
            "--count",
            "12",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        files(&out)
    };
    let a = run("5", "a");
    let b = run("5", "b");
    let c = run("6", "c");
    assert_eq!(a.len(), 13, "12 images + questions.jsonl");
    assert!(a == b, "same seed gave different files");
    assert!(a != c, "different seeds gave the same files");
    // No temporary directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn refuses_a_non_empty_output_directory() {
    let d = scratch("shapes_refuse");
    std::fs::write(d.join("keep.txt"), "x").unwrap();
    let o = mbq(&[
        "shapes",
        "--seed",
        "1",
        "--count",
        "2",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not empty") && !e.contains("panicked"), "{e}");
    assert_eq!(std::fs::read_to_string(d.join("keep.txt")).unwrap(), "x");
}

#[test]
fn jsonl_is_llava_format_and_images_exist() {
    let d = scratch("shapes_jsonl").join("out");
    let o = mbq(&[
        "shapes",
        "--seed",
        "3",
        "--count",
        "20",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(d.join("questions.jsonl")).unwrap();
    let mut types = std::collections::BTreeSet::new();
    let mut ids = std::collections::BTreeSet::new();
    for line in text.lines() {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        let img = j["image"].as_str().unwrap();
        assert!(img.starts_with("images/") && d.join(img).is_file(), "{img}");
        let conv = j["conversations"].as_array().unwrap();
        assert_eq!(conv.len(), 2);
        assert_eq!(conv[0]["from"], "human");
        assert!(conv[0]["value"].as_str().unwrap().starts_with("<image>\n"));
        assert_eq!(conv[1]["from"], "gpt");
        assert_eq!(conv[1]["value"], j["answer"]);
        assert!(
            ids.insert(j["id"].as_str().unwrap().to_string()),
            "duplicate id"
        );
        types.insert(j["type"].as_str().unwrap().to_string());
    }
    for t in ["color", "shape", "count", "exists", "relation", "caption"] {
        assert!(types.contains(t), "no {t} question in 20 images");
    }
    // The library reads it back.
    let qs = mbq::eval::load_questions(&d.join("questions.jsonl")).unwrap();
    assert_eq!(qs.len(), text.lines().count());
    assert!(qs.iter().all(|q| !q.prompt.contains("<image>")));
}

fn kind_named(s: &str) -> Option<ShapeKind> {
    SHAPES.iter().copied().find(|k| k.name() == s)
}

fn colour_named(s: &str) -> Option<Colour> {
    COLOURS.iter().copied().find(|c| c.name() == s)
}

#[test]
fn answers_agree_with_the_scene() {
    for item in generate(11, 300) {
        let shapes = &item.scene.shapes;
        assert!((1..=4).contains(&shapes.len()));
        // Non-overlapping, inside the image.
        for (i, a) in shapes.iter().enumerate() {
            assert!(a.x - a.half >= 0.0 && a.x + a.half <= mbq::shapes::IMAGE_SIZE as f32);
            for b in &shapes[i + 1..] {
                let d = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
                assert!(d > a.half + b.half, "overlap in {}", item.image);
            }
        }
        // The pixel at each centre has the shape's colour.
        let img = render(&item.scene);
        for s in shapes {
            let p = img.get_pixel(s.x as u32, s.y as u32).0;
            let close = p
                .iter()
                .zip(s.rgb)
                .all(|(&a, b)| (a as i32 - b as i32).abs() <= 2);
            assert!(close, "{}: centre {p:?} vs {:?}", item.image, s.rgb);
        }
        let of_kind = |k: ShapeKind| shapes.iter().filter(|s| s.kind == k).collect::<Vec<_>>();
        for qa in &item.qas {
            let q = qa.question.as_str();
            let a = qa.answer.as_str();
            match qa.kind {
                "color" => {
                    let k = kind_named(
                        q.trim_start_matches("What color is the ")
                            .trim_end_matches('?'),
                    )
                    .unwrap();
                    let m = of_kind(k);
                    assert_eq!(m.len(), 1, "{q}: ambiguous");
                    assert_eq!(m[0].colour.name(), a);
                }
                "shape" => {
                    let c = colour_named(
                        q.trim_start_matches("What shape is the ")
                            .trim_end_matches(" object?"),
                    )
                    .unwrap();
                    let m: Vec<_> = shapes.iter().filter(|s| s.colour == c).collect();
                    assert_eq!(m.len(), 1, "{q}: ambiguous");
                    assert_eq!(m[0].kind.name(), a);
                }
                "count" => assert_eq!(a, shapes.len().to_string()),
                "exists" => {
                    let k = kind_named(q.trim_start_matches("Is there a ").trim_end_matches('?'))
                        .unwrap();
                    assert_eq!(a, if of_kind(k).is_empty() { "no" } else { "yes" });
                }
                "relation" => {
                    let body = q.trim_start_matches("Is the ").trim_end_matches('?');
                    let (rel, (x, y)) = ["left of", "right of", "above", "below"]
                        .iter()
                        .find_map(|r| body.split_once(&format!(" {r} the ")).map(|p| (*r, p)))
                        .unwrap();
                    let (ka, kb) = (kind_named(x).unwrap(), kind_named(y).unwrap());
                    let (sa, sb) = (of_kind(ka), of_kind(kb));
                    assert!(sa.len() == 1 && sb.len() == 1, "{q}: ambiguous");
                    let (sa, sb) = (sa[0], sb[0]);
                    let truth = match rel {
                        "left of" => sa.x < sb.x,
                        "right of" => sa.x > sb.x,
                        "above" => sa.y < sb.y,
                        _ => sa.y > sb.y,
                    };
                    let gap = if rel.contains("of") {
                        (sa.x - sb.x).abs()
                    } else {
                        (sa.y - sb.y).abs()
                    };
                    assert!(gap >= 6.0, "{q}: too close to call");
                    assert_eq!(a, if truth { "yes" } else { "no" }, "{q}");
                }
                "caption" => {
                    assert_eq!(a, caption(&item.scene));
                    for s in shapes {
                        assert!(a.to_lowercase().contains(&format!(
                            "{} {}",
                            s.colour.name(),
                            s.kind.name()
                        )));
                    }
                    assert!(a.ends_with(" on a light background."));
                    assert!(!a.contains("a orange"), "{a}");
                }
                other => panic!("unknown type {other}"),
            }
        }
    }
}
