//! The VLM, written once over [`crate::backend::Backend`]: the vision tower
//! (`vision.rs`), the decoder layer (`decoder.rs`: the one forward, with
//! taps for calibration, and its backward), the language model around it
//! (`text.rs`: embeddings, final norm, lm_head), RoPE frequencies from the
//! config (`rope.rs`), the LLaVA / LLaVA-OneVision image side with its
//! projector (`llava.rs`), Qwen2-VL's tower and merger (`qwen2vl.rs`),
//! InternViT with its pixel shuffle and projector (`internvl.rs`) and
//! the whole model over them (`vlm.rs`).

pub mod decoder;
pub mod internvl;
pub mod llava;
pub mod qwen2vl;
pub mod rope;
pub mod text;
pub mod vision;
pub mod vlm;

pub use vlm::Vlm;

use crate::backend::Backend;
use crate::error::Result;
use crate::weights::Prefixed;

/// A linear layer on a backend: weight `[out, in]` and an optional bias.
pub struct Linear<B: Backend> {
    pub w: B::Weight,
    pub b: Option<B::Tensor>,
    /// W4A8: the input is quantized per token to INT8 for the product
    /// (`Backend::linear_a8`: fake quantization with
    /// `Backend::quant_act_int8` then the float product, or integer dot
    /// products where the backend has them). Set for packed
    /// linears of a file whose metadata has `mbq.act_bits` = `"8"`.
    pub act_quant: bool,
}

impl<B: Backend> Linear<B> {
    /// Loads `<prefix>.weight` `[out, in]` (or its packed form
    /// `<prefix>.qweight` + `<prefix>.scales_zeros`, or a GPTQ / AWQ /
    /// compressed-tensors linear repacked by [`crate::quant::import`]) and,
    /// when `bias`,
    /// `<prefix>.bias`. A packed linear quantizes its activations when the
    /// file's metadata says `mbq.act_bits` = `"8"` (W4A8).
    pub fn load(be: &B, vb: &Prefixed, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let (w, act_quant) = if crate::quant::import::is_quantized(vb) {
            let (p, act_bits) = crate::quant::import::read_linear(vb, out, inp)?;
            (be.packed_weight(&p)?, act_bits.is_some())
        } else {
            (be.stored_weight(&vb.stored("weight", &[out, inp])?)?, false)
        };
        let b = if bias {
            Some(be.upload(&vb.get("bias", &[out])?)?)
        } else {
            None
        };
        Ok(Linear { w, b, act_quant })
    }

    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        if self.act_quant {
            be.linear_a8(x, &self.w, self.b.as_ref())
        } else {
            be.linear(x, &self.w, self.b.as_ref())
        }
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

/// LayerNorm or RMSNorm, as a family's config chooses (the vision towers
/// of Qwen2.5-VL and some InternViTs use RMSNorm).
pub enum Norm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(B::Tensor, f32),
}

impl<B: Backend> Norm<B> {
    /// `<prefix>.weight` (and, for LayerNorm, `<prefix>.bias`).
    pub fn load(be: &B, vb: &Prefixed, dim: usize, eps: f32, rms: bool) -> Result<Self> {
        Ok(if rms {
            Norm::Rms(be.upload(&vb.get("weight", &[dim])?)?, eps)
        } else {
            Norm::Layer(LayerNorm::load(be, vb, dim, eps)?)
        })
    }

    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Norm::Layer(n) => n.forward(be, x),
            Norm::Rms(w, eps) => be.rms_norm(x, w, *eps),
        }
    }
}
