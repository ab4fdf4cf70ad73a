//! The ops of the scale search (docs/MBQ.md) that keep a grid point on the
//! device: the fake-quantized weight `Q(W s)` made from the layer's own
//! weight there, and the output error reduced there, so that a grid point
//! sends `s` (one value an input channel) and brings back three numbers.
//! Two reductions of activations stay there too: `abs_col_stats` (the
//! per-input-channel mean and max of |x| the search's scales are made from,
//! accumulated sample after sample) and `abs_terms` (the sensitivity pass's
//! masked sums of |x|), so neither downloads the activations.
//! And the search keeps its largest items (the samples' layer inputs and
//! the features) in f16 where the model is f16 (`to_half`, `half_to_f32`:
//! half the memory; the f32 copy of one sample exists only while it is
//! used), and there runs its products on f16 operands with f32 sums
//! (`weight_to_half`, `linear_half`: cuBLAS's f16 GEMM on CUDA, f16
//! operands read by `gemm.wgsl` on wgpu).
//! The CPU functions are the reference (`quant::pseudo::fake_quant_scaled`,
//! the sums below, `half`'s round-to-nearest-even conversion); wgpu
//! (`shaders/fake_quant.wgsl`, `loss.wgsl`, `stats.wgsl`, `half.wgsl`) and
//! CUDA (`kernels/search.cu`, `convert.cu`) are tested against them by the
//! op harness (`verify/ops/search.rs`).

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::cpu::{Cpu, CpuWeight};
use super::Backend;
use crate::error::{Error, Result};
use crate::quant::pseudo::{fake_quant_scaled, FakeQuant};
use crate::store::Store;
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
    /// An activation matrix held as f16 values (what [`Search::to_half`]
    /// makes).
    type Half;

    /// `x` rounded to f16: to nearest even (`half::f16::from_f32`, f16
    /// subnormals kept), saturating at f16's largest finite value, ±65504
    /// (a value an f16 model's own forward would have overflowed, kept
    /// finite so that one outlier cannot make every loss NaN); NaN stays
    /// NaN.
    fn to_half(&self, x: &Self::Tensor) -> Result<Self::Half>;

    /// The values of `h` as f32 (exact).
    fn half_to_f32(&self, h: &Self::Half) -> Result<Self::Tensor>;

    /// The shape of `h`, `(rows, cols)`.
    fn half_dims(&self, h: &Self::Half) -> (usize, usize);

    /// A dense weight's values rounded to f16 as [`Search::to_half`] rounds
    /// them, held as f16: the weight [`Search::linear_half`] takes (the
    /// fake-quantized `Q(W s) / s`, which the final division by `s` takes
    /// off f16's grid, or an f16 model's own weight, unchanged). An error
    /// for a packed weight.
    fn weight_to_half(&self, w: &Self::Weight) -> Result<Self::Weight>;

    /// `x . w^T (+ b)` with f16 operands and f32 sums: `x` as
    /// [`Search::to_half`] made it, `w` an f16 weight (as
    /// [`Search::weight_to_half`] makes it; an error for any other), `b`
    /// f32. Every product of two f16 values is exact in f32, so backends
    /// differ only in the order of the sums: the CPU expands both to f32,
    /// CUDA runs cuBLAS's f16 GEMM with f32 accumulation (tensor cores),
    /// wgpu its tiled GEMM reading f16 operands (half the bytes of f32; as
    /// WGSL `f16` where the device has SHADER_F16) and summing in f32.
    fn linear_half(
        &self,
        x: &Self::Half,
        w: &Self::Weight,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let (out, inp) = self.weight_shape(w);
        let (rows, cols) = self.half_dims(x);
        if cols != inp {
            return Err(shape(
                self,
                "linear_half",
                format!("input [{rows}, {cols}] for a [{out}, {inp}] weight"),
            ));
        }
        if let Some(b) = b {
            let (r, c) = self.dims(b);
            if r * c != out {
                return Err(shape(
                    self,
                    "linear_half",
                    format!("bias of {} for {out} outputs", r * c),
                ));
            }
        }
        self.linear_half_unchecked(x, w, b)
    }
    fn linear_half_unchecked(
        &self,
        x: &Self::Half,
        w: &Self::Weight,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

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

    /// Per-column |x| statistics of `x` `[rows, cols]`, as `[3, cols]`:
    /// rows 0 and 1 the sum of |x| over the rows as an unevaluated f32 pair
    /// (sum = hi + lo; devices accumulate it compensated, e.g.
    /// Neumaier/TwoSum in f32), row 2 the max of |x|. With `acc` (an earlier
    /// result with the same cols) the sums and maxima continue from it, so
    /// samples are added one after another on the device.
    fn abs_col_stats(&self, x: &Self::Tensor, acc: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (rows, cols) = self.dims(x);
        if let Some(a) = acc {
            let a = self.dims(a);
            if a != (3, cols) {
                return Err(shape(
                    self,
                    "abs_col_stats",
                    format!("x [{rows}, {cols}] and acc {a:?} (want [3, {cols}])"),
                ));
            }
        }
        self.abs_col_stats_unchecked(x, acc)
    }
    fn abs_col_stats_unchecked(
        &self,
        x: &Self::Tensor,
        acc: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// `[1, 3]`: the sum of |x| over the rows `masks` (`[rows, 2]`) marks as
    /// caption (column 0 nonzero), as vision (column 1 nonzero), and over
    /// every row. (It is `loss_terms(x, 0, masks, Abs)`.)
    fn abs_terms(&self, x: &Self::Tensor, masks: &Self::Tensor) -> Result<Self::Tensor> {
        let (a, m) = (self.dims(x), self.dims(masks));
        if m != (a.0, 2) {
            return Err(shape(
                self,
                "abs_terms",
                format!("x {a:?} and masks {m:?} (want [rows, 2])"),
            ));
        }
        self.abs_terms_unchecked(x, masks)
    }
    fn abs_terms_unchecked(&self, x: &Self::Tensor, masks: &Self::Tensor) -> Result<Self::Tensor>;
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

/// f16's largest finite value, where [`Search::to_half`] saturates.
pub const F16_MAX: f32 = 65504.0;

/// A `[rows, cols]` matrix of f16 values on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuHalf {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f16>,
}

impl Search for Cpu {
    type Half = CpuHalf;

    fn to_half(&self, x: &Tensor) -> Result<CpuHalf> {
        let mut data = vec![f16::ZERO; x.data.len()];
        let mut clamped = [0.0f32; 1024];
        for (src, dst) in x.data.chunks(1024).zip(data.chunks_mut(1024)) {
            let c = &mut clamped[..src.len()];
            c.iter_mut()
                .zip(src)
                .for_each(|(c, &v)| *c = v.clamp(-F16_MAX, F16_MAX));
            dst.convert_from_f32_slice(c);
        }
        Ok(CpuHalf {
            rows: x.rows(),
            cols: x.cols(),
            data,
        })
    }

    fn half_to_f32(&self, h: &CpuHalf) -> Result<Tensor> {
        let mut data = vec![0.0f32; h.data.len()];
        h.data.convert_to_f32_slice(&mut data);
        Tensor::new(vec![h.rows, h.cols], data)
    }

    fn half_dims(&self, h: &CpuHalf) -> (usize, usize) {
        (h.rows, h.cols)
    }

    fn weight_to_half(&self, w: &CpuWeight) -> Result<CpuWeight> {
        if let CpuWeight::Packed(_) = w {
            return Err(shape(
                self,
                "weight_to_half",
                "needs a dense weight, found a packed one".into(),
            ));
        }
        let (out, inp) = w.shape();
        let h = self.to_half(&w.to_dense())?;
        Ok(CpuWeight::F16 {
            out,
            inp,
            data: Store::Owned(h.data),
        })
    }

    fn linear_half_unchecked(
        &self,
        x: &CpuHalf,
        w: &CpuWeight,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !matches!(w, CpuWeight::F16 { .. }) {
            return Err(shape(
                self,
                "linear_half",
                "needs an f16 weight (weight_to_half)".into(),
            ));
        }
        self.linear(&self.half_to_f32(x)?, w, b)
    }

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
        masked_terms(&row_errors(&want.data, &got.data, want.cols(), dist), masks)
    }

    fn abs_col_stats_unchecked(&self, x: &Tensor, acc: Option<&Tensor>) -> Result<Tensor> {
        let cols = x.cols();
        let (mut sum, mut max) = match acc {
            Some(a) => (
                (0..cols)
                    .map(|c| a.data[c] as f64 + a.data[cols + c] as f64)
                    .collect(),
                a.data[2 * cols..3 * cols].to_vec(),
            ),
            None => (vec![0.0f64; cols], vec![0.0f32; cols]),
        };
        for row in x.data.chunks_exact(cols.max(1)).take(x.rows()) {
            for ((s, m), &v) in sum.iter_mut().zip(max.iter_mut()).zip(row) {
                *s += v.abs() as f64;
                *m = m.max(v.abs());
            }
        }
        let hi: Vec<f32> = sum.iter().map(|&s| s as f32).collect();
        let lo = sum.iter().zip(&hi).map(|(&s, &h)| (s - h as f64) as f32);
        let data = hi.iter().copied().chain(lo).chain(max).collect();
        Tensor::new(vec![3, cols], data)
    }

    fn abs_terms_unchecked(&self, x: &Tensor, masks: &Tensor) -> Result<Tensor> {
        let rows: Vec<f64> = x
            .data
            .chunks_exact(x.cols().max(1))
            .take(x.rows())
            .map(|r| r.iter().map(|v| v.abs() as f64).sum())
            .collect();
        masked_terms(&rows, masks)
    }
}

/// `[1, 3]`: the sums of `e` (one value a row) over the rows `masks` marks
/// as caption, as vision, and over every row, in f64, cast to f32.
fn masked_terms(e: &[f64], masks: &Tensor) -> Result<Tensor> {
    let mut t = [0.0f64; 3];
    for (r, &e) in e.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize, data: &[f32]) -> Tensor {
        Tensor::new(vec![rows, cols], data.to_vec()).unwrap()
    }

    #[test]
    fn abs_col_stats_chains_and_keeps_the_f64_sum_as_a_pair() {
        // 1 + 1e-8 + 1e-8 ...: every small value is lost in an f32 sum.
        let mut a = vec![1.0f32, -2.0];
        for _ in 0..999 {
            a.extend([1e-8, -0.5]);
        }
        let x = t(1000, 2, &a);
        let s = Cpu.abs_col_stats(&x, None).unwrap();
        assert_eq!(s.shape, vec![3, 2]);
        let small = 999.0 * 1e-8f32 as f64;
        let sum0 = s.data[0] as f64 + s.data[2] as f64;
        assert!((sum0 - (1.0 + small)).abs() < 1e-14, "{sum0}");
        assert_eq!((s.data[4], s.data[5]), (1.0, 2.0));
        // Two samples one after another: the sums and maxima continue.
        let y = t(2, 2, &[-3.0, 0.25, 0.5, 0.125]);
        let chained = Cpu.abs_col_stats(&y, Some(&s)).unwrap();
        let sum1 = chained.data[1] as f64 + chained.data[3] as f64;
        assert_eq!(sum1, 2.0 + 999.0 * 0.5 + 0.375);
        assert_eq!((chained.data[4], chained.data[5]), (3.0, 2.0));
        let sum0 = chained.data[0] as f64 + chained.data[2] as f64;
        assert!((sum0 - (4.5 + small)).abs() < 1e-14, "{sum0}");
    }

    #[test]
    fn abs_terms_is_loss_terms_against_zero() {
        let x = t(3, 2, &[1.0, -2.0, 0.5, 0.25, -4.0, 8.0]);
        let m = t(3, 2, &[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        let got = Cpu.abs_terms(&x, &m).unwrap();
        assert_eq!(got.data, vec![15.0, 12.0, 15.75]);
        let zero = Tensor::zeros(vec![3, 2]);
        assert_eq!(
            got.data,
            Cpu.loss_terms(&x, &zero, &m, Distance::Abs).unwrap().data
        );
    }

    #[test]
    fn shapes_are_checked() {
        let x = t(2, 3, &[0.0; 6]);
        let bad_acc = t(3, 2, &[0.0; 6]);
        let e = Cpu.abs_col_stats(&x, Some(&bad_acc)).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)));
        assert!(e.to_string().contains("abs_col_stats"), "{e}");
        let bad_masks = t(3, 2, &[0.0; 6]);
        let e = Cpu.abs_terms(&x, &bad_masks).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)));
        assert!(e.to_string().contains("abs_terms"), "{e}");
    }
}
