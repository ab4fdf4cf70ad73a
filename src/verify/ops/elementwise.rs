//! Element-wise ops, norms, row copies, RoPE and embeddings against the CPU.

use super::*;

const ACTS: [Act; 5] = [
    Act::Gelu,
    Act::GeluTanh,
    Act::QuickGelu,
    Act::Silu,
    Act::Relu,
];

/// add, then every activation alone and gated, per value.
pub fn add_act_gated<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL;
    let mut r = rng(1);
    let a = random(&mut r, 7, 37, 6.0);
    let b = random(&mut r, 7, 37, 2.0);
    for &(path, g) in paths {
        c.measure("add", format!("{path} add [7, 37]"), tol.add as f64, || {
            close(
                &down(g, g.add(&up(g, &a)?, &up(g, &b)?))?,
                &Cpu.add(&a, &b)?,
            )
        });
        for act in ACTS {
            for op in ["act", "gated"] {
                let gated = op == "gated";
                c.measure(
                    if gated { "gated" } else { "act" },
                    format!("{path} {op} {act:?} [7, 37] (per value, / max(1, |x|))"),
                    tol.act as f64,
                    || {
                        let (ga, gb) = (up(g, &a)?, up(g, &b)?);
                        let (got, want) = if gated {
                            (down(g, g.gated(&ga, &gb, act))?, Cpu.gated(&a, &b, act)?)
                        } else {
                            (down(g, g.act(&ga, act))?, Cpu.act(&a, act)?)
                        };
                        let mut worst = 0.0f64;
                        for (i, (x, (u, v))) in a
                            .data
                            .iter()
                            .zip(got.data.iter().zip(&want.data))
                            .enumerate()
                        {
                            let scale = if gated { b.data[i].abs().max(1.0) } else { 1.0 };
                            let e = ((u - v).abs() / (x.abs().max(1.0) * scale)) as f64;
                            if !e.is_finite() {
                                return Ok(f64::NAN);
                            }
                            worst = worst.max(e);
                        }
                        Ok(worst)
                    },
                );
            }
        }
    }
}

/// Every smooth activation over [-10, 10] in steps of 0.005: the worst
/// |gpu - cpu| / max(1, |x|) within the activation tolerance.
pub fn acts_over_a_dense_range<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
    let x = Tensor::new(vec![1, xs.len()], xs.clone()).expect("a row");
    for &(path, g) in paths {
        for act in [Act::Gelu, Act::GeluTanh, Act::QuickGelu, Act::Silu] {
            c.measure(
                "act",
                format!("{path} act {act:?} over [-10, 10] step 0.005"),
                B::TOL.act as f64,
                || {
                    let got = down(g, g.act(&up(g, &x)?, act))?;
                    let want = Cpu.act(&x, act)?;
                    Ok(xs
                        .iter()
                        .zip(got.data.iter().zip(&want.data))
                        .map(|(x, (u, v))| ((u - v).abs() / x.abs().max(1.0)) as f64)
                        .fold(0.0f64, |m, e| if e.is_nan() { e } else { m.max(e) }))
                },
            );
        }
    }
}

/// Columns divided by per-column scales (the search's W4A8 `X / s`); a
/// scale vector of the wrong length is an error.
pub fn div_cols<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(21);
    let x = random(&mut r, 9, 37, 5.0);
    let s: Vec<f32> = (0..37).map(|_| r.random_range(0.05f32..8.0)).collect();
    let s = Tensor::new(vec![37], s).expect("37 scales");
    let short = Tensor::new(vec![36], vec![1.0; 36]).expect("36 scales");
    for &(path, g) in paths {
        c.measure(
            "div_cols",
            format!("{path} div_cols [9, 37]"),
            B::TOL.div_cols as f64,
            || {
                close(
                    &down(g, g.div_cols(&up(g, &x)?, &up(g, &s)?))?,
                    &Cpu.div_cols(&x, &s)?,
                )
            },
        );
        c.expect(
            "errors",
            format!("{path} div_cols: 36 scales for 37 columns"),
            || match (up(g, &x), up(g, &short)) {
                (Ok(gx), Ok(gs)) => is_invalid(g.div_cols(&gx, &gs)),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

pub fn layer_norm_and_rms_norm<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(2);
    for (rows, cols) in [(5, 300), (3, 33), (1, 7), (2, 4099)] {
        let x = random(&mut r, rows, cols, 3.0);
        let w = random(&mut r, 1, cols, 1.5);
        let b = random(&mut r, 1, cols, 0.5);
        for &(path, g) in paths {
            let tol = B::TOL.norm as f64;
            c.measure(
                "layer_norm",
                format!("{path} layer_norm [{rows}, {cols}]"),
                tol,
                || {
                    close(
                        &down(g, g.layer_norm(&up(g, &x)?, &up(g, &w)?, &up(g, &b)?, 1e-5))?,
                        &Cpu.layer_norm(&x, &w, &b, 1e-5)?,
                    )
                },
            );
            c.measure(
                "rms_norm",
                format!("{path} rms_norm [{rows}, {cols}]"),
                tol,
                || {
                    close(
                        &down(g, g.rms_norm(&up(g, &x)?, &up(g, &w)?, 1e-6))?,
                        &Cpu.rms_norm(&x, &w, 1e-6)?,
                    )
                },
            );
        }
    }
}

/// The row copies, an empty slice, and out-of-range rows as errors.
pub fn rows_set_rows_concat_rows<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let tol = B::TOL.copy as f64;
    let mut r = rng(3);
    let x = random(&mut r, 9, 13, 1.0);
    let s = random(&mut r, 3, 13, 1.0);
    for &(path, g) in paths {
        c.measure("rows", format!("{path} rows 2..7 of [9, 13]"), tol, || {
            close(&down(g, g.rows(&up(g, &x)?, 2, 5))?, &Cpu.rows(&x, 2, 5)?)
        });
        c.measure(
            "concat_rows",
            format!("{path} concat_rows [3, 13] + [9, 13]"),
            tol,
            || {
                close(
                    &down(g, g.concat_rows(&up(g, &s)?, &up(g, &x)?))?,
                    &Cpu.concat_rows(&s, &x)?,
                )
            },
        );
        c.measure(
            "set_rows",
            format!("{path} set_rows [3, 13] at 5 of [9, 13]"),
            tol,
            || {
                let mut gx = up(g, &x)?;
                g.set_rows(&mut gx, 5, &up(g, &s)?)?;
                let mut x2 = x.clone();
                Cpu.set_rows(&mut x2, 5, &s)?;
                close(&g.download(&gx)?, &x2)
            },
        );
        // Empty slices and out of range: no panic; errors are errors.
        c.expect("rows", format!("{path} rows: an empty slice"), || {
            let t = up(g, &x).and_then(|gx| g.rows(&gx, 9, 0));
            match t {
                Ok(t) if g.dims(&t) == (0, 13) => Ok(()),
                Ok(t) => Err(format!("dims {:?}, expected (0, 13)", g.dims(&t))),
                Err(e) => Err(e.to_string()),
            }
        });
        c.expect(
            "errors",
            format!("{path} rows 7..12 of 9 rows"),
            || match up(g, &x) {
                Ok(gx) => is_invalid(g.rows(&gx, 7, 5)),
                Err(e) => Err(e.to_string()),
            },
        );
        c.expect(
            "errors",
            format!("{path} set_rows 3 rows at 8 of 9"),
            || match (up(g, &x), up(g, &s)) {
                (Ok(mut gx), Ok(gs)) => is_err(g.set_rows(&mut gx, 8, &gs)),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

/// RoPE at three head layouts (an odd head_dim among them) and positions.
pub fn rope_matches<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(4);
    for (heads, d) in [(3, 10), (2, 64), (1, 7)] {
        let rope = Rope {
            inv_freq: (0..d / 2)
                .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
                .collect(),
            head_dim: d,
        };
        let x = random(&mut r, 5, heads * d, 2.0);
        for &(path, g) in paths {
            if d % 2 == 1 && !B::ROPE_ODD_HEAD_DIM {
                c.expect(
                    "errors",
                    format!("{path} rope: odd head_dim {d} rejected"),
                    || match up(g, &x) {
                        Ok(gx) => is_invalid(g.rope(&gx, heads, &rope, 0)),
                        Err(e) => Err(e.to_string()),
                    },
                );
                continue;
            }
            // A position per row (the server's batch), against each row
            // rotated alone.
            let positions = [17, 0, 4093, 5, 6];
            c.measure(
                "rope",
                format!("{path} rope_at heads {heads} d {d} positions {positions:?}"),
                B::TOL.rope as f64,
                || {
                    let mut want = Vec::new();
                    for (r, &p) in positions.iter().enumerate() {
                        let row = Cpu.rows(&x, r, 1)?;
                        want.extend(Cpu.rope(&row, heads, &rope, p)?.data);
                    }
                    let want = Tensor::new(vec![positions.len(), heads * d], want)?;
                    close(
                        &down(g, g.rope_at(&up(g, &x)?, heads, &rope, &positions))?,
                        &want,
                    )
                },
            );
            for pos0 in [0, 17, 4093] {
                c.measure(
                    "rope",
                    format!("{path} rope heads {heads} d {d} pos0 {pos0}"),
                    B::TOL.rope as f64,
                    || {
                        close(
                            &down(g, g.rope(&up(g, &x)?, heads, &rope, pos0))?,
                            &Cpu.rope(&x, heads, &rope, pos0)?,
                        )
                    },
                );
            }
        }
    }
}

/// The `[41, 13]` embedding table [`embedding_f16_and_f32`] uses (for
/// backend tests that check how it is stored).
pub fn embedding_table() -> Tensor {
    random(&mut rng(5), 41, 13, 1.0)
}

/// Rows of an f32 table and of its f16 rounding (stored as f16), and an
/// id past the table as an error.
pub fn embedding_f16_and_f32<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let t32 = embedding_table();
    let t16 = to_f16(&t32);
    let ids = [0u32, 40, 7, 7, 23, 1];
    for &(path, g) in paths {
        for (name, t) in [("f32", &t32), ("f16", &t16)] {
            c.measure(
                "embedding",
                format!("{path} embedding {name} [41, 13], 6 ids"),
                B::TOL.copy as f64,
                || {
                    let w = g.weight(t)?;
                    if B::weight_is_f16(&w) != (name == "f16") {
                        return Err(Error::invalid(format!(
                            "an {name} table stored as f16: {}",
                            B::weight_is_f16(&w)
                        )));
                    }
                    close(
                        &down(g, g.embedding(&w, &ids))?,
                        &Cpu.embedding(&Cpu.weight(t)?, &ids)?,
                    )
                },
            );
        }
        c.expect(
            "errors",
            format!("{path} embedding: id 41 of 41 rows"),
            || match g.weight(&t32) {
                Ok(w) => is_invalid(g.embedding(&w, &[41])),
                Err(e) => Err(e.to_string()),
            },
        );
    }
}
