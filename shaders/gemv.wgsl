// gemv.wgsl: matrix-vector product with a dense weight (one token):
//   y[o0 + o] = sum_k x[k] * w[o, k] (+ b[o0 + o])   for o < n_out
// over one row chunk of a weight (weights larger than a storage binding
// are split by rows; one dispatch per chunk).
//
// Each workgroup (`WG` threads) computes R = 4 consecutive outputs: the
// threads stride over the input in blocks of 8, each block of x is read
// once and used for the 4 rows, and the 4 partial sums are reduced with
// one vec4 workgroup sum (subgroups when available).
//
// Bindings:
//   @binding(0) x: array<f32> [k]
//   @binding(1) w: F16: array<vec4<u32>> (8 f16 per vec4), else
//                  array<vec4<f32>>; rows of `ld` elements (ld % 8 == 0,
//                  zero padded past k)
//   @binding(3) b: array<f32> [out]   (flag BIAS)
//   @binding(4) y: array<f32> [out]   output
//   @binding(5) p: Params
// (The same slots as gemm.wgsl, so one binding list serves both.)
// Constants: WG. Flags: F16, BIAS, SUBGROUP.

#include "common.wgsl"

struct Params {
    k: u32,
    ld: u32,
    n_out: u32,
    o0: u32,
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

fn xv(i: u32) -> f32 {
    var v = 0.0;
    if i < p.k {
        v = x[i];
    }
    return v;
}

// Dot of 8 weights of row `row` starting at block `blk` with (lo, hi).
fn dot8(row: u32, blk: u32, lo: vec4<f32>, hi: vec4<f32>) -> f32 {
#if F16
    let q = w[row * (p.ld / 8u) + blk];
    let w0 = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
    let w1 = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
#else
    let base = row * (p.ld / 4u) + 2u * blk;
    let w0 = w[base];
    let w1 = w[base + 1u];
#endif
    return dot(w0, lo) + dot(w1, hi);
}

@compute @workgroup_size(WG)
fn gemv(ids: Ids) {
    setup(ids);
    let first = wgi * R;
    var acc = vec4<f32>(0.0);
    if first < p.n_out {
        let last = p.n_out - 1u;
        let blocks = (p.k + 7u) / 8u;
        for (var blk = tid; blk < blocks; blk += WG) {
            let k0 = blk * 8u;
            let lo = vec4<f32>(xv(k0), xv(k0 + 1u), xv(k0 + 2u), xv(k0 + 3u));
            let hi = vec4<f32>(xv(k0 + 4u), xv(k0 + 5u), xv(k0 + 6u), xv(k0 + 7u));
            acc.x += dot8(first, blk, lo, hi);
            acc.y += dot8(min(first + 1u, last), blk, lo, hi);
            acc.z += dot8(min(first + 2u, last), blk, lo, hi);
            acc.w += dot8(min(first + 3u, last), blk, lo, hi);
        }
    }
    let s = sum4(acc);
    if tid == 0u {
        for (var r = 0u; r < R; r++) {
            let o = first + r;
            if o < p.n_out {
                var v = s[r];
#if BIAS
                v += b[p.o0 + o];
#endif
                y[p.o0 + o] = v;
            }
        }
    }
}
