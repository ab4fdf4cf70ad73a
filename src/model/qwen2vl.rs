//! Qwen2-VL's vision side (`Qwen2VisionTransformerPretrainedModel`) and
//! Qwen2.5-VL's (`Qwen2_5_VisionTransformerPretrainedModel`), as
//! transformers computes them for one image. Qwen2-VL:
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
//!
//! Qwen2.5-VL differs in three places: RMSNorm instead of LayerNorm (blocks
//! and `ln_q`), a gated MLP with biases (`down(act(gate(x)) * up(x))`), and
//! windowed attention: the merged grid is cut into windows of
//! `window_size / merge / patch` merged tokens a side ([`windows`]); the
//! rows are permuted so each window is contiguous (on the host, before the
//! patch embedding, which like every row-wise op commutes with the
//! permutation), blocks in `fullatt_block_indexes` attend over the whole
//! image and the others within each window, and the merger's output is
//! put back in the processor's order.

use super::{Linear, Norm};
use crate::backend::{AttnShape, Backend, Rope};
use crate::config::{Act, VisionKind, VlmConfig};
use crate::error::{Error, Result};
use crate::preprocess::Preprocessed;
use crate::tensor::Tensor;
use crate::weights::Prefixed;

/// `fc2(act(fc1 x))` (Qwen2-VL) or `down(act(gate x) * up x)` (Qwen2.5-VL).
enum Mlp<B: Backend> {
    Plain {
        fc1: Linear<B>,
        fc2: Linear<B>,
    },
    Gated {
        gate: Linear<B>,
        up: Linear<B>,
        down: Linear<B>,
    },
}

struct Block<B: Backend> {
    norm1: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    proj: Linear<B>,
    norm2: Norm<B>,
    mlp: Mlp<B>,
}

/// The tower and its merger.
pub struct Qwen2VlVision<B: Backend> {
    patch: Linear<B>,
    blocks: Vec<Block<B>>,
    ln_q: Norm<B>,
    mlp0: Linear<B>,
    mlp2: Linear<B>,
    /// The row and column halves of the 2-D rotary embedding.
    rope: [Rope; 2],
    attn: AttnShape,
    act: Act,
    merge: usize,
    row_len: usize,
    embed: usize,
    /// Qwen2.5-VL: merged tokens per window side, and the blocks that
    /// attend over the whole image.
    window: Option<(usize, Vec<usize>)>,
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
    Tensor::new(
        shape,
        t.data[part * rows * cols..(part + 1) * rows * cols].to_vec(),
    )
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
        let v25 = c.kind == VisionKind::Qwen25Vl;
        let e = c.hidden_size;
        let (p, t, ch) = (c.patch_size, c.temporal_patch_size, c.num_channels);
        let row_len = ch * t * p * p;
        let conv = vm.pp("patch_embed.proj").get("weight", &[e, ch, t, p, p])?;
        let patch = dense(be, &conv.reshape(vec![e, row_len])?, None)?;
        let eps = c.layer_norm_eps;
        let inter = c.intermediate_size;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vm.pp(format!("blocks.{i}"));
            let qkv = b.pp("attn.qkv");
            let w = qkv.get("weight", &[3 * e, e])?;
            let bias = qkv.get("bias", &[3 * e])?;
            let part = |k: usize| dense(be, &third(&w, k)?, Some(&third(&bias, k)?));
            let mlp = if v25 {
                Mlp::Gated {
                    gate: Linear::load(be, &b.pp("mlp.gate_proj"), inter, e, true)?,
                    up: Linear::load(be, &b.pp("mlp.up_proj"), inter, e, true)?,
                    down: Linear::load(be, &b.pp("mlp.down_proj"), e, inter, true)?,
                }
            } else {
                Mlp::Plain {
                    fc1: Linear::load(be, &b.pp("mlp.fc1"), inter, e, true)?,
                    fc2: Linear::load(be, &b.pp("mlp.fc2"), e, inter, true)?,
                }
            };
            blocks.push(Block {
                norm1: Norm::load(be, &b.pp("norm1"), e, eps, v25)?,
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                proj: Linear::load(be, &b.pp("attn.proj"), e, e, true)?,
                norm2: Norm::load(be, &b.pp("norm2"), e, eps, v25)?,
                mlp,
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
            ln_q: Norm::load(be, &merger.pp("ln_q"), e, eps, v25)?,
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
            window: v25.then(|| (c.window_size / m / p, c.fullatt_block_indexes.clone())),
        })
    }

    /// Tokens an image with this grid becomes.
    pub fn num_tokens(&self, grid: (usize, usize, usize)) -> usize {
        grid.0 * grid.1 * grid.2 / (self.merge * self.merge)
    }

    /// The tower and the merger on one preprocessed image.
    pub fn encode(&self, be: &B, pre: &Preprocessed) -> Result<QwenImage<B::Tensor>> {
        let Some(grid) = pre.grid_thw else {
            return Err(no_grid());
        };
        let (t, h, w) = grid;
        let n = t * h * w;
        if t != 1 || !h.is_multiple_of(self.merge) || !w.is_multiple_of(self.merge) {
            return Err(Error::invalid(format!(
                "image_grid_thw {grid:?}: one frame (images, not video) whose rows and columns are multiples of spatial_merge_size {}",
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
        let groups = self.merge * self.merge;
        let (rows, cols) = patch_positions(grid, self.merge);
        // Qwen2.5-VL: merged tokens in window order, and each window's rows.
        let (order, spans) = match &self.window {
            Some((side, _)) => {
                let (order, sizes) = windows(h / self.merge, w / self.merge, *side);
                let mut spans = Vec::with_capacity(sizes.len());
                let mut at = 0;
                for s in sizes {
                    spans.push((at * groups, s * groups));
                    at += s;
                }
                (Some(order), spans)
            }
            None => (None, vec![(0, n)]),
        };
        let permute = |data: &[f32], width: usize| match &order {
            Some(o) => permute_blocks(data, o, groups * width),
            None => data.to_vec(),
        };
        let (rows, cols) = match &order {
            Some(o) => (
                permute_blocks(&rows, o, groups),
                permute_blocks(&cols, o, groups),
            ),
            None => (rows, cols),
        };
        let pixels = Tensor::new(
            vec![n, self.row_len],
            permute(&pre.pixel_values, self.row_len),
        )?;
        let mut x = self.patch.forward(be, &be.upload(&pixels)?)?;
        let s = self.attn;
        let rope2d = |y: &B::Tensor| -> Result<B::Tensor> {
            let y = be.rope_at(y, s.heads, &self.rope[0], &rows)?;
            be.rope_at(&y, s.heads, &self.rope[1], &cols)
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let hn = b.norm1.forward(be, &x)?;
            let q = rope2d(&b.q.forward(be, &hn)?)?;
            let k = rope2d(&b.k.forward(be, &hn)?)?;
            let v = b.v.forward(be, &hn)?;
            let whole = match &self.window {
                Some((_, full)) => full.contains(&i) || spans.len() == 1,
                None => true,
            };
            // One frame: attention over the whole image, or within windows.
            let a = if whole {
                be.attention(&q, &k, &v, s)?
            } else {
                let mut parts = Vec::with_capacity(spans.len());
                for &(at, len) in &spans {
                    let r = |t: &B::Tensor| be.rows(t, at, len);
                    parts.push(be.attention(&r(&q)?, &r(&k)?, &r(&v)?, s)?);
                }
                be.concat_all(parts)?
            };
            x = be.add(&x, &b.proj.forward(be, &a)?)?;
            let hn = b.norm2.forward(be, &x)?;
            let m = match &b.mlp {
                Mlp::Plain { fc1, fc2 } => {
                    fc2.forward(be, &be.act(&fc1.forward(be, &hn)?, self.act)?)?
                }
                Mlp::Gated { gate, up, down } => {
                    let g = be.gated(&gate.forward(be, &hn)?, &up.forward(be, &hn)?, self.act)?;
                    down.forward(be, &g)?
                }
            };
            x = be.add(&x, &m)?;
        }
        // The merger joins rows of one block, which the window order keeps
        // together: its input goes back to the processor's order here.
        let unpermute = |t: Tensor| -> Result<Tensor> {
            match &order {
                Some(o) => {
                    let block = groups * t.cols();
                    let mut out = vec![0.0; t.data.len()];
                    for (at, &k) in o.iter().enumerate() {
                        out[k * block..(k + 1) * block]
                            .copy_from_slice(&t.data[at * block..(at + 1) * block]);
                    }
                    Tensor::new(t.shape, out)
                }
                None => Ok(t),
            }
        };
        let vision_features = unpermute(be.download(&x)?)?;
        let normed = unpermute(be.download(&self.ln_q.forward(be, &x)?)?)?;
        let wide = normed.reshape(vec![n / groups, self.embed * groups])?;
        let y = be.act(&self.mlp0.forward(be, &be.upload(&wide)?)?, Act::Gelu)?;
        let features = self.mlp2.forward(be, &y)?;
        Ok(QwenImage {
            vision_features,
            features,
        })
    }
}

/// Pixel values that did not come from Qwen2-VL's image processor.
pub fn no_grid() -> Error {
    Error::invalid(
        "Qwen2-VL takes pixel values from its own image processor (Qwen2VLImageProcessor); these have no image_grid_thw",
    )
}

/// Blocks of `block` values of `data` in `order`.
fn permute_blocks<T: Copy>(data: &[T], order: &[usize], block: usize) -> Vec<T> {
    order
        .iter()
        .flat_map(|&k| data[k * block..(k + 1) * block].iter().copied())
        .collect()
}

/// Qwen2.5-VL's windows over a merged grid of `gh` x `gw` tokens
/// (`get_window_index`): windows of `side` x `side` tokens, the grid padded
/// by `side - n % side` on each axis (a whole empty window when `n % side`
/// is 0), windows row-major and tokens row-major inside each, empty windows
/// dropped. Returns the merged-token order (`window_index`) and each
/// window's token count.
pub fn windows(gh: usize, gw: usize, side: usize) -> (Vec<usize>, Vec<usize>) {
    let (nh, nw) = (
        (gh + side - gh % side) / side,
        (gw + side - gw % side) / side,
    );
    let mut order = Vec::with_capacity(gh * gw);
    let mut sizes = Vec::new();
    for wi in 0..nh {
        for wj in 0..nw {
            let before = order.len();
            for r in wi * side..((wi + 1) * side).min(gh) {
                for c in wj * side..((wj + 1) * side).min(gw) {
                    order.push(r * gw + c);
                }
            }
            if order.len() > before {
                sizes.push(order.len() - before);
            }
        }
    }
    (order, sizes)
}
