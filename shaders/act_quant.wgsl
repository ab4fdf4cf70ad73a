// act_quant.wgsl: per-row (per-token) symmetric INT8 fake quantization of
// activations, the A8 of W4A8 (quant::w4a8::fake_quantize_act_int8 is the
// CPU reference). One workgroup (`WG` threads) per row:
//
//   s = max(max|x_row|, 1e-5) / 127
//   y = clamp(round(x / s), -128, 127) * s      (round half to even, as torch)
//
// The output stays f32: the W4A8 path then runs the packed dequant GEMV /
// GEMM on it (no integer dot products).
//
// Bindings:
//   @binding(0) x: array<f32> [rows, cols]
//   @binding(1) y: array<f32> [rows, cols]  output
//   @binding(2) p: Params
// Constants: WG.

#include "common.wgsl"

struct Params {
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn act_quant_int8(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    var m = 0.0;
    for (var i = tid; i < p.cols; i += WG) {
        m = max(m, abs(x[base + i]));
    }
    let s = max(max1(m), 1e-5) / 127.0;
    for (var i = tid; i < p.cols; i += WG) {
        y[base + i] = clamp(round(x[base + i] / s), -128.0, 127.0) * s;
    }
}
