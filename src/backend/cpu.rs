//! The CPU reference backend: plain f32 loops, multi-threaded with rayon.
//! Every other backend is tested against these functions, so they favour
//! clarity; the only optimisation is splitting work across threads and
//! keeping the inner dot product vectorisable.

use rayon::prelude::*;

use super::{AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;

#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// A linear weight on the CPU: dense f32, or packed (dequantized row by row
/// inside the product, never expanded whole).
#[derive(Clone, Debug)]
pub enum CpuWeight {
    Dense(Tensor),
    Packed(PackedLinear),
}

impl CpuWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CpuWeight::Dense(t) => (t.shape[0], t.shape[1]),
            CpuWeight::Packed(p) => (p.out, p.inp),
        }
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

/// y `[rows, out]` = x `[rows, in]` . w `[out, in]`^T (+ b).
pub fn matmul_t(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    b: Option<&[f32]>,
) -> Vec<f32> {
    // Work in chunks of output features; each task writes a [chunk, rows]
    // block of the transposed result.
    const CHUNK: usize = 16;
    let mut yt = vec![0.0f32; out * rows];
    yt.par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(ci, block)| {
            let o0 = ci * CHUNK;
            let n_o = block.len() / rows.max(1);
            for oo in 0..n_o {
                let o = o0 + oo;
                let wr = &w[o * inp..(o + 1) * inp];
                let bias = b.map_or(0.0, |b| b[o]);
                for r in 0..rows {
                    block[oo * rows + r] = dot(&x[r * inp..(r + 1) * inp], wr) + bias;
                }
            }
        });
    transpose(&yt, out, rows)
}

/// y `[rows, out]` = x `[rows, in]` . dequant(w)^T (+ b): each output row of
/// the packed weight is dequantized once into a scratch row, then dotted
/// with every input row (the CPU reference of the fused dequant-GEMV).
pub fn matmul_packed(x: &[f32], rows: usize, w: &PackedLinear, b: Option<&[f32]>) -> Vec<f32> {
    const CHUNK: usize = 16;
    let (out, inp) = (w.out, w.inp);
    let mut yt = vec![0.0f32; out * rows];
    yt.par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(ci, block)| {
            let mut wr = vec![0.0f32; inp];
            for oo in 0..block.len() / rows.max(1) {
                let o = ci * CHUNK + oo;
                w.dequantize_row(o, &mut wr);
                let bias = b.map_or(0.0, |b| b[o]);
                for r in 0..rows {
                    block[oo * rows + r] = dot(&x[r * inp..(r + 1) * inp], &wr) + bias;
                }
            }
        });
    transpose(&yt, out, rows)
}

/// `[a, b]` -> `[b, a]`.
fn transpose(m: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a * b];
    for i in 0..a {
        for j in 0..b {
            t[j * a + i] = m[i * b + j];
        }
    }
    t
}

pub fn act_fn(x: f32, act: Act) -> f32 {
    match act {
        Act::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Act::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Act::Silu => x / (1.0 + (-x).exp()),
        Act::Relu => x.max(0.0),
    }
}

/// Softmax-weighted sum for one query row over keys `0..len` of one head.
/// `k`, `v` are `[len, stride]` with the head's slice at `off..off+d`.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    off: usize,
    len: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    let mut scores: Vec<f32> = (0..len)
        .map(|j| dot(q, &k[j * stride + off..j * stride + off + d]) * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, s) in scores.iter().enumerate() {
        let p = s / sum;
        let vr = &v[j * stride + off..j * stride + off + d];
        for (o, &x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

/// Attention of q `[n, heads*d]` over k, v `[len, kv_heads*d]`; query r sees
/// keys `0..visible(r)`.
fn attention_core(
    q: &[f32],
    n: usize,
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    visible: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale,
    } = shape;
    let group = heads / kv_heads;
    let qs = heads * d;
    let kvs = kv_heads * d;
    let mut out = vec![0.0f32; n * qs];
    out.par_chunks_mut(qs).enumerate().for_each(|(r, orow)| {
        for h in 0..heads {
            let off = (h / group) * d;
            attend_row(
                &q[r * qs + h * d..r * qs + (h + 1) * d],
                k,
                v,
                kvs,
                off,
                visible(r),
                scale,
                &mut orow[h * d..(h + 1) * d],
            );
        }
    });
    out
}

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

    fn packed_weight_unchecked(&self, w: &PackedLinear) -> Result<CpuWeight> {
        Ok(CpuWeight::Packed(w.clone()))
    }

    fn dense_weight_bytes(&self) -> f64 {
        4.0
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
        let y = match w {
            CpuWeight::Dense(w) => matmul_t(&x.data, rows, &w.data, out, inp, b),
            CpuWeight::Packed(p) => matmul_packed(&x.data, rows, p, b),
        };
        Tensor::new(vec![rows, out], y)
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> Result<Tensor> {
        let (vocab, dim) = self.weight_shape(table);
        let CpuWeight::Dense(table) = table else {
            return Err(shape_err(
                "embedding",
                "the embedding table must be dense".into(),
            ));
        };
        let mut data = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(shape_err(
                    "embedding",
                    format!("token id {id} >= vocabulary size {vocab}"),
                ));
            }
            data.extend_from_slice(&table.data[id * dim..(id + 1) * dim]);
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
        let data = x.data.par_iter().map(|&v| act_fn(v, act)).collect();
        Tensor::new(x.shape.clone(), data)
    }

    fn gated_unchecked(&self, gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
        let data = gate
            .data
            .par_iter()
            .zip(&up.data)
            .map(|(&g, &u)| act_fn(g, act) * u)
            .collect();
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
        let out = attention_core(&q.data, n, &k.data, &v.data, shape, |_| m);
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
        let out = attention_core(&q.data, n, &cache.k[layer], &cache.v[layer], shape, |r| {
            pos0 + r + 1
        });
        Tensor::new(vec![n, q.cols()], out)
    }
}
