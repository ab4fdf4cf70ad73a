// cross_entropy.wgsl: the mean cross-entropy of logits against labels and
// its gradient, for the sensitivity pass (src/backend/backward.rs has the
// formula and the f64 CPU reference this is tested against).
//
// Entry point:
//   cross_entropy: one workgroup per row r of logits l [rows, vocab], label
//         t = labels[r], max and sum reduced over the workgroup in f32:
//           m = max_j l_j,  s = sum_j exp(l_j - m),
//           loss[r] = log(s) + m - l_t,
//           g[r, j] = (exp(l_j - m) / s - [j == t]) / rows.
//         The host sums the `rows` per-row losses in f64 for the mean.
//
// Bindings:
//   @binding(0) l:      array<f32>  logits [rows, vocab]
//   @binding(1) labels: array<u32>  [rows], each < vocab (checked on the host)
//   @binding(2) g:      array<f32>  output: gradient [rows, vocab]
//   @binding(3) loss:   array<f32>  output: per-row loss [rows]
//   @binding(4) p:      Params (rows, vocab)
// Constants: WG.

#include "common.wgsl"

struct Params {
    rows: u32,
    vocab: u32,
}

@group(0) @binding(0) var<storage, read> l: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn cross_entropy(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let vocab = p.vocab;
    let base = row * vocab;
    // The most negative finite f32: the identity of max for finite logits.
    var m = -3.4028235e38;
    for (var j = tid; j < vocab; j += WG) {
        m = max(m, l[base + j]);
    }
    m = max1(m);
    var s = 0.0;
    for (var j = tid; j < vocab; j += WG) {
        s += exp(l[base + j] - m);
    }
    s = sum1(s);
    let inv = 1.0 / s;
    let per = 1.0 / f32(p.rows);
    let t = labels[row];
    for (var j = tid; j < vocab; j += WG) {
        var q = exp(l[base + j] - m) * inv;
        if j == t {
            q -= 1.0;
        }
        g[base + j] = q * per;
    }
    if tid == 0u {
        loss[row] = log(s) + m - l[base + t];
    }
}
