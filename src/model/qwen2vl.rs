//! Qwen2-VL's vision side (`Qwen2VisionTransformerPretrainedModel`), as
//! transformers computes it for one image:
//!
//! ```text
//! x   = patch_embed(pixel rows)            Conv3d without bias, as a linear over C*T*P*P
//! per block:                               pre-LayerNorm (eps 1e-6)
//!   x += proj(attn(rope2d(q), rope2d(k), v))   fused qkv with bias, full attention over the image
//!   x += fc2(quick_gelu(fc1(norm2(x))))
//! out = mlp.2(gelu(mlp.0(ln_q(x) as rows of 4 consecutive patches)))   the 2x2 merger
//! ```
//!
//! The rows arrive in the processor's order: by `merge x merge` block
//! (blocks row-major, row-major inside a block), so the merger's four
//! consecutive rows are one block. The 2-D rotary embedding has `head_dim /
//! 4` frequencies (theta 10000); the first `head_dim / 4` rotation pairs take
//! the patch's row, the next `head_dim / 4` its column ([`rope2d_parts`]).

use super::{LayerNorm, Linear};
use crate::backend::{AttnShape, Backend, Rope};
use crate::config::{Act, VlmConfig};
use crate::error::{Error, Result};
use crate::preprocess::Preprocessed;
use crate::tensor::Tensor;
use crate::weights::Prefixed;

struct Block<B: Backend> {
    norm1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    proj: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The tower and its merger.
pub struct Qwen2VlVision<B: Backend> {
    patch: Linear<B>,
    blocks: Vec<Block<B>>,
    ln_q: LayerNorm<B>,
    mlp0: Linear<B>,
    mlp2: Linear<B>,
    /// The row and column halves of the 2-D rotary embedding.
    rope: [Rope; 2],
    attn: AttnShape,
    act: Act,
    merge: usize,
    row_len: usize,
    embed: usize,
}

/// What one image becomes (stage by stage, for tests).
pub struct QwenImage<T> {
    /// The last block's output, the merger's input `[patches, embed_dim]`.
    pub vision_features: Tensor,
    /// The merger's output `[patches / merge^2, hidden]`.
    pub features: T,
}

/// A dense linear from host tensors.
fn dense<B: Backend>(be: &B, w: &Tensor, b: Option<&Tensor>) -> Result<Linear<B>> {
    Ok(Linear {
        w: be.weight(w)?,
        b: b.map(|b| be.upload(b)).transpose()?,
        act_quant: false,
    })
}

/// Rows `part * n .. (part + 1) * n` of a `[3n, ...]` tensor.
fn third(t: &Tensor, part: usize) -> Result<Tensor> {
    let rows = t.shape[0] / 3;
    let cols: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = rows;
    Tensor::new(shape, t.data[part * rows * cols..(part + 1) * rows * cols].to_vec())
}

/// The 2-D rotary embedding as two [`Rope`]s over `head_dim / 2` rotation
/// pairs: pairs `0..head_dim / 4` turn by the patch row times
/// `theta^(-4i / head_dim)`, pairs `head_dim / 4..` by the column times the
/// same frequencies; each part leaves the other's pairs at angle 0.
pub fn rope2d_parts(head_dim: usize, theta: f32) -> [Rope; 2] {
    let quarter = head_dim / 4;
    let dim = (head_dim / 2) as f32;
    let f: Vec<f32> = (0..quarter)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim))
        .collect();
    let zeros = vec![0.0; quarter];
    [
        Rope {
            inv_freq: [f.as_slice(), &zeros].concat(),
            head_dim,
        },
        Rope {
            inv_freq: [zeros.as_slice(), &f].concat(),
            head_dim,
        },
    ]
}

/// (row, column) of each patch row of a `(t, h, w)` grid in the processor's
/// block order.
pub fn patch_positions(grid: (usize, usize, usize), merge: usize) -> (Vec<usize>, Vec<usize>) {
    let (t, h, w) = grid;
    let mut rows = Vec::with_capacity(t * h * w);
    let mut cols = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for br in 0..h / merge {
            for bc in 0..w / merge {
                for i in 0..merge {
                    for j in 0..merge {
                        rows.push(br * merge + i);
                        cols.push(bc * merge + j);
                    }
                }
            }
        }
    }
    (rows, cols)
}

impl<B: Backend> Qwen2VlVision<B> {
    /// `vm` is the vision model's prefix (`visual`, or `model.visual` in
    /// transformers 5's layout).
    pub fn load(be: &B, vm: &Prefixed, vlm: &VlmConfig) -> Result<Self> {
        let c = &vlm.vision;
        let e = c.hidden_size;
        let (p, t, ch) = (c.patch_size, c.temporal_patch_size, c.num_channels);
        let row_len = ch * t * p * p;
        let conv = vm.pp("patch_embed.proj").get("weight", &[e, ch, t, p, p])?;
        let patch = dense(be, &conv.reshape(vec![e, row_len])?, None)?;
        let eps = c.layer_norm_eps;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vm.pp(format!("blocks.{i}"));
            let qkv = b.pp("attn.qkv");
            let w = qkv.get("weight", &[3 * e, e])?;
            let bias = qkv.get("bias", &[3 * e])?;
            let part = |k: usize| dense(be, &third(&w, k)?, Some(&third(&bias, k)?));
            blocks.push(Block {
                norm1: LayerNorm::load(be, &b.pp("norm1"), e, eps)?,
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                proj: Linear::load(be, &b.pp("attn.proj"), e, e, true)?,
                norm2: LayerNorm::load(be, &b.pp("norm2"), e, eps)?,
                fc1: Linear::load(be, &b.pp("mlp.fc1"), c.intermediate_size, e, true)?,
                fc2: Linear::load(be, &b.pp("mlp.fc2"), e, c.intermediate_size, true)?,
            });
        }
        let m = c.spatial_merge_size;
        let wide = e * m * m;
        let merger = vm.pp("merger");
        let heads = c.num_attention_heads;
        let hd = e / heads;
        Ok(Qwen2VlVision {
            patch,
            blocks,
            ln_q: LayerNorm::load(be, &merger.pp("ln_q"), e, eps)?,
            mlp0: Linear::load(be, &merger.pp("mlp.0"), wide, wide, true)?,
            mlp2: Linear::load(be, &merger.pp("mlp.2"), c.out_hidden_size, wide, true)?,
            rope: rope2d_parts(hd, 10000.0),
            attn: AttnShape {
                heads,
                kv_heads: heads,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
            },
            act: c.hidden_act,
            merge: m,
            row_len,
            embed: e,
        })
    }

    /// Tokens an image with this grid becomes.
    pub fn num_tokens(&self, grid: (usize, usize, usize)) -> usize {
        grid.0 * grid.1 * grid.2 / (self.merge * self.merge)
    }

    /// The tower and the merger on one preprocessed image.
    pub fn encode(&self, be: &B, pre: &Preprocessed) -> Result<QwenImage<B::Tensor>> {
        let Some(grid) = pre.grid_thw else {
            return Err(Error::invalid(
                "Qwen2-VL takes pixel values from its own image processor (Qwen2VLImageProcessor); these have no image_grid_thw",
            ));
        };
        let (t, h, w) = grid;
        let n = t * h * w;
        if t == 0 || !h.is_multiple_of(self.merge) || !w.is_multiple_of(self.merge) {
            return Err(Error::invalid(format!(
                "image_grid_thw {grid:?}: rows and columns must be multiples of spatial_merge_size {}",
                self.merge
            )));
        }
        if pre.pixel_values.len() != n * self.row_len {
            return Err(Error::invalid(format!(
                "pixel values: {} values for image_grid_thw {grid:?} ({n} rows of {})",
                pre.pixel_values.len(),
                self.row_len
            )));
        }
        let pixels = Tensor::new(vec![n, self.row_len], pre.pixel_values.clone())?;
        let mut x = self.patch.forward(be, &be.upload(&pixels)?)?;
        let (rows, cols) = patch_positions(grid, self.merge);
        let s = self.attn;
        let rope2d = |y: &B::Tensor| -> Result<B::Tensor> {
            let y = be.rope_at(y, s.heads, &self.rope[0], &rows)?;
            be.rope_at(&y, s.heads, &self.rope[1], &cols)
        };
        for b in &self.blocks {
            let hn = b.norm1.forward(be, &x)?;
            let q = rope2d(&b.q.forward(be, &hn)?)?;
            let k = rope2d(&b.k.forward(be, &hn)?)?;
            let v = b.v.forward(be, &hn)?;
            // One frame: every patch attends to the whole image.
            let a = be.attention(&q, &k, &v, s)?;
            x = be.add(&x, &b.proj.forward(be, &a)?)?;
            let hn = b.norm2.forward(be, &x)?;
            let m = be.act(&b.fc1.forward(be, &hn)?, self.act)?;
            x = be.add(&x, &b.fc2.forward(be, &m)?)?;
        }
        let vision_features = be.download(&x)?;
        let normed = be.download(&self.ln_q.forward(be, &x)?)?;
        let groups = self.merge * self.merge;
        let wide = normed.reshape(vec![n / groups, self.embed * groups])?;
        let y = be.act(&self.mlp0.forward(be, &be.upload(&wide)?)?, Act::Gelu)?;
        let features = self.mlp2.forward(be, &y)?;
        Ok(QwenImage {
            vision_features,
            features,
        })
    }
}
