// attention.wgsl: softmax(q k^T * scale) v for one query row and one head
// per workgroup, keys in blocks of WG with an online (running max) softmax,
// so any number of keys fits in fixed workgroup memory. Grouped-query
// attention: head h reads kv head h / (heads / kv_heads).
//
// Query r sees keys 0..len(r): len = m (all keys) when causal == 0, else
// pos0 + r + 1 (KV cache, query r at position pos0 + r).
//
// Bindings:
//   @binding(0) q: array<f32> [n, heads * d]
//   @binding(1) k: array<f32> [keys, kv_stride]   (kv head j at columns j*d..)
//   @binding(2) v: array<f32> [keys, kv_stride]
//   @binding(3) y: array<f32> [n, heads * d]   output
//   @binding(4) p: Params
// Constants: WG (keys per block, threads), MAXD (largest head_dim,
// <= 4 WG). Flag SUBGROUP.

#include "common.wgsl"

struct Params {
    n: u32,
    heads: u32,
    kv_heads: u32,
    d: u32,
    kv_stride: u32,
    causal: u32,
    pos0: u32,
    m: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> qs: array<f32, MAXD>;
var<workgroup> probs: array<f32, WG>;

const NEG: f32 = -3.0e38;

@compute @workgroup_size(WG)
fn attention(ids: Ids) {
    setup(ids);
    let r = wgi / p.heads;
    let h = wgi % p.heads;
    if r >= p.n {
        return;
    }
    let d = p.d;
    let off = (h / (p.heads / p.kv_heads)) * d;
    let qrow = r * p.heads * d + h * d;
    for (var t = tid; t < d; t += WG) {
        qs[t] = q[qrow + t];
    }
    workgroupBarrier();
    var len = p.m;
    if p.causal != 0u {
        len = p.pos0 + r + 1u;
    }
    var run_max = NEG;
    var run_sum = 0.0;
    var o = vec4<f32>(0.0); // dims tid + WG * u
    for (var b0 = 0u; b0 < len; b0 += WG) {
        let j = b0 + tid;
        var s = NEG;
        if j < len {
            let kb = j * p.kv_stride + off;
            var acc = 0.0;
            for (var t = 0u; t < d; t++) {
                acc += qs[t] * k[kb + t];
            }
            s = acc * p.scale;
        }
        let new_max = max(run_max, max1(s));
        var e = 0.0;
        if j < len {
            e = exp(s - new_max);
        }
        probs[tid] = e;
        let corr = exp(run_max - new_max);
        run_sum = run_sum * corr + sum1(e);
        run_max = new_max;
        let cnt = min(WG, len - b0);
        for (var u = 0u; u < 4u; u++) {
            let t = tid + WG * u;
            if t < d {
                var acc = o[u] * corr;
                for (var jj = 0u; jj < cnt; jj++) {
                    acc += probs[jj] * v[(b0 + jj) * p.kv_stride + off + t];
                }
                o[u] = acc;
            }
        }
        workgroupBarrier();
    }
    for (var u = 0u; u < 4u; u++) {
        let t = tid + WG * u;
        if t < d {
            y[qrow + t] = o[u] / run_sum;
        }
    }
}
