//! The activations calibration keeps between its steps (each sample's
//! layer input, the scale search's features) in f32, or in f16 where the
//! model is f16 ([`KeepDtype`]): at 7B they are the largest items of the
//! search (docs/MBQ.md), and f16 halves them. A kept value is expanded to
//! f32 on the backend while it is used ([`Kept::get`]), one sample at a
//! time; with f16, the search's grid points also run their products on
//! f16 operands with f32 sums (`qlinear.rs`).
//!
//! Rounding to f16 is what an f16 model's own forward does to every
//! activation (transformers keeps them in the model's dtype); the CPU and
//! the devices round alike (to nearest even, `Search::to_half`), so their
//! searches see the same values.

use std::ops::Deref;

use crate::backend::Search;
use crate::error::Result;

/// `--feature-dtype`: how calibration keeps activations between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FeatureDtype {
    /// f16 where the language model's weights are stored in f16, else f32.
    #[default]
    Auto,
    F16,
    F32,
}

impl FeatureDtype {
    /// The dtype used for a model whose language model is stored in f16
    /// (`model_f16`) or not.
    pub fn resolve(self, model_f16: bool) -> KeepDtype {
        match self {
            FeatureDtype::F16 => KeepDtype::F16,
            FeatureDtype::F32 => KeepDtype::F32,
            FeatureDtype::Auto if model_f16 => KeepDtype::F16,
            FeatureDtype::Auto => KeepDtype::F32,
        }
    }
}

/// The dtype kept activations are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepDtype {
    F32,
    F16,
}

impl KeepDtype {
    /// Its name in the report's settings.
    pub fn name(self) -> &'static str {
        match self {
            KeepDtype::F32 => "f32",
            KeepDtype::F16 => "f16",
        }
    }

    /// Bytes a value.
    pub fn size(self) -> usize {
        match self {
            KeepDtype::F32 => 4,
            KeepDtype::F16 => 2,
        }
    }
}

/// An activation on the backend, as kept.
pub enum Kept<B: Search> {
    F32(B::Tensor),
    F16(B::Half),
}

impl<B: Search> Kept<B> {
    /// Keeps `t` as `dtype` says (rounded to f16 for [`KeepDtype::F16`]).
    pub fn new(be: &B, t: B::Tensor, dtype: KeepDtype) -> Result<Kept<B>> {
        Ok(match dtype {
            KeepDtype::F32 => Kept::F32(t),
            KeepDtype::F16 => Kept::F16(be.to_half(&t)?),
        })
    }

    /// How it is kept.
    pub fn dtype(&self) -> KeepDtype {
        match self {
            Kept::F32(_) => KeepDtype::F32,
            Kept::F16(_) => KeepDtype::F16,
        }
    }

    /// Keeps each of `ts`.
    pub fn all(be: &B, ts: Vec<B::Tensor>, dtype: KeepDtype) -> Result<Vec<Kept<B>>> {
        ts.into_iter().map(|t| Kept::new(be, t, dtype)).collect()
    }

    /// The values as an f32 tensor: the kept one, or an f16 one expanded
    /// (exactly) for as long as the result lives.
    pub fn get(&self, be: &B) -> Result<Held<'_, B::Tensor>> {
        Ok(match self {
            Kept::F32(t) => Held::Borrowed(t),
            Kept::F16(h) => Held::Owned(be.half_to_f32(h)?),
        })
    }
}

/// A tensor borrowed from a [`Kept`] or expanded from one.
pub enum Held<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::tensor::Tensor;

    #[test]
    fn f16_keeps_the_rounded_values_and_f32_the_values() {
        // A tie (1 + 2^-11 rounds to even, 1), a value that rounds up, an
        // f16 subnormal, one beyond f16's range (saturates).
        let v = vec![
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-12),
            3e-6,
            -7e4,
            0.1,
            2.5,
        ];
        let t = Tensor::new(vec![2, 3], v.clone()).unwrap();
        let k = Kept::new(&Cpu, t.clone(), KeepDtype::F16).unwrap();
        let back = k.get(&Cpu).unwrap();
        assert_eq!(back.shape, vec![2, 3]);
        let want: Vec<f32> = v
            .iter()
            .map(|&x| f16::from_f32(x.clamp(-65504.0, 65504.0)).to_f32())
            .collect();
        assert_eq!(back.data, want);
        assert_eq!(back.data[0], 1.0);
        assert_eq!(back.data[1], 1.0 + 2f32.powi(-10));
        assert_eq!(back.data[3], -65504.0);
        assert_ne!(back.data[4], 0.1);
        let k = Kept::new(&Cpu, t, KeepDtype::F32).unwrap();
        assert_eq!(k.get(&Cpu).unwrap().data, v);
    }

    #[test]
    fn auto_follows_the_model() {
        assert_eq!(FeatureDtype::Auto.resolve(true), KeepDtype::F16);
        assert_eq!(FeatureDtype::Auto.resolve(false), KeepDtype::F32);
        assert_eq!(FeatureDtype::F32.resolve(true), KeepDtype::F32);
        assert_eq!(FeatureDtype::F16.resolve(false), KeepDtype::F16);
    }
}
