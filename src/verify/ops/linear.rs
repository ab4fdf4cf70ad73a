//! Dense, packed and W4A8 products (GEMV and GEMM paths, split bindings)
//! and the INT8 activation quantization against the CPU.

use super::*;

/// `x [rows, inp] . w^T (+ b)` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_dense<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    f16: bool,
    bias: bool,
    seed: u64,
) {
    let mut r = rng(seed);
    let x = random(&mut r, rows, inp, 1.0);
    let mut w = random(&mut r, out, inp, 0.5);
    if f16 {
        w = to_f16(&w);
    }
    let b = random(&mut r, 1, out, 0.5);
    let kind = if rows <= B::GEMV_MAX_ROWS {
        "GEMV"
    } else {
        "GEMM"
    };
    let dtype = if f16 { "f16" } else { "f32" };
    c.measure(
        "linear_dense",
        format!("{label} dense {dtype} {kind} rows {rows} [{out}, {inp}] bias {bias}"),
        B::TOL.linear as f64,
        || {
            let gw = g.weight(&w)?;
            if B::weight_is_f16(&gw) != f16 {
                return Err(Error::invalid(format!(
                    "stored as f16 {}, expected {f16}",
                    B::weight_is_f16(&gw)
                )));
            }
            let gb = up(g, &b)?;
            let got = down(g, g.linear(&up(g, &x)?, &gw, bias.then_some(&gb)))?;
            let want = Cpu.linear(&x, &Cpu.weight(&w)?, bias.then_some(&b))?;
            close(&got, &want)
        },
    );
}

pub fn linear_dense_gemv_and_gemm<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for f16 in [false, true] {
            // GEMV at 64, 128 and 256 threads (k / 8 = 6, 75, 263 blocks;
            // CUDA's vector and scalar paths: in % 8), several tokens at
            // once (the skinny GEMV: 2, 3, 5, 8 rows, outputs not a
            // multiple of 4), the last GEMV row count and one more, then
            // GEMMs of one and several tiles.
            for &(rows, out, inp) in &[
                (1, 37, 45),
                (1, 131, 600),
                (1, 13, 2100),
                (2, 37, 45),
                (3, 131, 600),
                (5, 13, 2100),
                (8, 37, 45),
                (9, 131, 600),
                (m, 37, 48),
                (m + 1, 37, 45),
                (7, 37, 45),
                (70, 131, 83),
            ] {
                for bias in [false, true] {
                    check_dense(c, path, g, rows, out, inp, f16, bias, 10 + rows as u64);
                }
            }
        }
    }
}

/// A packed linear `[out, inp]` at `bits` / `group` on `g` vs the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_packed<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    bits: u32,
    group: usize,
    bias: bool,
) {
    let mut r = rng(100 + bits as u64 * 7 + group as u64 + rows as u64);
    let x = random(&mut r, rows, inp, 1.0);
    let w = random(&mut r, out, inp, 0.5);
    let b = random(&mut r, 1, out, 0.5);
    let kind = if rows <= B::GEMV_MAX_ROWS {
        "GEMV"
    } else {
        "GEMM"
    };
    c.measure(
        "linear_packed",
        format!("{label} packed W{bits} g{group} {kind} rows {rows} [{out}, {inp}] bias {bias}"),
        B::TOL.linear as f64,
        || {
            let p = quantize_linear("w", &w.data, out, inp, bits, group)?;
            let gw = g.packed_weight(&p)?;
            if !B::weight_is_packed(&gw) {
                return Err(Error::invalid("the weight was not kept packed"));
            }
            let gb = up(g, &b)?;
            let got = down(g, g.linear(&up(g, &x)?, &gw, bias.then_some(&gb)))?;
            let want = Cpu.linear(&x, &Cpu.packed_weight(&p)?, bias.then_some(&b))?;
            close(&got, &want)
        },
    );
}

/// The packed GEMV at W3 / W4 / W8 in groups of 32 / 64 / 128, at one row,
/// several rows at once (2, 3, 5, 8: the skinny GEMV, outputs not a
/// multiple of 4), the last GEMV row count and one more (the GEMM), then
/// at 128 and 256 threads (k / 32 = 80 and 384 blocks).
pub fn packed_gemv_every_format<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(c, path, g, 1, 37, 384, bits, group, group == 64);
                check_packed(c, path, g, 2, 37, 384, bits, group, group != 64);
                check_packed(c, path, g, 3, 13, 640, bits, group, group == 32);
                check_packed(c, path, g, 5, 37, 384, bits, group, group != 32);
                check_packed(c, path, g, 8, 21, 384, bits, group, group == 128);
                check_packed(c, path, g, m, 9, 1152, bits, group, group != 64);
                check_packed(c, path, g, m + 1, 45, 384, bits, group, group == 64);
            }
        }
        check_packed(c, path, g, 1, 21, 2560, 3, 128, true);
        check_packed(c, path, g, 1, 13, 12288, 4, 64, false);
        check_packed(c, path, g, 6, 21, 2560, 3, 128, true);
        check_packed(c, path, g, 3, 13, 12288, 4, 64, false);
    }
}

/// The packed prefill GEMM at every format (just past the GEMV's rows, and
/// 17), then several tiles in both directions.
pub fn packed_prefill_every_format<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let m = B::GEMV_MAX_ROWS;
    for &(path, g) in paths {
        for bits in [3, 4, 8] {
            for group in [32, 64, 128] {
                check_packed(c, path, g, m + 1, 37, 384, bits, group, group == 32);
                check_packed(c, path, g, 17, 37, 384, bits, group, group != 32);
            }
        }
        check_packed(c, path, g, 67, 131, 256, 3, 128, true);
    }
}

/// Per-token INT8 fake quantization against the CPU, with a zero row and
/// values exactly on .5 boundaries of a row's grid. The measured error is
/// the fraction of values one quantization step off; a value further off
/// (beyond `act_quant_same` and one step) fails the case.
pub fn act_quant_int8_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL;
    let mut r = rng(11);
    for (rows, cols, scale) in [(7, 129, 3.0), (1, 300, 0.02), (33, 45, 40.0), (3, 1, 1.0)] {
        let mut x = random(&mut r, rows, cols, scale);
        if rows > 2 {
            x.data[cols..2 * cols].iter_mut().for_each(|v| *v = 0.0);
            let row = &mut x.data[2 * cols..3 * cols];
            row[0] = 127.0;
            for (i, v) in row.iter_mut().enumerate().skip(1) {
                *v = ((i % 50) as f32 - 25.0) + 0.5;
            }
        }
        for &(path, g) in paths {
            c.measure(
                "quant_act_int8",
                format!("{path} quant_act_int8 [{rows}, {cols}] (fraction one step off)"),
                tol.act_quant_max_step_fraction,
                || {
                    let want = Cpu.quant_act_int8(&x)?;
                    let got = down(g, g.quant_act_int8(&up(g, &x)?))?;
                    if got.shape != want.shape {
                        return Err(Error::invalid(format!(
                            "shape {:?}, the CPU's {:?}",
                            got.shape, want.shape
                        )));
                    }
                    let mut steps = 0usize;
                    for (ri, (gr, wr)) in got
                        .data
                        .chunks(cols)
                        .zip(want.data.chunks(cols))
                        .enumerate()
                    {
                        let xr = &x.data[ri * cols..(ri + 1) * cols];
                        let max = xr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let step = max.max(1e-5) / 127.0;
                        for (i, (a, b)) in gr.iter().zip(wr).enumerate() {
                            let d = (a - b).abs();
                            if d <= tol.act_quant_same * max {
                                continue;
                            }
                            if d.is_nan() || d > step * (1.0 + 1e-5) {
                                return Err(Error::invalid(format!(
                                    "at [{ri}, {i}]: x {} device {a} cpu {b} (step {step})",
                                    xr[i]
                                )));
                            }
                            steps += 1;
                        }
                    }
                    Ok(steps as f64 / (rows * cols) as f64)
                },
            );
        }
    }
}

/// Zero points of a random W4A8-style packed weight.
#[derive(Clone, Copy, Debug)]
pub enum Zeros {
    /// 8 everywhere, as `quant::w4a8` writes.
    Eight,
    /// A random integer in 0..=15 per group (asymmetric RTN-style).
    Random,
    /// 7.5: not an integer, so an integer path must not take it.
    Half,
}

/// A 4-bit packed `[out, inp]` with random codes, random per-group f16
/// scales (spanning 0.002..0.05) and `zeros`.
pub fn w4_random(
    seed: u64,
    out: usize,
    inp: usize,
    group: usize,
    zeros: Zeros,
) -> Result<PackedLinear> {
    let mut r = rng(seed);
    let codes: Vec<u8> = (0..out * inp).map(|_| r.random_range(0..16u8)).collect();
    let mut sz = Vec::with_capacity(out * inp / group * 2);
    for _ in 0..out * inp / group {
        sz.push(half::f16::from_f32(r.random_range(0.002f32..0.05)));
        sz.push(half::f16::from_f32(match zeros {
            Zeros::Eight => 8.0,
            Zeros::Random => r.random_range(0..16u8) as f32,
            Zeros::Half => 7.5,
        }));
    }
    PackedLinear::from_codes("w4a8", out, inp, 4, group, &codes, sz)
}

/// `linear_a8` of `x` by `p` on `g` against the CPU reference (fake-quantized
/// INT8 activations, then the packed f32 product), recorded as one
/// `linear_a8` check; returns whether an integer path ran
/// ([`Device::integer_a8_linears`] moved). `integer`: whether it must
/// (`None`: no expectation).
pub fn check_linear_a8<B: Device>(
    c: &mut Checks,
    what: &str,
    g: &B,
    x: &Tensor,
    p: &PackedLinear,
    b: Option<&Tensor>,
    integer: Option<bool>,
) -> bool {
    let tol = B::TOL;
    let mut ran = false;
    let mut note = String::new();
    let before = g.integer_a8_linears();
    let mut measured = || -> Result<(f64, f64)> {
        let gw = g.packed_weight(p)?;
        let gb = b.map(|b| up(g, b)).transpose()?;
        let got = down(g, g.linear_a8(&up(g, x)?, &gw, gb.as_ref()))?;
        ran = g.integer_a8_linears() > before;
        let cw = Cpu.packed_weight(p)?;
        // The fake-quant path is the float packed product (zero point
        // folded per block: more rounding, `linear`).
        let tol = if ran { tol.w4a8_int } else { tol.linear } as f64;
        // The reference on the device's own INT8 grid (the same
        // quantization as the integer path): equal to the CPU's unless the
        // device divides less exactly (see `act_quant_same`); then a value
        // may sit one step off.
        let gq = down(g, g.quant_act_int8(&up(g, x)?))?;
        let cq = Cpu.quant_act_int8(x)?;
        if gq.data == cq.data {
            Ok((close(&got, &Cpu.linear_a8(x, &cw, b)?)?, tol))
        } else {
            let off = gq.data.iter().zip(&cq.data).filter(|(a, b)| a != b).count();
            note = format!(
                "{off} INT8 activations differ from the CPU's; compared on the device's grid"
            );
            Ok((close(&got, &Cpu.linear(&gq, &cw, b)?)?, tol))
        }
    };
    let r = measured();
    let path = if ran { "integer" } else { "fake-quant" };
    let case = format!("{what} ({path})");
    match r {
        Ok((e, t)) => {
            let mut note = note;
            let mut ok = e <= t;
            if let Some(want) = integer {
                if want != ran {
                    ok = false;
                    note = format!("the integer path ran {ran}, expected {want}");
                }
            }
            c.results.push(OpCheck {
                family: "linear_a8",
                case,
                err: Some(e),
                tol: t,
                ok,
                note,
            });
        }
        Err(e) => c.error("linear_a8", case, e),
    }
    ran
}

/// One W4A8 case: a [`w4_random`] weight, activations with an outlier per
/// row (as LLM activations have); returns whether an integer path ran.
#[allow(clippy::too_many_arguments)]
pub fn check_w4a8<B: Device>(
    c: &mut Checks,
    label: &str,
    g: &B,
    rows: usize,
    out: usize,
    inp: usize,
    group: usize,
    zeros: Zeros,
    bias: bool,
    integer: Option<bool>,
) -> bool {
    let seed = (rows * 1000 + out * 7 + inp * 3 + group) as u64;
    let what =
        format!("{label} W4A8 rows {rows} [{out}, {inp}] g{group} zeros {zeros:?} bias {bias}");
    let p = match w4_random(seed, out, inp, group, zeros) {
        Ok(p) => p,
        Err(e) => {
            c.error("linear_a8", what, e);
            return false;
        }
    };
    let mut r = rng(seed + 1);
    let mut x = random(&mut r, rows, inp, 2.0);
    for row in x.data.chunks_mut(inp) {
        row[(seed as usize) % inp] = 30.0;
    }
    let b = random(&mut r, 1, out, 0.5);
    check_linear_a8(c, &what, g, &x, &p, bias.then_some(&b), integer)
}

/// W4A8 (`linear_a8`) against the CPU on GEMV and prefill shapes, every
/// group size, zero kind and bias. `paths` name, with each backend,
/// whether its integer path must run on integer zero points (never on
/// non-integer ones).
pub fn w4a8_matches_cpu<B: Device>(c: &mut Checks, paths: &[(&str, &B, bool)]) {
    for &(path, g, integer) in paths {
        let want = Some(integer);
        for rows in [1, 3, 7] {
            for (ii, inp) in [128, 384, 2560].into_iter().enumerate() {
                for (oi, out) in [1, 67, 300].into_iter().enumerate() {
                    let group = [32, 64, 128][(rows + ii + oi) % 3];
                    let zeros = [Zeros::Eight, Zeros::Random][(ii + oi) % 2];
                    let bias = (rows + oi) % 2 == 0;
                    check_w4a8(c, path, g, rows, out, inp, group, zeros, bias, want);
                }
            }
        }
        // Every group size, zero kind and bias on one shape.
        for group in [32, 64, 128] {
            for zeros in [Zeros::Eight, Zeros::Random] {
                for bias in [false, true] {
                    for rows in [1, 5] {
                        check_w4a8(c, path, g, rows, 67, 384, group, zeros, bias, want);
                    }
                }
            }
        }
        // Non-integer zero points: never the integer path, still correct.
        check_w4a8(c, path, g, 3, 67, 384, 64, Zeros::Half, true, Some(false));
        // Several token tiles of a prefill kernel (T = 4) and row blocks.
        check_w4a8(c, path, g, 19, 131, 256, 128, Zeros::Random, true, want);
        // An RTN-quantized weight (`quantize_linear`, W4 g128).
        let mut r = rng(12);
        let w = random(&mut r, 67, 384, 0.5);
        match quantize_linear("w", &w.data, 67, 384, 4, 128) {
            Ok(p) => {
                for rows in [1, 7] {
                    let x = random(&mut r, rows, 384, 2.0);
                    let what = format!("{path} RTN W4 g128 linear_a8 rows {rows} [67, 384]");
                    check_linear_a8(c, &what, g, &x, &p, None, None);
                }
            }
            Err(e) => c.error("linear_a8", format!("{path} RTN W4 g128"), e),
        }
    }
}

/// Products on a backend that splits weights across bindings (wgpu with a
/// small `max_binding`): dense f32 / f16, packed W3 / W8 and W4A8, each
/// weight in several chunks, GEMV and GEMM. `integer`: whether W4A8 runs
/// in integers on `g`.
pub fn split_weights<B: Device>(c: &mut Checks, path: &str, g: &B, integer: bool) {
    let mut r = rng(11);
    let w = random(&mut r, 37, 45, 0.5);
    let mut rr = rng(7);
    let pw = random(&mut rr, 37, 384, 0.5);
    let t32 = embedding_table();
    c.expect(
        "errors",
        format!("{path}: weights split into several bindings"),
        || {
            let chunks = |r: Result<B::Weight>| r.map(|w| B::weight_chunks(&w));
            let n = [
                chunks(g.weight(&w)),
                chunks(g.weight(&t32)),
                chunks(g.weight(&to_f16(&t32))),
                quantize_linear("w", &pw.data, 37, 384, 4, 128)
                    .and_then(|p| chunks(g.packed_weight(&p))),
                w4_random(1, 67, 384, 64, Zeros::Eight).and_then(|p| chunks(g.packed_weight(&p))),
            ];
            for k in n {
                match k {
                    Ok(k) if k > 1 => {}
                    Ok(k) => return Err(format!("a weight in {k} binding(s), expected several")),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        },
    );
    embedding_f16_and_f32(c, &[(path, g)]);
    // One token, the skinny GEMV (3, 8) and the GEMM (9): every chunk
    // writes its columns of every token's row.
    for rows in [1, 3, 8, 9] {
        for f16 in [false, true] {
            check_dense(c, path, g, rows, 37, 45, f16, true, 12);
        }
        for bits in [3, 8] {
            check_packed(c, path, g, rows, 37, 384, bits, 64, true);
        }
    }
    for rows in [1, 6] {
        check_w4a8(
            c,
            path,
            g,
            rows,
            67,
            384,
            64,
            Zeros::Random,
            true,
            Some(integer),
        );
    }
}
