//! `mbq shapes`: a deterministic synthetic visual-question-answering task.
//!
//! Each scene is a small RGB image with 1 to 4 non-overlapping shapes
//! (circle, square, triangle, cross) in named colours on a light
//! solid or gradient background. Each image comes with short-answer
//! questions (colour, shape, count, existence, spatial relation) and one
//! templated caption, in the LLaVA calibration JSONL format. The same seed
//! gives the same bytes: one `StdRng` drives everything, in a fixed order.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};

/// Side of the square images, in pixels.
pub const IMAGE_SIZE: u32 = 64;
/// Sub-samples per pixel side (anti-aliased edges).
const SUPERSAMPLE: u32 = 4;
/// Half-extent of a shape, in pixels (inclusive range).
const MIN_HALF: f32 = 8.0;
const MAX_HALF: f32 = 13.0;
/// Free pixels between two shapes' bounding circles, and to the border.
const GAP: f32 = 3.0;
/// Centre offset below which a left/right or above/below question is not asked.
const RELATION_MARGIN: f32 = 6.0;
/// Placement attempts per shape before the scene makes do with fewer.
const PLACEMENT_TRIES: usize = 200;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
}

/// The kinds scenes are drawn from (stars are drawable but left out: at
/// 64x64 they are too close to crosses and circles for the bundled model).
pub const SHAPES: [ShapeKind; 4] = [
    ShapeKind::Circle,
    ShapeKind::Square,
    ShapeKind::Triangle,
    ShapeKind::Cross,
];

impl ShapeKind {
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Cross => "cross",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

pub const COLOURS: [Colour; 6] = [
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Purple,
    Colour::Orange,
];

impl Colour {
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// The base RGB value (each drawn shape is jittered around it).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 165, 55],
            Colour::Blue => [35, 75, 215],
            Colour::Yellow => [230, 200, 20],
            Colour::Purple => [135, 55, 175],
            Colour::Orange => [245, 125, 25],
        }
    }
}

/// One shape of a scene: kind, colour, centre and half-extent in pixels.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    pub kind: ShapeKind,
    pub colour: Colour,
    pub rgb: [u8; 3],
    pub x: f32,
    pub y: f32,
    /// Stars and triangles point up.
    pub half: f32,
}

/// Background: a vertical/horizontal/diagonal gradient between two light
/// colours (equal for a solid background).
#[derive(Clone, Debug, Serialize)]
pub struct Background {
    pub from: [u8; 3],
    pub to: [u8; 3],
    /// Direction (dx, dy) of the gradient, unit-free.
    pub dir: [f32; 2],
}

#[derive(Clone, Debug, Serialize)]
pub struct Scene {
    pub background: Background,
    pub shapes: Vec<Shape>,
}

/// One question about a scene, with its short answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qa {
    pub kind: &'static str,
    pub question: String,
    pub answer: String,
}

fn light(rng: &mut StdRng) -> [u8; 3] {
    [
        rng.random_range(205..=255u8),
        rng.random_range(205..=255u8),
        rng.random_range(205..=255u8),
    ]
}

/// Draws a random scene.
pub fn random_scene(rng: &mut StdRng) -> Scene {
    let from = light(rng);
    let background = if rng.random_bool(0.5) {
        Background {
            from,
            to: from,
            dir: [1.0, 0.0],
        }
    } else {
        let dirs = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]];
        Background {
            from,
            to: light(rng),
            dir: dirs[rng.random_range(0..dirs.len())],
        }
    };
    let n = rng.random_range(1..=4usize);
    let size = IMAGE_SIZE as f32;
    let mut shapes: Vec<Shape> = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = SHAPES[rng.random_range(0..SHAPES.len())];
        let colour = COLOURS[rng.random_range(0..COLOURS.len())];
        let base = colour.rgb();
        let mut rgb = [0u8; 3];
        for (c, b) in rgb.iter_mut().zip(base) {
            *c = (b as i32 + rng.random_range(-12..=12)).clamp(0, 255) as u8;
        }
        let half = rng.random_range(MIN_HALF..=MAX_HALF).round();
        for _ in 0..PLACEMENT_TRIES {
            let lo = half + GAP;
            let hi = size - half - GAP;
            let x = rng.random_range(lo..=hi).round();
            let y = rng.random_range(lo..=hi).round();
            let free = shapes.iter().all(|s| {
                let d = ((s.x - x).powi(2) + (s.y - y).powi(2)).sqrt();
                d > s.half + half + GAP
            });
            if free {
                shapes.push(Shape {
                    kind,
                    colour,
                    rgb,
                    x,
                    y,
                    half,
                });
                break;
            }
        }
    }
    Scene { background, shapes }
}

/// Even-odd point-in-polygon.
fn in_polygon(px: f32, py: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > py) != (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Whether point (dx, dy), relative to the shape's centre, is inside it.
fn covers(kind: ShapeKind, half: f32, dx: f32, dy: f32) -> bool {
    let s = half;
    match kind {
        ShapeKind::Circle => dx * dx + dy * dy <= s * s,
        ShapeKind::Square => dx.abs() <= 0.85 * s && dy.abs() <= 0.85 * s,
        ShapeKind::Triangle => in_polygon(dx, dy, &[(0.0, -s), (s, 0.8 * s), (-s, 0.8 * s)]),
        ShapeKind::Cross => {
            let t = 0.34 * s;
            (dx.abs() <= t && dy.abs() <= s) || (dy.abs() <= t && dx.abs() <= s)
        }
        ShapeKind::Star => {
            let mut pts = [(0.0f32, 0.0f32); 10];
            for (i, p) in pts.iter_mut().enumerate() {
                let r = if i % 2 == 0 { s } else { 0.45 * s };
                let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
                *p = (r * a.cos(), r * a.sin());
            }
            in_polygon(dx, dy, &pts)
        }
    }
}

/// Renders a scene (anti-aliased by supersampling).
pub fn render(scene: &Scene) -> RgbImage {
    let size = IMAGE_SIZE;
    let bg = &scene.background;
    let (gx, gy) = (bg.dir[0], bg.dir[1]);
    // Gradient parameter t in [0, 1] along dir over the image.
    let corners = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)];
    let proj: Vec<f32> = corners.iter().map(|(x, y)| x * gx + y * gy).collect();
    let pmin = proj.iter().copied().fold(f32::INFINITY, f32::min);
    let pmax = proj.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let n = SUPERSAMPLE;
    let mut img = RgbImage::new(size, size);
    for py in 0..size {
        for px in 0..size {
            let mut acc = [0u32; 3];
            for sy in 0..n {
                for sx in 0..n {
                    let x = px as f32 + (sx as f32 + 0.5) / n as f32;
                    let y = py as f32 + (sy as f32 + 0.5) / n as f32;
                    let hit = scene
                        .shapes
                        .iter()
                        .find(|s| covers(s.kind, s.half, x - s.x, y - s.y));
                    let c = match hit {
                        Some(s) => s.rgb,
                        None => {
                            let u = x / size as f32;
                            let v = y / size as f32;
                            let t = ((u * gx + v * gy) - pmin) / (pmax - pmin).max(1e-6);
                            let mut c = [0u8; 3];
                            for (k, ck) in c.iter_mut().enumerate() {
                                let a = bg.from[k] as f32;
                                let b = bg.to[k] as f32;
                                *ck = (a + (b - a) * t).round() as u8;
                            }
                            c
                        }
                    };
                    for k in 0..3 {
                        acc[k] += c[k] as u32;
                    }
                }
            }
            let d = n * n;
            img.put_pixel(
                px,
                py,
                Rgb([
                    ((acc[0] + d / 2) / d) as u8,
                    ((acc[1] + d / 2) / d) as u8,
                    ((acc[2] + d / 2) / d) as u8,
                ]),
            );
        }
    }
    img
}

fn article_phrase(s: &Shape) -> String {
    let colour = s.colour.name();
    let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {colour} {}", s.kind.name())
}

/// The caption: the shapes left to right (top to bottom on ties), as
/// "A red circle, a green star and a blue square on a light background."
pub fn caption(scene: &Scene) -> String {
    let mut order: Vec<&Shape> = scene.shapes.iter().collect();
    order.sort_by(|a, b| a.x.total_cmp(&b.x).then(a.y.total_cmp(&b.y)));
    let parts: Vec<String> = order.iter().map(|s| article_phrase(s)).collect();
    let list = match parts.len() {
        0 => "nothing".to_string(),
        1 => parts[0].clone(),
        k => format!("{} and {}", parts[..k - 1].join(", "), parts[k - 1]),
    };
    let mut text = format!("{list} on a light background.");
    if let Some(first) = text.get(0..1) {
        text = first.to_uppercase() + &text[1..];
    }
    text
}

fn qa(kind: &'static str, question: String, answer: impl Into<String>) -> Qa {
    Qa {
        kind,
        question,
        answer: answer.into(),
    }
}

/// Questions about a scene, each unambiguous: a colour question only names
/// a shape kind that appears once, a shape question only a colour that
/// appears once, relations only between unique kinds whose centres are
/// clearly apart on the asked axis. The caption comes last.
pub fn questions(scene: &Scene, rng: &mut StdRng) -> Vec<Qa> {
    let shapes = &scene.shapes;
    let kind_count = |k: ShapeKind| shapes.iter().filter(|s| s.kind == k).count();
    let colour_count = |c: Colour| shapes.iter().filter(|s| s.colour == c).count();
    let unique_kind: Vec<&Shape> = shapes.iter().filter(|s| kind_count(s.kind) == 1).collect();
    let unique_colour: Vec<&Shape> = shapes
        .iter()
        .filter(|s| colour_count(s.colour) == 1)
        .collect();
    let mut out = Vec::new();

    if !unique_kind.is_empty() {
        let s = unique_kind[rng.random_range(0..unique_kind.len())];
        out.push(qa(
            "color",
            format!("What color is the {}?", s.kind.name()),
            s.colour.name(),
        ));
    }
    if !unique_colour.is_empty() {
        let s = unique_colour[rng.random_range(0..unique_colour.len())];
        out.push(qa(
            "shape",
            format!("What shape is the {} object?", s.colour.name()),
            s.kind.name(),
        ));
    }
    out.push(qa(
        "count",
        "How many shapes are there?".to_string(),
        shapes.len().to_string(),
    ));

    let present: Vec<ShapeKind> = SHAPES
        .iter()
        .copied()
        .filter(|&k| kind_count(k) > 0)
        .collect();
    let absent: Vec<ShapeKind> = SHAPES
        .iter()
        .copied()
        .filter(|&k| kind_count(k) == 0)
        .collect();
    let ask_present = absent.is_empty() || (!present.is_empty() && rng.random_bool(0.5));
    let (k, yes) = if ask_present {
        (present[rng.random_range(0..present.len())], true)
    } else {
        (absent[rng.random_range(0..absent.len())], false)
    };
    out.push(qa(
        "exists",
        format!("Is there a {}?", k.name()),
        if yes { "yes" } else { "no" },
    ));

    // Relations: every ordered pair of unique kinds with a clear offset.
    let mut pairs: Vec<(&Shape, &Shape, &'static str, bool)> = Vec::new();
    for a in &unique_kind {
        for b in &unique_kind {
            if a.kind == b.kind {
                continue;
            }
            if (a.x - b.x).abs() >= RELATION_MARGIN {
                pairs.push((a, b, "left of", a.x < b.x));
                pairs.push((a, b, "right of", a.x > b.x));
            }
            if (a.y - b.y).abs() >= RELATION_MARGIN {
                pairs.push((a, b, "above", a.y < b.y));
                pairs.push((a, b, "below", a.y > b.y));
            }
        }
    }
    if !pairs.is_empty() {
        let (a, b, rel, yes) = pairs[rng.random_range(0..pairs.len())];
        out.push(qa(
            "relation",
            format!("Is the {} {rel} the {}?", a.kind.name(), b.kind.name()),
            if yes { "yes" } else { "no" },
        ));
    }
    out.push(qa(
        "caption",
        "Describe the image.".to_string(),
        caption(scene),
    ));
    out
}

/// One JSONL line of `questions.jsonl` (LLaVA calibration format).
#[derive(Serialize)]
pub struct Record {
    pub id: String,
    pub image: String,
    pub conversations: [Turn; 2],
    pub answer: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Serialize)]
pub struct Turn {
    pub from: &'static str,
    pub value: String,
}

/// A generated item: the image's relative path, the scene and its questions.
pub struct Item {
    pub image: String,
    pub scene: Scene,
    pub qas: Vec<Qa>,
}

/// Generates `count` items from `seed` (the scene, then its questions, per
/// item, from one RNG).
pub fn generate(seed: u64, count: usize) -> Vec<Item> {
    items(seed, count).collect()
}

/// [`generate`] one item at a time: nothing is kept, so any `count` runs in
/// constant memory.
pub fn items(seed: u64, count: usize) -> impl Iterator<Item = Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(move |i| {
        let scene = random_scene(&mut rng);
        let qas = questions(&scene, &mut rng);
        Item {
            image: format!("images/s{seed}_{i:06}.png"),
            scene,
            qas,
        }
    })
}

/// The JSONL records of an item.
pub fn records(item: &Item) -> Vec<Record> {
    let stem = item
        .image
        .trim_start_matches("images/")
        .trim_end_matches(".png");
    item.qas
        .iter()
        .map(|q| Record {
            id: format!("{stem}_{}", q.kind),
            image: item.image.clone(),
            conversations: [
                Turn {
                    from: "human",
                    value: format!("<image>\n{}", q.question),
                },
                Turn {
                    from: "gpt",
                    value: q.answer.clone(),
                },
            ],
            answer: q.answer.clone(),
            kind: q.kind.to_string(),
        })
        .collect()
}

pub struct Summary {
    pub images: usize,
    pub questions: usize,
    pub out: PathBuf,
    /// Notes for the user (stale temporary directories of killed runs).
    pub notes: Vec<String>,
}

/// Writes `count` images and `questions.jsonl` into `out`, atomically: into
/// a temporary sibling directory first, renamed into place when complete.
/// `out` must not exist or be an empty directory.
pub fn write_dataset(seed: u64, count: usize, out: &Path) -> Result<Summary> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::invalid(format!(
                "{}: exists and is not empty; give a new directory",
                out.display()
            )));
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a directory name", out.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let notes = crate::quant::outdir::remove_stale_temp_dirs(&parent, &name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = write_into(seed, count, &tmp);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(Summary {
        out: out.to_path_buf(),
        notes,
        ..summary
    })
}

fn write_into(seed: u64, count: usize, dir: &Path) -> Result<Summary> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let jsonl = dir.join("questions.jsonl");
    let file = std::fs::File::create(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
    let mut w = std::io::BufWriter::new(file);
    let mut n_q = 0;
    for item in items(seed, count) {
        let path = dir.join(&item.image);
        render(&item.scene)
            .save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        for r in records(&item) {
            let line = serde_json::to_string(&r).map_err(|e| Error::invalid(e.to_string()))?;
            writeln!(w, "{line}").map_err(|e| Error::io(&jsonl, e))?;
            n_q += 1;
        }
    }
    w.flush().map_err(|e| Error::io(&jsonl, e))?;
    Ok(Summary {
        images: count,
        questions: n_q,
        out: dir.to_path_buf(),
        notes: Vec::new(),
    })
}
