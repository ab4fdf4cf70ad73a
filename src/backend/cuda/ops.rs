//! `Backend for Cuda`: every op on the device, with the semantics of the
//! CPU reference (src/backend/cpu/); shape errors are `Error::Invalid`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{err, grid_stride, int, per_row, Ctx, Cuda, CudaCache, CudaTensor, CudaWeight};
use crate::backend::{act_code, AttnShape, Backend, Rope};
use crate::config::Act;
use crate::error::{Error, Result};
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;

/// Threads per block of the one-block-per-row kernels (norms, act_quant).
const ROW_THREADS: u32 = 256;
/// Threads per block of the grid-stride kernels.
const EW_THREADS: u32 = 256;
/// attention.cu: ATTN_THREADS and ATTN_MAX_D.
const ATTN_THREADS: u32 = 128;
const ATTN_MAX_D: usize = 512;
/// Most f32 scores of one attention launch (64 MiB of scratch): the query
/// rows are launched in chunks below it.
const ATTN_MAX_SCORES: usize = 1 << 24;

fn invalid(op: &str, msg: String) -> Error {
    Error::invalid(format!("cuda {op}: {msg}"))
}

impl Cuda {
    /// Copies `n` values from `src[s0..]` to `dst[d0..]` on the stream.
    fn copy(
        &self,
        src: &CudaSlice<f32>,
        s0: usize,
        dst: &mut CudaSlice<f32>,
        d0: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let s = src.slice(s0..s0 + n);
        let mut d = dst.slice_mut(d0..d0 + n);
        self.stream().memcpy_dtod(&s, &mut d).ctx("cuMemcpyDtoD")
    }

    /// An element-wise kernel `(inputs.., y, n[, act])`.
    fn elementwise(
        &self,
        entry: &str,
        inputs: &[&CudaTensor],
        act: Option<Act>,
    ) -> Result<CudaTensor> {
        let (rows, cols) = (inputs[0].rows, inputs[0].cols);
        let mut y = self.tensor(rows, cols)?;
        let n = rows * cols;
        if n == 0 {
            return Ok(y);
        }
        let f = self.function(entry)?;
        let n_i = int(n, entry)?;
        let code = act.map(|a| act_code(a) as i32).unwrap_or(0);
        let mut l = self.stream().launch_builder(&f);
        for t in inputs {
            l.arg(&t.data);
        }
        l.arg(&mut y.data).arg(&n_i);
        if act.is_some() {
            l.arg(&code);
        }
        // SAFETY: elementwise.cu / act.cu signatures; every input holds n values.
        unsafe { l.launch(grid_stride(n, EW_THREADS)) }.ctx(entry)?;
        Ok(y)
    }

    /// Attention of q `[n, heads*d]` over keys / values `0..len` of `k`, `v`
    /// (`[>= len, kv_heads*d]`); `causal_pos0`: query r sees keys
    /// `0..pos0 + r + 1`.
    fn attend(
        &self,
        q: &CudaTensor,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        len: usize,
        shape: AttnShape,
        causal_pos0: Option<usize>,
    ) -> Result<CudaTensor> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale,
        } = shape;
        if kv_heads == 0 || heads % kv_heads != 0 || d > ATTN_MAX_D {
            return Err(invalid(
                "attention",
                format!("{heads} heads over {kv_heads} kv heads of {d} (d <= {ATTN_MAX_D})"),
            ));
        }
        let n = q.rows;
        let mut y = self.tensor(n, heads * d)?;
        if n == 0 || len == 0 || d == 0 {
            return Ok(y);
        }
        let chunk = (ATTN_MAX_SCORES / (heads * len)).clamp(1, 65535).min(n);
        // SAFETY: scratch; attention_f32 writes every score before reading it.
        let mut scores = unsafe { self.stream().alloc::<f32>(chunk * heads * len) }
            .ctx("cuMemAlloc (attention scores)")?;
        let f = self.function("attention_f32")?;
        let (n_i, len_i) = (int(n, "attention rows")?, int(len, "attention keys")?);
        let (h_i, kvh_i, d_i) = (heads as i32, kv_heads as i32, d as i32);
        let causal = match causal_pos0 {
            Some(p) => int(p, "attention position")?,
            None => -1,
        };
        let mut row0 = 0;
        while row0 < n {
            let rows = chunk.min(n - row0);
            let row0_i = row0 as i32;
            let mut l = self.stream().launch_builder(&f);
            l.arg(&q.data)
                .arg(k)
                .arg(v)
                .arg(&mut scores)
                .arg(&mut y.data)
                .arg(&n_i)
                .arg(&len_i)
                .arg(&h_i)
                .arg(&kvh_i)
                .arg(&d_i)
                .arg(&scale)
                .arg(&row0_i)
                .arg(&causal);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, rows as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: attention.cu; q [n, heads d], k / v at least len rows
            // of kv_heads d, scores chunk * heads * len, y [n, heads d].
            unsafe { l.launch(cfg) }.ctx("attention_f32")?;
            row0 += rows;
        }
        Ok(y)
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Cache = CudaCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        // Allocated zero-filled on the device.
        self.tensor(rows, cols)
    }

    fn upload(&self, t: &Tensor) -> Result<CudaTensor> {
        let data = if t.data.is_empty() {
            self.zeros(1)?
        } else {
            self.stream().clone_htod(&t.data).ctx("upload")?
        };
        Ok(CudaTensor {
            data,
            rows: t.rows(),
            cols: t.cols(),
        })
    }

    fn download(&self, t: &CudaTensor) -> Result<Tensor> {
        let n = t.numel();
        let data = if n == 0 {
            Vec::new()
        } else {
            self.stream()
                .clone_dtoh(&t.data.slice(0..n))
                .ctx("download")?
        };
        Tensor::new(vec![t.rows, t.cols], data)
    }

    fn weight(&self, w: &Tensor) -> Result<CudaWeight> {
        if w.shape.len() != 2 {
            return Err(invalid(
                "weight",
                format!("expected [out, in], got {:?}", w.shape),
            ));
        }
        let (out, inp) = (w.shape[0], w.shape[1]);
        let bits: Option<Vec<u16>> = w
            .data
            .iter()
            .map(|&v| {
                let h = half::f16::from_f32(v);
                (h.to_f32() == v).then_some(h.to_bits())
            })
            .collect();
        Ok(match bits {
            Some(bits) if !bits.is_empty() => CudaWeight::F16 {
                w: self.stream().clone_htod(&bits).ctx("upload weight")?,
                out,
                inp,
            },
            _ => CudaWeight::F32 {
                w: if w.data.is_empty() {
                    self.zeros(1)?
                } else {
                    self.stream().clone_htod(&w.data).ctx("upload weight")?
                },
                out,
                inp,
            },
        })
    }

    fn packed_weight_unchecked(&self, w: &PackedLinear) -> Result<CudaWeight> {
        let pairs: Vec<u32> = w
            .scales_zeros
            .chunks_exact(2)
            .map(|c| c[0].to_bits() as u32 | (c[1].to_bits() as u32) << 16)
            .collect();
        if w.qweight.is_empty() || pairs.is_empty() {
            return Err(invalid("packed_weight", "an empty packed weight".into()));
        }
        Ok(CudaWeight::Packed {
            q: self
                .stream()
                .clone_htod(&w.qweight[..])
                .ctx("upload packed weight")?,
            sz: self
                .stream()
                .clone_htod(&pairs)
                .ctx("upload scales / zeros")?,
            out: w.out,
            inp: w.inp,
            bits: w.bits,
            group: w.group_size,
        })
    }

    fn begin_timing(&self) -> Result<bool> {
        let ev = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("cuEventCreate")?;
        ev.record(self.stream()).ctx("cuEventRecord")?;
        *self.timing.lock().map_err(|_| err("timing poisoned"))? = Some(ev);
        Ok(true)
    }

    fn end_timing(&self) -> Result<Option<f64>> {
        let Some(start) = self
            .timing
            .lock()
            .map_err(|_| err("timing poisoned"))?
            .take()
        else {
            return Ok(None);
        };
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("cuEventCreate")?;
        end.record(self.stream()).ctx("cuEventRecord")?;
        end.synchronize().ctx("cuEventSynchronize")?;
        let ms = start.elapsed_ms(&end).ctx("cuEventElapsedTime")?;
        Ok(Some(ms as f64 / 1e3))
    }

    fn dims(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        w.shape()
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, b: Option<&CudaTensor>) -> Result<CudaTensor> {
        self.linear_impl(x, w, b)
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let (vocab, dim) = table.shape();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(invalid(
                "embedding",
                format!("token id {id} >= vocabulary size {vocab}"),
            ));
        }
        let mut y = self.tensor(ids.len(), dim)?;
        if ids.is_empty() || dim == 0 {
            return Ok(y);
        }
        let dids = self.stream().clone_htod(ids).ctx("upload ids")?;
        let (n_i, d_i) = (int(ids.len(), "ids")?, int(dim, "dim")?);
        let cfg = grid_stride(ids.len() * dim, EW_THREADS);
        match table {
            CudaWeight::F16 { w, .. } => {
                let f = self.function("embedding_f16")?;
                let mut l = self.stream().launch_builder(&f);
                l.arg(w).arg(&dids).arg(&mut y.data).arg(&n_i).arg(&d_i);
                // SAFETY: convert.cu embedding_f16; ids < vocab checked above.
                unsafe { l.launch(cfg) }.ctx("embedding_f16")?;
            }
            CudaWeight::F32 { w, .. } => {
                let f = self.function("embedding_f32")?;
                let mut l = self.stream().launch_builder(&f);
                l.arg(w).arg(&dids).arg(&mut y.data).arg(&n_i).arg(&d_i);
                // SAFETY: convert.cu embedding_f32; ids < vocab checked above.
                unsafe { l.launch(cfg) }.ctx("embedding_f32")?;
            }
            CudaWeight::Packed { .. } => {
                return Err(invalid(
                    "embedding",
                    "the embedding table must be dense".into(),
                ))
            }
        }
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        if w.numel() != c || b.numel() != c {
            return Err(invalid(
                "layer_norm",
                format!("{c} features, weight {}, bias {}", w.numel(), b.numel()),
            ));
        }
        let mut y = self.tensor(rows, c)?;
        if rows == 0 || c == 0 {
            return Ok(y);
        }
        let f = self.function("layer_norm_f32")?;
        let (r_i, c_i) = (int(rows, "rows")?, int(c, "cols")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data)
            .arg(&w.data)
            .arg(&b.data)
            .arg(&mut y.data)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&eps);
        // SAFETY: norm.cu layer_norm_f32, one block per row.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }.ctx("layer_norm_f32")?;
        Ok(y)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        if w.numel() != c {
            return Err(invalid(
                "rms_norm",
                format!("{c} features, weight {}", w.numel()),
            ));
        }
        let mut y = self.tensor(rows, c)?;
        if rows == 0 || c == 0 {
            return Ok(y);
        }
        let f = self.function("rms_norm_f32")?;
        let (r_i, c_i) = (int(rows, "rows")?, int(c, "cols")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data)
            .arg(&w.data)
            .arg(&mut y.data)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&eps);
        // SAFETY: elementwise.cu rms_norm_f32, one block per row.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }.ctx("rms_norm_f32")?;
        Ok(y)
    }

    fn add_unchecked(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise("add_f32", &[a, b], None)
    }

    fn act(&self, x: &CudaTensor, act: Act) -> Result<CudaTensor> {
        self.elementwise("act_f32", &[x], Some(act))
    }

    fn gated_unchecked(&self, gate: &CudaTensor, up: &CudaTensor, act: Act) -> Result<CudaTensor> {
        self.elementwise("gated_f32", &[gate, up], Some(act))
    }

    fn div_cols(&self, x: &CudaTensor, s: &CudaTensor) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        if s.numel() != c {
            return Err(invalid(
                "div_cols",
                format!("{} scales for {c} columns", s.numel()),
            ));
        }
        let mut y = self.tensor(rows, c)?;
        let n = rows * c;
        if n == 0 {
            return Ok(y);
        }
        let f = self.function("div_cols_f32")?;
        let (n_i, c_i) = (int(n, "div_cols")?, int(c, "cols")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data)
            .arg(&s.data)
            .arg(&mut y.data)
            .arg(&n_i)
            .arg(&c_i);
        // SAFETY: elementwise.cu div_cols_f32; x and y hold n values, s cols.
        unsafe { l.launch(grid_stride(n, EW_THREADS)) }.ctx("div_cols_f32")?;
        Ok(y)
    }

    fn quant_act_int8(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let (rows, c) = (x.rows, x.cols);
        let mut y = self.tensor(rows, c)?;
        if rows == 0 || c == 0 {
            return Ok(y);
        }
        let f = self.function("act_quant_int8_f32")?;
        let (r_i, c_i) = (int(rows, "rows")?, int(c, "cols")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data).arg(&mut y.data).arg(&r_i).arg(&c_i);
        // SAFETY: act_quant.cu act_quant_int8_f32, one block per row.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }.ctx("act_quant_int8_f32")?;
        Ok(y)
    }

    fn rows(&self, x: &CudaTensor, start: usize, n: usize) -> Result<CudaTensor> {
        let c = x.cols;
        if start + n > x.rows {
            return Err(invalid(
                "rows",
                format!("rows {start}..{} of {}", start + n, x.rows),
            ));
        }
        let mut y = self.tensor(n, c)?;
        self.copy(&x.data, start * c, &mut y.data, 0, n * c)?;
        Ok(y)
    }

    fn set_rows(&self, x: &mut CudaTensor, at: usize, src: &CudaTensor) -> Result<()> {
        let c = x.cols;
        if src.cols != c || at + src.rows > x.rows {
            return Err(invalid(
                "set_rows",
                format!(
                    "[{}, {}] at row {at} into [{}, {c}]",
                    src.rows, src.cols, x.rows
                ),
            ));
        }
        self.copy(&src.data, 0, &mut x.data, at * c, src.numel())
    }

    fn concat_rows(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        if a.cols != b.cols {
            return Err(invalid(
                "concat_rows",
                format!("[{}, {}] and [{}, {}]", a.rows, a.cols, b.rows, b.cols),
            ));
        }
        let mut y = self.tensor(a.rows + b.rows, a.cols)?;
        self.copy(&a.data, 0, &mut y.data, 0, a.numel())?;
        self.copy(&b.data, 0, &mut y.data, a.numel(), b.numel())?;
        Ok(y)
    }

    fn rope_at_unchecked(
        &self,
        x: &CudaTensor,
        heads: usize,
        rope: &Rope,
        positions: &[usize],
    ) -> Result<CudaTensor> {
        let d = rope.head_dim;
        let half = d / 2;
        if x.cols != heads * d || rope.inv_freq.len() < half {
            return Err(invalid(
                "rope",
                format!("{} features for {heads} heads of {d}", x.cols),
            ));
        }
        let rows = x.rows;
        let mut y = self.tensor(rows, x.cols)?;
        if rows == 0 || half == 0 || heads == 0 {
            self.copy(&x.data, 0, &mut y.data, 0, x.numel())?;
            return Ok(y);
        }
        if !d.is_multiple_of(2) {
            // The last value of each head is not rotated: keep it.
            self.copy(&x.data, 0, &mut y.data, 0, x.numel())?;
        }
        // The CPU's table: f32 inv_freq * position, then sin_cos.
        let mut cs = vec![0.0f32; rows * d];
        for (r, &p) in positions.iter().enumerate() {
            let pos = p as f32;
            for i in 0..half {
                let (s, c) = (rope.inv_freq[i] * pos).sin_cos();
                cs[r * d + i] = c;
                cs[r * d + half + i] = s;
            }
        }
        let dcs = self.stream().clone_htod(&cs).ctx("upload rope table")?;
        let f = self.function("rope_f32")?;
        let (r_i, h_i, d_i) = (int(rows, "rows")?, int(heads, "heads")?, int(d, "d")?);
        let mut l = self.stream().launch_builder(&f);
        l.arg(&x.data)
            .arg(&dcs)
            .arg(&mut y.data)
            .arg(&r_i)
            .arg(&h_i)
            .arg(&d_i);
        // SAFETY: rope.cu rope_f32: x, y [rows, heads d], cs [rows, d].
        unsafe { l.launch(grid_stride(rows * heads * half, EW_THREADS)) }.ctx("rope_f32")?;
        Ok(y)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        shape: AttnShape,
    ) -> Result<CudaTensor> {
        if q.cols != shape.heads * shape.head_dim
            || k.cols != shape.kv_heads * shape.head_dim
            || (v.rows, v.cols) != (k.rows, k.cols)
        {
            return Err(invalid(
                "attention",
                format!(
                    "q [{}, {}], k [{}, {}], v [{}, {}]",
                    q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
                ),
            ));
        }
        self.attend(q, &k.data, &v.data, k.rows, shape, None)
    }

    fn new_cache(&self, layers: usize, kv_dim: usize, capacity: usize) -> Result<CudaCache> {
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.zeros(capacity * kv_dim)?);
            v.push(self.zeros(capacity * kv_dim)?);
        }
        Ok(CudaCache {
            k,
            v,
            kv_dim,
            capacity,
        })
    }

    fn cache_dims(&self, cache: &CudaCache) -> (usize, usize, usize) {
        (cache.kv_dim, cache.k.len(), cache.capacity)
    }

    fn attention_cached_unchecked(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        cache: &mut CudaCache,
        layer: usize,
        pos0: usize,
        shape: AttnShape,
    ) -> Result<CudaTensor> {
        let n = q.rows;
        let kvd = cache.kv_dim;
        self.copy(&k.data, 0, &mut cache.k[layer], pos0 * kvd, n * kvd)?;
        self.copy(&v.data, 0, &mut cache.v[layer], pos0 * kvd, n * kvd)?;
        self.attend(
            q,
            &cache.k[layer],
            &cache.v[layer],
            pos0 + n,
            shape,
            Some(pos0),
        )
    }
}
