// gemm.wgsl: tiled matrix product for several tokens (prefill, vision):
//   y[m, o0 + n] = sum_k x[m, k] * W[n, k] (+ b[o0 + n])
// for m < M, n < N over one row chunk of W (weights larger than a storage
// binding are split by rows; one dispatch per chunk). W is dense (f32, or
// f16 pairs with flag F16) or, with flag PACKED, the packed format,
// dequantized while it is loaded into workgroup memory (packed.wgsl).
// With flag XH, x holds f16 values two to a word (Search::linear_half: f16
// operands, f32 sums; every product of two f16 values is exact in f32).
// With XH and HALF (the device has SHADER_F16; `enable f16;` is put first),
// x and W are read as WGSL `f16` arrays, the same bytes: native 16-bit
// loads, and f16 subnormals kept (unpack2x16float may flush them).
//
// Each workgroup (256 threads, 16 x 16) computes a 64 x 64 tile of y,
// each thread a 4 x 4 block (rows ty + 16 i, columns tx + 16 j), stepping
// through k in slices of 16 staged in workgroup memory.
//
// Bindings:
//   @binding(0) x:  array<f32> [M, K]; XH: array<u32>, value i in half
//                   i % 2 of word i / 2 (no row padding); XH + HALF:
//                   array<f16> [M, K]
//   @binding(1) w:  dense: array<u32> (F16; array<f16> with HALF) or
//                   array<f32>, rows of `ld` elements; PACKED: the codes
//                   `q: array<u32>`
//   @binding(2) sz: array<u32> (scale, zero) pairs   (PACKED only)
//   @binding(3) b:  array<f32> [out]   (flag BIAS)
//   @binding(4) y:  array<f32> [M, out]   output (row stride `out`)
//   @binding(5) p:  Params
// Constants: WG (= 256). PACKED: BITS, GROUP. Flags: F16, PACKED, BIAS, XH,
// HALF (only with XH and F16).

#include "common.wgsl"

struct Params {
    m: u32,
    k: u32,
    n: u32,
    ld: u32,
    o0: u32,
    out: u32,
}

#if HALF
@group(0) @binding(0) var<storage, read> x: array<f16>;
#else
#if XH
@group(0) @binding(0) var<storage, read> x: array<u32>;
#else
@group(0) @binding(0) var<storage, read> x: array<f32>;
#endif
#endif
#if PACKED
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> sz: array<u32>;
#include "packed.wgsl"
#else
#if HALF
@group(0) @binding(1) var<storage, read> w: array<f16>;
#else
#if F16
@group(0) @binding(1) var<storage, read> w: array<u32>;
#else
@group(0) @binding(1) var<storage, read> w: array<f32>;
#endif
#endif
#endif
#if BIAS
@group(0) @binding(3) var<storage, read> b: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const BM: u32 = 64u;
const BN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> xs: array<array<f32, BM>, TK>;
var<workgroup> ws: array<array<f32, BN>, TK>;

// Value i of x (row-major [M, K]).
fn xv(i: u32) -> f32 {
#if HALF
    return f32(x[i]);
#else
#if XH
    return unpack2x16float(x[i / 2u])[i % 2u];
#else
    return x[i];
#endif
#endif
}

// Weights W[n, k..k+3] (k % 4 == 0, n < N); zero past K.
fn w4(n: u32, k: u32) -> vec4<f32> {
#if PACKED
    let groups = p.k / GROUP;
    let g = k / GROUP;
    let s = scale_zero(n, g, groups);
    return (codes4((n * groups + g) * WPG, k % GROUP) - s.y) * s.x;
#else
    var v = vec4<f32>(0.0);
    let e = n * p.ld + k;
#if HALF
    v = vec4<f32>(f32(w[e]), f32(w[e + 1u]), f32(w[e + 2u]), f32(w[e + 3u]));
#else
#if F16
    // ld % 8 == 0 and k % 4 == 0: both words lie inside row n's padding.
    v = vec4<f32>(unpack2x16float(w[e / 2u]), unpack2x16float(w[e / 2u + 1u]));
#else
    v = vec4<f32>(w[e], w[e + 1u], w[e + 2u], w[e + 3u]);
#endif
#endif
    return select(vec4<f32>(0.0), v, vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.k));
#endif
}

@compute @workgroup_size(256)
fn gemm(ids: Ids) {
    setup(ids);
    let tiles_n = (p.n + BN - 1u) / BN;
    let bm = (wgi / tiles_n) * BM;
    let bn = (wgi % tiles_n) * BN;
    let tx = tid % 16u;
    let ty = tid / 16u;
    // Loader coordinates: row tid / 4 of the tile, k offset 4 (tid % 4).
    let lr = tid / 4u;
    let lk = (tid % 4u) * 4u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        let m = bm + lr;
        for (var u = 0u; u < 4u; u++) {
            let k = k0 + lk + u;
            var v = 0.0;
            if m < p.m && k < p.k {
                v = xv(m * p.k + k);
            }
            xs[lk + u][lr] = v;
        }
        let n = bn + lr;
        var wv = vec4<f32>(0.0);
        if n < p.n && k0 + lk < p.k {
            wv = w4(n, k0 + lk);
        }
        ws[lk][lr] = wv.x;
        ws[lk + 1u][lr] = wv.y;
        ws[lk + 2u][lr] = wv.z;
        ws[lk + 3u][lr] = wv.w;
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = vec4<f32>(xs[kk][ty], xs[kk][ty + 16u], xs[kk][ty + 32u], xs[kk][ty + 48u]);
            let bv = vec4<f32>(ws[kk][tx], ws[kk][tx + 16u], ws[kk][tx + 32u], ws[kk][tx + 48u]);
            acc[0] += a.x * bv;
            acc[1] += a.y * bv;
            acc[2] += a.z * bv;
            acc[3] += a.w * bv;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = bm + ty + 16u * i;
        if m >= p.m {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let n = bn + tx + 16u * j;
            if n < p.n {
                var v = acc[i][j];
#if BIAS
                v += b[p.o0 + n];
#endif
                y[m * p.out + p.o0 + n] = v;
            }
        }
    }
}
