//! A model directory's image processor, whichever family it belongs to:
//! the `image_processor_type` of preprocessor_config.json (or of
//! processor_config.json's `"image_processor"`) picks LLaVA's CLIP / SigLIP /
//! OneVision processors ([`crate::preprocess`]), Qwen2-VL's
//! ([`crate::preprocess_qwen`]) or InternVL's ([`crate::preprocess_internvl`]).

use std::path::Path;

use image::RgbImage;

use crate::error::Result;
use crate::preprocess::{
    self, image_settings, read_image_processor_json, ImageProcessorConfig, Preprocessed,
};
use crate::preprocess_internvl::{self, is_internvl_type, InternVlImageConfig};
use crate::preprocess_qwen::{self, is_qwen_vl_type, QwenVlImageConfig};

#[derive(Debug, Clone, PartialEq)]
pub enum ImageProcessor {
    Llava(ImageProcessorConfig),
    QwenVl(QwenVlImageConfig),
    /// `GotOcr2ImageProcessor` with `crop_to_patches` (InternVL -hf).
    InternVl(InternVlImageConfig),
}

impl ImageProcessor {
    pub fn load(model_dir: &Path) -> Result<ImageProcessor> {
        let (path, json) = read_image_processor_json(model_dir)?;
        let obj = image_settings(&path, &json)?;
        let ty = obj
            .get("image_processor_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if is_qwen_vl_type(ty) {
            Ok(ImageProcessor::QwenVl(QwenVlImageConfig::from_json(
                &path, &json,
            )?))
        } else if is_internvl_type(ty) {
            Ok(ImageProcessor::InternVl(InternVlImageConfig::from_json(
                &path, &json,
            )?))
        } else {
            Ok(ImageProcessor::Llava(ImageProcessorConfig::from_json(
                &path, &json,
            )?))
        }
    }

    /// The pixel values of one image, as the HF processor makes them.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Preprocessed> {
        match self {
            ImageProcessor::Llava(c) => preprocess::preprocess(c, img),
            ImageProcessor::QwenVl(c) => {
                let p = preprocess_qwen::preprocess(c, img)?;
                Ok(Preprocessed {
                    pixel_values: p.pixel_values,
                    num_tiles: 1,
                    height: p.resized.0,
                    width: p.resized.1,
                    image_size: (img.height() as usize, img.width() as usize),
                    grid_thw: Some(p.grid_thw),
                })
            }
            // Tiles `[num_tiles, 3, size, size]`: the grid row by row, then
            // the thumbnail when there is more than one.
            ImageProcessor::InternVl(c) => {
                let p = preprocess_internvl::preprocess(c, img)?;
                Ok(Preprocessed {
                    pixel_values: p.pixel_values,
                    num_tiles: p.num_tiles,
                    height: p.height,
                    width: p.width,
                    image_size: (img.height() as usize, img.width() as usize),
                    grid_thw: None,
                })
            }
        }
    }
}
