// backward.wgsl: the backward of ops for the sensitivity pass (activation
// gradients only; src/backend/backward.rs has the formulas and the CPU
// reference every entry is tested against).
//
// Entry points:
//   gated_backward:    one thread per value (`WG` per workgroup), y = act(g) u:
//                      dg = dy u act'(g),  du = dy act(g)
//   rms_norm_backward: one workgroup per row, y_j = w_j x_j r,
//                      r = (mean(x^2) + eps)^-1/2 (the sums in f32):
//                      dx_j = r w_j dy_j - r^3 x_j / cols * sum_i dy_i w_i x_i
//   linear_backward:   one thread per output value, over one row chunk of a
//                      dense weight W (rows o0..o0 + n of `[out, k]`):
//                      dx[m, j] (+)= sum_{i < n} dy[m, o0 + i] W[i, j]
//                      (the first chunk writes, later ones add: p.acc)
//
// Bindings (each entry uses a subset):
//   @binding(0) a:  array<f32>  gate [n] | x [rows, cols]
//   @binding(1) b:  array<f32>  up [n]   | w [cols]
//   @binding(2) dy: array<f32>  [n] | [rows, cols] | [m, out]
//   @binding(3) o0: array<f32>  output: dg [n] | dx [rows, cols] | dx [m, k]
//   @binding(4) o1: array<f32>  output: du [n]      (gated_backward)
//   @binding(5) p:  Params (meaning per entry below)
//   @binding(6) w:  linear_backward's weight chunk: array<u32> of f16 pairs
//                   (flag F16) or array<f32>, rows of `ld` elements
// Params: gated_backward (n, act code, -); rms_norm_backward (rows, cols,
// eps bits); linear_backward (m, k, n, ld, o0, out, acc).
// Constants: WG. Flag F16 (linear_backward).

#include "common.wgsl"
#include "act.wgsl"

struct Params {
    p0: u32,
    p1: u32,
    p2: u32,
    p3: u32,
    p4: u32,
    p5: u32,
    p6: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> o0: array<f32>;
@group(0) @binding(4) var<storage, read_write> o1: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;
#if F16
@group(0) @binding(6) var<storage, read> w: array<u32>;
#else
@group(0) @binding(6) var<storage, read> w: array<f32>;
#endif

@compute @workgroup_size(WG)
fn gated_backward(ids: Ids) {
    setup(ids);
    let i = wgi * WG + tid;
    if i < p.p0 {
        let g = a[i];
        let d = dy[i];
        o0[i] = d * b[i] * act_grad(g, p.p1);
        o1[i] = d * act_fn(g, p.p1);
    }
}

@compute @workgroup_size(WG)
fn rms_norm_backward(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.p0 {
        return;
    }
    let cols = p.p1;
    let eps = bitcast<f32>(p.p2);
    let base = row * cols;
    var s = vec4<f32>(0.0);
    for (var i = tid; i < cols; i += WG) {
        let v = a[base + i];
        s += vec4<f32>(v * v, dy[base + i] * b[i] * v, 0.0, 0.0);
    }
    let t = sum4(s);
    let inv = 1.0 / sqrt(t.x / f32(cols) + eps);
    let k = inv * inv * inv * t.y / f32(cols);
    for (var i = tid; i < cols; i += WG) {
        o0[base + i] = inv * b[i] * dy[base + i] - k * a[base + i];
    }
}

fn w_at(e: u32) -> f32 {
#if F16
    return unpack2x16float(w[e / 2u])[e % 2u];
#else
    return w[e];
#endif
}

@compute @workgroup_size(WG)
fn linear_backward(ids: Ids) {
    setup(ids);
    let m = p.p0;
    let k = p.p1;
    let n = p.p2;
    let ld = p.p3;
    let r0 = p.p4;
    let out = p.p5;
    let idx = wgi * WG + tid;
    if idx >= m * k {
        return;
    }
    let r = idx / k;
    let j = idx % k;
    var acc = 0.0;
    for (var i = 0u; i < n; i++) {
        acc += dy[r * out + r0 + i] * w_at(i * ld + j);
    }
    if p.p6 != 0u {
        acc += o0[idx];
    }
    o0[idx] = acc;
}
