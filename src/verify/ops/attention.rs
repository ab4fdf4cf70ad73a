//! Attention (full and over the KV cache) and the shape errors against the CPU.

use super::*;

pub fn attention_non_causal<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    for &(n, heads, kv_heads, d) in &[(13, 4, 2, 10), (150, 3, 3, 72), (5, 2, 1, 256)] {
        let mut r = rng(20 + n as u64);
        let q = random(&mut r, n, heads * d, 1.0);
        let k = random(&mut r, n, kv_heads * d, 1.0);
        let v = random(&mut r, n, kv_heads * d, 1.0);
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
        };
        for &(path, g) in paths {
            c.measure(
                "attention",
                format!("{path} attention n {n} heads {heads}/{kv_heads} d {d}"),
                B::TOL.attn as f64,
                || {
                    close(
                        &down(g, g.attention(&up(g, &q)?, &up(g, &k)?, &up(g, &v)?, shape))?,
                        &Cpu.attention(&q, &k, &v, shape)?,
                    )
                },
            );
        }
    }
}

/// A 71-token prefill (two key blocks), a 3-token chunk, then 3
/// single-token steps, on two layers; past the capacity is an error.
pub fn attention_cached_prefill_then_decode<B: Device>(c: &mut Checks, paths: &[(&str, &B)]) {
    let (heads, kv_heads, d, layers, cap) = (4, 2, 12, 2, 90);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale: (d as f32).powf(-0.5),
    };
    for &(path, g) in paths {
        let mut r = rng(30);
        let caches = g
            .new_cache(layers, kv_heads * d, cap)
            .and_then(|gc| Ok((gc, Cpu.new_cache(layers, kv_heads * d, cap)?)));
        let (mut gc, mut cc) = match caches {
            Ok(x) => x,
            Err(e) => {
                c.error("attention_cached", format!("{path} new_cache"), e);
                continue;
            }
        };
        let mut pos = 0;
        for n in [71, 3, 1, 1, 1] {
            let step = if n == 1 { "decode" } else { "prefill" };
            for layer in 0..layers {
                let q = random(&mut r, n, heads * d, 1.0);
                let k = random(&mut r, n, kv_heads * d, 1.0);
                let v = random(&mut r, n, kv_heads * d, 1.0);
                c.measure(
                    "attention_cached",
                    format!("{path} attention_cached {step} n {n} at {pos}, layer {layer}"),
                    B::TOL.attn as f64,
                    || {
                        let got = g.attention_cached(
                            &up(g, &q)?,
                            &up(g, &k)?,
                            &up(g, &v)?,
                            &mut gc,
                            layer,
                            pos,
                            shape,
                        );
                        let got = down(g, got)?;
                        let want = Cpu.attention_cached(&q, &k, &v, &mut cc, layer, pos, shape)?;
                        close(&got, &want)
                    },
                );
            }
            pos += n;
        }
        // Past the capacity: an error, not a panic.
        let q = random(&mut r, 1, heads * d, 1.0);
        let k = random(&mut r, 1, kv_heads * d, 1.0);
        c.expect(
            "errors",
            format!("{path} attention_cached past the capacity {cap}"),
            || match (up(g, &q), up(g, &k)) {
                (Ok(gq), Ok(gk)) => {
                    is_err(g.attention_cached(&gq, &gk, &gk, &mut gc, 0, cap, shape))
                }
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            },
        );
    }
}

/// Mismatched shapes and a 3-d weight are errors, not panics.
pub fn shape_errors_are_errors<B: Device>(c: &mut Checks, path: &str, g: &B) {
    let mut r = rng(40);
    let a = random(&mut r, 3, 5, 1.0);
    let b = random(&mut r, 3, 6, 1.0);
    let w = random(&mut r, 4, 7, 1.0);
    c.expect("errors", format!("{path} add [3, 5] + [3, 6]"), || {
        match (up(g, &a), up(g, &b)) {
            (Ok(ga), Ok(gb)) => is_invalid(g.add(&ga, &gb)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        }
    });
    c.expect(
        "errors",
        format!("{path} linear [3, 5] by [4, 7]"),
        || match (up(g, &a), g.weight(&w)) {
            (Ok(ga), Ok(gw)) => is_invalid(g.linear(&ga, &gw, None)),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        },
    );
    c.expect("errors", format!("{path} a 3-d weight"), || {
        is_err(g.weight(&Tensor::zeros(vec![2, 3, 4])))
    });
}
