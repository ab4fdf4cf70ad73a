//! `LlavaForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration`:
//! vision tower -> feature selection -> 2-layer projector -> (OneVision:
//! anyres packing with unpadding, downsampling and `image_newline`) -> rows
//! that replace the expanded image tokens in the decoder's input embeddings.

use super::vision::VisionTower;
use super::vlm::ImageEmbeds;
use super::Linear;
use crate::anyres;
use crate::backend::Backend;
use crate::config::{Act, Arch, VlmConfig};
use crate::error::{Error, Result};
use crate::preprocess::Preprocessed;
use crate::tensor::Tensor;
use crate::weights::{Prefixes, WeightFiles};

/// `multi_modal_projector`: linear_1 -> act -> linear_2.
pub struct Projector<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
    pub act: Act,
}

impl<B: Backend> Projector<B> {
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = be.act(&self.linear_1.forward(be, x)?, self.act)?;
        self.linear_2.forward(be, &h)
    }
}

/// LLaVA's image side: the tower, the projector and (OneVision) the
/// `image_newline` row.
pub struct LlavaEncoder<B: Backend> {
    pub vision: VisionTower<B>,
    pub projector: Projector<B>,
    /// OneVision's `image_newline` `[hidden]`, kept on the host for packing.
    pub image_newline: Option<Vec<f32>>,
}

impl<B: Backend> LlavaEncoder<B> {
    pub fn load(be: &B, cfg: &VlmConfig, w: &WeightFiles, p: &Prefixes) -> Result<Self> {
        let vision = VisionTower::load(be, &w.pp(&p.vision), cfg)?;
        let hidden = cfg.text.hidden_size;
        let vdim = cfg.vision_feature_dim();
        let pj = w.pp(&p.projector);
        let bias = cfg.multimodal_projector_bias;
        let projector = Projector {
            linear_1: Linear::load(be, &pj.pp("linear_1"), hidden, vdim, bias)?,
            linear_2: Linear::load(be, &pj.pp("linear_2"), hidden, hidden, bias)?,
            act: cfg.projector_hidden_act,
        };
        let image_newline = match cfg.arch {
            Arch::LlavaOnevision => Some(w.get(&p.image_newline, &[hidden])?.data),
            _ => None,
        };
        Ok(LlavaEncoder {
            vision,
            projector,
            image_newline,
        })
    }

    /// How many image tokens an image of `(height, width)` expands to: the
    /// processor's count, equal to the rows [`Self::encode`] returns.
    pub fn num_image_tokens(&self, cfg: &VlmConfig, image_size: (usize, usize)) -> Result<usize> {
        match cfg.arch {
            Arch::LlavaOnevision => anyres::onevision_num_image_tokens(
                image_size,
                &cfg.image_grid_pinpoints,
                cfg.vision.image_size,
                cfg.vision.patch_size,
                &cfg.vision_aspect_ratio,
                cfg.vision_feature_select_strategy == "full",
            ),
            _ => Ok(cfg.tokens_per_tile()),
        }
    }

    /// Vision tower, projector and (OneVision) packing for one image.
    pub fn encode(
        &self,
        be: &B,
        cfg: &VlmConfig,
        pre: &Preprocessed,
    ) -> Result<ImageEmbeds<B::Tensor>> {
        let vc = &cfg.vision;
        if pre.grid_thw.is_some() || pre.height != vc.image_size || pre.width != vc.image_size {
            return Err(Error::invalid(format!(
                "pixel values are {}x{}, the vision tower expects {}x{}",
                pre.height, pre.width, vc.image_size, vc.image_size
            )));
        }
        let tile_len = vc.num_channels * pre.height * pre.width;
        if cfg.arch == Arch::Llava && pre.num_tiles != 1 {
            return Err(Error::invalid(format!(
                "llava takes one image tile, the image processor produced {}",
                pre.num_tiles
            )));
        }
        let mut vision_features = Vec::with_capacity(pre.num_tiles);
        let mut projected = Vec::with_capacity(pre.num_tiles);
        for t in 0..pre.num_tiles {
            let f = self
                .vision
                .forward(be, &pre.pixel_values[t * tile_len..(t + 1) * tile_len])?;
            let p = self.projector.forward(be, &be.upload(&f)?)?;
            vision_features.push(f);
            projected.push(p);
        }
        let hidden = cfg.text.hidden_size;
        if cfg.arch != Arch::LlavaOnevision {
            let projector_output = vec![be.download(&projected[0])?];
            let features = projected.swap_remove(0);
            let (num_tokens, _) = be.dims(&features);
            return Ok(ImageEmbeds {
                vision_features,
                projector_output,
                features,
                num_tokens,
            });
        }
        let projector_output: Vec<Tensor> = projected
            .iter()
            .map(|p| be.download(p))
            .collect::<Result<_>>()?;
        let tokens = projector_output[0].rows();
        let flat: Vec<f32> = projector_output
            .iter()
            .flat_map(|t| t.data.iter().copied())
            .collect();
        let newline = self.image_newline.as_deref().unwrap_or(&[]);
        let (packed, rows) = anyres::pack_onevision_features(
            &flat,
            pre.num_tiles,
            tokens,
            hidden,
            pre.image_size,
            &cfg.image_grid_pinpoints,
            vc.image_size,
            vc.patch_size,
            &cfg.vision_aspect_ratio,
            newline,
        )?;
        let features = be.upload(&Tensor::new(vec![rows, hidden], packed)?)?;
        Ok(ImageEmbeds {
            vision_features,
            projector_output,
            features,
            num_tokens: rows,
        })
    }
}

/// Checks the sizes config.json gives against the tensors present, before
/// anything is allocated from them: the number of decoder and vision
/// layers, the embedding and the patch embedding. A mismatch is a
/// config.json error naming the key (and saying when the key is missing
/// and transformers' default was used).
pub fn check_config_against_weights(cfg: &VlmConfig, w: &WeightFiles, p: &Prefixes) -> Result<()> {
    let bad = |msg: String| Err(Error::config(&cfg.path, msg));
    let loc = w.location();
    let text_layers = w.count_numbered(&format!("{}.layers", p.text));
    if cfg.text.num_hidden_layers > text_layers {
        return bad(format!(
            "{}, but {} holds {text_layers} decoder layers ({}.layers.N)",
            cfg.describe("text_config.num_hidden_layers", cfg.text.num_hidden_layers),
            loc.display(),
            p.text
        ));
    }
    let qwen = matches!(cfg.arch, Arch::Qwen2Vl | Arch::Qwen25Vl);
    if qwen {
        let blocks = w.count_numbered(&format!("{}.blocks", p.vision));
        if cfg.vision.num_hidden_layers > blocks {
            return bad(format!(
                "\"vision_config.depth\" is {}, but {} holds {blocks} vision blocks ({}.blocks.N)",
                cfg.vision.num_hidden_layers,
                loc.display(),
                p.vision
            ));
        }
    }
    // InternViT names its layers `encoder.layer.N`.
    let layers_key = if cfg.arch == Arch::InternVl {
        "encoder.layer"
    } else {
        "encoder.layers"
    };
    let vision_layers = w.count_numbered(&format!("{}.{layers_key}", p.vision));
    let needed = cfg.feature_layer_indices().into_iter().max().unwrap_or(0);
    if !qwen && needed > vision_layers {
        return bad(format!(
            "{} with vision_feature_layer {:?} needs {needed} vision layers, but {} holds {vision_layers} ({}.{layers_key}.N)",
            cfg.describe("vision_config.num_hidden_layers", cfg.vision.num_hidden_layers),
            cfg.vision_feature_layer,
            loc.display(),
            p.vision
        ));
    }
    let embed = format!("{}.embed_tokens.weight", p.text);
    if let Some(shape) = w.shape(&embed) {
        let t = &cfg.text;
        if shape != [t.vocab_size, t.hidden_size] {
            return bad(format!(
                "{} and {}, but tensor \"{embed}\" is {shape:?} (expected [vocab_size, hidden_size])",
                cfg.describe("text_config.vocab_size", t.vocab_size),
                cfg.describe("text_config.hidden_size", t.hidden_size),
            ));
        }
    }
    let patch = format!("{}.embeddings.patch_embedding.weight", p.vision);
    if let Some(shape) = w.shape(&patch) {
        let v = &cfg.vision;
        if shape != [v.hidden_size, v.num_channels, v.patch_size, v.patch_size] {
            return bad(format!(
                "{}, {} and {}, but tensor \"{patch}\" is {shape:?} (expected [hidden_size, num_channels, patch_size, patch_size])",
                cfg.describe("vision_config.hidden_size", v.hidden_size),
                cfg.describe("vision_config.num_channels", v.num_channels),
                cfg.describe("vision_config.patch_size", v.patch_size),
            ));
        }
    }
    Ok(())
}
