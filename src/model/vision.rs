//! The vision tower: CLIP (`CLIPVisionModel`: class token, pre-layernorm)
//! or SigLIP (`SiglipVisionModel`: patch bias, no class token), as
//! transformers computes them. Only the encoder layers up to the deepest
//! `vision_feature_layer` are loaded and run; the post-layernorm and the
//! pooling head are never used by LLaVA.

use super::{LayerNorm, Linear};
use crate::backend::{AttnShape, Backend};
use crate::config::{VisionConfig, VisionKind, VlmConfig};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Prefixed;

struct EncoderLayer<B: Backend> {
    ln1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    ln2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

pub struct VisionTower<B: Backend> {
    pub cfg: VisionConfig,
    /// Conv2d(kernel = stride = patch) as a linear over flattened patches:
    /// `[hidden, channels * patch * patch]`.
    patch: Linear<B>,
    /// CLIP's class embedding `[1, hidden]`.
    class_embedding: Option<B::Tensor>,
    /// `[positions, hidden]`.
    position_embedding: B::Tensor,
    pre_layernorm: Option<LayerNorm<B>>,
    layers: Vec<EncoderLayer<B>>,
    /// Hidden-state indices to output (0 = embeddings), in config order.
    feature_layers: Vec<usize>,
    drop_cls: bool,
}

impl<B: Backend> VisionTower<B> {
    /// `vm` is the vision model's prefix (`vision_tower.vision_model`, or
    /// `model.vision_tower` in transformers 5's layout).
    pub fn load(be: &B, vm: &Prefixed, vlm: &VlmConfig) -> Result<Self> {
        let cfg = vlm.vision.clone();
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::config(
                &vlm.path,
                format!(
                    "vision_config: hidden_size {} is not a multiple of num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vm.pp("embeddings");
        let conv_name = emb.pp("patch_embedding");
        let conv = conv_name.get("weight", &[h, cfg.num_channels, p, p])?;
        let conv = conv.reshape(vec![h, cfg.num_channels * p * p])?;
        let patch_bias = match cfg.kind {
            VisionKind::Siglip => Some(be.upload(&conv_name.get("bias", &[h])?)?),
            VisionKind::Clip
            | VisionKind::Qwen2Vl
            | VisionKind::Qwen25Vl
            | VisionKind::InternVit => None,
        };
        let patch = Linear {
            w: be.weight(&conv)?,
            b: patch_bias,
            act_quant: false,
        };
        let class_embedding = match cfg.kind {
            VisionKind::Clip => {
                Some(be.upload(&emb.get("class_embedding", &[h])?.reshape(vec![1, h])?)?)
            }
            VisionKind::Siglip
            | VisionKind::Qwen2Vl
            | VisionKind::Qwen25Vl
            | VisionKind::InternVit => None,
        };
        let position_embedding = be.upload(
            &emb.pp("position_embedding")
                .get("weight", &[cfg.num_positions(), h])?,
        )?;
        let pre_layernorm = match cfg.kind {
            VisionKind::Clip => Some(LayerNorm::load(
                be,
                &vm.pp("pre_layrnorm"),
                h,
                cfg.layer_norm_eps,
            )?),
            VisionKind::Siglip
            | VisionKind::Qwen2Vl
            | VisionKind::Qwen25Vl
            | VisionKind::InternVit => None,
        };
        let feature_layers = vlm.feature_layer_indices();
        let needed = feature_layers.iter().copied().max().unwrap_or(0);
        let mut layers = Vec::with_capacity(needed);
        for i in 0..needed {
            let l = vm.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            let eps = cfg.layer_norm_eps;
            layers.push(EncoderLayer {
                ln1: LayerNorm::load(be, &l.pp("layer_norm1"), h, eps)?,
                q: Linear::load(be, &a.pp("q_proj"), h, h, true)?,
                k: Linear::load(be, &a.pp("k_proj"), h, h, true)?,
                v: Linear::load(be, &a.pp("v_proj"), h, h, true)?,
                o: Linear::load(be, &a.pp("out_proj"), h, h, true)?,
                ln2: LayerNorm::load(be, &l.pp("layer_norm2"), h, eps)?,
                fc1: Linear::load(be, &l.pp("mlp.fc1"), cfg.intermediate_size, h, true)?,
                fc2: Linear::load(be, &l.pp("mlp.fc2"), h, cfg.intermediate_size, true)?,
            });
        }
        Ok(VisionTower {
            cfg,
            patch,
            class_embedding,
            position_embedding,
            pre_layernorm,
            layers,
            feature_layers,
            drop_cls: vlm.vision_feature_select_strategy == "default",
        })
    }

    /// Features of one tile `[channels, size, size]` (host pixel values),
    /// the selected hidden states after the feature-select strategy:
    /// `[tokens, hidden * feature_layers]`.
    pub fn forward(&self, be: &B, pixels: &[f32]) -> Result<Tensor> {
        let c = &self.cfg;
        let patches = patchify(pixels, c.num_channels, c.image_size, c.patch_size)?;
        let mut x = self.patch.forward(be, &be.upload(&patches)?)?;
        if let Some(cls) = &self.class_embedding {
            x = be.concat_rows(cls, &x)?;
        }
        x = be.add(&x, &self.position_embedding)?;
        if let Some(ln) = &self.pre_layernorm {
            x = ln.forward(be, &x)?;
        }
        let heads = c.num_attention_heads;
        let hd = c.head_dim();
        let shape = AttnShape {
            heads,
            kv_heads: heads,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
        };
        let mut selected: Vec<Option<Tensor>> = vec![None; self.feature_layers.len()];
        let mut keep = |idx: usize, x: &B::Tensor| -> Result<()> {
            for (slot, &want) in selected.iter_mut().zip(&self.feature_layers) {
                if want == idx {
                    *slot = Some(be.download(x)?);
                }
            }
            Ok(())
        };
        keep(0, &x)?;
        for (i, l) in self.layers.iter().enumerate() {
            let h = l.ln1.forward(be, &x)?;
            let q = l.q.forward(be, &h)?;
            let k = l.k.forward(be, &h)?;
            let v = l.v.forward(be, &h)?;
            let a = be.attention(&q, &k, &v, shape)?;
            x = be.add(&x, &l.o.forward(be, &a)?)?;
            let h = l.ln2.forward(be, &x)?;
            let h = be.act(&l.fc1.forward(be, &h)?, c.hidden_act)?;
            x = be.add(&x, &l.fc2.forward(be, &h)?)?;
            keep(i + 1, &x)?;
        }
        let parts: Vec<Tensor> = selected.into_iter().flatten().collect();
        let mut feats = concat_cols(&parts)?;
        if self.drop_cls {
            let cols = feats.cols();
            let rows = feats.rows();
            feats = Tensor::new(vec![rows - 1, cols], feats.data[cols..].to_vec())?;
        }
        Ok(feats)
    }
}

/// `[channels, size, size]` pixels -> `[patches, channels * p * p]` rows in
/// Conv2d weight order (channel, ky, kx), patches in raster order.
pub fn patchify(pixels: &[f32], channels: usize, size: usize, p: usize) -> Result<Tensor> {
    if pixels.len() != channels * size * size {
        return Err(Error::invalid(format!(
            "vision tower: expected {channels}x{size}x{size} pixel values, got {}",
            pixels.len()
        )));
    }
    let n = size / p;
    let mut out = Vec::with_capacity(n * n * channels * p * p);
    for py in 0..n {
        for px in 0..n {
            for ch in 0..channels {
                for ky in 0..p {
                    let row = (ch * size + py * p + ky) * size + px * p;
                    out.extend_from_slice(&pixels[row..row + p]);
                }
            }
        }
    }
    Tensor::new(vec![n * n, channels * p * p], out)
}

/// Concatenates matrices with the same row count along columns.
fn concat_cols(parts: &[Tensor]) -> Result<Tensor> {
    match parts {
        [] => Err(Error::invalid("vision tower: no feature layer selected")),
        [one] => Ok(one.clone()),
        _ => {
            let rows = parts[0].rows();
            let cols: usize = parts.iter().map(Tensor::cols).sum();
            let mut data = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                for p in parts {
                    data.extend_from_slice(p.row(r));
                }
            }
            Tensor::new(vec![rows, cols], data)
        }
    }
}
