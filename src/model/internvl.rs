//! InternVL's image side (`InternVLModel.get_image_features` of
//! transformers' native InternVL, the "-hf" checkpoints), tile by tile:
//!
//! ```text
//! x   = [cls | patch_embeddings(tile)] + position_embeddings   Conv2d with bias; no interpolation (tiles are image_size)
//! per layer:                                                 norm: LayerNorm or RMSNorm (norm_type)
//!   x += lambda_1 * projection_layer(attn(q_proj(n), k_proj(n), v_proj(n)))   n = layernorm_before(x); q/k biases
//!   x += lambda_2 * fc2(act(fc1(layernorm_after(x))))                         (attention_bias), optional q/k RMSNorm
//! x   = layernorm(x) unless use_mean_pooling                  (the -hf checkpoints pool: no final norm)
//! f   = pixel_shuffle_0.5(x without CLS)                      token (i, j) = [x(2i,2j) | x(2i,2j+1) | x(2i+1,2j) | x(2i+1,2j+1)]
//! out = linear_2(gelu(linear_1(layer_norm(f))))               projector LayerNorm eps 1e-5
//! ```
//!
//! The layer scales are folded into the weights at load time
//! (`w' = diag(lambda) w`, `b' = lambda * b`): one rounding of the f32
//! product per weight instead of one per activation, well within the
//! goldens' 1e-4 relative tolerance, and no elementwise multiply is needed
//! on the backend. The pixel shuffle runs on the host.

use super::{LayerNorm, Linear, Norm};
use crate::backend::{AttnShape, Backend};
use crate::config::{Act, VlmConfig};
use crate::config_internvl::InternVitExtra;
use crate::error::{Error, Result};
use crate::model::vision::patchify;
use crate::model::vlm::ImageEmbeds;
use crate::preprocess::Preprocessed;
use crate::tensor::Tensor;
use crate::weights::Prefixed;

/// `InternVLVisionRMSNorm`'s epsilon for q / k (the class default).
const QK_NORM_EPS: f32 = 1e-6;
/// `InternVLMultiModalProjector`'s LayerNorm (`nn.LayerNorm` default).
const PROJECTOR_EPS: f32 = 1e-5;

struct Layer<B: Backend> {
    norm1: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    qk_norm: Option<(B::Tensor, B::Tensor)>,
    /// `projection_layer` with `lambda_1` folded in.
    proj: Linear<B>,
    norm2: Norm<B>,
    fc1: Linear<B>,
    /// `fc2` with `lambda_2` folded in.
    fc2: Linear<B>,
}

/// InternViT and the projector.
pub struct InternVlEncoder<B: Backend> {
    patch: Linear<B>,
    cls: B::Tensor,
    pos: B::Tensor,
    layers: Vec<Layer<B>>,
    final_norm: Option<LayerNorm<B>>,
    proj_norm: LayerNorm<B>,
    linear_1: Linear<B>,
    linear_2: Linear<B>,
    attn: AttnShape,
    act: Act,
    projector_act: Act,
    channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden: usize,
}

/// `diag(scale) w` and `scale * b` as a dense linear: `w` `[out, in]`.
fn scaled<B: Backend>(
    be: &B,
    vb: &Prefixed,
    scale: &Tensor,
    out: usize,
    inp: usize,
) -> Result<Linear<B>> {
    let mut w = vb.get("weight", &[out, inp])?;
    let mut b = vb.get("bias", &[out])?;
    for (o, &s) in scale.data.iter().enumerate() {
        w.data[o * inp..(o + 1) * inp]
            .iter_mut()
            .for_each(|x| *x *= s);
        b.data[o] *= s;
    }
    Ok(Linear {
        w: be.weight(&w)?,
        b: Some(be.upload(&b)?),
        act_quant: false,
    })
}

impl<B: Backend> InternVlEncoder<B> {
    /// `vm`: the tower's prefix (`vision_tower` or `model.vision_tower`),
    /// `pm`: the projector's.
    pub fn load(be: &B, vm: &Prefixed, pm: &Prefixed, cfg: &VlmConfig) -> Result<Self> {
        let extra: &InternVitExtra = cfg.internvl.as_ref().ok_or_else(|| {
            Error::config(&cfg.path, "not an InternVL config (no InternViT settings)")
        })?;
        let c = &cfg.vision;
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let emb = vm.pp("embeddings");
        let conv = emb.pp("patch_embeddings.projection");
        let w = conv
            .get("weight", &[h, ch, p, p])?
            .reshape(vec![h, ch * p * p])?;
        let patch = Linear {
            w: be.weight(&w)?,
            b: Some(be.upload(&conv.get("bias", &[h])?)?),
            act_quant: false,
        };
        let cls = emb.get("cls_token", &[1, 1, h])?.reshape(vec![1, h])?;
        let n = c.num_positions();
        let pos = emb
            .get("position_embeddings", &[1, n, h])?
            .reshape(vec![n, h])?;
        let (eps, inter, rms) = (c.layer_norm_eps, c.intermediate_size, extra.rms_norm);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vm.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let qk_norm = if extra.qk_norm {
                Some((
                    be.upload(&a.pp("q_norm").get("weight", &[h])?)?,
                    be.upload(&a.pp("k_norm").get("weight", &[h])?)?,
                ))
            } else {
                None
            };
            let l1 = l.get("lambda_1", &[h])?;
            let l2 = l.get("lambda_2", &[h])?;
            layers.push(Layer {
                norm1: Norm::load(be, &l.pp("layernorm_before"), h, eps, rms)?,
                q: Linear::load(be, &a.pp("q_proj"), h, h, extra.qkv_bias)?,
                k: Linear::load(be, &a.pp("k_proj"), h, h, extra.qkv_bias)?,
                v: Linear::load(be, &a.pp("v_proj"), h, h, extra.qkv_bias)?,
                qk_norm,
                proj: scaled(be, &a.pp("projection_layer"), &l1, h, h)?,
                norm2: Norm::load(be, &l.pp("layernorm_after"), h, eps, rms)?,
                fc1: Linear::load(be, &l.pp("mlp.fc1"), inter, h, true)?,
                fc2: scaled(be, &l.pp("mlp.fc2"), &l2, h, inter)?,
            });
        }
        let final_norm = if extra.final_norm {
            Some(LayerNorm::load(be, &vm.pp("layernorm"), h, eps)?)
        } else {
            None
        };
        let wide = 4 * h;
        let th = cfg.text.hidden_size;
        let heads = c.num_attention_heads;
        let hd = h / heads;
        Ok(InternVlEncoder {
            patch,
            cls: be.upload(&cls)?,
            pos: be.upload(&pos)?,
            layers,
            final_norm,
            proj_norm: LayerNorm::load(be, &pm.pp("layer_norm"), wide, PROJECTOR_EPS)?,
            linear_1: Linear::load(be, &pm.pp("linear_1"), th, wide, true)?,
            linear_2: Linear::load(be, &pm.pp("linear_2"), th, th, true)?,
            attn: AttnShape {
                heads,
                kv_heads: heads,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
            },
            act: c.hidden_act,
            projector_act: cfg.projector_hidden_act,
            channels: ch,
            image_size: c.image_size,
            patch_size: p,
            hidden: h,
        })
    }

    /// Tokens per tile after the pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        let s = self.image_size / self.patch_size;
        s * s / 4
    }

    /// Image tokens of a preprocessed image: tiles x tokens per tile.
    pub fn num_image_tokens(&self, pre: &Preprocessed) -> usize {
        pre.num_tiles * self.tokens_per_tile()
    }

    /// InternViT on one tile `[channels, size, size]`: the last layer's
    /// output, CLS dropped, pixel-shuffled `[tokens, 4 * hidden]`.
    fn tower(&self, be: &B, pixels: &[f32]) -> Result<Tensor> {
        let patches = patchify(pixels, self.channels, self.image_size, self.patch_size)?;
        let x = self.patch.forward(be, &be.upload(&patches)?)?;
        let mut x = be.add(&be.concat_rows(&self.cls, &x)?, &self.pos)?;
        for l in &self.layers {
            let n = l.norm1.forward(be, &x)?;
            let (mut q, mut k) = (l.q.forward(be, &n)?, l.k.forward(be, &n)?);
            if let Some((qn, kn)) = &l.qk_norm {
                q = be.rms_norm(&q, qn, QK_NORM_EPS)?;
                k = be.rms_norm(&k, kn, QK_NORM_EPS)?;
            }
            let v = l.v.forward(be, &n)?;
            let a = be.attention(&q, &k, &v, self.attn)?;
            x = be.add(&x, &l.proj.forward(be, &a)?)?;
            let n = l.norm2.forward(be, &x)?;
            let m = l
                .fc2
                .forward(be, &be.act(&l.fc1.forward(be, &n)?, self.act)?)?;
            x = be.add(&x, &m)?;
        }
        if let Some(ln) = &self.final_norm {
            x = ln.forward(be, &x)?;
        }
        let x = be.download(&x)?;
        pixel_shuffle(
            &x.data[self.hidden..],
            self.image_size / self.patch_size,
            self.hidden,
        )
    }

    /// The tower and projector on every tile of one image.
    pub fn encode(&self, be: &B, pre: &Preprocessed) -> Result<ImageEmbeds<B::Tensor>> {
        if pre.grid_thw.is_some() || pre.height != self.image_size || pre.width != self.image_size {
            return Err(Error::invalid(format!(
                "pixel values are {}x{} tiles, InternViT expects {}x{} (GotOcr2ImageProcessor tiles of vision_config.image_size)",
                pre.height, pre.width, self.image_size, self.image_size
            )));
        }
        let tile_len = self.channels * pre.height * pre.width;
        if pre.num_tiles == 0 || pre.pixel_values.len() != pre.num_tiles * tile_len {
            return Err(Error::invalid(format!(
                "pixel values: {} values for {} tiles of {tile_len}",
                pre.pixel_values.len(),
                pre.num_tiles
            )));
        }
        let mut vision_features = Vec::with_capacity(pre.num_tiles);
        let mut projected = Vec::with_capacity(pre.num_tiles);
        let mut projector_output = Vec::with_capacity(pre.num_tiles);
        for t in pre.pixel_values.chunks_exact(tile_len) {
            let f = self.tower(be, t)?;
            let y = self.proj_norm.forward(be, &be.upload(&f)?)?;
            let y = be.act(&self.linear_1.forward(be, &y)?, self.projector_act)?;
            let y = self.linear_2.forward(be, &y)?;
            projector_output.push(be.download(&y)?);
            vision_features.push(f);
            projected.push(y);
        }
        let features = be.concat_all(projected)?;
        Ok(ImageEmbeds {
            vision_features,
            projector_output,
            features,
            num_tokens: pre.num_tiles * self.tokens_per_tile(),
        })
    }
}

/// `InternVLModel.pixel_shuffle` with scale 0.5 on one tile's patch rows
/// (`side` x `side` patches, row-major, `dim` channels): token (i, j), in
/// row-major order, is the concatenation of patches (2i, 2j), (2i, 2j+1),
/// (2i+1, 2j) and (2i+1, 2j+1).
pub fn pixel_shuffle(x: &[f32], side: usize, dim: usize) -> Result<Tensor> {
    if !side.is_multiple_of(2) || x.len() != side * side * dim {
        return Err(Error::invalid(format!(
            "pixel shuffle: {} values are not {side} x {side} patches of {dim} (side must be even)",
            x.len()
        )));
    }
    let half = side / 2;
    let mut out = Vec::with_capacity(x.len());
    for i in 0..half {
        for j in 0..half {
            for (r, c) in [
                (2 * i, 2 * j),
                (2 * i, 2 * j + 1),
                (2 * i + 1, 2 * j),
                (2 * i + 1, 2 * j + 1),
            ] {
                let at = (r * side + c) * dim;
                out.extend_from_slice(&x[at..at + dim]);
            }
        }
    }
    Tensor::new(vec![half * half, 4 * dim], out)
}
