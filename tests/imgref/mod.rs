//! Shared helpers for the reference tests: the deterministic input generator
//! and hash mirrored from ref/make_ref.py, and readers for the ref/ files.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// splitmix64, as `Rng` in ref/make_ref.py.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// `k / 2^24 - 0.5`, exact in f32.
    pub fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32
    }
}

/// Interleaved u8 pixels: kind 0 noise, 1 gradient + noise, 2 blocks (`gen_pixels`).
pub fn gen_pixels(seed: u64, w: usize, h: usize, c: usize, kind: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let n = w * h * c;
    match kind {
        0 => rng.bytes(n),
        1 => {
            let (ax, ay) = (rng.below(16) as usize, rng.below(16) as usize);
            let noise = rng.bytes(n);
            let mut out = vec![0u8; n];
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        let i = (y * w + x) * c + ch;
                        out[i] = (((x * ax + y * ay + ch * 50) / 4 + (noise[i] & 7) as usize) & 255)
                            as u8;
                    }
                }
            }
            out
        }
        _ => {
            let bs = 1 + rng.below(16) as usize;
            let pal: Vec<u8> = rng
                .bytes(64 * c)
                .into_iter()
                .map(|v| {
                    if v < 40 {
                        0
                    } else if v > 215 {
                        255
                    } else {
                        v
                    }
                })
                .collect();
            let mut out = vec![0u8; n];
            for y in 0..h {
                for x in 0..w {
                    let b = ((y / bs) * 31 + (x / bs) * 17) % 64;
                    for ch in 0..c {
                        out[(y * w + x) * c + ch] = pal[b * c + ch];
                    }
                }
            }
            out
        }
    }
}

/// A PIL-mode image from a case spec (`seed`, `w`, `h`, `mode`, `kind`).
pub fn make_image(spec: &Value) -> image::DynamicImage {
    let (w, h) = (uint(spec, "w"), uint(spec, "h"));
    let mode = spec["mode"].as_str().expect("mode");
    let c = match mode {
        "L" => 1,
        "LA" => 2,
        "RGB" => 3,
        "RGBA" => 4,
        other => panic!("mode {other}"),
    };
    let data = gen_pixels(
        spec["seed"].as_u64().expect("seed"),
        w,
        h,
        c,
        spec["kind"].as_u64().expect("kind"),
    );
    let (w, h) = (w as u32, h as u32);
    match c {
        1 => image::DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, data).expect("L")),
        2 => image::DynamicImage::ImageLumaA8(
            image::GrayAlphaImage::from_raw(w, h, data).expect("LA"),
        ),
        3 => image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, data).expect("RGB")),
        _ => image::DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, data).expect("RGBA")),
    }
}

/// Position-weighted 64-bit hash (`hash_u8` in make_ref.py).
pub fn hash_u8(data: &[u8]) -> String {
    let mut h = 0u64;
    for (i, &b) in data.iter().enumerate() {
        let mut z = (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
        z ^= z >> 29;
        z = z.wrapping_mul(0xBF58476D1CE4E5B9);
        z ^= z >> 32;
        h = h.wrapping_add((b as u64 + 1).wrapping_mul(z));
    }
    format!("{:016x}", h ^ data.len() as u64)
}

pub fn ref_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

pub fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(ref_dir().join(name))
        .expect("reference json (run tests/fixtures/preprocess/make_ref.py)");
    serde_json::from_str(&text).expect("valid json")
}

pub fn read_bin(name: &str) -> Vec<u8> {
    std::fs::read(ref_dir().join(name))
        .expect("reference bin (run tests/fixtures/preprocess/make_ref.py)")
}

/// `n` little-endian f32 values at byte `offset`.
pub fn f32s_at(bin: &[u8], offset: usize, n: usize) -> Vec<f32> {
    bin[offset..offset + 4 * n]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn uint(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}")) as usize
}

pub fn pair(v: &Value) -> (usize, usize) {
    (
        v[0].as_u64().expect("pair") as usize,
        v[1].as_u64().expect("pair") as usize,
    )
}
