// gemv_packed.wgsl: fused dequantize + skinny matrix product with a packed
// weight (m = 1..MAXM tokens, decode of one or several sequences), reading
// the packed words directly:
//   y[t, o0 + o] = sum_k x[t, k] * (code[o, k] - zero) * scale (+ b[o0 + o])
// The zero point is folded per 32-input block:
//   sum_i (c_i - z) s x_i = s (sum_i c_i x_i - z sum_i x_i).
//
// Each workgroup (`WG` threads) computes R = 4 consecutive outputs for
// every token; the threads stride over the input in blocks of 32 (groups
// are multiples of 32). Per block the 4 rows' code words and (scale, zero)
// are loaded once and used for all m tokens (the token loop is inside the
// block loop: each token's x block is loaded, 8 vec4, and dotted with the
// 4 rows' codes), one vec4 accumulator per token; each token's 4 partial
// sums are reduced with one vec4 workgroup sum. At m = 1 the arithmetic is
// that of a plain GEMV (the same accumulation order).
//
// Bindings:
//   @binding(0) x:  array<vec4<f32>> [m, k / 4] row-major
//   @binding(1) q:  array<u32> codes of the chunk's rows (packed.wgsl)
//   @binding(2) sz: array<u32> (scale, zero) f16 pairs [rows, k / GROUP]
//   @binding(3) b:  array<f32> [out]   (flag BIAS)
//   @binding(4) y:  array<f32> [m, out] output (row stride `out`, the whole
//                   weight's outputs, not the chunk's)
//   @binding(5) p:  Params { k, n_out (the chunk's rows), o0 (its first
//                   row), m (tokens, 1..=MAXM), out (y's row stride) }
// Constants: WG, BITS (3, 4, 8), GROUP (32, 64, 128), MAXM (most tokens,
// the accumulators' size; the runtime count is p.m). Flags: BIAS, SUBGROUP.

#include "common.wgsl"

struct Params {
    k: u32,
    n_out: u32,
    o0: u32,
    m: u32,
    out: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> sz: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> b: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

#include "packed.wgsl"

const R: u32 = 4u;

@compute @workgroup_size(WG)
fn gemv_packed(ids: Ids) {
    setup(ids);
    let first = wgi * R;
    var acc: array<vec4<f32>, MAXM>;
    if first < p.n_out {
        let last = p.n_out - 1u;
        let rows = vec4<u32>(first, min(first + 1u, last), min(first + 2u, last), min(first + 3u, last));
        let groups = p.k / GROUP;
        let blocks = p.k / 32u;
        var xs: array<vec4<f32>, 8>;
        for (var blk = tid; blk < blocks; blk += WG) {
            let k0 = blk * 32u;
            let g = k0 / GROUP;
            let kg = k0 % GROUP;
            // The block of the 4 rows: codes and (scale, zero), loaded once.
            let s0 = scale_zero(rows.x, g, groups);
            let s1 = scale_zero(rows.y, g, groups);
            let s2 = scale_zero(rows.z, g, groups);
            let s3 = scale_zero(rows.w, g, groups);
            let q0 = words32((rows.x * groups + g) * WPG, kg);
            let q1 = words32((rows.y * groups + g) * WPG, kg);
            let q2 = words32((rows.z * groups + g) * WPG, kg);
            let q3 = words32((rows.w * groups + g) * WPG, kg);
            for (var t = 0u; t < MAXM; t++) {
                if t < p.m {
                    let xb = t * (p.k / 4u) + blk * 8u;
                    var v = vec4<f32>(0.0);
                    for (var i = 0u; i < 8u; i++) {
                        xs[i] = x[xb + i];
                        v += xs[i];
                    }
                    let xsum = v.x + v.y + v.z + v.w;
                    acc[t].x += s0.x * (dot32(q0, &xs) - s0.y * xsum);
                    acc[t].y += s1.x * (dot32(q1, &xs) - s1.y * xsum);
                    acc[t].z += s2.x * (dot32(q2, &xs) - s2.y * xsum);
                    acc[t].w += s3.x * (dot32(q3, &xs) - s3.y * xsum);
                }
            }
        }
    }
    // A constant trip count (the accumulators stay in registers); p.m is
    // uniform: every thread takes part in every token's sum.
    for (var t = 0u; t < MAXM; t++) {
        if t < p.m {
            let s = sum4(acc[t]);
            if tid == 0u {
                for (var r = 0u; r < R; r++) {
                    let o = first + r;
                    if o < p.n_out {
                        var v = s[r];
#if BIAS
                        v += b[p.o0 + o];
#endif
                        y[t * p.out + p.o0 + o] = v;
                    }
                }
            }
        }
    }
}
