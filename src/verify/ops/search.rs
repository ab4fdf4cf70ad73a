//! The scale search's device ops ([`Search`]) against the CPU reference:
//! `fake_quant` (the same codes as `quant::pseudo`), `loss_terms`, the
//! activation statistics `abs_col_stats` and `abs_terms`, and the f16
//! conversion of kept activations (`to_half`, `half_to_f32`).

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

/// `[rows, cols]` of values whose magnitudes span 1e-3..1e4: in each
/// column one big value (about 1e4, at a row that moves with the column)
/// among values of 1e-3..1, either sign, so that an f32 sum that is not
/// compensated loses the small ones (measurably: see the case names), and
/// every 17th column zero.
fn varied(r: &mut rand::rngs::StdRng, rows: usize, cols: usize, seed: usize) -> Tensor {
    use rand::Rng;
    let mut data = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            let sign = if r.random::<bool>() { 1.0 } else { -1.0 };
            let v = if j % 17 == 5 {
                0.0
            } else if (j * 7 + seed) % rows.max(1) == i {
                1e4 * (1.0 + r.random::<f32>())
            } else {
                10f32.powf(-3.0 + 3.0 * r.random::<f32>())
            };
            data.push(sign * v);
        }
    }
    Tensor::new(vec![rows, cols], data).expect("rows * cols values")
}

/// The largest error of the sums (`hi + lo` as f64) of a `[3, cols]`
/// result, each relative to the reference's column.
fn col_sum_err(got: &Tensor, want: &Tensor, cols: usize) -> f64 {
    if got.data.len() != 3 * cols || want.data.len() != 3 * cols {
        return f64::INFINITY;
    }
    let sum = |t: &Tensor, c: usize| t.data[c] as f64 + t.data[cols + c] as f64;
    (0..cols)
        .map(|c| {
            let (g, w) = (sum(got, c), sum(want, c));
            (g - w).abs() / w.abs().max(1e-30)
        })
        .fold(0.0, f64::max)
}

/// The largest error of each column's plain f32 sum in row order (no
/// compensation), relative to the f64 sum: what the cases would show
/// without the compensation.
fn naive_f32_err(samples: &[Tensor], cols: usize) -> f64 {
    let mut s32 = vec![0.0f32; cols];
    let mut s64 = vec![0.0f64; cols];
    for x in samples {
        for row in x.data.chunks_exact(cols) {
            for c in 0..cols {
                s32[c] += row[c].abs();
                s64[c] += row[c].abs() as f64;
            }
        }
    }
    s32.iter()
        .zip(&s64)
        .map(|(&a, &b)| (a as f64 - b).abs() / b.max(1e-30))
        .fold(0.0, f64::max)
}

/// `abs_col_stats` on odd shapes (columns not a multiple of a workgroup,
/// 1 to 1000 rows), values of widely varied magnitude, and samples
/// chained through `acc` (each step compared): the sums (`hi + lo`)
/// relative to the CPU's f64 per column, the maxima exactly.
pub fn abs_col_stats_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.abs_col_stats as f64;
    let mut r = rng(11);
    // (cols, rows of each sample, one after another)
    let cases: [(usize, &[usize]); 6] = [
        (1, &[1]),
        (129, &[37]),
        (65, &[1000, 3, 517]),
        (3000, &[300, 211]),
        (1031, &[999]),
        (257, &[1, 700, 64]),
    ];
    for (k, &(cols, samples)) in cases.iter().enumerate() {
        let xs: Vec<Tensor> = samples
            .iter()
            .enumerate()
            .map(|(i, &rows)| varied(&mut r, rows, cols, k + 3 * i))
            .collect();
        let naive = naive_f32_err(&xs, cols);
        let mut cpu: Vec<Result<Tensor>> = Vec::new();
        for x in &xs {
            let acc = match cpu.last() {
                Some(Ok(a)) => Some(a),
                _ => None,
            };
            let next = Cpu.abs_col_stats(x, acc);
            cpu.push(next);
        }
        for &(path, g) in paths {
            let got: Result<Vec<Tensor>> = (|| {
                let mut acc: Option<B::Tensor> = None;
                let mut out = Vec::new();
                for x in &xs {
                    let t = g.abs_col_stats(&up(g, x)?, acc.as_ref())?;
                    out.push(g.download(&t)?);
                    acc = Some(t);
                }
                Ok(out)
            })();
            for (i, x) in xs.iter().enumerate() {
                let name = format!(
                    "{path} abs_col_stats [{}, {cols}] sample {} of {}",
                    x.rows(),
                    i + 1,
                    xs.len()
                );
                let pair = |i: usize| -> Result<(&Tensor, &Tensor)> {
                    let want = cpu[i]
                        .as_ref()
                        .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                    let got = got
                        .as_ref()
                        .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                    if got[i].shape != [3, cols] {
                        return Err(crate::error::Error::invalid(format!(
                            "shape {:?}, want [3, {cols}]",
                            got[i].shape
                        )));
                    }
                    Ok((&got[i], want))
                };
                c.measure(
                    "abs_col_stats",
                    format!(
                        "{name} sum (col. rel. err. of hi + lo; f32 without compensation \
                         {naive:.1e})"
                    ),
                    tol,
                    || pair(i).map(|(g, w)| col_sum_err(g, w, cols)),
                );
                c.measure("abs_col_stats", format!("{name} max (exact)"), 0.0, || {
                    pair(i).map(|(g, w)| rel_err(&g.data[2 * cols..], &w.data[2 * cols..]))
                });
            }
        }
    }
    for &(path, g) in paths {
        c.expect(
            "abs_col_stats",
            format!("{path} abs_col_stats [4, 5] with acc [3, 6]"),
            || {
                let x = up(g, &Tensor::zeros(vec![4, 5])).map_err(|e| e.to_string())?;
                let a = up(g, &Tensor::zeros(vec![3, 6])).map_err(|e| e.to_string())?;
                super::is_invalid(g.abs_col_stats(&x, Some(&a)))
            },
        );
    }
}

/// `abs_terms` on odd shapes, values of widely varied magnitude, with
/// caption and vision rows that overlap, rows in neither, and masks with
/// no caption or no vision rows, against the CPU's f64 sums.
pub fn abs_terms_match_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.abs_terms as f64;
    let mut r = rng(12);
    // (rows, cols, masks: 0 overlapping, 1 no caption, 2 no vision)
    let cases = [
        (37, 129, 0),
        (1, 3584, 0),
        (300, 65, 1),
        (2, 1, 2),
        (1000, 17, 0),
        (513, 700, 2),
    ];
    for (k, &(rows, cols, kind)) in cases.iter().enumerate() {
        let x = varied(&mut r, rows, cols, k);
        let masks: Vec<f32> = (0..rows)
            .flat_map(|i| {
                let cap = kind != 1 && i % 3 == 0;
                let vis = kind != 2 && (i % 3 == 1 || i % 5 == 0);
                [cap as u8 as f32, vis as u8 as f32]
            })
            .collect();
        let masks = Tensor::new(vec![rows, 2], masks).expect("two flags a row");
        let what = ["", ", no caption rows", ", no vision rows"][kind];
        let cpu = Cpu.abs_terms(&x, &masks);
        for &(path, g) in paths {
            c.measure(
                "abs_terms",
                format!("{path} abs_terms [{rows}, {cols}]{what} (rel. err. of each sum)"),
                tol,
                || {
                    let cpu = cpu
                        .as_ref()
                        .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                    let t = down(g, g.abs_terms(&up(g, &x)?, &up(g, &masks)?))?;
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
    for &(path, g) in paths {
        c.expect(
            "abs_terms",
            format!("{path} abs_terms [4, 5] with masks [3, 2]"),
            || {
                let x = up(g, &Tensor::zeros(vec![4, 5])).map_err(|e| e.to_string())?;
                let m = up(g, &Tensor::zeros(vec![3, 2])).map_err(|e| e.to_string())?;
                super::is_invalid(g.abs_terms(&x, &m))
            },
        );
    }
}

/// Values for the f16 conversion: every exponent from f16's subnormals
/// (2^-28) to past its range (2^17, saturated), both signs, with the exact
/// midpoints between neighbouring f16 values (ties, to even) among them.
fn half_values(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|i| {
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            match i % 5 {
                // The midpoint of an f16 and the next one up: (2m + 1) 2^(e-11).
                0 => {
                    let m = 1024 + r.random_range(0..1023i32);
                    sign * (2 * m + 1) as f32 * 2f32.powi(r.random_range(-14..15) - 11)
                }
                _ => sign * r.random::<f32>() * 2f32.powi(r.random_range(-28..18)),
            }
        })
        .collect()
}

/// `to_half` then `half_to_f32` on the device against the CPU's conversion,
/// bit for bit, on shapes with an odd number of values (a half-used last
/// word) and values over f16's whole range, ties and overflow included.
pub fn half_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.half as f64;
    let mut r = rng(21);
    for (rows, cols) in [(37, 129), (1, 1), (3, 3584), (257, 65)] {
        let x = Tensor::new(vec![rows, cols], half_values(&mut r, rows * cols))
            .expect("rows * cols values");
        let cpu = Cpu.to_half(&x).and_then(|h| Cpu.half_to_f32(&h));
        for &(path, g) in paths {
            c.measure(
                "half",
                format!("{path} to_half, half_to_f32 [{rows}, {cols}] (values not bit-equal)"),
                tol,
                || {
                    let cpu = cpu
                        .as_ref()
                        .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                    let h = g.to_half(&up(g, &x)?)?;
                    let t = down(g, g.half_to_f32(&h))?;
                    if t.shape != cpu.shape {
                        return Err(crate::error::Error::invalid(format!(
                            "shape {:?}, want {:?}",
                            t.shape, cpu.shape
                        )));
                    }
                    Ok(t.data
                        .iter()
                        .zip(&cpu.data)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count() as f64)
                },
            );
        }
    }
}

/// `weight_to_half` then `linear_half` on the device against the CPU's
/// (both operands rounded to f16, exact products, f32 sums: only the order
/// of the sums differs, so the `linear` tolerance): an odd number of
/// inputs (an f16 pair of x straddling two rows), a single row (no GEMV
/// path) and more than one GEMM tile, with and without a bias; the weight
/// is f32 on the device first (as `fake_quant` makes it) or an f16
/// model's own. The device's f16 weight must be stored as f16, and an f32
/// weight must be refused.
pub fn linear_half_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.linear as f64;
    let cases = [
        (37, 70, 129, true, false),
        (1, 5, 3, false, false),
        (130, 67, 96, true, true),
        (9, 300, 257, false, true),
    ];
    for (k, &(rows, out, inp, bias, f16_model)) in cases.iter().enumerate() {
        let mut r = rng(60 + k as u64);
        let x = random(&mut r, rows, inp, 2.0);
        let mut w = random(&mut r, out, inp, 0.5);
        if f16_model {
            w = to_f16(&w);
        }
        let b = random(&mut r, 1, out, 0.5);
        let want = Cpu.weight(&w).and_then(|cw| {
            let hw = Cpu.weight_to_half(&cw)?;
            Cpu.linear_half(&Cpu.to_half(&x)?, &hw, bias.then_some(&b))
        });
        for &(path, g) in paths {
            let case = format!(
                "{path} weight_to_half, linear_half rows {rows} [{out}, {inp}] bias {bias} \
                 weight {}",
                if f16_model { "f16" } else { "f32" }
            );
            c.measure("linear_half", case.clone(), tol, || {
                let want = want
                    .as_ref()
                    .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
                let hw = g.weight_to_half(&g.weight(&w)?)?;
                if !B::weight_is_f16(&hw) {
                    return Err(crate::error::Error::invalid(
                        "weight_to_half made a weight not stored as f16",
                    ));
                }
                let gb = up(g, &b)?;
                let got = down(
                    g,
                    g.linear_half(&g.to_half(&up(g, &x)?)?, &hw, bias.then_some(&gb)),
                )?;
                super::close(&got, want)
            });
            if k == 0 {
                c.expect(
                    "linear_half",
                    format!("{path} linear_half refuses an f32 weight"),
                    || {
                        let w32 = g.weight(&w).map_err(|e| e.to_string())?;
                        let xh = g.to_half(&up(g, &x).map_err(|e| e.to_string())?);
                        super::is_invalid(g.linear_half(
                            &xh.map_err(|e| e.to_string())?,
                            &w32,
                            None,
                        ))
                    },
                );
            }
        }
    }
}
