//! The linears a grid point of the scale search runs (docs/MBQ.md): the
//! group's quantized ones ([`QLinear`]: the device makes `Q(W s)` from the
//! layer's own weight) and the module's others, full precision
//! ([`FixedLinear`]: o_proj after the attention, down_proj after the MLP's
//! gate and up).
//!
//! Both take the dtype the search keeps its activations in
//! ([`KeepDtype`]): with f32, the products are f32 ([`Backend::linear`]);
//! with f16 (the default for an f16 model), each product takes f16
//! operands and sums in f32 ([`Search::linear_half`]), as the f16 model
//! itself and the official PyTorch search compute: the input is rounded
//! to f16 before the product and the effective weight `Q(W s) / s` (which
//! the division by `s` takes off f16's grid) is rounded to f16 once. That
//! is half the bytes a product reads, and on CUDA the tensor cores.

use super::kept::KeepDtype;
use super::method::QuantKind;
use crate::backend::{Backend, Search};
use crate::error::Result;
use crate::model::decoder::LinearOp;
use crate::model::Linear;
use crate::quant::pseudo::FakeQuant;

/// `x . w^T (+ b)` in `dtype`'s arithmetic (see the module comment).
fn product<B: Search>(
    be: &B,
    x: &B::Tensor,
    w: &B::Weight,
    b: Option<&B::Tensor>,
    dtype: KeepDtype,
) -> Result<B::Tensor> {
    match dtype {
        KeepDtype::F32 => be.linear(x, w, b),
        KeepDtype::F16 => be.linear_half(&be.to_half(x)?, w, b),
    }
}

/// A linear as the search runs it, on the backend: the effective weight
/// the device made from the layer's own, its bias, and (for W4A8) the
/// per-channel scales the input is divided by before the per-token
/// activation quantization.
pub struct QLinear<'a, B: Backend> {
    w: B::Weight,
    b: Option<&'a B::Tensor>,
    act_div: Option<&'a B::Tensor>,
    dtype: KeepDtype,
}

impl<'a, B: Search> QLinear<'a, B> {
    /// The quantized form of `l` with its input channels scaled by `s`
    /// (`[1, in]` on the device), its products in `dtype`.
    pub fn new(
        be: &B,
        l: &'a Linear<B>,
        s: &'a B::Tensor,
        q: QuantKind,
        dtype: KeepDtype,
    ) -> Result<Self> {
        let (fq, act_div) = match q {
            QuantKind::Weight { bits, group_size } => (FakeQuant::Group { bits, group_size }, None),
            QuantKind::W4A8 => (FakeQuant::W4PerChannel, Some(s)),
        };
        let w = be.fake_quant(&l.w, s, fq)?;
        let w = match dtype {
            KeepDtype::F32 => w,
            KeepDtype::F16 => be.weight_to_half(&w)?,
        };
        Ok(QLinear {
            w,
            b: l.b.as_ref(),
            act_div,
            dtype,
        })
    }
}

impl<B: Search> LinearOp<B> for QLinear<'_, B> {
    /// W4A8 divides the input by the scales and fake-quantizes it per token
    /// on the device (`div_cols`, `quant_act_int8`), then the float product.
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self.act_div {
            None => product(be, x, &self.w, self.b, self.dtype),
            Some(s) => {
                let xq = be.quant_act_int8(&be.div_cols(x, s)?)?;
                product(be, &xq, &self.w, self.b, self.dtype)
            }
        }
    }
}

/// A layer's own linear in a grid point's module: its weight (for f16
/// products, the weight as [`Search::weight_to_half`] holds it, made once
/// a layer) and bias.
pub struct FixedLinear<'a, B: Backend> {
    pub w: &'a B::Weight,
    pub b: Option<&'a B::Tensor>,
    pub dtype: KeepDtype,
}

impl<B: Search> LinearOp<B> for FixedLinear<'_, B> {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        product(be, x, self.w, self.b, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::tensor::Tensor;
    use half::f16;

    fn f16_round(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }

    /// The f16 product is the f32 product of the operands rounded to f16
    /// (each product exact), and differs from the f32 one.
    #[test]
    fn f16_products_round_both_operands() {
        let x = Tensor::new(vec![2, 3], vec![0.1, -1.3, 2.7, 3.33, 1e-3, -0.77]).unwrap();
        let wt = Tensor::new(vec![2, 3], vec![0.301, 0.2, -0.45, 1.01, -2.2, 0.0007]).unwrap();
        let w = Cpu.weight(&wt).unwrap();
        let hw = Cpu.weight_to_half(&w).unwrap();
        let b = Tensor::new(vec![1, 2], vec![0.5, -0.25]).unwrap();
        let l = FixedLinear::<Cpu> {
            w: &hw,
            b: Some(&b),
            dtype: KeepDtype::F16,
        };
        let got = l.forward(&Cpu, &x).unwrap();
        for r in 0..2 {
            for o in 0..2 {
                let want: f32 = (0..3)
                    .map(|k| f16_round(x.data[r * 3 + k]) * f16_round(wt.data[o * 3 + k]))
                    .sum::<f32>()
                    + b.data[o];
                assert!((got.data[r * 2 + o] - want).abs() <= 1e-6, "{r} {o}");
            }
        }
        let full = FixedLinear::<Cpu> {
            w: &w,
            b: Some(&b),
            dtype: KeepDtype::F32,
        }
        .forward(&Cpu, &x)
        .unwrap();
        assert_ne!(full.data, got.data);
        // An f32 weight is refused by the f16 product, by name.
        let e = FixedLinear::<Cpu> {
            w: &w,
            b: None,
            dtype: KeepDtype::F16,
        }
        .forward(&Cpu, &x)
        .unwrap_err();
        assert!(e.to_string().contains("linear_half"), "{e}");
    }
}
