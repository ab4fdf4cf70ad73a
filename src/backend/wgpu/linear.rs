//! Linear weights on the device and the products with them.
//!
//! A weight is a list of row chunks, each small enough for one storage
//! binding (the device's `max_storage_buffer_binding_size`, or a smaller
//! test threshold); every kernel runs once per chunk and writes that
//! chunk's output columns. Dense rows are padded to a multiple of 8
//! elements (`ld`) so the GEMV reads whole vec4s.
//!
//! Up to [`SKINNY_MAX`] tokens (rows of x: decode, one sequence or a
//! batched step of several) use a GEMV (`gemv.wgsl`, or the fused
//! dequant-GEMV `gemv_packed.wgsl` reading packed words directly): each
//! workgroup reads its 4 weight rows once and applies them to every token,
//! so a decode step costs one pass over the weights whatever its m. More
//! tokens (prefill) use the tiled GEMM (`gemm.wgsl`, 64-row tiles, which
//! dequantizes packed tiles as it stages them), where the tiling pays.
//!
//! W4A8 with integer dot products (`linear_a8`, when the device has
//! `dot4I8Packed`): the activations are quantized to packed INT8 words
//! (`act_quant.wgsl`, flag PACKED) and multiplied with the 4-bit codes by
//! `gemv_w4a8.wgsl`, one token per workgroup for decode and
//! [`A8_PREFILL_TOKENS`] for prefill.

use half::f16;

use super::kernels::KernelKey;
use super::{err, shape_err, u32_of, Wgpu, WgpuHalf, WgpuTensor, WG};
use crate::error::Result;
use crate::quant::format::PackedLinear;
use crate::tensor::Tensor;

/// Output rows per GEMV workgroup (`R` in gemv*.wgsl).
const GEMV_ROWS: usize = 4;
/// Most tokens a product runs as a GEMV (gemv*.wgsl); more run the GEMM.
pub const SKINNY_MAX: usize = 8;
/// GEMM tile (`BM`, `BN` in gemm.wgsl) and its threads.
const GEMM_TILE: usize = 64;
const GEMM_WG: u32 = 256;
/// Tokens per workgroup of the integer W4A8 kernel when there are several
/// (`T` in gemv_w4a8.wgsl): each weight word loaded serves that many.
const A8_PREFILL_TOKENS: usize = 4;

/// Rows `row0..row0 + rows` of a dense weight.
pub struct DenseChunk {
    pub(super) row0: usize,
    pub(super) rows: usize,
    pub(super) buf: wgpu::Buffer,
}

/// Rows `row0..row0 + rows` of a packed weight: codes and (scale, zero).
pub struct PackedChunk {
    row0: usize,
    rows: usize,
    q: wgpu::Buffer,
    sz: wgpu::Buffer,
}

/// The fields of a [`WgpuWeight::Dense`] ([`WgpuWeight::dense_parts`]).
pub(super) struct DenseParts<'a> {
    pub out: usize,
    pub inp: usize,
    pub ld: usize,
    pub f16: bool,
    pub chunks: &'a [DenseChunk],
}

/// A linear weight `[out, in]` on the device.
pub enum WgpuWeight {
    Dense {
        out: usize,
        inp: usize,
        /// Row stride in elements (`inp` rounded up to 8, zero padded).
        ld: usize,
        /// f16 pairs in u32 (every value was exactly an f16) or f32.
        f16: bool,
        chunks: Vec<DenseChunk>,
    },
    Packed {
        out: usize,
        inp: usize,
        bits: u32,
        group: usize,
        /// Every zero point is an integer in `0..=15` and bits is 4: the
        /// integer W4A8 kernel can form `c - z` as a signed byte.
        int4_zeros: bool,
        chunks: Vec<PackedChunk>,
    },
}

impl WgpuWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            WgpuWeight::Dense { out, inp, .. } | WgpuWeight::Packed { out, inp, .. } => {
                (*out, *inp)
            }
        }
    }

    /// How many bindings (row chunks) the weight is split into.
    pub fn chunks(&self) -> usize {
        match self {
            WgpuWeight::Dense { chunks, .. } => chunks.len(),
            WgpuWeight::Packed { chunks, .. } => chunks.len(),
        }
    }

    /// Whether a dense weight is stored as f16.
    pub fn is_f16(&self) -> bool {
        matches!(self, WgpuWeight::Dense { f16: true, .. })
    }

    /// A dense weight's parts, for the ops that read its values (the
    /// search's fake_quant, the backward's dX): an invalid-input error
    /// naming `op` for a packed one.
    pub(super) fn dense_parts(&self, op: &str) -> Result<DenseParts<'_>> {
        match self {
            WgpuWeight::Dense {
                out,
                inp,
                ld,
                f16,
                chunks,
            } => Ok(DenseParts {
                out: *out,
                inp: *inp,
                ld: *ld,
                f16: *f16,
                chunks,
            }),
            WgpuWeight::Packed { .. } => Err(shape_err(
                op,
                "needs a dense weight (an unquantized model), found a packed one".into(),
            )),
        }
    }
}

/// GEMV threads for `blocks` blocks of input (8 values dense, 32 packed):
/// enough threads that few idle, at most 256.
fn gemv_wg(blocks: usize) -> u32 {
    match blocks {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// The GEMV's `MAXM` (accumulators per thread) for `m` tokens: m rounded up
/// to a power of two, so there are 4 pipelines per configuration and m = 1
/// keeps a single accumulator.
fn gemv_maxm(m: usize) -> u32 {
    m.next_power_of_two() as u32
}

/// Rows per chunk for rows of `row_bytes` under a binding limit.
pub(super) fn rows_per_chunk(what: &str, row_bytes: u64, limit: u64) -> Result<usize> {
    let n = limit / row_bytes.max(1);
    if n == 0 {
        return Err(err(format!(
            "{what}: one row is {row_bytes} bytes, more than a storage binding ({limit} bytes)"
        )));
    }
    Ok(n as usize)
}

/// The input's features match the weight's, and the bias its outputs.
fn check_linear(x: &WgpuTensor, w: &WgpuWeight, b: Option<&WgpuTensor>) -> Result<()> {
    let (out, inp) = w.shape();
    if x.cols != inp {
        return Err(shape_err(
            "linear",
            format!(
                "input has {} features, weight [{out}, {inp}] expects {inp}",
                x.cols
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
    Ok(())
}

impl Wgpu {
    pub(super) fn dense_weight(&self, w: &Tensor) -> Result<WgpuWeight> {
        let (out, inp) = match w.shape.as_slice() {
            [o, i] => (*o, *i),
            s => {
                return Err(shape_err(
                    "weight",
                    format!("expected [out, in], got {s:?}"),
                ))
            }
        };
        let f16 = w
            .data
            .iter()
            .all(|&v| f16::from_f32(v).to_f32().to_bits() == v.to_bits());
        let ld = inp.div_ceil(8) * 8;
        let esize = if f16 { 2 } else { 4 };
        let per = rows_per_chunk("weight", (ld * esize) as u64, self.rec.ctx.max_binding)?;
        let mut chunks = Vec::new();
        for row0 in (0..out).step_by(per) {
            let rows = per.min(out - row0);
            let label = format!("weight [{out}, {inp}] rows {row0}..{}", row0 + rows);
            let src = &w.data[row0 * inp..(row0 + rows) * inp];
            let buf = if f16 {
                let mut h = vec![f16::ZERO; rows * ld];
                for (dst, s) in h.chunks_exact_mut(ld).zip(src.chunks_exact(inp.max(1))) {
                    for (d, &v) in dst.iter_mut().zip(s) {
                        *d = f16::from_f32(v);
                    }
                }
                self.rec.upload(bytemuck::cast_slice(&h), &label)?
            } else {
                let mut h = vec![0.0f32; rows * ld];
                for (dst, s) in h.chunks_exact_mut(ld).zip(src.chunks_exact(inp.max(1))) {
                    dst[..inp].copy_from_slice(s);
                }
                self.rec.upload(bytemuck::cast_slice(&h), &label)?
            };
            chunks.push(DenseChunk { row0, rows, buf });
        }
        Ok(WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16,
            chunks,
        })
    }

    /// A packed weight `Backend::packed_weight` has validated
    /// (`PackedLinear::validate`), cut into chunks of rows.
    pub(super) fn packed(&self, p: &PackedLinear) -> Result<WgpuWeight> {
        let wpr = p.words_per_row();
        let groups = p.groups();
        let row_bytes = (wpr * 4).max(groups * 4) as u64;
        let per = rows_per_chunk("packed weight", row_bytes, self.rec.ctx.max_binding)?;
        let mut chunks = Vec::new();
        for row0 in (0..p.out).step_by(per) {
            let rows = per.min(p.out - row0);
            let label = format!(
                "packed W{} g{} [{}, {}] rows {row0}..{}",
                p.bits,
                p.group_size,
                p.out,
                p.inp,
                row0 + rows
            );
            let q = &p.qweight[row0 * wpr..(row0 + rows) * wpr];
            let sz = &p.scales_zeros[row0 * groups * 2..(row0 + rows) * groups * 2];
            chunks.push(PackedChunk {
                row0,
                rows,
                q: self
                    .rec
                    .upload(bytemuck::cast_slice(q), &format!("{label} codes"))?,
                sz: self
                    .rec
                    .upload(bytemuck::cast_slice(sz), &format!("{label} scales"))?,
            });
        }
        let int4_zeros = p.bits == 4
            && p.scales_zeros.iter().skip(1).step_by(2).all(|z| {
                let z = z.to_f32();
                z.fract() == 0.0 && (0.0..=15.0).contains(&z)
            });
        Ok(WgpuWeight::Packed {
            out: p.out,
            inp: p.inp,
            bits: p.bits,
            group: p.group_size,
            int4_zeros,
            chunks,
        })
    }

    /// A W4A8 linear in integers (see the module comment), or `None` when
    /// the device has no `dot4I8Packed`, it is turned off, or `w` is not a
    /// 4-bit packed weight with integer zero points (the caller then runs
    /// the fake-quant fallback).
    pub(super) fn linear_a8_impl(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        b: Option<&WgpuTensor>,
    ) -> Result<Option<WgpuTensor>> {
        let WgpuWeight::Packed {
            out,
            inp,
            group,
            int4_zeros: true,
            chunks,
            ..
        } = w
        else {
            return Ok(None);
        };
        // (No input features: nothing to quantize; the fallback handles it.)
        if !self.rec.ctx.dot4 || *inp == 0 {
            return Ok(None);
        }
        let (out, inp) = (*out, *inp);
        check_linear(x, w, b)?;
        let m = x.rows;
        let y = self.tensor(m, out, "linear_a8 output")?;
        if m == 0 || out == 0 {
            return Ok(Some(y));
        }
        let k = u32_of("linear_a8", inp)?;
        let m32 = u32_of("linear_a8", m)?;
        let out32 = u32_of("linear_a8", out)?;
        // INT8 activations, 4 per word (inp is a multiple of 32), and scales.
        let xq = self.rec.output((m * inp) as u64)?;
        let sx = self.rec.output((m * 4) as u64)?;
        let key = self
            .key("act_quant.wgsl", "act_quant_int8_packed", WG)
            .def("PACKED", 1);
        self.rec.dispatch(
            &key,
            &[(0, x.buf()), (1, xq.get()), (3, sx.get())],
            2,
            &[m32, k],
            m32,
        )?;
        let t = if m == 1 { 1 } else { A8_PREFILL_TOKENS };
        let key = self
            .key("gemv_w4a8.wgsl", "gemv_w4a8", gemv_wg(inp / 32))
            .def("BITS", 4)
            .def("GROUP", u32_of("linear_a8", *group)?)
            .def("T", t as u32)
            .def("BIAS", b.is_some() as u32);
        for c in chunks {
            let n = u32_of("linear_a8", c.rows)?;
            let o0 = u32_of("linear_a8", c.row0)?;
            let mut binds = vec![
                (0, xq.get()),
                (1, &c.q),
                (2, &c.sz),
                (4, y.buf()),
                (6, sx.get()),
            ];
            if let Some(b) = b {
                binds.push((3, b.buf()));
            }
            let groups = c.rows.div_ceil(GEMV_ROWS) * m.div_ceil(t);
            self.rec.dispatch(
                &key,
                &binds,
                5,
                &[m32, k, n, o0, out32],
                u32_of("linear_a8", groups)?,
            )?;
        }
        self.a8_dot4_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(y))
    }

    /// [`crate::backend::search::Search::linear_half`]: the tiled GEMM
    /// (any number of rows) with flag XH, x and `w` (a dense f16 weight)
    /// read as WGSL `f16` where the device has `SHADER_F16` (flag HALF),
    /// else as u32 pairs through `unpack2x16float`.
    pub(super) fn linear_half_impl(
        &self,
        x: &WgpuHalf,
        w: &WgpuWeight,
        b: Option<&WgpuTensor>,
    ) -> Result<WgpuTensor> {
        let WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16: true,
            chunks,
        } = w
        else {
            return Err(shape_err(
                "linear_half",
                "needs an f16 dense weight (weight_to_half)".into(),
            ));
        };
        let (m, out, inp) = (x.rows, *out, *inp);
        let y = self.tensor(m, out, "linear_half output")?;
        if m == 0 || out == 0 {
            return Ok(y);
        }
        let (k, m32) = (u32_of("linear_half", inp)?, u32_of("linear_half", m)?);
        let (out32, ld) = (u32_of("linear_half", out)?, u32_of("linear_half", *ld)?);
        let key = KernelKey::new("gemm.wgsl", "gemm")
            .def("WG", GEMM_WG)
            .def("F16", 1)
            .def("XH", 1)
            .def("HALF", self.rec.ctx.shader_f16 as u32)
            .def("BIAS", b.is_some() as u32);
        for c in chunks {
            let mut binds = vec![(0, x.mem.get()), (1, &c.buf), (4, y.buf())];
            if let Some(b) = b {
                binds.push((3, b.buf()));
            }
            let n = u32_of("linear_half", c.rows)?;
            let o0 = u32_of("linear_half", c.row0)?;
            let groups = m.div_ceil(GEMM_TILE) * c.rows.div_ceil(GEMM_TILE);
            self.rec.dispatch(
                &key,
                &binds,
                5,
                &[m32, k, n, ld, o0, out32],
                u32_of("linear_half", groups)?,
            )?;
        }
        Ok(y)
    }

    pub(super) fn linear_impl(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        b: Option<&WgpuTensor>,
    ) -> Result<WgpuTensor> {
        check_linear(x, w, b)?;
        let (out, inp) = w.shape();
        let m = x.rows;
        let y = self.tensor(m, out, "linear output")?;
        if m == 0 || out == 0 {
            return Ok(y);
        }
        let k = u32_of("linear", inp)?;
        let m32 = u32_of("linear", m)?;
        let out32 = u32_of("linear", out)?;
        let bias = b.is_some() as u32;
        match w {
            WgpuWeight::Dense {
                ld, f16, chunks, ..
            } => {
                for c in chunks {
                    let n = u32_of("linear", c.rows)?;
                    let o0 = u32_of("linear", c.row0)?;
                    let ld = u32_of("linear", *ld)?;
                    let mut binds = vec![(0, x.buf()), (1, &c.buf), (4, y.buf())];
                    if let Some(b) = b {
                        binds.push((3, b.buf()));
                    }
                    if m <= SKINNY_MAX {
                        let key = self
                            .key("gemv.wgsl", "gemv", gemv_wg(inp.div_ceil(8)))
                            .def("MAXM", gemv_maxm(m))
                            .def("F16", *f16 as u32)
                            .def("BIAS", bias);
                        let groups = c.rows.div_ceil(GEMV_ROWS);
                        self.rec.dispatch(
                            &key,
                            &binds,
                            5,
                            &[k, ld, n, o0, m32, out32],
                            u32_of("linear", groups)?,
                        )?;
                    } else {
                        let key = KernelKey::new("gemm.wgsl", "gemm")
                            .def("WG", GEMM_WG)
                            .def("F16", *f16 as u32)
                            .def("BIAS", bias);
                        let groups = m.div_ceil(GEMM_TILE) * c.rows.div_ceil(GEMM_TILE);
                        self.rec.dispatch(
                            &key,
                            &binds,
                            5,
                            &[m32, k, n, ld, o0, out32],
                            u32_of("linear", groups)?,
                        )?;
                    }
                }
            }
            WgpuWeight::Packed {
                bits,
                group,
                chunks,
                ..
            } => {
                let group = u32_of("linear", *group)?;
                for c in chunks {
                    let n = u32_of("linear", c.rows)?;
                    let o0 = u32_of("linear", c.row0)?;
                    let mut binds = vec![(0, x.buf()), (1, &c.q), (2, &c.sz), (4, y.buf())];
                    if let Some(b) = b {
                        binds.push((3, b.buf()));
                    }
                    if m <= SKINNY_MAX {
                        let key = self
                            .key("gemv_packed.wgsl", "gemv_packed", gemv_wg(inp / 32))
                            .def("BITS", *bits)
                            .def("GROUP", group)
                            .def("MAXM", gemv_maxm(m))
                            .def("BIAS", bias);
                        let groups = c.rows.div_ceil(GEMV_ROWS);
                        self.rec.dispatch(
                            &key,
                            &binds,
                            5,
                            &[k, n, o0, m32, out32],
                            u32_of("linear", groups)?,
                        )?;
                    } else {
                        let key = KernelKey::new("gemm.wgsl", "gemm")
                            .def("WG", GEMM_WG)
                            .def("PACKED", 1)
                            .def("BITS", *bits)
                            .def("GROUP", group)
                            .def("BIAS", bias);
                        let groups = m.div_ceil(GEMM_TILE) * c.rows.div_ceil(GEMM_TILE);
                        self.rec.dispatch(
                            &key,
                            &binds,
                            5,
                            &[m32, k, n, 0, o0, out32],
                            u32_of("linear", groups)?,
                        )?;
                    }
                }
            }
        }
        Ok(y)
    }

    pub(super) fn embedding_impl(&self, table: &WgpuWeight, ids: &[u32]) -> Result<WgpuTensor> {
        let (vocab, dim) = table.shape();
        let WgpuWeight::Dense {
            ld, f16, chunks, ..
        } = table
        else {
            return Err(shape_err(
                "embedding",
                "the embedding table must be dense".into(),
            ));
        };
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(shape_err(
                "embedding",
                format!("token id {bad} >= vocabulary size {vocab}"),
            ));
        }
        let y = self.tensor(ids.len(), dim, "embedding output")?;
        if ids.is_empty() || dim == 0 {
            return Ok(y);
        }
        let total = u32_of("embedding", ids.len() * dim)?;
        let id_buf = self.rec.upload(bytemuck::cast_slice(ids), "token ids")?;
        let key = self
            .key("embedding.wgsl", "embedding", WG)
            .def("F16", *f16 as u32);
        for c in chunks {
            let lo = c.row0 as u32;
            let hi = (c.row0 + c.rows) as u32;
            if !ids.iter().any(|&id| id >= lo && id < hi) {
                continue;
            }
            let params = [
                ids.len() as u32,
                dim as u32,
                u32_of("embedding", *ld)?,
                lo,
                c.rows as u32,
            ];
            self.rec.dispatch(
                &key,
                &[(0, &c.buf), (1, &id_buf), (2, y.buf())],
                3,
                &params,
                total.div_ceil(WG),
            )?;
        }
        Ok(y)
    }
}
