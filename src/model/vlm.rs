//! The whole VLM: an image encoder of its family ([`ImageEncoder`]) whose
//! output rows replace the expanded image tokens in the input embeddings of
//! the language model ([`TextModel`]).

use std::path::Path;

use super::internvl::InternVlEncoder;
use super::llava::{check_config_against_weights, LlavaEncoder};
use super::qwen2vl::{no_grid, Qwen2VlVision};
use super::text::TextModel;
use crate::backend::Backend;
use crate::config::{Arch, VlmConfig};
use crate::error::{Error, Result};
use crate::preprocess::Preprocessed;
use crate::tensor::Tensor;
use crate::weights::{Prefixes, WeightFiles};

/// The image side of each family.
pub enum ImageEncoder<B: Backend> {
    /// LLaVA and LLaVA-OneVision: CLIP / SigLIP tower and projector.
    Llava(LlavaEncoder<B>),
    /// Qwen2-VL and Qwen2.5-VL: native-resolution tower and 2x2 merger.
    Qwen2Vl(Qwen2VlVision<B>),
    /// InternVL (-hf): InternViT per tile, pixel shuffle, MLP projector.
    InternVl(InternVlEncoder<B>),
}

pub struct Vlm<B: Backend> {
    pub cfg: VlmConfig,
    pub encoder: ImageEncoder<B>,
    pub text: TextModel<B>,
}

/// What an image becomes on its way into the decoder (stage by stage, for
/// tests and inspection).
pub struct ImageEmbeds<T> {
    /// Per tile: the features entering the projector (LLaVA) or the
    /// merger (Qwen2-VL) `[tokens, vdim]`.
    pub vision_features: Vec<Tensor>,
    /// Per tile: projector (merger) output `[tokens, hidden]`.
    pub projector_output: Vec<Tensor>,
    /// The rows that replace the image tokens `[num_image_tokens, hidden]`.
    pub features: T,
    pub num_tokens: usize,
}

impl<B: Backend> Vlm<B> {
    /// Loads config.json and the weights of a model directory.
    pub fn load(be: &B, dir: &Path) -> Result<Self> {
        let cfg = VlmConfig::load(dir)?;
        let w = WeightFiles::open(dir)?;
        Self::from_weights(be, cfg, &w)
    }

    pub fn from_weights(be: &B, cfg: VlmConfig, w: &WeightFiles) -> Result<Self> {
        let p = Prefixes::detect(w)?;
        check_config_against_weights(&cfg, w, &p)?;
        let encoder = match cfg.arch {
            Arch::Llava | Arch::LlavaOnevision => {
                ImageEncoder::Llava(LlavaEncoder::load(be, &cfg, w, &p)?)
            }
            Arch::Qwen2Vl | Arch::Qwen25Vl => {
                ImageEncoder::Qwen2Vl(Qwen2VlVision::load(be, &w.pp(&p.vision), &cfg)?)
            }
            Arch::InternVl => ImageEncoder::InternVl(InternVlEncoder::load(
                be,
                &w.pp(&p.vision),
                &w.pp(&p.projector),
                &cfg,
            )?),
        };
        let text = TextModel::load(be, &w.pp(&p.text), &w.pp(&p.lm_head), &cfg.text)?;
        Ok(Vlm { cfg, encoder, text })
    }

    /// How many image tokens the preprocessed image expands to: the
    /// processor's count, equal to the rows [`Self::encode_image`] returns.
    pub fn num_image_tokens(&self, pre: &Preprocessed) -> Result<usize> {
        match &self.encoder {
            ImageEncoder::Llava(e) => e.num_image_tokens(&self.cfg, pre.image_size),
            ImageEncoder::Qwen2Vl(e) => match pre.grid_thw {
                Some(g) => Ok(e.num_tokens(g)),
                None => Err(no_grid()),
            },
            ImageEncoder::InternVl(e) => Ok(e.num_image_tokens(pre)),
        }
    }

    /// The merged (rows, columns) grid of each image, for M-RoPE: `None`
    /// unless the language model uses M-RoPE.
    pub fn mrope_grids(&self, images: &[&Preprocessed]) -> Result<Option<Vec<(usize, usize)>>> {
        if self.cfg.text.mrope_section.is_none() {
            return Ok(None);
        }
        let m = self.cfg.vision.spatial_merge_size;
        images
            .iter()
            .map(|p| match p.grid_thw {
                Some((1, h, w)) => Ok((h / m, w / m)),
                Some(g) => Err(Error::invalid(format!(
                    "image_grid_thw {g:?}: only single images (t = 1) are supported, not video"
                ))),
                None => Err(no_grid()),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The image encoder on one image.
    pub fn encode_image(&self, be: &B, pre: &Preprocessed) -> Result<ImageEmbeds<B::Tensor>> {
        match &self.encoder {
            ImageEncoder::Llava(e) => e.encode(be, &self.cfg, pre),
            ImageEncoder::InternVl(e) => e.encode(be, pre),
            ImageEncoder::Qwen2Vl(e) => {
                let img = e.encode(be, pre)?;
                let (num_tokens, _) = be.dims(&img.features);
                Ok(ImageEmbeds {
                    vision_features: vec![img.vision_features],
                    projector_output: vec![be.download(&img.features)?],
                    features: img.features,
                    num_tokens,
                })
            }
        }
    }
}
