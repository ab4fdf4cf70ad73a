// norm.wgsl: LayerNorm and RMSNorm over the last dimension, one workgroup
// (`WG` threads) per row.
//
//   layer_norm: y = (x - mean) / sqrt(var + eps) * w + b   (biased variance)
//   rms_norm:   y = w * (x / sqrt(mean(x^2) + eps))
//
// Bindings:
//   @binding(0) x: array<f32> [rows, cols]
//   @binding(1) w: array<f32> [cols]
//   @binding(2) b: array<f32> [cols]        (layer_norm only)
//   @binding(3) y: array<f32> [rows, cols]  output
//   @binding(4) p: Params
// Constants: WG.

#include "common.wgsl"

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn layer_norm(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var i = tid; i < p.cols; i += WG) {
        s += x[base + i];
    }
    let mean = sum1(s) / f32(p.cols);
    var v = 0.0;
    for (var i = tid; i < p.cols; i += WG) {
        let d = x[base + i] - mean;
        v += d * d;
    }
    let inv = 1.0 / sqrt(sum1(v) / f32(p.cols) + p.eps);
    for (var i = tid; i < p.cols; i += WG) {
        y[base + i] = (x[base + i] - mean) * inv * w[i] + b[i];
    }
}

@compute @workgroup_size(WG)
fn rms_norm(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var i = tid; i < p.cols; i += WG) {
        let v = x[base + i];
        s += v * v;
    }
    let inv = 1.0 / sqrt(sum1(s) / f32(p.cols) + p.eps);
    for (var i = tid; i < p.cols; i += WG) {
        y[base + i] = w[i] * (x[base + i] * inv);
    }
}
