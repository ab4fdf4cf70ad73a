//! Image preprocessing of InternVL's transformers-native ("-hf")
//! checkpoints: `GotOcr2ImageProcessor` with `crop_to_patches`, which
//! `InternVLProcessor` always turns on. Reproduces transformers 4.57's slow
//! class and 5.x's PIL backend bit for bit on `u8` RGB input.
//!
//! Tiling: among the grids of `cols x rows` tiles with
//! `min_patches <= cols * rows <= max_patches`, the one whose `cols / rows`
//! is closest to the image's `width / height` ([`optimal_tiled_canvas`]);
//! the image is resized to `cols * tile_w` x `rows * tile_h` and cut into
//! tiles row by row; when there is more than one tile, the whole image
//! resized to one tile (the thumbnail) comes last. With `max_patches <= 1`
//! there is no tiling: one tile, the image resized to `size`.
//!
//! One difference between the two transformers generations, on configs no
//! published InternVL checkpoint has: transformers 4.57 tiles (and makes the
//! thumbnail) with bicubic whatever `resample` says; transformers 5 and this
//! module use `resample`. With the Hub value (3, bicubic) they agree.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::preprocess::{
    image_settings, parse_size, read_image_processor_json, resize_rgb8, Filter, ParsedSize,
    PixelNorm, Settings, SizeSpec, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};

/// The class names (as `image_processor_type`) this module reads.
pub const INTERNVL_PROCESSOR_TYPES: &str =
    "GotOcr2ImageProcessor (and its Fast / Pil variants), as InternVL -hf checkpoints use";

/// The settings of a `GotOcr2ImageProcessor`, with the class defaults for
/// every key the file leaves out (or sets to `null`). Note the class's
/// default mean/std are OpenAI CLIP's; InternVL checkpoints set ImageNet's
/// (`[0.485, 0.456, 0.406]` / `[0.229, 0.224, 0.225]`) in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlImageConfig {
    /// The file the settings were read from (for error messages).
    pub path: PathBuf,
    /// `image_processor_type` as written.
    pub processor_type: String,
    /// Only used without tiling (`max_patches <= 1`).
    pub do_resize: bool,
    /// `size`: the tile's (height, width).
    pub tile: (usize, usize),
    /// As written in the file; informational, since `InternVLProcessor`
    /// passes `crop_to_patches=True` on every call.
    pub crop_to_patches: bool,
    pub min_patches: usize,
    pub max_patches: usize,
    pub resample: Filter,
    pub norm: PixelNorm,
    /// Informational: [`crate::preprocess::load_image`] always yields RGB.
    pub do_convert_rgb: bool,
}

/// Whether an `image_processor_type` names `GotOcr2ImageProcessor` (or its
/// Fast / Pil variant).
pub fn is_internvl_type(name: &str) -> bool {
    let base = name
        .strip_suffix("Fast")
        .or_else(|| name.strip_suffix("Pil"))
        .unwrap_or(name);
    base == "GotOcr2ImageProcessor"
}

impl InternVlImageConfig {
    /// Read a model directory's image processor config (see
    /// [`read_image_processor_json`] for which file).
    pub fn load(model_dir: &Path) -> Result<InternVlImageConfig> {
        let (path, json) = read_image_processor_json(model_dir)?;
        Self::from_json(&path, &json)
    }

    /// Parse already-read settings (`path` is for messages).
    pub fn from_json(path: &Path, json: &Value) -> Result<InternVlImageConfig> {
        let s = Settings {
            path,
            obj: image_settings(path, json)?,
        };
        let (type_key, processor_type) = s.processor_type()?;
        if !is_internvl_type(&processor_type) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: type_key.into(),
                found: processor_type,
                supported: INTERNVL_PROCESSOR_TYPES.into(),
            });
        }
        // get_size_dict(default_to_square=True): an int is a square.
        let tile = match s.get("size") {
            None => (384, 384),
            Some(v) => match parse_size(v) {
                Some(ParsedSize::Int(n)) => (n, n),
                Some(ParsedSize::Spec(SizeSpec::HeightWidth { height, width })) => (height, width),
                _ => {
                    return Err(s.bad(
                        "size",
                        "{\"height\": H, \"width\": W} or a positive integer",
                        v,
                    ))
                }
            },
        };
        let min_patches = s.positive("min_patches")?.unwrap_or(1);
        let max_patches = s.positive("max_patches")?.unwrap_or(12);
        if min_patches > max_patches {
            return Err(Error::config(
                path,
                format!("min_patches {min_patches} is larger than max_patches {max_patches}"),
            ));
        }
        Ok(InternVlImageConfig {
            path: path.to_path_buf(),
            processor_type,
            do_resize: s.bool("do_resize", true)?,
            tile,
            crop_to_patches: s.bool("crop_to_patches", false)?,
            min_patches,
            max_patches,
            resample: s.resample(Filter::Bicubic)?,
            norm: s.pixel_norm(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)?,
            do_convert_rgb: s.bool("do_convert_rgb", true)?,
        })
    }

    /// Whether images are tiled: `InternVLProcessor` always asks, and
    /// transformers tiles when `max_patches > 1`.
    pub fn tiles_images(&self) -> bool {
        self.max_patches > 1
    }

    /// The (columns, rows) grid for an image of this (height, width); (1, 1)
    /// without tiling.
    pub fn grid(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if !self.tiles_images() {
            return Ok((1, 1));
        }
        optimal_tiled_canvas(
            (height, width),
            self.tile,
            self.min_patches,
            self.max_patches,
        )
    }

    /// Tiles for an image of this size: the grid's, plus the thumbnail when
    /// there is more than one (`get_number_of_image_patches`).
    pub fn num_tiles(&self, height: usize, width: usize) -> Result<usize> {
        let (c, r) = self.grid(height, width)?;
        Ok(if c * r > 1 { c * r + 1 } else { 1 })
    }
}

/// Read an InternVL (-hf) image processor config from a model directory.
pub fn load(model_dir: &Path) -> Result<InternVlImageConfig> {
    InternVlImageConfig::load(model_dir)
}

/// `get_all_supported_aspect_ratios`: every (columns, rows) with
/// `min <= columns * rows <= max`, enumerated columns-outer, then stably
/// sorted by `columns * rows`.
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for cols in 1..=max_tiles {
        // rows beyond max / cols exceed max: skipping them keeps the order
        for rows in 1..=max_tiles / cols {
            if cols * rows >= min_tiles {
                out.push((cols, rows));
            }
        }
    }
    out.sort_by_key(|&(c, r)| c * r); // stable, as Python's sorted
    out
}

/// `get_optimal_tiled_canvas`: the (columns, rows) among [`candidate_grids`]
/// whose `columns / rows` is closest to `width / height` (first found wins);
/// on an exactly equal difference a later candidate replaces the best when
/// the image's area exceeds half the candidate's (`h * w > 0.5 * tile_h *
/// tile_w * columns * rows`). (1, 1) when there is no candidate. `size` and
/// `tile` are (height, width).
pub fn optimal_tiled_canvas(
    size: (usize, usize),
    tile: (usize, usize),
    min_tiles: usize,
    max_tiles: usize,
) -> Result<(usize, usize)> {
    let (h, w) = size;
    if h == 0 || w == 0 {
        return Err(Error::invalid(format!(
            "tiling an image of {w}x{h}: height and width must be > 0"
        )));
    }
    let aspect = w as f64 / h as f64;
    let area = (w * h) as f64;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for (c, r) in candidate_grids(min_tiles, max_tiles) {
        let diff = (aspect - c as f64 / r as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff
            && area > 0.5 * tile.0 as f64 * tile.1 as f64 * c as f64 * r as f64
        {
            best = (c, r);
        }
    }
    Ok(best)
}

fn px(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(format!("image dimension {n} is too large")))
}

/// The `u8` tiles HF rescales and normalizes, in output order: the grid's
/// tiles row by row, then the thumbnail (only with more than one tile).
pub fn tiles_u8(cfg: &InternVlImageConfig, img: &RgbImage) -> Result<Vec<RgbImage>> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    if h == 0 || w == 0 {
        return Err(Error::invalid("image has no pixels"));
    }
    let (th, tw) = cfg.tile;
    if !cfg.tiles_images() {
        let out = if cfg.do_resize {
            resize_rgb8(img, px(tw)?, px(th)?, cfg.resample)?
        } else {
            img.clone()
        };
        return Ok(vec![out]);
    }
    let (cols, rows) = cfg.grid(h, w)?;
    let resized = resize_rgb8(img, px(cols * tw)?, px(rows * th)?, cfg.resample)?;
    let mut tiles = Vec::with_capacity(cols * rows + 1);
    for r in 0..rows {
        for c in 0..cols {
            tiles.push(
                image::imageops::crop_imm(&resized, px(c * tw)?, px(r * th)?, px(tw)?, px(th)?)
                    .to_image(),
            );
        }
    }
    if tiles.len() > 1 {
        tiles.push(resize_rgb8(img, px(tw)?, px(th)?, cfg.resample)?);
    }
    Ok(tiles)
}

/// Preprocessed pixels of one image, as the InternVL processor returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlPixels {
    /// `[num_tiles, 3, height, width]` row-major.
    pub pixel_values: Vec<f32>,
    /// HF's `num_patches` entry: grid tiles plus the thumbnail.
    pub num_tiles: usize,
    /// (columns, rows) of the grid; (1, 1) when the image is one tile.
    pub grid: (usize, usize),
    /// A tile's height and width.
    pub height: usize,
    pub width: usize,
}

/// Run `GotOcr2ImageProcessor` with `crop_to_patches=True` (what
/// `InternVLProcessor` does) on one RGB image, taken as height x width x RGB.
pub fn preprocess(cfg: &InternVlImageConfig, img: &RgbImage) -> Result<InternVlPixels> {
    let tiles = tiles_u8(cfg, img)?;
    let grid = cfg.grid(img.height() as usize, img.width() as usize)?;
    let (width, height) = tiles[0].dimensions();
    let mut pixel_values = Vec::with_capacity(tiles.len() * 3 * (width * height) as usize);
    for t in &tiles {
        cfg.norm.push_chw(t, &mut pixel_values);
    }
    Ok(InternVlPixels {
        pixel_values,
        num_tiles: tiles.len(),
        grid,
        height: height as usize,
        width: width as usize,
    })
}
