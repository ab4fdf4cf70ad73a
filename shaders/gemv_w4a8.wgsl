// gemv_w4a8.wgsl: W4A8 linear in integers, for a few tokens at a time:
// INT8 activations (act_quant.wgsl, flag PACKED) times a packed 4-bit
// weight (packed.wgsl) with the WGSL built-in dot4I8Packed (language
// feature packed_4x8_integer_dot_product):
//
//   y[t, o0 + o] = sx[t] * sum_blk f32(acc[t, o, blk]) * s[o, g(blk)]  (+ b[o0 + o])
//   acc[t, o, blk] = sum_{i in blk} (c[o, i] - z[o, g]) * xq[t, i]     (i32, exact)
//
// over blocks of 32 inputs (a group is GROUP / 32 blocks, so each block has
// one (s, z)). The codes c (0..15) minus the group's zero z (an integer in
// 0..15: the host checks it, W4A8 files have z = 8) are turned into signed
// bytes four at a time without unpacking: a weight word holds codes
// 8j..8j+7, (w & 0x0F0F0F0F) the even ones and ((w >> 4) & 0x0F0F0F0F) the
// odd ones, one per byte; ((v | 0x80808080) - z * 0x01010101) ^ 0x80808080
// is then c - z per byte in two's complement (each byte 128 + c - z lies in
// 113..143, so no borrow crosses bytes). The x words are in the same
// even/odd order (act_quant.wgsl). |acc| <= 32 * 15 * 128, far from
// overflow; only the per-block f32 combine rounds.
//
// Each workgroup (`WG` threads) computes R = 4 consecutive outputs for T
// consecutive tokens (T = 1 for decode; prefill uses T > 1 so each weight
// word loaded is used for T tokens); the threads stride over the blocks of
// 32 inputs and the T partial vec4 sums are reduced with sum4. Workgroup
// `wgi` does output rows (wgi % nrb) * R.. and tokens (wgi / nrb) * T..,
// nrb = ceil(n_out / R).
//
// Bindings:
//   @binding(0) xq: array<u32> [m, k / 4]  INT8 activations (act_quant.wgsl)
//   @binding(1) q:  array<u32> codes of the chunk's rows (packed.wgsl)
//   @binding(2) sz: array<u32> (scale, zero) f16 pairs [rows, k / GROUP]
//   @binding(3) b:  array<f32> [out]   (flag BIAS)
//   @binding(4) y:  array<f32> [m, out]   output (this chunk's columns)
//   @binding(5) p:  Params
//   @binding(6) sx: array<f32> [m]  activation scales (act_quant.wgsl)
// Constants: WG, BITS (= 4), GROUP (a multiple of 32), T. Flags: BIAS,
// SUBGROUP.

#include "common.wgsl"

struct Params {
    m: u32,
    k: u32,
    n_out: u32,
    o0: u32,
    out: u32,
}

@group(0) @binding(0) var<storage, read> xq: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> sz: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> b: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;
@group(0) @binding(6) var<storage, read> sx: array<f32>;

#include "packed.wgsl"

const R: u32 = 4u;

@compute @workgroup_size(WG)
fn gemv_w4a8(ids: Ids) {
    setup(ids);
    let nrb = (p.n_out + R - 1u) / R;
    let first = (wgi % nrb) * R;
    let t0 = (wgi / nrb) * T;
    var acc: array<vec4<f32>, T>;
    if t0 < p.m {
        let last_o = p.n_out - 1u;
        let last_t = p.m - 1u;
        let groups = p.k / GROUP;
        let blocks = p.k / 32u;
        let kw = p.k / 4u;
        var xs: array<array<u32, 8>, T>;
        var w: array<u32, 8>;
        for (var blk = tid; blk < blocks; blk += WG) {
            for (var t = 0u; t < T; t++) {
                let xb = min(t0 + t, last_t) * kw + blk * 8u;
                for (var i = 0u; i < 8u; i++) {
                    xs[t][i] = xq[xb + i];
                }
            }
            let k0 = blk * 32u;
            let g = k0 / GROUP;
            for (var r = 0u; r < R; r++) {
                let row = min(first + r, last_o);
                let s = scale_zero(row, g, groups);
                let zz = u32(s.y) * 0x01010101u;
                let gw = (row * groups + g) * WPG + (k0 % GROUP) / 8u;
                for (var i = 0u; i < 4u; i++) {
                    let word = q[gw + i];
                    w[2u * i] = (((word & 0x0F0F0F0Fu) | 0x80808080u) - zz) ^ 0x80808080u;
                    w[2u * i + 1u] = ((((word >> 4u) & 0x0F0F0F0Fu) | 0x80808080u) - zz) ^ 0x80808080u;
                }
                for (var t = 0u; t < T; t++) {
                    var d = 0i;
                    for (var i = 0u; i < 8u; i++) {
                        d += dot4I8Packed(w[i], xs[t][i]);
                    }
                    acc[t][r] += f32(d) * s.x;
                }
            }
        }
    }
    for (var t = 0u; t < T; t++) {
        let s = sum4(acc[t]);
        let tok = t0 + t;
        if tid == 0u && tok < p.m {
            let st = sx[tok];
            for (var r = 0u; r < R; r++) {
                let o = first + r;
                if o < p.n_out {
                    var v = s[r] * st;
#if BIAS
                    v += b[p.o0 + o];
#endif
                    y[tok * p.out + p.o0 + o] = v;
                }
            }
        }
    }
}
