//! The backward ops of the sensitivity pass ([`Grad`]) against the CPU
//! reference (src/backend/backward.rs).

use super::*;

const ACTS: [Act; 5] = [
    Act::Gelu,
    Act::GeluTanh,
    Act::QuickGelu,
    Act::Silu,
    Act::Relu,
];

fn test_rope(d: usize) -> Rope {
    Rope {
        inv_freq: (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
            .collect(),
        head_dim: d,
    }
}

/// Every backward op family on `paths`, then the dense input gradient over
/// weights split into several bindings on `split` where there is one.
pub fn backward_ops<B: Device + Grad>(
    c: &mut Checks,
    paths: &[(&str, &B)],
    split: Option<(&str, &B)>,
) {
    gated_backward_matches(c, paths);
    rms_norm_backward_matches(c, paths);
    rope_backward_matches(c, paths);
    linear_backward_matches(c, paths);
    if let Some(s) = split {
        // Weights in several bindings; attention's scratch over the binding
        // limit (wgpu: the host fallback).
        linear_backward_matches(c, &[s]);
        attention_backward_matches(c, &[s]);
    }
    attention_backward_matches(c, paths);
    cross_entropy_matches(c, paths);
    for &(path, g) in paths {
        backward_errors(c, path, g);
    }
}

/// (d gate, d up) of every activation, per value relative to
/// max(1, |gate|) max(1, |up|) max(1, |dy|).
pub fn gated_backward_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(50);
    let (gate, upv, dy) = (
        random(&mut r, 7, 37, 6.0),
        random(&mut r, 7, 37, 2.0),
        random(&mut r, 7, 37, 1.5),
    );
    for &(path, g) in paths {
        for act in ACTS {
            c.measure(
                "gated_backward",
                format!("{path} gated_backward {act:?} [7, 37] (per value)"),
                B::TOL.grad_act as f64,
                || {
                    let (dg, du) =
                        g.gated_backward(&up(g, &gate)?, &up(g, &upv)?, &up(g, &dy)?, act)?;
                    let (dg, du) = (g.download(&dg)?, g.download(&du)?);
                    let (wg, wu) = Cpu.gated_backward(&gate, &upv, &dy, act)?;
                    let mut worst = 0.0f64;
                    for i in 0..gate.data.len() {
                        let s = gate.data[i].abs().max(1.0)
                            * upv.data[i].abs().max(1.0)
                            * dy.data[i].abs().max(1.0);
                        for (a, b) in [(dg.data[i], wg.data[i]), (du.data[i], wu.data[i])] {
                            let e = ((a - b).abs() / s) as f64;
                            if !e.is_finite() {
                                return Ok(f64::NAN);
                            }
                            worst = worst.max(e);
                        }
                    }
                    Ok(worst)
                },
            );
        }
    }
}

pub fn rms_norm_backward_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(51);
    for (rows, cols) in [(5, 37), (3, 1000)] {
        let x = random(&mut r, rows, cols, 2.0);
        let w = random(&mut r, 1, cols, 1.5);
        let dy = random(&mut r, rows, cols, 1.0);
        for &(path, g) in paths {
            c.measure(
                "rms_norm_backward",
                format!("{path} rms_norm_backward [{rows}, {cols}]"),
                B::TOL.grad_norm as f64,
                || {
                    close(
                        &down(
                            g,
                            g.rms_norm_backward(&up(g, &x)?, &up(g, &w)?, 1e-6, &up(g, &dy)?),
                        )?,
                        &Cpu.rms_norm_backward(&x, &w, 1e-6, &dy)?,
                    )
                },
            );
        }
    }
}

pub fn rope_backward_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(52);
    for (heads, d) in [(3, 10), (2, 64)] {
        let rope = test_rope(d);
        let dy = random(&mut r, 5, heads * d, 2.0);
        for &(path, g) in paths {
            for pos0 in [0, 17, 4093] {
                c.measure(
                    "rope_backward",
                    format!("{path} rope_backward heads {heads} d {d} pos0 {pos0}"),
                    B::TOL.grad_rope as f64,
                    || {
                        close(
                            &down(g, g.rope_backward(&up(g, &dy)?, heads, &rope, pos0))?,
                            &Cpu.rope_backward(&dy, heads, &rope, pos0)?,
                        )
                    },
                );
            }
        }
    }
}

/// dX = dY W on dense weights, f32 and f16-exact, one row and several.
pub fn linear_backward_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    for (rows, out, inp) in [(1, 37, 45), (9, 70, 53), (13, 130, 67)] {
        let mut r = rng(53 + rows as u64);
        let w = random(&mut r, out, inp, 0.5);
        let dy = random(&mut r, rows, out, 1.0);
        for f16 in [false, true] {
            let w = if f16 { to_f16(&w) } else { w.clone() };
            let cw = Cpu.weight(&w).expect("a 2-d weight");
            for &(path, g) in paths {
                c.measure(
                    "linear_backward",
                    format!(
                        "{path} linear_backward {} rows {rows} [{out}, {inp}]",
                        if f16 { "f16" } else { "f32" }
                    ),
                    B::TOL.grad_linear as f64,
                    || {
                        close(
                            &down(g, g.linear_backward(&up(g, &dy)?, &g.weight(&w)?))?,
                            &Cpu.linear_backward(&dy, &cw)?,
                        )
                    },
                );
            }
        }
    }
}

/// Causal GQA at positions 0..n: (dq, dk, dv), each relative to its scale.
pub fn attention_backward_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    for &(n, heads, kv_heads, d) in &[(13, 4, 2, 10), (40, 3, 3, 64), (150, 6, 2, 72)] {
        let mut r = rng(60 + n as u64);
        let q = random(&mut r, n, heads * d, 1.0);
        let k = random(&mut r, n, kv_heads * d, 1.0);
        let v = random(&mut r, n, kv_heads * d, 1.0);
        let dout = random(&mut r, n, heads * d, 1.0);
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
        };
        for &(path, g) in paths {
            c.measure(
                "attention_backward",
                format!("{path} attention_backward n {n} heads {heads}/{kv_heads} d {d}"),
                B::TOL.grad_attn as f64,
                || {
                    let (dq, dk, dv) = g.attention_backward(
                        &up(g, &q)?,
                        &up(g, &k)?,
                        &up(g, &v)?,
                        &up(g, &dout)?,
                        shape,
                    )?;
                    let (wq, wk, wv) = Cpu.attention_backward(&q, &k, &v, &dout, shape)?;
                    Ok(close(&g.download(&dq)?, &wq)?
                        .max(close(&g.download(&dk)?, &wk)?)
                        .max(close(&g.download(&dv)?, &wv)?))
                },
            );
        }
    }
}

/// The loss relative to the CPU's, and the gradient relative to its scale.
pub fn cross_entropy_matches<B: Device + Grad>(c: &mut Checks, paths: &[(&str, &B)]) {
    let mut r = rng(70);
    let (rows, vocab) = (6, 301);
    let logits = random(&mut r, rows, vocab, 8.0);
    let labels: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 97 + 5) % vocab as u32)
        .collect();
    for &(path, g) in paths {
        c.measure(
            "cross_entropy",
            format!("{path} cross_entropy [{rows}, {vocab}] (loss and gradient)"),
            B::TOL.grad_ce as f64,
            || {
                let (loss, grad) = g.cross_entropy(&up(g, &logits)?, &labels)?;
                let (wl, wg) = Cpu.cross_entropy(&logits, &labels)?;
                Ok(((loss - wl).abs() / wl.abs().max(1e-12)).max(close(&g.download(&grad)?, &wg)?))
            },
        );
    }
}

/// A packed weight and mismatched shapes are invalid-input errors.
pub fn backward_errors<B: Device + Grad>(c: &mut Checks, path: &str, g: &B) {
    let mut r = rng(80);
    let pw = random(&mut r, 8, 64, 0.5);
    let dy = random(&mut r, 2, 8, 1.0);
    c.expect(
        "errors",
        format!("{path} linear_backward on a packed weight"),
        || {
            let p = quantize_linear("w", &pw.data, 8, 64, 4, 32).map_err(|e| e.to_string())?;
            match (up(g, &dy), g.packed_weight(&p)) {
                (Ok(gd), Ok(gw)) => is_invalid(g.linear_backward(&gd, &gw)),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            }
        },
    );
    let q = random(&mut r, 3, 8, 1.0);
    let k = random(&mut r, 3, 5, 1.0);
    let shape = AttnShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
    };
    c.expect(
        "errors",
        format!("{path} attention_backward q [3, 8], k [3, 5] for 2 / 1 heads of 4"),
        || match (up(g, &q), up(g, &k)) {
            (Ok(gq), Ok(gk)) => is_invalid(g.attention_backward(&gq, &gk, &gk, &gq, shape)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        },
    );
    let x = random(&mut r, 3, 5, 1.0);
    let w = random(&mut r, 1, 6, 1.0);
    c.expect(
        "errors",
        format!("{path} rms_norm_backward x [3, 5], w [6]"),
        || match (up(g, &x), up(g, &w)) {
            (Ok(gx), Ok(gw)) => is_invalid(g.rms_norm_backward(&gx, &gw, 1e-6, &gx)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        },
    );
    c.expect(
        "errors",
        format!("{path} gated_backward [3, 5] with up [1, 6]"),
        || match (up(g, &x), up(g, &w)) {
            (Ok(gx), Ok(gw)) => is_invalid(g.gated_backward(&gx, &gw, &gx, Act::Silu)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        },
    );
}
