//! The [`Backend`] implementation: shape checks on the host (the same
//! messages as the CPU reference), then one recorded dispatch or copy per
//! op. Nothing waits for the device except `download`.

use super::linear::WgpuWeight;
use super::{
    err, shape_err, u32_of, RopeTable, Wgpu, WgpuCache, WgpuTensor, ATTN_WG, MAX_HEAD_DIM, WG,
};
use crate::backend::{act_code, AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::Result;
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;

impl Wgpu {
    /// One element-wise kernel over `a` (and `b`); `arg` is the activation
    /// code, or div_cols' column count.
    fn elementwise(
        &self,
        entry: &'static str,
        a: &WgpuTensor,
        b: Option<&WgpuTensor>,
        arg: u32,
    ) -> Result<WgpuTensor> {
        let y = self.tensor(a.rows, a.cols, entry)?;
        let n = u32_of(entry, a.numel())?;
        let mut binds = vec![(0, a.buf()), (2, y.buf())];
        if let Some(b) = b {
            binds.push((1, b.buf()));
        }
        let key = self.key("elementwise.wgsl", entry, WG);
        self.rec
            .dispatch(&key, &binds, 3, &[n, arg], n.div_ceil(WG))?;
        Ok(y)
    }

    /// The (cos, sin) table of `positions`, computed as the
    /// CPU reference does (f32 `inv_freq * pos`, then sin/cos) and uploaded
    /// once per step: q and k of every layer share it.
    fn rope_table(&self, positions: &[usize], inv_freq: &[f32]) -> Result<wgpu::Buffer> {
        let mut last = self
            .rope_table
            .lock()
            .map_err(|_| err("the RoPE table lock is poisoned"))?;
        if let Some(t) = last.as_ref() {
            if t.positions == positions && t.inv_freq == inv_freq {
                return Ok(t.buf.clone());
            }
        }
        let mut cs = Vec::with_capacity(positions.len() * inv_freq.len() * 2);
        for &p in positions {
            let pos = p as f32;
            for &f in inv_freq {
                let (s, c) = (f * pos).sin_cos();
                cs.push(c);
                cs.push(s);
            }
        }
        let buf = self.rec.upload(bytemuck::cast_slice(&cs), "rope cos/sin")?;
        *last = Some(RopeTable {
            positions: positions.to_vec(),
            inv_freq: inv_freq.to_vec(),
            buf: buf.clone(),
        });
        Ok(buf)
    }

    /// Attention of q over the first keys of `k`, `v` (see attention.wgsl).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &WgpuTensor,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        kv_stride: usize,
        keys: usize,
        causal_pos0: Option<usize>,
        shape: AttnShape,
    ) -> Result<WgpuTensor> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale,
        } = shape;
        if kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
            return Err(shape_err(
                "attention",
                format!("{heads} heads, {kv_heads} kv heads of {d}"),
            ));
        }
        if d > MAX_HEAD_DIM as usize {
            return Err(err(format!(
                "attention: head_dim {d} is larger than the kernel's {MAX_HEAD_DIM}"
            )));
        }
        let y = self.tensor(q.rows, q.cols, "attention output")?;
        let params = [
            u32_of("attention", q.rows)?,
            heads as u32,
            kv_heads as u32,
            d as u32,
            u32_of("attention", kv_stride)?,
            causal_pos0.is_some() as u32,
            u32_of("attention", causal_pos0.unwrap_or(0))?,
            u32_of("attention", keys)?,
            scale.to_bits(),
        ];
        let key = self
            .key("attention.wgsl", "attention", ATTN_WG)
            .def("MAXD", MAX_HEAD_DIM);
        let groups = u32_of("attention", q.rows * heads)?;
        self.rec.dispatch(
            &key,
            &[(0, q.buf()), (1, k), (2, v), (3, y.buf())],
            4,
            &params,
            groups,
        )?;
        Ok(y)
    }
}

impl Backend for Wgpu {
    type Tensor = WgpuTensor;
    type Weight = WgpuWeight;
    type Cache = WgpuCache;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn upload(&self, t: &Tensor) -> Result<WgpuTensor> {
        let (rows, cols) = (t.rows(), t.cols());
        self.activation_bytes(rows, cols, "upload")?;
        let buf = self.rec.upload(bytemuck::cast_slice(&t.data), "upload")?;
        Ok(WgpuTensor {
            mem: self.rec.pooled(buf),
            rows,
            cols,
        })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<WgpuTensor> {
        let bytes = self.activation_bytes(rows, cols, "zeros")?;
        // A new buffer, not a pooled one: wgpu zero-fills new buffers.
        let buf = self.rec.buffer(bytes, "zeros")?;
        Ok(WgpuTensor {
            mem: self.rec.pooled(buf),
            rows,
            cols,
        })
    }

    fn begin_timing(&self) -> Result<bool> {
        self.rec.begin_timing()
    }

    fn end_timing(&self) -> Result<Option<f64>> {
        self.rec.end_timing()
    }

    fn download(&self, t: &WgpuTensor) -> Result<Tensor> {
        let bytes = self.rec.read(t.buf(), (t.numel() * 4) as u64)?;
        let data: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::new(vec![t.rows, t.cols], data)
    }

    fn weight(&self, w: &Tensor) -> Result<WgpuWeight> {
        self.dense_weight(w)
    }

    fn packed_weight_unchecked(&self, w: &PackedLinear) -> Result<WgpuWeight> {
        self.packed(w)
    }

    fn dims(&self, t: &WgpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight_shape(&self, w: &WgpuWeight) -> (usize, usize) {
        w.shape()
    }

    fn linear(&self, x: &WgpuTensor, w: &WgpuWeight, b: Option<&WgpuTensor>) -> Result<WgpuTensor> {
        self.linear_impl(x, w, b)
    }

    fn embedding(&self, table: &WgpuWeight, ids: &[u32]) -> Result<WgpuTensor> {
        self.embedding_impl(table, ids)
    }

    fn layer_norm(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        b: &WgpuTensor,
        eps: f32,
    ) -> Result<WgpuTensor> {
        let c = x.cols;
        if w.numel() != c || b.numel() != c {
            return Err(shape_err(
                "layer_norm",
                format!("{c} features, weight {}, bias {}", w.numel(), b.numel()),
            ));
        }
        let y = self.tensor(x.rows, c, "layer_norm")?;
        let rows = u32_of("layer_norm", x.rows)?;
        let key = self.key("norm.wgsl", "layer_norm", WG);
        self.rec.dispatch(
            &key,
            &[(0, x.buf()), (1, w.buf()), (2, b.buf()), (3, y.buf())],
            4,
            &[rows, c as u32, eps.to_bits()],
            rows,
        )?;
        Ok(y)
    }

    fn rms_norm(&self, x: &WgpuTensor, w: &WgpuTensor, eps: f32) -> Result<WgpuTensor> {
        let c = x.cols;
        if w.numel() != c {
            return Err(shape_err(
                "rms_norm",
                format!("{c} features, weight {}", w.numel()),
            ));
        }
        let y = self.tensor(x.rows, c, "rms_norm")?;
        let rows = u32_of("rms_norm", x.rows)?;
        let key = self.key("norm.wgsl", "rms_norm", WG);
        self.rec.dispatch(
            &key,
            &[(0, x.buf()), (1, w.buf()), (3, y.buf())],
            4,
            &[rows, c as u32, eps.to_bits()],
            rows,
        )?;
        Ok(y)
    }

    fn add_unchecked(&self, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        self.elementwise("add", a, Some(b), 0)
    }

    fn act(&self, x: &WgpuTensor, act: Act) -> Result<WgpuTensor> {
        self.elementwise("act", x, None, act_code(act))
    }

    fn gated_unchecked(&self, gate: &WgpuTensor, up: &WgpuTensor, act: Act) -> Result<WgpuTensor> {
        self.elementwise("gated", gate, Some(up), act_code(act))
    }

    fn div_cols(&self, x: &WgpuTensor, s: &WgpuTensor) -> Result<WgpuTensor> {
        if s.numel() != x.cols {
            return Err(shape_err(
                "div_cols",
                format!("{} scales for {} columns", s.numel(), x.cols),
            ));
        }
        if x.numel() == 0 {
            return self.tensor(x.rows, x.cols, "div_cols");
        }
        self.elementwise("div_cols", x, Some(s), u32_of("div_cols", x.cols)?)
    }

    /// The fake quantization (act_quant.wgsl, f32 in and out): the W4A8
    /// fallback of [`Backend::linear_a8`] runs the packed dequant GEMV /
    /// GEMM on it.
    fn quant_act_int8(&self, x: &WgpuTensor) -> Result<WgpuTensor> {
        let y = self.tensor(x.rows, x.cols, "quant_act_int8")?;
        let rows = u32_of("quant_act_int8", x.rows)?;
        let cols = u32_of("quant_act_int8", x.cols)?;
        let key = self.key("act_quant.wgsl", "act_quant_int8", WG);
        self.rec
            .dispatch(&key, &[(0, x.buf()), (1, y.buf())], 2, &[rows, cols], rows)?;
        Ok(y)
    }

    /// Integer dot products (`dot4I8Packed`) when the device has them and
    /// `w` is 4-bit packed with integer zero points; else the default.
    fn linear_a8(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        b: Option<&WgpuTensor>,
    ) -> Result<WgpuTensor> {
        match self.linear_a8_impl(x, w, b)? {
            Some(y) => Ok(y),
            None => self.linear(&self.quant_act_int8(x)?, w, b),
        }
    }

    fn rows(&self, x: &WgpuTensor, start: usize, n: usize) -> Result<WgpuTensor> {
        if start + n > x.rows {
            return Err(shape_err(
                "rows",
                format!("rows {start}..{} of {}", start + n, x.rows),
            ));
        }
        let y = self.tensor(n, x.cols, "rows")?;
        let row = (x.cols * 4) as u64;
        self.rec
            .copy(x.buf(), start as u64 * row, y.buf(), 0, n as u64 * row)?;
        Ok(y)
    }

    fn set_rows(&self, x: &mut WgpuTensor, at: usize, src: &WgpuTensor) -> Result<()> {
        if src.cols != x.cols || at + src.rows > x.rows {
            return Err(shape_err(
                "set_rows",
                format!(
                    "[{}, {}] at row {at} into [{}, {}]",
                    src.rows, src.cols, x.rows, x.cols
                ),
            ));
        }
        let row = (x.cols * 4) as u64;
        self.rec.copy(
            src.buf(),
            0,
            x.buf(),
            at as u64 * row,
            src.rows as u64 * row,
        )
    }

    fn concat_rows(&self, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        if a.cols != b.cols {
            return Err(shape_err(
                "concat_rows",
                format!("[{}, {}] and [{}, {}]", a.rows, a.cols, b.rows, b.cols),
            ));
        }
        let y = self.tensor(a.rows + b.rows, a.cols, "concat_rows")?;
        let (ab, bb) = ((a.numel() * 4) as u64, (b.numel() * 4) as u64);
        self.rec.copy(a.buf(), 0, y.buf(), 0, ab)?;
        self.rec.copy(b.buf(), 0, y.buf(), ab, bb)?;
        Ok(y)
    }

    fn rope_at_unchecked(
        &self,
        x: &WgpuTensor,
        heads: usize,
        rope: &Rope,
        positions: &[usize],
    ) -> Result<WgpuTensor> {
        let d = rope.head_dim;
        if x.cols != heads * d || !d.is_multiple_of(2) || rope.inv_freq.len() < d / 2 {
            return Err(shape_err(
                "rope",
                format!("{} features for {heads} heads of {d}", x.cols),
            ));
        }
        let half = d / 2;
        let cs = self.rope_table(positions, &rope.inv_freq[..half])?;
        let y = self.tensor(x.rows, x.cols, "rope")?;
        let n = u32_of("rope", x.rows * heads * half)?;
        let key = self.key("rope.wgsl", "rope", WG);
        self.rec.dispatch(
            &key,
            &[(0, x.buf()), (1, &cs), (2, y.buf())],
            3,
            &[x.rows as u32, heads as u32, d as u32],
            n.div_ceil(WG),
        )?;
        Ok(y)
    }

    fn attention(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        shape: AttnShape,
    ) -> Result<WgpuTensor> {
        if q.cols != shape.heads * shape.head_dim
            || k.cols != shape.kv_heads * shape.head_dim
            || (v.rows, v.cols) != (k.rows, k.cols)
        {
            return Err(shape_err(
                "attention",
                format!(
                    "q [{}, {}], k [{}, {}], v [{}, {}]",
                    q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
                ),
            ));
        }
        if k.rows == 0 {
            return Err(shape_err("attention", "no keys".into()));
        }
        self.attend(q, k.buf(), v.buf(), k.cols, k.rows, None, shape)
    }

    fn new_cache(&self, layers: usize, kv_dim: usize, capacity: usize) -> Result<WgpuCache> {
        let bytes = (capacity * kv_dim * 4) as u64;
        if bytes > self.rec.ctx.limits.max_storage_buffer_binding_size {
            return Err(err(format!(
                "a KV cache layer of {capacity} positions x {kv_dim} ({bytes} bytes) exceeds \
                 the device's max_storage_buffer_binding_size {}",
                self.rec.ctx.limits.max_storage_buffer_binding_size
            )));
        }
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for l in 0..layers {
            k.push(
                self.rec
                    .buffer(bytes, &format!("kv cache keys, layer {l}"))?,
            );
            v.push(
                self.rec
                    .buffer(bytes, &format!("kv cache values, layer {l}"))?,
            );
        }
        Ok(WgpuCache {
            k,
            v,
            kv_dim,
            capacity,
        })
    }

    fn cache_dims(&self, cache: &WgpuCache) -> (usize, usize, usize) {
        (cache.kv_dim, cache.k.len(), cache.capacity)
    }

    fn attention_cached_unchecked(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        cache: &mut WgpuCache,
        layer: usize,
        pos0: usize,
        shape: AttnShape,
    ) -> Result<WgpuTensor> {
        let n = q.rows;
        let kvd = cache.kv_dim;
        let row = (kvd * 4) as u64;
        let (at, bytes) = (pos0 as u64 * row, n as u64 * row);
        self.rec.copy(k.buf(), 0, &cache.k[layer], at, bytes)?;
        self.rec.copy(v.buf(), 0, &cache.v[layer], at, bytes)?;
        self.attend(
            q,
            &cache.k[layer],
            &cache.v[layer],
            kvd,
            pos0 + n,
            Some(pos0),
            shape,
        )
    }
}
