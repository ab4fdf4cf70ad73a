//! The CPU backend: the reference every other backend is tested against,
//! and the fallback on machines without a usable GPU. The elementwise ops,
//! norms, RoPE and attention are plain f32 loops over threads (rayon);
//! the linear layer (`linear.rs`) reads weights as the checkpoint stores
//! them (f16 / bf16 from the mapped file, packed codes as packed) through
//! SIMD row kernels (`kernels.rs`) for decode and a GEMM crate for many
//! rows, and keeps a plain reference of itself for the tests.

mod attention;
mod kernels;
mod linear;
mod math;

pub use kernels::{q8, set_int8_activations, Isa};
pub use linear::{linear_with, reference_linear, CpuWeight, GEMM_ROWS, TILE};

use rayon::prelude::*;

use super::{AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;
use crate::weights::{StoredData, StoredWeight};

#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// A pointer into an output that parallel tasks share, each writing its
/// own disjoint part (columns of a GEMM's output, a head's block of an
/// attention's).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks holding it write disjoint parts only.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `i` floats on (a method, so that closures capture the
    /// whole `OutPtr`, which is `Send`, not its raw pointer field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Key/value cache: per layer, `capacity x kv_dim` keys and values.
pub struct CpuCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub kv_dim: usize,
    pub capacity: usize,
}

fn shape_err(op: &str, msg: String) -> Error {
    Error::invalid(format!("cpu {op}: {msg}"))
}

/// Dot product with eight independent accumulators (vectorises well).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// One value through an activation (the definition the row loops of
/// `math.rs` use, and the backward pass's).
pub fn act_fn(x: f32, act: Act) -> f32 {
    math::act(x, act)
}

/// Values a task of the elementwise ops.
const ELEMENTWISE_CHUNK: usize = 16 * 1024;

impl Backend for Cpu {
    type Tensor = Tensor;
    type Weight = CpuWeight;
    type Cache = CpuCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn weight(&self, w: &Tensor) -> Result<CpuWeight> {
        if w.shape.len() != 2 {
            return Err(shape_err(
                "weight",
                format!("expected [out, in], got {:?}", w.shape),
            ));
        }
        Ok(CpuWeight::Dense(w.clone()))
    }

    /// f16 and bf16 weights are kept as stored (mapped from the file),
    /// not converted.
    fn stored_weight(&self, w: &StoredWeight) -> Result<CpuWeight> {
        let &[out, inp] = w.shape.as_slice() else {
            return Err(shape_err(
                "weight",
                format!("expected [out, in], got {:?}", w.shape),
            ));
        };
        Ok(match &w.data {
            StoredData::F32(_) => CpuWeight::Dense(w.to_tensor()?),
            StoredData::F16(d) => CpuWeight::F16 {
                out,
                inp,
                data: d.clone(),
            },
            StoredData::BF16(d) => CpuWeight::BF16 {
                out,
                inp,
                data: d.clone(),
            },
        })
    }

    fn packed_weight_unchecked(&self, w: &PackedLinear) -> Result<CpuWeight> {
        Ok(CpuWeight::Packed(w.clone()))
    }

    fn dims(&self, t: &Tensor) -> (usize, usize) {
        (t.rows(), t.cols())
    }

    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        w.shape()
    }

    fn linear(&self, x: &Tensor, w: &CpuWeight, b: Option<&Tensor>) -> Result<Tensor> {
        let (out, inp) = self.weight_shape(w);
        if x.cols() != inp {
            return Err(shape_err(
                "linear",
                format!(
                    "input has {} features, weight [{out}, {inp}] expects {inp}",
                    x.cols()
                ),
            ));
        }
        if let Some(b) = b {
            if b.numel() != out {
                return Err(shape_err(
                    "linear",
                    format!("bias of {} for {out} outputs", b.numel()),
                ));
            }
        }
        let rows = x.rows();
        let b = b.map(|b| b.data.as_slice());
        Tensor::new(vec![rows, out], linear::linear(&x.data, rows, w, b))
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> Result<Tensor> {
        let (vocab, dim) = self.weight_shape(table);
        if let CpuWeight::Packed(_) = table {
            return Err(shape_err(
                "embedding",
                "the embedding table must be dense".into(),
            ));
        }
        let mut data = vec![0.0f32; ids.len() * dim];
        for (&id, row) in ids.iter().zip(data.chunks_exact_mut(dim.max(1))) {
            let id = id as usize;
            if id >= vocab {
                return Err(shape_err(
                    "embedding",
                    format!("token id {id} >= vocabulary size {vocab}"),
                ));
            }
            table.row_f32(id, row);
        }
        Tensor::new(vec![ids.len(), dim], data)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        let c = x.cols();
        if w.numel() != c || b.numel() != c {
            return Err(shape_err(
                "layer_norm",
                format!("{c} features, weight {}, bias {}", w.numel(), b.numel()),
            ));
        }
        let mut out = x.clone();
        out.data.par_chunks_mut(c).for_each(|row| {
            let mean = row.iter().sum::<f32>() / c as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((r, &wi), &bi) in row.iter_mut().zip(&w.data).zip(&b.data) {
                *r = (*r - mean) * inv * wi + bi;
            }
        });
        Ok(out)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let c = x.cols();
        if w.numel() != c {
            return Err(shape_err(
                "rms_norm",
                format!("{c} features, weight {}", w.numel()),
            ));
        }
        let mut out = x.clone();
        out.data.par_chunks_mut(c).for_each(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (r, &wi) in row.iter_mut().zip(&w.data) {
                *r = wi * (*r * inv);
            }
        });
        Ok(out)
    }

    fn add_unchecked(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let data = a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect();
        Tensor::new(a.shape.clone(), data)
    }

    fn act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let mut data = x.data.clone();
        data.par_chunks_mut(ELEMENTWISE_CHUNK)
            .for_each(|c| math::act_in_place(c, act));
        Tensor::new(x.shape.clone(), data)
    }

    fn gated_unchecked(&self, gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
        let mut data = gate.data.clone();
        data.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(up.data.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(g, u)| math::gated_in_place(g, u, act));
        Tensor::new(gate.shape.clone(), data)
    }

    fn div_cols(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        let c = x.cols();
        if s.data.len() != c {
            return Err(shape_err(
                "div_cols",
                format!("{} scales for {c} columns", s.data.len()),
            ));
        }
        let mut y = x.clone();
        for r in y.data.chunks_exact_mut(c.max(1)) {
            r.iter_mut().zip(&s.data).for_each(|(v, k)| *v /= k);
        }
        Ok(y)
    }

    fn quant_act_int8(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        crate::quant::w4a8::fake_quantize_act_int8(&mut y.data, x.cols());
        Ok(y)
    }

    fn rows(&self, x: &Tensor, start: usize, n: usize) -> Result<Tensor> {
        let c = x.cols();
        if start + n > x.rows() {
            return Err(shape_err(
                "rows",
                format!("rows {start}..{} of {}", start + n, x.rows()),
            ));
        }
        Tensor::new(vec![n, c], x.data[start * c..(start + n) * c].to_vec())
    }

    fn set_rows(&self, x: &mut Tensor, at: usize, src: &Tensor) -> Result<()> {
        let c = x.cols();
        if src.cols() != c || at + src.rows() > x.rows() {
            return Err(shape_err(
                "set_rows",
                format!("{:?} at row {at} into {:?}", src.shape, x.shape),
            ));
        }
        x.data[at * c..(at + src.rows()) * c].copy_from_slice(&src.data);
        Ok(())
    }

    fn concat_rows(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.cols() != b.cols() {
            return Err(shape_err(
                "concat_rows",
                format!("{:?} and {:?}", a.shape, b.shape),
            ));
        }
        let mut data = a.data.clone();
        data.extend_from_slice(&b.data);
        Tensor::new(vec![a.rows() + b.rows(), a.cols()], data)
    }

    fn rope_at_unchecked(
        &self,
        x: &Tensor,
        heads: usize,
        rope: &Rope,
        positions: &[usize],
    ) -> Result<Tensor> {
        let d = rope.head_dim;
        if x.cols() != heads * d {
            return Err(shape_err(
                "rope",
                format!("{} features for {heads} heads of {d}", x.cols()),
            ));
        }
        let half = d / 2;
        let mut out = x.clone();
        out.data
            .par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(r, row)| {
                let pos = positions[r] as f32;
                for i in 0..half {
                    // transformers: freqs = inv_freq * position in f32, then cos/sin.
                    let f = rope.inv_freq[i] * pos;
                    let (s, c) = f.sin_cos();
                    for h in 0..heads {
                        let a = row[h * d + i];
                        let b = row[h * d + i + half];
                        row[h * d + i] = a * c - b * s;
                        row[h * d + i + half] = b * c + a * s;
                    }
                }
            });
        Ok(out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, shape: AttnShape) -> Result<Tensor> {
        let n = q.rows();
        let m = k.rows();
        if q.cols() != shape.heads * shape.head_dim
            || k.cols() != shape.kv_heads * shape.head_dim
            || v.shape != k.shape
        {
            return Err(shape_err(
                "attention",
                format!("q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape),
            ));
        }
        let out = attention::attention(&q.data, n, &k.data, &v.data, m, shape, |_| m);
        Tensor::new(vec![n, q.cols()], out)
    }

    fn new_cache(&self, layers: usize, kv_dim: usize, capacity: usize) -> Result<CpuCache> {
        Ok(CpuCache {
            k: vec![vec![0.0; capacity * kv_dim]; layers],
            v: vec![vec![0.0; capacity * kv_dim]; layers],
            kv_dim,
            capacity,
        })
    }

    fn cache_dims(&self, cache: &CpuCache) -> (usize, usize, usize) {
        (cache.kv_dim, cache.k.len(), cache.capacity)
    }

    fn attention_cached_unchecked(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut CpuCache,
        layer: usize,
        pos0: usize,
        shape: AttnShape,
    ) -> Result<Tensor> {
        let n = q.rows();
        let kvd = cache.kv_dim;
        cache.k[layer][pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(&k.data);
        cache.v[layer][pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(&v.data);
        let keys = pos0 + n;
        let out = attention::attention(
            &q.data,
            n,
            &cache.k[layer],
            &cache.v[layer],
            keys,
            shape,
            |r| pos0 + r + 1,
        );
        Tensor::new(vec![n, q.cols()], out)
    }
}
