//! Image preprocessing that reproduces transformers 4.57's *slow* (PIL based)
//! image processors bit for bit: `CLIPImageProcessor` (LLaVA-1.5),
//! `SiglipImageProcessor` (LLaVA with SigLIP) and `LlavaOnevisionImageProcessor`
//! (anyres tiling). The `...Fast` names in a config map to the same behaviour.
//!
//! The pipeline works on `u8` RGB images exactly as HF does (HF resizes through
//! PIL, crops and pads `uint8` numpy arrays) and converts to `f32` only at the
//! end, at the same point and with the same arithmetic as HF:
//! `rescale` multiplies in `f64` and casts to `f32`; `normalize` subtracts and
//! divides in `f32` with the mean and std cast to `f32`.
//!
//! The resampler ([`resize_rgb8`]) is a transcription of Pillow 13's
//! `libImaging/Resample.c` (8-bit path): two separable passes with a `u8`
//! intermediate, fixed-point coefficients with 22 fractional bits.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use serde_json::{Map, Value};

use crate::anyres;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Which transformers image processor class a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    /// `CLIPImageProcessor`: shortest-edge resize, center crop.
    Clip,
    /// `SiglipImageProcessor`: fixed-size resize, no crop.
    Siglip,
    /// `LlavaOnevisionImageProcessor`: anyres tiling.
    LlavaOnevision,
}

/// HF's `size` dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// `{"shortest_edge": n}`
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`
    HeightWidth { height: usize, width: usize },
}

/// An image processor's settings, with the defaults of the transformers class
/// named by `image_processor_type` for every key the file leaves out (or sets
/// to `null`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// The file the settings were read from (for error messages).
    pub path: PathBuf,
    /// `image_processor_type` as written, e.g. `"CLIPImageProcessor"`.
    pub processor_type: String,
    pub kind: ProcessorKind,
    pub do_resize: bool,
    pub size: SizeSpec,
    /// From the PIL code in `resample` (2 bilinear, 3 bicubic).
    pub resample: Filter,
    /// CLIP only: SigLIP and OneVision have no crop step and ignore the key.
    pub do_center_crop: bool,
    /// (height, width); used by CLIP only.
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Informational: [`load_image`] always yields RGB. (HF SigLIP defaults to
    /// no conversion and so only accepts RGB inputs.)
    pub do_convert_rgb: bool,
    /// OneVision: candidate (height, width) resolutions.
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// OneVision: pad the tile count across a batch; a no-op for one image.
    pub do_pad: bool,
}

pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_STANDARD: [f64; 3] = [0.5, 0.5, 0.5];

impl ImageProcessorConfig {
    /// The defaults of the transformers class `kind` (its `__init__` arguments).
    pub fn defaults(kind: ProcessorKind) -> ImageProcessorConfig {
        let (size, mean, std, convert, pinpoints) = match kind {
            ProcessorKind::Clip => (
                SizeSpec::ShortestEdge(224),
                OPENAI_CLIP_MEAN,
                OPENAI_CLIP_STD,
                true,
                vec![],
            ),
            ProcessorKind::Siglip => (
                SizeSpec::HeightWidth {
                    height: 224,
                    width: 224,
                },
                IMAGENET_STANDARD,
                IMAGENET_STANDARD,
                false,
                vec![],
            ),
            ProcessorKind::LlavaOnevision => {
                let pins = (1..=6)
                    .flat_map(|a| (1..=6).map(move |b| (384 * a, 384 * b)))
                    .collect();
                (
                    SizeSpec::HeightWidth {
                        height: 384,
                        width: 384,
                    },
                    OPENAI_CLIP_MEAN,
                    OPENAI_CLIP_STD,
                    true,
                    pins,
                )
            }
        };
        ImageProcessorConfig {
            path: PathBuf::new(),
            processor_type: String::new(),
            kind,
            do_resize: true,
            size,
            resample: Filter::Bicubic,
            do_center_crop: kind == ProcessorKind::Clip,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: mean,
            image_std: std,
            do_convert_rgb: convert,
            image_grid_pinpoints: pinpoints,
            do_pad: kind == ProcessorKind::LlavaOnevision,
        }
    }

    /// Read the image processor settings of a model directory as transformers
    /// 4.57 does: `preprocessor_config.json` if present, else
    /// `processor_config.json`; in either, the settings nested under
    /// `"image_processor"` (transformers 5 layout) win over the top level.
    pub fn load(model_dir: &Path) -> Result<ImageProcessorConfig> {
        let (path, json) = read_image_processor_json(model_dir)?;
        Self::from_json(&path, &json)
    }

    /// Parse the settings from an already-read config (`path` is for messages).
    pub fn from_json(path: &Path, json: &Value) -> Result<ImageProcessorConfig> {
        let bad = |key: &str, expected: &str, found: &Value| {
            Error::config(
                path,
                format!("key \"{key}\": expected {expected}, found {found}"),
            )
        };
        let obj = image_settings(path, json)?;
        let type_key = if obj.contains_key("image_processor_type") {
            "image_processor_type"
        } else {
            "feature_extractor_type"
        };
        let processor_type = match obj.get(type_key) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(bad(type_key, "a class name string", other)),
            None => {
                return Err(Error::config(
                    path,
                    "key \"image_processor_type\" is missing",
                ))
            }
        };
        let kind =
            match processor_type
                .strip_suffix("Fast")
                .unwrap_or(&processor_type)
            {
                "CLIPImageProcessor" | "CLIPFeatureExtractor" => ProcessorKind::Clip,
                "SiglipImageProcessor" => ProcessorKind::Siglip,
                "LlavaOnevisionImageProcessor" => ProcessorKind::LlavaOnevision,
                _ => return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: type_key.into(),
                    found: processor_type,
                    supported:
                        "CLIPImageProcessor, SiglipImageProcessor, LlavaOnevisionImageProcessor \
                                (and their Fast variants)"
                            .into(),
                }),
            };
        let mut cfg = Self::defaults(kind);
        cfg.path = path.to_path_buf();
        cfg.processor_type = processor_type;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());

        for (key, field) in [
            ("do_resize", &mut cfg.do_resize),
            ("do_center_crop", &mut cfg.do_center_crop),
            ("do_rescale", &mut cfg.do_rescale),
            ("do_normalize", &mut cfg.do_normalize),
            ("do_convert_rgb", &mut cfg.do_convert_rgb),
            ("do_pad", &mut cfg.do_pad),
        ] {
            if let Some(v) = get(key) {
                *field = v.as_bool().ok_or_else(|| bad(key, "true or false", v))?;
            }
        }
        if kind != ProcessorKind::Clip {
            cfg.do_center_crop = false;
        }
        if let Some(v) = get("size") {
            // An int means the shortest edge (HF get_size_dict(default_to_square=False)).
            cfg.size = match parse_size(v) {
                Some(ParsedSize::Int(n)) => SizeSpec::ShortestEdge(n),
                Some(ParsedSize::Spec(s)) => s,
                None => return Err(bad("size", SIZE_EXPECTED, v)),
            };
        }
        if kind == ProcessorKind::Siglip
            && cfg.do_resize
            && matches!(cfg.size, SizeSpec::ShortestEdge(_))
        {
            return Err(bad(
                "size",
                "{\"height\": H, \"width\": W} for SiglipImageProcessor",
                obj_get(obj, "size"),
            ));
        }
        if let Some(v) = get("crop_size") {
            // An int means a square crop (HF get_size_dict(default_to_square=True)).
            cfg.crop_size = match parse_size(v) {
                Some(ParsedSize::Int(n)) => (n, n),
                Some(ParsedSize::Spec(SizeSpec::HeightWidth { height, width })) => (height, width),
                _ => {
                    return Err(bad(
                        "crop_size",
                        "{\"height\": H, \"width\": W} or a positive integer",
                        v,
                    ))
                }
            };
        }
        if let Some(v) = get("resample") {
            cfg.resample = v.as_i64().and_then(Filter::from_pil).ok_or_else(|| {
                bad(
                    "resample",
                    "a PIL filter code this crate implements: 2 (bilinear) or 3 (bicubic)",
                    v,
                )
            })?;
        }
        if let Some(v) = get("rescale_factor") {
            cfg.rescale_factor = v
                .as_f64()
                .ok_or_else(|| bad("rescale_factor", "a number", v))?;
        }
        for (key, field) in [
            ("image_mean", &mut cfg.image_mean),
            ("image_std", &mut cfg.image_std),
        ] {
            if let Some(v) = get(key) {
                *field = parse_triple(v)
                    .ok_or_else(|| bad(key, "a number or a list of 3 numbers", v))?;
            }
        }
        if kind == ProcessorKind::LlavaOnevision {
            if let Some(v) = get("image_grid_pinpoints") {
                cfg.image_grid_pinpoints = parse_pinpoints(v).ok_or_else(|| {
                    bad(
                        "image_grid_pinpoints",
                        "a non-empty list of [height, width] pairs",
                        v,
                    )
                })?;
            }
        }
        Ok(cfg)
    }
}

/// The image processor config file of a model directory and its JSON:
/// `preprocessor_config.json` if present, else `processor_config.json`
/// (transformers 5 writes only the latter, with the settings nested under
/// `"image_processor"`; see [`image_settings`]).
pub fn read_image_processor_json(model_dir: &Path) -> Result<(PathBuf, Value)> {
    let path = ["preprocessor_config.json", "processor_config.json"]
        .iter()
        .map(|name| model_dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Missing {
            path: model_dir.join("preprocessor_config.json"),
            what: "image processor config (preprocessor_config.json or processor_config.json)"
                .into(),
        })?;
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("invalid JSON: {e}")))?;
    // processor_config.json of transformers 4 holds only the processor's
    // own settings; without preprocessor_config.json beside it the image
    // settings are missing, and that file is what to name.
    let has_image_settings = json.get("image_processor").is_some()
        || json.get("image_processor_type").is_some()
        || json.get("feature_extractor_type").is_some();
    if !has_image_settings && path.ends_with("processor_config.json") {
        return Err(Error::Missing {
                path: model_dir.join("preprocessor_config.json"),
                what: format!(
                    "image processor config; {} has no image processor settings (no \"image_processor\" or \"image_processor_type\")",
                    path.display()
                ),
            });
    }
    Ok((path, json))
}

/// The object holding the image processor settings: the one nested under
/// `"image_processor"` when there is one (transformers 5 layout), else the top level.
pub fn image_settings<'a>(path: &Path, json: &'a Value) -> Result<&'a Map<String, Value>> {
    let bad = |key: &str, found: &Value| {
        Error::config(
            path,
            format!("key \"{key}\": expected a JSON object, found {found}"),
        )
    };
    let root = json.as_object().ok_or_else(|| bad("(top level)", json))?;
    match root.get("image_processor") {
        Some(Value::Object(nested)) => Ok(nested),
        Some(other) => Err(bad("image_processor", other)),
        None => Ok(root),
    }
}

/// Typed reads of an image processor settings object, with errors that name
/// the file, the key, what was expected and what was found. A `null` value
/// counts as absent (transformers then uses its default).
pub(crate) struct Settings<'a> {
    pub path: &'a Path,
    pub obj: &'a Map<String, Value>,
}

impl Settings<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn bad(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::config(
            self.path,
            format!("key \"{key}\": expected {expected}, found {found}"),
        )
    }

    /// `image_processor_type` (or the older `feature_extractor_type`) as written.
    pub fn processor_type(&self) -> Result<(&'static str, String)> {
        let key = if self.obj.contains_key("image_processor_type") {
            "image_processor_type"
        } else {
            "feature_extractor_type"
        };
        match self.obj.get(key) {
            Some(Value::String(s)) => Ok((key, s.clone())),
            Some(other) => Err(self.bad(key, "a class name string", other)),
            None => Err(Error::config(
                self.path,
                "key \"image_processor_type\" is missing",
            )),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false", v)),
            None => Ok(default),
        }
    }

    /// A positive integer (`Ok(None)` when absent).
    pub fn positive(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            Some(v) => positive(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a positive integer", v)),
            None => Ok(None),
        }
    }

    pub fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number", v)),
            None => Ok(default),
        }
    }

    pub fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        match self.get(key) {
            Some(v) => {
                parse_triple(v).ok_or_else(|| self.bad(key, "a number or a list of 3 numbers", v))
            }
            None => Ok(default),
        }
    }

    pub fn resample(&self, default: Filter) -> Result<Filter> {
        match self.get("resample") {
            Some(v) => v.as_i64().and_then(Filter::from_pil).ok_or_else(|| {
                self.bad(
                    "resample",
                    "a PIL filter code this crate implements: 2 (bilinear) or 3 (bicubic)",
                    v,
                )
            }),
            None => Ok(default),
        }
    }

    /// `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`.
    pub fn pixel_norm(&self, mean: [f64; 3], std: [f64; 3]) -> Result<PixelNorm> {
        let norm = PixelNorm {
            do_rescale: self.bool("do_rescale", true)?,
            rescale_factor: self.number("rescale_factor", 1.0 / 255.0)?,
            do_normalize: self.bool("do_normalize", true)?,
            image_mean: self.triple("image_mean", mean)?,
            image_std: self.triple("image_std", std)?,
        };
        if norm.do_normalize && norm.image_std.contains(&0.0) {
            return Err(self.bad(
                "image_std",
                "non-zero values",
                self.get("image_std").unwrap_or(&Value::Null),
            ));
        }
        Ok(norm)
    }
}

/// Load the image processor settings of a model directory
/// (see [`ImageProcessorConfig::load`]).
pub fn load(model_dir: &Path) -> Result<ImageProcessorConfig> {
    ImageProcessorConfig::load(model_dir)
}

pub(crate) const SIZE_EXPECTED: &str =
    "{\"shortest_edge\": N}, {\"height\": H, \"width\": W}, [H, W] or a positive integer";

pub(crate) enum ParsedSize {
    Int(usize),
    Spec(SizeSpec),
}

fn obj_get<'a>(obj: &'a Map<String, Value>, key: &str) -> &'a Value {
    obj.get(key).unwrap_or(&Value::Null)
}

pub(crate) fn positive(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
}

pub(crate) fn parse_size(v: &Value) -> Option<ParsedSize> {
    match v {
        Value::Number(_) => positive(v).map(ParsedSize::Int),
        Value::Array(a) if a.len() == 2 => Some(ParsedSize::Spec(SizeSpec::HeightWidth {
            height: positive(&a[0])?,
            width: positive(&a[1])?,
        })),
        Value::Object(o) => {
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort_unstable();
            match keys.as_slice() {
                ["shortest_edge"] => Some(ParsedSize::Spec(SizeSpec::ShortestEdge(positive(
                    &o["shortest_edge"],
                )?))),
                ["height", "width"] => Some(ParsedSize::Spec(SizeSpec::HeightWidth {
                    height: positive(&o["height"])?,
                    width: positive(&o["width"])?,
                })),
                _ => None,
            }
        }
        _ => None,
    }
}

pub(crate) fn parse_triple(v: &Value) -> Option<[f64; 3]> {
    match v {
        Value::Number(n) => n.as_f64().map(|x| [x; 3]),
        Value::Array(a) if a.len() == 3 => Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?]),
        _ => None,
    }
}

fn parse_pinpoints(v: &Value) -> Option<Vec<(usize, usize)>> {
    let list = v.as_array()?;
    let pins = list
        .iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([h, w]) => Some((positive(h)?, positive(w)?)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    (!pins.is_empty()).then_some(pins)
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Convert a decoded image to 8-bit RGB the way PIL's `Image.convert("RGB")`
/// does for the mode PIL would have opened the file in: L/LA replicate the
/// gray level, RGBA/LA drop alpha (no compositing), 16-bit PNG samples keep
/// their high byte (PIL opens them with the `;16B` raw modes), except 16-bit
/// grayscale, which PIL opens as `I;16` and clamps to 255 on conversion.
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma8(g) => RgbImage::from_fn(w, h, |x, y| {
            let l = g.get_pixel(x, y).0[0];
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageLumaA8(g) => RgbImage::from_fn(w, h, |x, y| {
            let l = g.get_pixel(x, y).0[0];
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let p = rgba.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageLuma16(g) => RgbImage::from_fn(w, h, |x, y| {
            let l = g.get_pixel(x, y).0[0].min(255) as u8;
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageLumaA16(g) => RgbImage::from_fn(w, h, |x, y| {
            let l = (g.get_pixel(x, y).0[0] >> 8) as u8;
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(w, h, |x, y| {
            let p = rgb.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let p = rgba.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        // Float images cannot come from the formats enabled here.
        other => other.to_rgb8(),
    }
}

/// The largest width or height [`load_image`] decodes.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most memory [`load_image`] lets the decoder allocate (bytes).
pub const MAX_IMAGE_ALLOC: u64 = 2 << 30;

/// Decode an image file and convert it to RGB as `transformers.image_utils.load_image`
/// does: apply the EXIF orientation (`ImageOps.exif_transpose`), then
/// `convert("RGB")` (see [`to_rgb8`]). The format is detected from the content.
///
/// PNG, BMP, GIF and lossless WebP decode to exactly PIL's pixels. JPEG does
/// not: the image crate's decoder (zune-jpeg) differs from PIL's libjpeg-turbo
/// by a few levels on a few percent of the pixels (more with 4:2:0 chroma), so
/// bit-exact comparisons with HF need non-JPEG inputs.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    if path.is_dir() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: "is a directory; expected an image file".into(),
        });
    }
    let image_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| image_err(format!("cannot read file: {e}")))?;
    decode_image(reader, path)
}

/// [`load_image`] on bytes already in memory (a `data:` URL's payload);
/// `name` says where they came from in errors.
pub fn load_image_bytes(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image {
            path: PathBuf::from(name),
            msg: format!("cannot read: {e}"),
        })?;
    decode_image(reader, Path::new(name))
}

fn decode_image<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    path: &Path,
) -> Result<RgbImage> {
    let image_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let mut decoder = reader.into_decoder().map_err(|e| {
        image_err(format!(
            "not a supported image (png, jpeg, bmp, gif, webp): {e}"
        ))
    })?;
    // The size is read from the header before any pixel is decoded: a
    // small file may declare a huge image.
    let (w, h) = decoder.dimensions();
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(image_err(format!(
            "the file declares {w}x{h} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    decoder.set_limits(limits).map_err(|e| {
        image_err(format!(
            "the file declares {w}x{h} pixels, more than the limits allow ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, {} MiB decoded): {e}",
            MAX_IMAGE_ALLOC >> 20
        ))
    })?;
    // A broken EXIF block is ignored, as PIL does when it cannot parse it.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| image_err(format!("cannot decode: {e}")))?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(image_err("image has no pixels".into()));
    }
    Ok(to_rgb8(&img))
}

// ---------------------------------------------------------------------------
// Processing
// ---------------------------------------------------------------------------

/// Preprocessed pixels for one image, ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// `[num_tiles, 3, height, width]`, row-major, exactly HF's `pixel_values`
    /// for this image without the batch dimension.
    pub pixel_values: Vec<f32>,
    /// 1 for CLIP and SigLIP; for OneVision the base image plus the grid tiles.
    pub num_tiles: usize,
    pub height: usize,
    pub width: usize,
    /// The original (height, width), HF's `image_sizes` entry.
    pub image_size: (usize, usize),
    /// Qwen2-VL: `image_grid_thw`; `pixel_values` is then
    /// `[t * h * w, C * T * P * P]` and `height` x `width` the resized image.
    pub grid_thw: Option<(usize, usize, usize)>,
}

/// A pixel count as the `u32` the image crate uses.
fn px(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(format!("image dimension {n} is too large")))
}

/// HF `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `size`, the long side `int(size * long / short)` (truncated).
pub fn shortest_edge_output_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// HF `image_transforms.center_crop` on a `u8` image, including its zero
/// padding when the image is smaller than the crop: the image is placed at
/// offset `ceil((crop - size) / 2)` on a zero canvas. Always returns
/// `crop_h` x `crop_w`.
pub fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (oh, ow) = (i64::from(img.height()), i64::from(img.width()));
    let (ch, cw) = (i64::from(crop_h), i64::from(crop_w));
    // Python floor division; negative when the image is smaller than the crop.
    let top = (oh - ch).div_euclid(2);
    let left = (ow - cw).div_euclid(2);
    // Where the image lands on the (possibly larger) zero canvas.
    let (nh, nw) = (ch.max(oh), cw.max(ow));
    let top_pad = (nh - oh + 1) / 2;
    let left_pad = (nw - ow + 1) / 2;
    let (y0, x0) = (top + top_pad, left + left_pad);
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let sy = y0 + i64::from(y) - top_pad;
        let sx = x0 + i64::from(x) - left_pad;
        if (0..oh).contains(&sy) && (0..ow).contains(&sx) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// The `u8` tiles HF feeds to `rescale`/`normalize`, in output order: for
/// CLIP the resized and center-cropped image, for SigLIP the resized image,
/// for OneVision the base image resized to the tile size followed by the grid
/// tiles row by row.
pub fn preprocess_tiles_u8(cfg: &ImageProcessorConfig, img: &RgbImage) -> Result<Vec<RgbImage>> {
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::invalid("image has no pixels"));
    }
    let filter = cfg.resample;
    match cfg.kind {
        ProcessorKind::Clip => {
            let mut out = img.clone();
            if cfg.do_resize {
                let (h, w) = match cfg.size {
                    SizeSpec::ShortestEdge(s) => {
                        shortest_edge_output_size(img.height() as usize, img.width() as usize, s)
                    }
                    SizeSpec::HeightWidth { height, width } => (height, width),
                };
                out = resize_rgb8(&out, px(w)?, px(h)?, filter)?;
            }
            if cfg.do_center_crop {
                out = center_crop(&out, px(cfg.crop_size.0)?, px(cfg.crop_size.1)?);
            }
            Ok(vec![out])
        }
        ProcessorKind::Siglip => {
            if !cfg.do_resize {
                return Ok(vec![img.clone()]);
            }
            match cfg.size {
                SizeSpec::HeightWidth { height, width } => {
                    Ok(vec![resize_rgb8(img, px(width)?, px(height)?, filter)?])
                }
                // Validated at load time; HF fails with KeyError('height') here.
                SizeSpec::ShortestEdge(_) => Err(Error::config(
                    &cfg.path,
                    "size: SigLIP needs {\"height\", \"width\"}",
                )),
            }
        }
        ProcessorKind::LlavaOnevision => onevision_tiles(cfg, img, filter),
    }
}

/// `LlavaOnevisionImageProcessor.get_image_patches` + `_preprocess` resizing,
/// for one image on its own (HF's `need_patching`).
fn onevision_tiles(
    cfg: &ImageProcessorConfig,
    img: &RgbImage,
    filter: Filter,
) -> Result<Vec<RgbImage>> {
    let (th, tw) = match cfg.size {
        SizeSpec::HeightWidth { height, width } => (height, width),
        SizeSpec::ShortestEdge(s) => (s, s),
    };
    let patch = th; // HF: patch_size=size_tuple[0]
    let original = (img.height() as usize, img.width() as usize);
    let best = anyres::select_best_resolution(original, &cfg.image_grid_pinpoints)?;
    // resize keeping the aspect ratio, then pad (centered, zeros) to `best`.
    let (nh, nw) = anyres::patch_output_size(original, best);
    let resized = resize_rgb8(img, px(nw)?, px(nh)?, filter)?;
    let (pad_y, pad_x) = ((best.0 - nh) / 2, (best.1 - nw) / 2);
    let padded = RgbImage::from_fn(px(best.1)?, px(best.0)?, |x, y| {
        let (sy, sx) = (y as usize, x as usize);
        if (pad_y..pad_y + nh).contains(&sy) && (pad_x..pad_x + nw).contains(&sx) {
            *resized.get_pixel((sx - pad_x) as u32, (sy - pad_y) as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    // Base image first (always resized, even with do_resize=false), then the
    // tiles in row-major order; edge tiles are partial when `best` is not a
    // multiple of the tile size.
    let mut tiles = vec![resize_rgb8(img, px(tw)?, px(th)?, filter)?];
    for y in (0..best.0).step_by(patch.max(1)) {
        for x in (0..best.1).step_by(patch.max(1)) {
            let (h, w) = (patch.min(best.0 - y), patch.min(best.1 - x));
            let tile = image::imageops::crop_imm(&padded, x as u32, y as u32, w as u32, h as u32)
                .to_image();
            tiles.push(tile);
        }
    }
    if cfg.do_resize {
        for t in tiles.iter_mut().skip(1) {
            if t.width() as usize != tw || t.height() as usize != th {
                *t = resize_rgb8(t, px(tw)?, px(th)?, filter)?;
            }
        }
    }
    Ok(tiles)
}

/// Rescale and normalize `u8` tiles into `[n, 3, h, w]` `f32`, with HF's
/// casts: `f32(f64(v) * rescale_factor)`, then `(x - f32(mean)) / f32(std)` in `f32`.
pub fn tiles_to_pixel_values(cfg: &ImageProcessorConfig, tiles: &[RgbImage]) -> Result<Vec<f32>> {
    let Some(first) = tiles.first() else {
        return Ok(Vec::new());
    };
    let (w, h) = first.dimensions();
    if tiles.iter().any(|t| t.dimensions() != (w, h)) {
        return Err(Error::invalid(
            "tiles of different sizes cannot be stacked (do_resize=false with pinpoints \
             that are not multiples of the tile size)",
        ));
    }
    let norm = PixelNorm {
        do_rescale: cfg.do_rescale,
        rescale_factor: cfg.rescale_factor,
        do_normalize: cfg.do_normalize,
        image_mean: cfg.image_mean,
        image_std: cfg.image_std,
    };
    let mut out = Vec::with_capacity(tiles.len() * 3 * (w * h) as usize);
    for tile in tiles {
        norm.push_chw(tile, &mut out);
    }
    Ok(out)
}

/// HF's `rescale` then `normalize` of a `u8` image, with its casts:
/// `f32(f64(v) * rescale_factor)`, then `(x - f32(mean)) / f32(std)` in `f32`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelNorm {
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl PixelNorm {
    /// The `f32` value of a `u8` sample of channel `c` (0..3).
    pub fn value(&self, v: u8, c: usize) -> f32 {
        let mut f = if self.do_rescale {
            (f64::from(v) * self.rescale_factor) as f32
        } else {
            f32::from(v)
        };
        if self.do_normalize {
            f = (f - self.image_mean[c] as f32) / self.image_std[c] as f32;
        }
        f
    }

    /// Append `img` as `[3, h, w]` values (channel planes, rows top down).
    pub fn push_chw(&self, img: &RgbImage, out: &mut Vec<f32>) {
        for c in 0..3 {
            for p in img.pixels() {
                out.push(self.value(p.0[c], c));
            }
        }
    }
}

/// Run the configured processor on one RGB image (see [`load_image`]).
///
/// Deliberate departures from HF, all on degenerate inputs: HF infers the
/// channel axis from the array shape, so an image 1 or 3 pixels high is taken
/// for channels-first and garbled (`infer_channel_dimension_format`); this
/// function always treats the input as height x width x RGB, which is what HF
/// computes when told `input_data_format="channels_last"`. OneVision's
/// `pad()` re-infers the axis on the resized image and fails the same way
/// when that is 1 or 3 pixels high; here it is padded normally.
pub fn preprocess(cfg: &ImageProcessorConfig, img: &RgbImage) -> Result<Preprocessed> {
    let tiles = preprocess_tiles_u8(cfg, img)?;
    let pixel_values = tiles_to_pixel_values(cfg, &tiles)?;
    let (width, height) = tiles.first().map(|t| t.dimensions()).unwrap_or((0, 0));
    Ok(Preprocessed {
        pixel_values,
        num_tiles: tiles.len(),
        height: height as usize,
        width: width as usize,
        image_size: (img.height() as usize, img.width() as usize),
        grid_thw: None,
    })
}

// ---------------------------------------------------------------------------
// Resampling (Pillow libImaging/Resample.c, 8-bit path)
// ---------------------------------------------------------------------------

/// A resampling filter, named by its PIL code in configs (`resample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `PIL.Image.BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// `PIL.Image.BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    /// The filter for a PIL resample code; `None` for codes this crate does not implement.
    pub fn from_pil(code: i64) -> Option<Filter> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    /// Pillow's `bilinear_filter` / `bicubic_filter`.
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's fixed-point coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Per-output-pixel filter taps for one axis (Pillow's `precompute_coeffs`
/// followed by `normalize_coeffs_8bpc`).
struct Taps {
    /// For each output index: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output index.
    weights: Vec<i32>,
    ksize: usize,
}

fn precompute_taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    // The box is (0, in_size) held as C floats; exact for any realistic size.
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero; both are then clamped to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            // C `(int)(x +- 0.5)`: round half away from zero, then truncate.
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Taps {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: drop the fraction bits and clamp to `0..=255`.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass of Pillow's 8-bit resampler along x (`horizontal`) or y.
fn resample_pass(src: &RgbImage, out_len: u32, horizontal: bool, filter: Filter) -> RgbImage {
    let in_len = if horizontal {
        src.width()
    } else {
        src.height()
    };
    let taps = precompute_taps(in_len as usize, out_len as usize, filter);
    let (w, h) = if horizontal {
        (out_len, src.height())
    } else {
        (src.width(), out_len)
    };
    RgbImage::from_fn(w, h, |x, y| {
        let o = if horizontal { x } else { y } as usize;
        let (start, n) = taps.bounds[o];
        let k = &taps.weights[o * taps.ksize..o * taps.ksize + n];
        let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
        for (i, &kw) in k.iter().enumerate() {
            let s = (start + i) as u32;
            let p = if horizontal {
                src.get_pixel(s, y)
            } else {
                src.get_pixel(x, s)
            }
            .0;
            for c in 0..3 {
                acc[c] += i64::from(p[c]) * i64::from(kw);
            }
        }
        image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
    })
}

/// Resize an RGB image to `width` x `height` exactly as Pillow 13's
/// `Image.resize((width, height), resample)` does for mode "RGB" (no box, no
/// reducing_gap): same size is a copy; otherwise one pass per changed axis,
/// each rounding to `u8` (fixed-point weights, `+ 2^21`, `>> 22`, clamp).
///
/// Pass order (it changes the `u8` intermediate, hence the result): Pillow
/// 13.0 runs the vertical pass first when the height shrinks by more than
/// twice as many pixels as the width does (`ImagingResampleInner`:
/// `horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)`),
/// and horizontal first otherwise. Pillow <= 12 always went horizontal first.
pub fn resize_rgb8(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid(format!(
            "resize to {width}x{height}: height and width must be > 0"
        )));
    }
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::invalid("cannot resize an empty image"));
    }
    let (need_h, need_v) = (width != img.width(), height != img.height());
    let dy = i64::from(img.height()) - i64::from(height);
    let dx = i64::from(img.width()) - i64::from(width);
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    let out = match (need_h, need_v) {
        (false, false) => img.clone(),
        (true, false) => resample_pass(img, width, true, filter),
        (false, true) => resample_pass(img, height, false, filter),
        (true, true) if horizontal_first => resample_pass(
            &resample_pass(img, width, true, filter),
            height,
            false,
            filter,
        ),
        (true, true) => resample_pass(
            &resample_pass(img, height, false, filter),
            width,
            true,
            filter,
        ),
    };
    Ok(out)
}
