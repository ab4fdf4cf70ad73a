//! [`Search`] for wgpu: `fake_quant.wgsl` makes the search's effective
//! weight from the layer's own dense weight on the device (one output
//! chunk per binding-sized run of rows), and `loss.wgsl` reduces a
//! sample's output error to three values (and, with flag GOT off, a
//! sample's |x| to `abs_terms`'s three sums). `stats.wgsl` adds a sample's
//! per-column |x| sums (compensated) and maxima to the running statistics.
//! `half.wgsl` rounds an activation to f16 (two values a word) and expands
//! it back, and rounds a weight to f16 for `linear_half` (`gemm.wgsl` with
//! flag XH: f16 operands, f32 sums).

use super::linear::{rows_per_chunk, DenseChunk, DenseParts};
use super::{err, u32_of, Wgpu, WgpuHalf, WgpuTensor, WgpuWeight, WG};
use crate::backend::search::{Distance, Search};
use crate::error::Result;
use crate::quant::pseudo::FakeQuant;

/// Threads of stats.wgsl's workgroups (one column each): small, so that a
/// few thousand columns still spread over many workgroups.
const STATS_WG: u32 = 64;

impl Search for Wgpu {
    type Half = WgpuHalf;

    fn to_half(&self, x: &WgpuTensor) -> Result<WgpuHalf> {
        let n = x.numel();
        let words = n.div_ceil(2);
        let h = WgpuHalf {
            mem: self.rec.output((words.max(1) * 4) as u64)?,
            rows: x.rows,
            cols: x.cols,
        };
        let groups = u32_of("to_half", words)?.div_ceil(WG);
        let key = self.key("half.wgsl", "to_half", WG);
        let params = [u32_of("to_half", n)?];
        self.rec
            .dispatch(&key, &[(0, x.buf()), (2, h.mem.get())], 3, &params, groups)?;
        Ok(h)
    }

    fn half_to_f32(&self, h: &WgpuHalf) -> Result<WgpuTensor> {
        let y = self.tensor(h.rows, h.cols, "half_to_f32")?;
        let n = h.rows * h.cols;
        let groups = u32_of("half_to_f32", n)?.div_ceil(WG);
        let key = self.key("half.wgsl", "half_to_f32", WG);
        let params = [u32_of("half_to_f32", n)?];
        self.rec
            .dispatch(&key, &[(0, h.mem.get()), (2, y.buf())], 3, &params, groups)?;
        Ok(y)
    }

    fn half_dims(&self, h: &WgpuHalf) -> (usize, usize) {
        (h.rows, h.cols)
    }

    /// half.wgsl's `to_half` over each chunk's padded rows (`ld` is even:
    /// a row's words never straddle two rows); an f16 weight's chunks are
    /// shared, not copied.
    fn weight_to_half(&self, w: &WgpuWeight) -> Result<WgpuWeight> {
        let DenseParts {
            out,
            inp,
            ld,
            f16,
            chunks,
        } = w.dense_parts("weight_to_half")?;
        let key = self.key("half.wgsl", "to_half", WG);
        let mut halves = Vec::with_capacity(chunks.len());
        for c in chunks {
            let buf = if f16 {
                c.buf.clone()
            } else {
                let n = c.rows * ld;
                let label = format!(
                    "weight_to_half [{out}, {inp}] rows {}..{}",
                    c.row0,
                    c.row0 + c.rows
                );
                let buf = self.rec.buffer((n * 2) as u64, &label)?;
                let params = [u32_of("weight_to_half", n)?];
                let groups = u32_of("weight_to_half", n / 2)?.div_ceil(WG);
                self.rec
                    .dispatch(&key, &[(0, &c.buf), (2, &buf)], 3, &params, groups)?;
                buf
            };
            halves.push(DenseChunk {
                row0: c.row0,
                rows: c.rows,
                buf,
            });
        }
        Ok(WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16: true,
            chunks: halves,
        })
    }

    fn linear_half_unchecked(
        &self,
        x: &WgpuHalf,
        w: &WgpuWeight,
        b: Option<&WgpuTensor>,
    ) -> Result<WgpuTensor> {
        self.linear_half_impl(x, w, b)
    }

    fn fake_quant_unchecked(
        &self,
        w: &WgpuWeight,
        s: &WgpuTensor,
        q: FakeQuant,
    ) -> Result<WgpuWeight> {
        let DenseParts {
            out,
            inp,
            ld,
            f16,
            chunks,
        } = w.dense_parts("fake_quant")?;
        let (group, maxq, sym) = match q {
            FakeQuant::Group { bits, group_size } => (group_size, (1u32 << bits) - 1, false),
            FakeQuant::W4PerChannel => (inp, 7, true),
        };
        if group == 0 || inp % group != 0 {
            return Err(err(format!(
                "fake_quant: group {group} does not divide {inp} inputs"
            )));
        }
        let key = self
            .key("fake_quant.wgsl", "fake_quant", WG)
            .def("F16", f16 as u32)
            .def("SYM", sym as u32);
        let per = rows_per_chunk(
            "fake_quant output",
            (ld * 4) as u64,
            self.rec.ctx.max_binding,
        )?;
        let mut outs = Vec::new();
        for c in chunks {
            for r0 in (0..c.rows).step_by(per) {
                let rows = per.min(c.rows - r0);
                let label = format!(
                    "fake_quant [{out}, {inp}] rows {}..{}",
                    c.row0 + r0,
                    c.row0 + r0 + rows
                );
                let buf = self.rec.buffer((rows * ld * 4) as u64, &label)?;
                let threads = u32_of("fake_quant", rows * (inp / group))?;
                let params = [
                    u32_of("fake_quant", rows)?,
                    u32_of("fake_quant", inp)?,
                    u32_of("fake_quant", ld)?,
                    u32_of("fake_quant", r0)?,
                    u32_of("fake_quant", group)?,
                    maxq,
                ];
                self.rec.dispatch(
                    &key,
                    &[(0, &c.buf), (1, s.buf()), (2, &buf)],
                    3,
                    &params,
                    threads.div_ceil(WG),
                )?;
                outs.push(DenseChunk {
                    row0: c.row0 + r0,
                    rows,
                    buf,
                });
            }
        }
        Ok(WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16: false,
            chunks: outs,
        })
    }

    fn loss_terms_unchecked(
        &self,
        want: &WgpuTensor,
        got: &WgpuTensor,
        masks: &WgpuTensor,
        dist: Distance,
    ) -> Result<WgpuTensor> {
        let rows = u32_of("loss_terms", want.rows)?;
        let cols = u32_of("loss_terms", want.cols)?;
        let e = self.tensor(want.rows, 1, "loss_terms rows")?;
        let squared = (dist == Distance::Squared) as u32;
        let key = self
            .key("loss.wgsl", "loss_rows", WG)
            .def("SQUARED", squared)
            .def("GOT", 1)
            .def("TOTAL", 0);
        self.rec.dispatch(
            &key,
            &[(0, want.buf()), (1, got.buf()), (2, e.buf())],
            3,
            &[rows, cols],
            rows,
        )?;
        self.masked_total(&e, masks, rows, cols, "loss_terms")
    }

    fn abs_col_stats_unchecked(
        &self,
        x: &WgpuTensor,
        acc: Option<&WgpuTensor>,
    ) -> Result<WgpuTensor> {
        let rows = u32_of("abs_col_stats", x.rows)?;
        let cols = u32_of("abs_col_stats", x.cols)?;
        let out = self.tensor(3, x.cols, "abs_col_stats")?;
        let key = self
            .key("stats.wgsl", "abs_col_stats", STATS_WG)
            .def("ACC", acc.is_some() as u32);
        // p.one = 1.0, opaque to the compiler (see stats.wgsl).
        let params = [rows, cols, 1.0f32.to_bits()];
        match acc {
            Some(a) => self.rec.dispatch(
                &key,
                &[(0, x.buf()), (1, a.buf()), (2, out.buf())],
                3,
                &params,
                cols.div_ceil(STATS_WG),
            )?,
            None => self.rec.dispatch(
                &key,
                &[(0, x.buf()), (2, out.buf())],
                3,
                &params,
                cols.div_ceil(STATS_WG),
            )?,
        }
        Ok(out)
    }

    fn abs_terms_unchecked(&self, x: &WgpuTensor, masks: &WgpuTensor) -> Result<WgpuTensor> {
        let rows = u32_of("abs_terms", x.rows)?;
        let cols = u32_of("abs_terms", x.cols)?;
        let e = self.tensor(x.rows, 1, "abs_terms rows")?;
        let key = self
            .key("loss.wgsl", "loss_rows", WG)
            .def("SQUARED", 0)
            .def("GOT", 0)
            .def("TOTAL", 0);
        self.rec
            .dispatch(&key, &[(0, x.buf()), (2, e.buf())], 3, &[rows, cols], rows)?;
        self.masked_total(&e, masks, rows, cols, "abs_terms")
    }
}

impl Wgpu {
    /// The caption, vision and all-row sums `[1, 3]` of the per-row
    /// values `e` (`[rows, 1]`, `loss.wgsl`'s `loss_rows`) under the
    /// `[rows, 2]` masks: the last step of `loss_terms` and `abs_terms`.
    fn masked_total(
        &self,
        e: &WgpuTensor,
        masks: &WgpuTensor,
        rows: u32,
        cols: u32,
        what: &str,
    ) -> Result<WgpuTensor> {
        let t = self.tensor(1, 3, what)?;
        let key = self.key("loss.wgsl", "loss_total", WG).def("TOTAL", 1);
        self.rec.dispatch(
            &key,
            &[(0, e.buf()), (1, masks.buf()), (2, t.buf())],
            3,
            &[rows, cols],
            1,
        )?;
        Ok(t)
    }
}
