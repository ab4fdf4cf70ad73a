// gemv_packed.wgsl: fused dequantize + matrix-vector product with a packed
// weight (one token), reading the packed words directly:
//   y[o0 + o] = sum_k x[k] * (code[o, k] - zero) * scale (+ b[o0 + o])
// The zero point is folded per 32-input block:
//   sum_i (c_i - z) s x_i = s (sum_i c_i x_i - z sum_i x_i).
//
// Each workgroup (`WG` threads) computes R = 4 consecutive outputs; the
// threads stride over the input in blocks of 32 (groups are multiples of
// 32), each block of x is loaded once (8 vec4) and used for the 4 rows,
// and the 4 partial sums are reduced with one vec4 workgroup sum.
//
// Bindings:
//   @binding(0) x:  array<vec4<f32>> [k / 4]
//   @binding(1) q:  array<u32> codes of the chunk's rows (packed.wgsl)
//   @binding(2) sz: array<u32> (scale, zero) f16 pairs [rows, k / GROUP]
//   @binding(3) b:  array<f32> [out]   (flag BIAS)
//   @binding(4) y:  array<f32> [out]   output
//   @binding(5) p:  Params
// Constants: WG, BITS (3, 4, 8), GROUP (32, 64, 128). Flags: BIAS, SUBGROUP.

#include "common.wgsl"

struct Params {
    k: u32,
    n_out: u32,
    o0: u32,
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

// Row `row`'s contribution of block `blk` (inputs 32 blk .. 32 blk + 31).
fn block_dot(row: u32, blk: u32, xs: ptr<function, array<vec4<f32>, 8>>, xsum: f32) -> f32 {
    let groups = p.k / GROUP;
    let k0 = blk * 32u;
    let g = k0 / GROUP;
    let s = scale_zero(row, g, groups);
    let gw = (row * groups + g) * WPG;
    return s.x * (dot32(gw, k0 % GROUP, xs) - s.y * xsum);
}

@compute @workgroup_size(WG)
fn gemv_packed(ids: Ids) {
    setup(ids);
    let first = wgi * R;
    var acc = vec4<f32>(0.0);
    if first < p.n_out {
        let last = p.n_out - 1u;
        let blocks = p.k / 32u;
        var xs: array<vec4<f32>, 8>;
        for (var blk = tid; blk < blocks; blk += WG) {
            var v = vec4<f32>(0.0);
            for (var i = 0u; i < 8u; i++) {
                xs[i] = x[blk * 8u + i];
                v += xs[i];
            }
            let xsum = v.x + v.y + v.z + v.w;
            acc.x += block_dot(first, blk, &xs, xsum);
            acc.y += block_dot(min(first + 1u, last), blk, &xs, xsum);
            acc.z += block_dot(min(first + 2u, last), blk, &xs, xsum);
            acc.w += block_dot(min(first + 3u, last), blk, &xs, xsum);
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
