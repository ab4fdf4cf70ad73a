//! [`Search`] for wgpu: `fake_quant.wgsl` makes the search's effective
//! weight from the layer's own dense weight on the device (one output
//! chunk per binding-sized run of rows), and `loss.wgsl` reduces a
//! sample's output error to three values.

use super::linear::{rows_per_chunk, DenseChunk};
use super::{err, shape_err, u32_of, Wgpu, WgpuTensor, WgpuWeight, WG};
use crate::backend::search::{Distance, Search};
use crate::error::Result;
use crate::quant::pseudo::FakeQuant;

impl Search for Wgpu {
    fn fake_quant_unchecked(
        &self,
        w: &WgpuWeight,
        s: &WgpuTensor,
        q: FakeQuant,
    ) -> Result<WgpuWeight> {
        let WgpuWeight::Dense {
            out,
            inp,
            ld,
            f16,
            chunks,
        } = w
        else {
            return Err(shape_err(
                "fake_quant",
                "needs a dense weight (an unquantized model), found a packed one".into(),
            ));
        };
        let (out, inp, ld) = (*out, *inp, *ld);
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
            .def("F16", *f16 as u32)
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
        let t = self.tensor(1, 3, "loss_terms")?;
        let squared = (dist == Distance::Squared) as u32;
        let key = self
            .key("loss.wgsl", "loss_rows", WG)
            .def("SQUARED", squared)
            .def("TOTAL", 0);
        self.rec.dispatch(
            &key,
            &[(0, want.buf()), (1, got.buf()), (2, e.buf())],
            3,
            &[rows, cols],
            rows,
        )?;
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
