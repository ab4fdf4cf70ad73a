//! The VLM, written once over [`crate::backend::Backend`]: the vision tower
//! (`vision.rs`), the decoder-only language model (`text.rs`) and the LLaVA /
//! LLaVA-OneVision composition with its projector (`llava.rs`).

pub mod llava;
pub mod text;
pub mod vision;

use crate::backend::Backend;
use crate::error::Result;
use crate::weights::Prefixed;

/// A linear layer on a backend: weight `[out, in]` and an optional bias.
pub struct Linear<B: Backend> {
    pub w: B::Weight,
    pub b: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// Loads `<prefix>.weight` `[out, in]` (or its packed form
    /// `<prefix>.qweight` + `<prefix>.scales_zeros`) and, when `bias`,
    /// `<prefix>.bias`.
    pub fn load(be: &B, vb: &Prefixed, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let w = if vb.contains("qweight") {
            be.packed_weight(&crate::quant::format::read_packed(vb, out, inp)?)?
        } else {
            be.weight(&vb.get("weight", &[out, inp])?)?
        };
        let b = if bias {
            Some(be.upload(&vb.get("bias", &[out])?)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.linear(x, &self.w, self.b.as_ref())
    }
}

/// A LayerNorm's weight and bias.
pub struct LayerNorm<B: Backend> {
    pub w: B::Tensor,
    pub b: B::Tensor,
    pub eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(be: &B, vb: &Prefixed, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            w: be.upload(&vb.get("weight", &[dim])?)?,
            b: be.upload(&vb.get("bias", &[dim])?)?,
            eps,
        })
    }
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.layer_norm(x, &self.w, &self.b, self.eps)
    }
}
