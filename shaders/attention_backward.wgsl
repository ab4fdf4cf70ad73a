// attention_backward.wgsl: the backward of causal grouped-query attention
// at positions 0..n (query r sees keys 0..=r), as src/backend/backward.rs
// `attention_backward` computes it, without float atomics: two passes
// through a global scratch of probabilities and score gradients.
//
//   rows: one workgroup per (query row r, query head h); threads over the
//         keys j <= r: s_j = scale q_r.k_j, p = softmax(s) (max, exp, sum
//         reductions), dP_j = do_r.v_j, D = sum_j p_j dP_j (= do_r.o_r),
//         dS_j = p_j (dP_j - D); P[h, r, j] = p_j, S[h, r, j] = dS_j;
//         then threads over the dims c: dq[r, h d + c] = scale sum_j dS_j k_j[c].
//   cols: one workgroup per (key row j, kv head g); threads over the dims c,
//         summing over the group's query heads h and the rows r >= j:
//         dk[j, g d + c] = scale sum dS[h, r, j] q_r[h d + c],
//         dv[j, g d + c] = sum P[h, r, j] do_r[h d + c].
//
// Bindings:
//   @binding(0) q:    array<f32> [n, heads * d]
//   @binding(1) k:    array<f32> [n, kv_heads * d]          (rows)
//   @binding(2) v:    array<f32> [n, kv_heads * d]          (rows)
//   @binding(3) dout: array<f32> [n, heads * d]
//   @binding(4) P:    array<f32> [heads, n, n]  scratch: written by rows, read by cols
//   @binding(5) S:    array<f32> [heads, n, n]  scratch: written by rows, read by cols
//   @binding(6) dq:   array<f32> [n, heads * d]  output (rows)
//   @binding(7) dk:   array<f32> [n, kv_heads * d]  output (cols)
//   @binding(8) dv:   array<f32> [n, kv_heads * d]  output (cols)
//   @binding(9) p:    Params
// Constants: WG. Entries only read P[h, r, j], S[h, r, j] for j <= r.

#include "common.wgsl"

struct Params {
    n: u32,
    heads: u32,
    kv_heads: u32,
    d: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;
@group(0) @binding(4) var<storage, read_write> P: array<f32>;
@group(0) @binding(5) var<storage, read_write> S: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(9) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn rows(ids: Ids) {
    setup(ids);
    let r = wgi / p.heads;
    let h = wgi % p.heads;
    if r >= p.n {
        return; // the whole workgroup leaves together
    }
    let d = p.d;
    let qs = p.heads * d;
    let kvs = p.kv_heads * d;
    let ko = (h / (p.heads / p.kv_heads)) * d;
    let qo = r * qs + h * d;
    let base = (h * p.n + r) * p.n;
    let len = r + 1u;
    // Scores and their maximum.
    var m = -3.0e38;
    for (var j = tid; j < len; j += WG) {
        var s = 0.0;
        for (var c = 0u; c < d; c++) {
            s += q[qo + c] * k[j * kvs + ko + c];
        }
        s *= p.scale;
        P[base + j] = s;
        m = max(m, s);
    }
    m = max1(m);
    var l = 0.0;
    for (var j = tid; j < len; j += WG) {
        let e = exp(P[base + j] - m);
        P[base + j] = e;
        l += e;
    }
    l = sum1(l);
    // Probabilities, dP and D.
    var dd = 0.0;
    for (var j = tid; j < len; j += WG) {
        let pj = P[base + j] / l;
        P[base + j] = pj;
        var g = 0.0;
        for (var c = 0u; c < d; c++) {
            g += dout[qo + c] * v[j * kvs + ko + c];
        }
        S[base + j] = g;
        dd += pj * g;
    }
    dd = sum1(dd);
    for (var j = tid; j < len; j += WG) {
        S[base + j] = P[base + j] * (S[base + j] - dd);
    }
    storageBarrier();
    for (var c = tid; c < d; c += WG) {
        var acc = 0.0;
        for (var j = 0u; j < len; j++) {
            acc += S[base + j] * k[j * kvs + ko + c];
        }
        dq[qo + c] = p.scale * acc;
    }
}

@compute @workgroup_size(WG)
fn cols(ids: Ids) {
    setup(ids);
    let j = wgi / p.kv_heads;
    let g = wgi % p.kv_heads;
    if j >= p.n {
        return;
    }
    let d = p.d;
    let qs = p.heads * d;
    let kvs = p.kv_heads * d;
    let group = p.heads / p.kv_heads;
    for (var c = tid; c < d; c += WG) {
        var ak = 0.0;
        var av = 0.0;
        for (var h = g * group; h < (g + 1u) * group; h++) {
            for (var r = j; r < p.n; r++) {
                let e = (h * p.n + r) * p.n + j;
                let o = r * qs + h * d + c;
                ak += S[e] * q[o];
                av += P[e] * dout[o];
            }
        }
        dk[j * kvs + g * d + c] = p.scale * ak;
        dv[j * kvs + g * d + c] = av;
    }
}
