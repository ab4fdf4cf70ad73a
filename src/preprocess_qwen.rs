//! Image preprocessing of Qwen2-VL and Qwen2.5-VL: transformers'
//! `Qwen2VLImageProcessor` (4.57's slow class, 5.x's PIL backend; both
//! families use it), reproduced bit for bit on `u8` RGB input.
//!
//! `smart_resize` picks a size divisible by `patch_size * merge_size` with
//! about the original aspect ratio and a pixel count inside
//! `[min_pixels, max_pixels]`; the image is resized there with the PIL
//! resampler ([`resize_rgb8`]), rescaled and normalized as HF does
//! ([`PixelNorm`]), and cut into `patch_size` squares. Each row of the output
//! is one patch, `C x T x P x P` values with the single frame repeated
//! `temporal_patch_size` times; rows are ordered by `merge_size x merge_size`
//! block (blocks row-major, row-major inside a block), which is the order the
//! vision tower's merger concatenates them in.
//!
//! Config files: transformers 4 (Hub) files give `min_pixels` / `max_pixels`;
//! transformers 5 writes `size: {"shortest_edge": min, "longest_edge": max}`,
//! at the top level of `preprocessor_config.json` or nested under
//! `"image_processor"` in `processor_config.json`. Both are read; a top-level
//! `min_pixels` / `max_pixels` wins over `size`, as in transformers 5.
//! (transformers 4.57's `__init__` ignores `size` altogether and falls back to
//! its defaults; a v5-written file is read here as transformers 5 reads it.)

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::preprocess::{
    image_settings, read_image_processor_json, resize_rgb8, Filter, PixelNorm, Settings,
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};

/// `Qwen2VLImageProcessor`'s default `min_pixels` (`56 * 56`).
pub const DEFAULT_MIN_PIXELS: usize = 56 * 56;
/// `Qwen2VLImageProcessor`'s default `max_pixels` (`28 * 28 * 1280`).
pub const DEFAULT_MAX_PIXELS: usize = 28 * 28 * 1280;
/// `smart_resize` rejects images whose long side is more than this many times the short side.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// The settings of a `Qwen2VLImageProcessor`, with the class defaults for
/// every key the file leaves out (or sets to `null`).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlImageConfig {
    /// The file the settings were read from (for error messages).
    pub path: PathBuf,
    /// `image_processor_type` as written.
    pub processor_type: String,
    pub do_resize: bool,
    /// `size.shortest_edge`, or `min_pixels`.
    pub min_pixels: usize,
    /// `size.longest_edge`, or `max_pixels`.
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub resample: Filter,
    pub norm: PixelNorm,
    /// Informational: [`crate::preprocess::load_image`] always yields RGB.
    pub do_convert_rgb: bool,
}

/// The class names (as `image_processor_type`) this module reads.
pub const QWEN_VL_PROCESSOR_TYPES: &str = "Qwen2VLImageProcessor (and its Fast / Pil variants)";

pub fn is_qwen_vl_type(name: &str) -> bool {
    let base = name
        .strip_suffix("Fast")
        .or_else(|| name.strip_suffix("Pil"))
        .unwrap_or(name);
    base == "Qwen2VLImageProcessor"
}

impl QwenVlImageConfig {
    /// Read a model directory's image processor config (see
    /// [`read_image_processor_json`] for which file).
    pub fn load(model_dir: &Path) -> Result<QwenVlImageConfig> {
        let (path, json) = read_image_processor_json(model_dir)?;
        Self::from_json(&path, &json)
    }

    /// Parse already-read settings (`path` is for messages).
    pub fn from_json(path: &Path, json: &Value) -> Result<QwenVlImageConfig> {
        let s = Settings {
            path,
            obj: image_settings(path, json)?,
        };
        let (type_key, processor_type) = s.processor_type()?;
        if !is_qwen_vl_type(&processor_type) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: type_key.into(),
                found: processor_type,
                supported: QWEN_VL_PROCESSOR_TYPES.into(),
            });
        }

        // transformers 5: `size` (default {56*56, 28*28*1280}), then the
        // top-level min_pixels / max_pixels override its two entries.
        let (mut min, mut max) = (Some(DEFAULT_MIN_PIXELS), Some(DEFAULT_MAX_PIXELS));
        if let Some(size) = s.get("size") {
            let expected = "{\"shortest_edge\": MIN_PIXELS, \"longest_edge\": MAX_PIXELS}";
            let obj = size
                .as_object()
                .ok_or_else(|| s.bad("size", expected, size))?;
            (min, max) = (None, None);
            for (key, v) in obj {
                let slot = match key.as_str() {
                    "shortest_edge" => &mut min,
                    "longest_edge" => &mut max,
                    // transformers 5 drops these from `size` (the top-level keys are used).
                    "min_pixels" | "max_pixels" => continue,
                    _ => return Err(s.bad("size", expected, size)),
                };
                *slot = Some(
                    crate::preprocess::positive(v)
                        .ok_or_else(|| s.bad(&format!("size.{key}"), "a positive integer", v))?,
                );
            }
        }
        if let Some(n) = s.positive("min_pixels")? {
            min = Some(n);
        }
        if let Some(n) = s.positive("max_pixels")? {
            max = Some(n);
        }
        let (Some(min_pixels), Some(max_pixels)) = (min, max) else {
            return Err(Error::config(
                path,
                format!(
                    "key \"size\": needs both \"shortest_edge\" and \"longest_edge\" (or top-level \
                     \"min_pixels\" and \"max_pixels\"), found {}",
                    s.get("size").unwrap_or(&Value::Null)
                ),
            ));
        };
        if min_pixels > max_pixels {
            return Err(Error::config(
                path,
                format!(
                    "min_pixels (size.shortest_edge) {min_pixels} is larger than max_pixels \
                     (size.longest_edge) {max_pixels}"
                ),
            ));
        }
        Ok(QwenVlImageConfig {
            path: path.to_path_buf(),
            processor_type,
            do_resize: s.bool("do_resize", true)?,
            min_pixels,
            max_pixels,
            patch_size: s.positive("patch_size")?.unwrap_or(14),
            merge_size: s.positive("merge_size")?.unwrap_or(2),
            temporal_patch_size: s.positive("temporal_patch_size")?.unwrap_or(2),
            resample: s.resample(Filter::Bicubic)?,
            norm: s.pixel_norm(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)?,
            do_convert_rgb: s.bool("do_convert_rgb", true)?,
        })
    }

    /// `patch_size * merge_size`: both sides of the resized image are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The (height, width) the image is resized to (its own size without `do_resize`).
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if !self.do_resize {
            return Ok((height, width));
        }
        smart_resize(
            height,
            width,
            self.factor(),
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// `image_grid_thw` of an image of this size: `(1, h / patch, w / patch)`.
    pub fn grid_thw(&self, height: usize, width: usize) -> Result<(usize, usize, usize)> {
        let (h, w) = self.resized_size(height, width)?;
        let f = self.factor();
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(Error::invalid(format!(
                "{}: with do_resize false the image ({w}x{h}) must have sides divisible by \
                 patch_size * merge_size = {f}",
                self.path.display()
            )));
        }
        Ok((1, h / self.patch_size, w / self.patch_size))
    }

    /// The number of `<|image_pad|>` tokens the processor expands one image
    /// to: `t * h * w / merge_size^2`.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> Result<usize> {
        let (t, h, w) = self.grid_thw(height, width)?;
        Ok(t * h * w / (self.merge_size * self.merge_size))
    }
}

/// Read a Qwen2-VL / Qwen2.5-VL image processor config from a model directory.
pub fn load(model_dir: &Path) -> Result<QwenVlImageConfig> {
    QwenVlImageConfig::load(model_dir)
}

/// transformers' `smart_resize` (Qwen2-VL): the (height, width) to resize
/// to. Each side is `round(side / factor) * factor` with Python's round half
/// to even (70 / 28 = 2.5 gives 56); if the area is then above `max_pixels`
/// both sides shrink by `beta = sqrt(h * w / max_pixels)` and are floored to
/// the factor (at least `factor`); if below `min_pixels` they grow by
/// `sqrt(min_pixels / (h * w))` and are ceiled to the factor. The same `f64`
/// operations in the same order as the Python code. An aspect ratio above
/// 200 is an error, as in transformers.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(Error::invalid(format!(
            "smart_resize: height {height}, width {width} and factor {factor} must be > 0"
        )));
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > MAX_ASPECT_RATIO {
        return Err(Error::invalid(format!(
            "image {width}x{height}: absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, \
             got {ratio} (Qwen2-VL smart_resize)"
        )));
    }
    let mut h_bar = (hf / ff).round_ties_even() as usize * factor;
    let mut w_bar = (wf / ff).round_ties_even() as usize * factor;
    // Python ints do not overflow; these products stay far below 2^53 for any
    // image load_image accepts.
    let area = (height * width) as f64;
    if h_bar * w_bar > max_pixels {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = factor.max((hf / beta / ff).floor() as usize * factor);
        w_bar = factor.max((wf / beta / ff).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (hf * beta / ff).ceil() as usize * factor;
        w_bar = (wf * beta / ff).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(Error::invalid(format!(
            "image {width}x{height}: smart_resize gives {w_bar}x{h_bar} (min_pixels {min_pixels}, \
             factor {factor})"
        )));
    }
    Ok((h_bar, w_bar))
}

/// Preprocessed pixels of one image, as `Qwen2VLImageProcessor` returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlPixels {
    /// `[t * h * w, C * T * P * P]` row-major (`pixel_values` of this image).
    pub pixel_values: Vec<f32>,
    /// `image_grid_thw`: (frames / temporal_patch_size, patch rows, patch columns).
    pub grid_thw: (usize, usize, usize),
    /// Values per row: `3 * temporal_patch_size * patch_size^2`.
    pub row_len: usize,
    /// The (height, width) the image was resized to.
    pub resized: (usize, usize),
    /// `t * h * w / merge_size^2`: the image's tokens after the merger.
    pub num_image_tokens: usize,
}

/// The resized `u8` image HF rescales and normalizes.
pub fn resized_u8(cfg: &QwenVlImageConfig, img: &RgbImage) -> Result<RgbImage> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    if h == 0 || w == 0 {
        return Err(Error::invalid("image has no pixels"));
    }
    let (nh, nw) = cfg.resized_size(h, w)?;
    let px = |n: usize| {
        u32::try_from(n).map_err(|_| Error::invalid(format!("image dimension {n} is too large")))
    };
    resize_rgb8(img, px(nw)?, px(nh)?, cfg.resample)
}

/// Run `Qwen2VLImageProcessor` on one RGB image.
///
/// Like [`crate::preprocess::preprocess`], the input is always taken as
/// height x width x RGB (HF guesses the channel axis from the array shape
/// and garbles images 1 or 3 pixels high unless told `channels_last`).
pub fn preprocess(cfg: &QwenVlImageConfig, img: &RgbImage) -> Result<QwenVlPixels> {
    let grid_thw = cfg.grid_thw(img.height() as usize, img.width() as usize)?;
    let resized = resized_u8(cfg, img)?;
    let mut chw = Vec::with_capacity(3 * resized.width() as usize * resized.height() as usize);
    cfg.norm.push_chw(&resized, &mut chw);
    let (h, w) = (resized.height() as usize, resized.width() as usize);
    let pixel_values = patchify(
        &chw,
        h,
        w,
        cfg.patch_size,
        cfg.merge_size,
        cfg.temporal_patch_size,
    )?;
    let (t, gh, gw) = grid_thw;
    Ok(QwenVlPixels {
        pixel_values,
        grid_thw,
        row_len: 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size,
        resized: (h, w),
        num_image_tokens: t * gh * gw / (cfg.merge_size * cfg.merge_size),
    })
}

/// Cut a `[3, height, width]` image into Qwen2-VL's rows: one row per
/// `patch x patch` square, ordered by `merge x merge` block (blocks
/// row-major, row-major inside a block); each row holds, per channel, the
/// patch repeated `temporal` times (one image is one frame, duplicated), each
/// copy row-major. HF's reshape to
/// `(t, T, C, h/m, m, P, w/m, m, P)` and transpose `(0, 3, 6, 4, 7, 2, 1, 5, 8)`.
pub fn patchify(
    chw: &[f32],
    height: usize,
    width: usize,
    patch: usize,
    merge: usize,
    temporal: usize,
) -> Result<Vec<f32>> {
    let f = patch * merge;
    if f == 0 || temporal == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        return Err(Error::invalid(format!(
            "patchify: {width}x{height} is not a multiple of patch_size {patch} x merge_size {merge}"
        )));
    }
    if chw.len() != 3 * height * width {
        return Err(Error::invalid(format!(
            "patchify: {} values for a 3x{height}x{width} image",
            chw.len()
        )));
    }
    let (bh, bw) = (height / f, width / f);
    let mut out = Vec::with_capacity(chw.len() * temporal);
    for by in 0..bh {
        for bx in 0..bw {
            for my in 0..merge {
                for mx in 0..merge {
                    let (y0, x0) = ((by * merge + my) * patch, (bx * merge + mx) * patch);
                    for c in 0..3 {
                        let plane = &chw[c * height * width..(c + 1) * height * width];
                        for _ in 0..temporal {
                            for py in 0..patch {
                                let row = (y0 + py) * width + x0;
                                out.extend_from_slice(&plane[row..row + patch]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
