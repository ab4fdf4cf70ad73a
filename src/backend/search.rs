//! The ops of the scale search (docs/MBQ.md) that keep a grid point on the
//! device: the fake-quantized weight `Q(W s)` made from the layer's own
//! weight there, and the output error reduced there, so that a grid point
//! sends `s` (one value an input channel) and brings back three numbers.
//! The CPU functions are the reference (`quant::pseudo::fake_quant_scaled`
//! and the sums below); wgpu (`shaders/search.wgsl`) and CUDA
//! (`kernels/search.cu`) are tested against them by the op harness
//! (`verify/ops/search.rs`).

use super::cpu::{Cpu, CpuWeight};
use super::Backend;
use crate::error::{Error, Result};
use crate::quant::pseudo::{fake_quant_scaled, FakeQuant};
use crate::tensor::Tensor;

/// The error of one output element, `want - got`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distance {
    /// `|d|` (MAE).
    Abs,
    /// `d^2` (MSE).
    Squared,
}

impl Distance {
    /// Its code in the kernels (`search.wgsl`, `search.cu`).
    pub fn code(self) -> u32 {
        match self {
            Distance::Abs => 0,
            Distance::Squared => 1,
        }
    }
}

/// The search's device ops. Shapes are checked here (the provided
/// methods) before a backend's `*_unchecked` implementation sees them.
pub trait Search: Backend {
    /// The effective weight of a dense `[out, in]` weight `w` (as
    /// [`Backend::weight`] or [`Backend::stored_weight`] made it) with its
    /// input channels scaled by `s` (`in` values), fake-quantized as `q`
    /// says: the same f16 roundings as the reference, so the same codes.
    fn fake_quant(&self, w: &Self::Weight, s: &Self::Tensor, q: FakeQuant) -> Result<Self::Weight> {
        let (out, inp) = self.weight_shape(w);
        let (r, c) = self.dims(s);
        if r * c != inp {
            return Err(shape(
                self,
                "fake_quant",
                format!("{} scales for a [{out}, {inp}] weight", r * c),
            ));
        }
        match q {
            FakeQuant::Group { bits, group_size } => {
                crate::quant::format::check_shape("fake_quant", inp, bits, group_size)?
            }
            FakeQuant::W4PerChannel => {}
        }
        self.fake_quant_unchecked(w, s, q)
    }
    fn fake_quant_unchecked(
        &self,
        w: &Self::Weight,
        s: &Self::Tensor,
        q: FakeQuant,
    ) -> Result<Self::Weight>;

    /// The error sums of one sample, `[1, 3]`: over the rows `masks` marks
    /// as caption (column 0 nonzero), as vision (column 1 nonzero), and over
    /// every row, of `dist(want - got)` summed over the columns. `want` and
    /// `got` are `[rows, cols]`, `masks` `[rows, 2]`.
    fn loss_terms(
        &self,
        want: &Self::Tensor,
        got: &Self::Tensor,
        masks: &Self::Tensor,
        dist: Distance,
    ) -> Result<Self::Tensor> {
        let (a, b, m) = (self.dims(want), self.dims(got), self.dims(masks));
        if a != b || m != (a.0, 2) {
            return Err(shape(
                self,
                "loss_terms",
                format!("want {a:?}, got {b:?} and masks {m:?} (want [rows, 2])"),
            ));
        }
        self.loss_terms_unchecked(want, got, masks, dist)
    }
    fn loss_terms_unchecked(
        &self,
        want: &Self::Tensor,
        got: &Self::Tensor,
        masks: &Self::Tensor,
        dist: Distance,
    ) -> Result<Self::Tensor>;
}

fn shape<B: Backend + ?Sized>(be: &B, op: &str, msg: String) -> Error {
    Error::invalid(format!("{} {op}: {msg}", be.name()))
}

/// Row sums of `dist(want - got)` in f64 (the reference).
pub fn row_errors(want: &[f32], got: &[f32], cols: usize, dist: Distance) -> Vec<f64> {
    want.chunks_exact(cols.max(1))
        .zip(got.chunks_exact(cols.max(1)))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| {
                    let d = a as f64 - b as f64;
                    match dist {
                        Distance::Abs => d.abs(),
                        Distance::Squared => d * d,
                    }
                })
                .sum()
        })
        .collect()
}

impl Search for Cpu {
    fn fake_quant_unchecked(&self, w: &CpuWeight, s: &Tensor, q: FakeQuant) -> Result<CpuWeight> {
        let (out, inp) = w.shape();
        let dense = w.to_dense();
        let data = fake_quant_scaled(&dense.data, out, inp, &s.data, q)?;
        Ok(CpuWeight::Dense(Tensor::new(vec![out, inp], data)?))
    }

    fn loss_terms_unchecked(
        &self,
        want: &Tensor,
        got: &Tensor,
        masks: &Tensor,
        dist: Distance,
    ) -> Result<Tensor> {
        let mut t = [0.0f64; 3];
        for (r, e) in row_errors(&want.data, &got.data, want.cols(), dist)
            .into_iter()
            .enumerate()
        {
            if masks.data[2 * r] != 0.0 {
                t[0] += e;
            }
            if masks.data[2 * r + 1] != 0.0 {
                t[1] += e;
            }
            t[2] += e;
        }
        Tensor::new(vec![1, 3], t.map(|v| v as f32).to_vec())
    }
}
