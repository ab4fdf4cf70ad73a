//! The scale search's device ops ([`Search`]) against the CPU reference:
//! `fake_quant` (the same codes as `quant::pseudo`) and `loss_terms`.

use super::{down, random, rel_err, rng, to_f16, up, Checks, Device};
use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Distance, Search};
use crate::error::Result;
use crate::quant::pseudo::FakeQuant;
use crate::tensor::Tensor;

/// The largest [`rel_err`] of any row (a row's own scale: a code off in a
/// row of small values is not hidden by a row of large ones).
fn row_rel_err(got: &Tensor, want: &Tensor, cols: usize) -> f64 {
    if got.data.len() != want.data.len() {
        return f64::INFINITY;
    }
    got.data
        .chunks(cols.max(1))
        .zip(want.data.chunks(cols.max(1)))
        .map(|(g, w)| rel_err(g, w))
        .fold(0.0, f64::max)
}

/// `w`'s values as the backend holds them after `fake_quant`, `[out, in]`:
/// the product with the identity (each output one weight times 1.0,
/// exact), transposed.
fn read_weight<B: Backend>(g: &B, w: &B::Weight) -> Result<Tensor> {
    let (out, inp) = g.weight_shape(w);
    let mut eye = Tensor::zeros(vec![inp, inp]);
    for i in 0..inp {
        eye.data[i * inp + i] = 1.0;
    }
    let t = down(g, g.linear(&up(g, &eye)?, w, None))?;
    let mut wt = Tensor::zeros(vec![out, inp]);
    for i in 0..inp {
        for o in 0..out {
            wt.data[o * inp + i] = t.data[i * out + o];
        }
    }
    Ok(wt)
}

/// A weight with the rows that reach each branch of the quantizer: two
/// constant rows (with `s` = 1, range 0: the 1e-5 clamp, and at 1000 a
/// quotient `x / scale` beyond f16, rounded to infinity), a row of values
/// about 1e-6
/// (scales and quotients that are f16 subnormals), a row with an outlier,
/// then random rows of varied scale.
fn search_weight(out: usize, inp: usize, seed: u64) -> Tensor {
    let mut r = rng(seed);
    let mut w = random(&mut r, out, inp, 0.05);
    for (i, row) in w.data.chunks_exact_mut(inp).enumerate() {
        match i {
            0 => row.iter_mut().for_each(|v| *v = 0.0123),
            3 => row.iter_mut().for_each(|v| *v = 1000.0),
            1 => row.iter_mut().for_each(|v| *v *= 2e-5),
            2 => row[inp / 3] = 900.0,
            _ => row.iter_mut().for_each(|v| *v *= 1.0 + (i % 7) as f32),
        }
    }
    w
}

/// `fake_quant` of f16-valued and f32-valued weights, every bit width and
/// group size, and W4A8's per-channel INT4, against the CPU.
pub fn fake_quant_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut cases: Vec<(usize, usize, FakeQuant)> = Vec::new();
    for bits in [3, 4, 8] {
        for group_size in [32, 64, 128] {
            cases.push((37, 384, FakeQuant::Group { bits, group_size }));
        }
    }
    cases.push((
        5,
        256,
        FakeQuant::Group {
            bits: 3,
            group_size: 128,
        },
    ));
    cases.push((37, 300, FakeQuant::W4PerChannel));
    cases.push((4, 1, FakeQuant::W4PerChannel));
    fake_quant_cases(c, paths, &cases);
}

/// [`fake_quant_matches_cpu`] on rows narrow enough for a configuration
/// that splits weights across bindings of a few rows (wgpu's "split").
pub fn fake_quant_narrow_rows<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let cases = [
        (
            37,
            128,
            FakeQuant::Group {
                bits: 3,
                group_size: 32,
            },
        ),
        (
            37,
            128,
            FakeQuant::Group {
                bits: 4,
                group_size: 64,
            },
        ),
        (
            37,
            128,
            FakeQuant::Group {
                bits: 8,
                group_size: 128,
            },
        ),
        (9, 96, FakeQuant::W4PerChannel),
    ];
    fake_quant_cases(c, paths, &cases);
}

fn fake_quant_cases<B: Device>(
    c: &mut Checks,
    paths: &[(&str, &B)],
    cases: &[(usize, usize, FakeQuant)],
) {
    let tol = B::TOL.fake_quant as f64;
    for (k, &(out, inp, q)) in cases.iter().enumerate() {
        let w32 = search_weight(out, inp, 40 + k as u64);
        let mut r = rng(90 + k as u64);
        let s_data = (0..inp)
            .map(|_| 0.25 + 3.75 * rand::Rng::random::<f32>(&mut r))
            .collect();
        let random_s = Tensor::new(vec![1, inp], s_data).expect("inp scales");
        let ones = Tensor::new(vec![1, inp], vec![1.0; inp]).expect("inp scales");
        for (kind, w, s) in [
            ("f16", to_f16(&w32), &random_s),
            ("f32", w32.clone(), &random_s),
            ("f16, s = 1", to_f16(&w32), &ones),
        ] {
            let want = Cpu
                .fake_quant(&Cpu.weight(&w).expect("a [out, in] weight"), s, q)
                .and_then(|wq| read_weight(&Cpu, &wq));
            for &(path, g) in paths {
                c.measure(
                    "fake_quant",
                    format!("{path} fake_quant {q:?} {kind} [{out}, {inp}] (row rel. err.)"),
                    tol,
                    || {
                        let want = want
                            .as_ref()
                            .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                        let wq = g.fake_quant(&g.weight(&w)?, &up(g, s)?, q)?;
                        Ok(row_rel_err(&read_weight(g, &wq)?, want, inp))
                    },
                );
            }
        }
    }
}

/// `loss_terms` on odd shapes, with caption and vision rows that overlap
/// and rows in neither, against the CPU's f64 sums.
pub fn loss_terms_match_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.loss_terms as f64;
    let mut r = rng(7);
    for (rows, cols) in [(37, 129), (1, 3584), (300, 65), (2, 1)] {
        let want = random(&mut r, rows, cols, 2.0);
        let noise = random(&mut r, rows, cols, 0.01);
        let mut got = want.clone();
        got.data
            .iter_mut()
            .zip(&noise.data)
            .for_each(|(v, n)| *v += n);
        let masks: Vec<f32> = (0..rows)
            .flat_map(|i| {
                [
                    (i % 3 == 0) as u8 as f32,
                    (i % 3 == 1 || i % 5 == 0) as u8 as f32,
                ]
            })
            .collect();
        let masks = Tensor::new(vec![rows, 2], masks).expect("two flags a row");
        for dist in [Distance::Abs, Distance::Squared] {
            let cpu = Cpu.loss_terms(&want, &got, &masks, dist);
            for &(path, g) in paths {
                c.measure(
                    "loss_terms",
                    format!("{path} loss_terms {dist:?} [{rows}, {cols}] (rel. err. of each sum)"),
                    tol,
                    || {
                        let cpu = cpu
                            .as_ref()
                            .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                        let t = down(
                            g,
                            g.loss_terms(&up(g, &want)?, &up(g, &got)?, &up(g, &masks)?, dist),
                        )?;
                        if t.shape != [1, 3] {
                            return Err(crate::error::Error::invalid(format!(
                                "shape {:?}, want [1, 3]",
                                t.shape
                            )));
                        }
                        Ok(t.data
                            .iter()
                            .zip(&cpu.data)
                            .map(|(a, b)| ((a - b).abs() / b.abs().max(1e-30)) as f64)
                            .fold(0.0, f64::max))
                    },
                );
            }
        }
    }
}
