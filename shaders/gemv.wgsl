// gemv.wgsl: skinny matrix product with a dense weight (m = 1..MAXM tokens,
// decode of one or several sequences):
//   y[t, o0 + o] = sum_k x[t, k] * w[o, k] (+ b[o0 + o])   for o < n_out, t < m
// over one row chunk of a weight (weights larger than a storage binding
// are split by rows; one dispatch per chunk, each writing its columns
// o0..o0 + n_out of every token's row of y).
//
// Each workgroup (`WG` threads) computes R = 4 consecutive outputs for
// every token: the threads stride over the input in blocks of 8, each
// block of the 4 weight rows is read once and used for all m tokens (the
// token loop is inside the block loop, one vec4 accumulator per token),
// and each token's 4 partial sums are reduced with one vec4 workgroup sum
// (subgroups when available). At m = 1 the arithmetic is that of a plain
// GEMV (the same accumulation order).
//
// Bindings:
//   @binding(0) x: array<f32> [m, k] row-major
//   @binding(1) w: F16: array<vec4<u32>> (8 f16 per vec4), else
//                  array<vec4<f32>>; rows of `ld` elements (ld % 8 == 0,
//                  zero padded past k)
//   @binding(3) b: array<f32> [out]   (flag BIAS)
//   @binding(4) y: array<f32> [m, out] output (row stride `out`, the whole
//                  weight's outputs, not the chunk's)
//   @binding(5) p: Params { k, ld, n_out (the chunk's rows), o0 (its first
//                  row), m (tokens, 1..=MAXM), out (y's row stride) }
// (The same slots as gemm.wgsl, so one binding list serves both.)
// Constants: WG, MAXM (most tokens, the accumulators' size; the runtime
// count is p.m). Flags: F16, BIAS, SUBGROUP.

#include "common.wgsl"

struct Params {
    k: u32,
    ld: u32,
    n_out: u32,
    o0: u32,
    m: u32,
    out: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
#if F16
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
#else
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
#endif
#if BIAS
@group(0) @binding(3) var<storage, read> b: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const R: u32 = 4u;

// x[t, i], 0 past k.
fn xv(t: u32, i: u32) -> f32 {
    var v = 0.0;
    if i < p.k {
        v = x[t * p.k + i];
    }
    return v;
}

// The 8 weights of row `row` in block `blk`, as two vec4.
fn w8(row: u32, blk: u32) -> array<vec4<f32>, 2> {
#if F16
    let q = w[row * (p.ld / 8u) + blk];
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)),
        vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)),
    );
#else
    let base = row * (p.ld / 4u) + 2u * blk;
    return array<vec4<f32>, 2>(w[base], w[base + 1u]);
#endif
}

@compute @workgroup_size(WG)
fn gemv(ids: Ids) {
    setup(ids);
    let first = wgi * R;
    var acc: array<vec4<f32>, MAXM>;
    if first < p.n_out {
        let last = p.n_out - 1u;
        let blocks = (p.k + 7u) / 8u;
        for (var blk = tid; blk < blocks; blk += WG) {
            let k0 = blk * 8u;
            let w0 = w8(first, blk);
            let w1 = w8(min(first + 1u, last), blk);
            let w2 = w8(min(first + 2u, last), blk);
            let w3 = w8(min(first + 3u, last), blk);
            for (var t = 0u; t < MAXM; t++) {
                if t < p.m {
                    let lo = vec4<f32>(xv(t, k0), xv(t, k0 + 1u), xv(t, k0 + 2u), xv(t, k0 + 3u));
                    let hi = vec4<f32>(xv(t, k0 + 4u), xv(t, k0 + 5u), xv(t, k0 + 6u), xv(t, k0 + 7u));
                    acc[t].x += dot(w0[0], lo) + dot(w0[1], hi);
                    acc[t].y += dot(w1[0], lo) + dot(w1[1], hi);
                    acc[t].z += dot(w2[0], lo) + dot(w2[1], hi);
                    acc[t].w += dot(w3[0], lo) + dot(w3[1], hi);
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
