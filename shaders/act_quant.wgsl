// act_quant.wgsl: per-row (per-token) symmetric INT8 quantization of
// activations, the A8 of W4A8 (quant::w4a8::fake_quantize_act_int8 is the
// CPU reference). One workgroup (`WG` threads) per row:
//
//   s = max(max|x_row|, 1e-5) / 127
//   q = clamp(round(x / s), -128, 127)          (round half to even, as torch)
//
// Two entry points, one per variant (both use `row_scale` and `q_of`, so
// they give the same q):
// - `act_quant_int8` (fake quantization): y = q * s in f32, for the
//   fallback W4A8 path (then the packed dequant GEMV / GEMM in f32).
// - `act_quant_int8_packed` (flag PACKED): q as signed bytes, 4 per u32,
//   and s per row, the input of gemv_w4a8.wgsl (integer dot products).
//   Word order follows the 4-bit weight words: of each 8 inputs 8j..8j+7,
//   word 2j holds the even ones (8j, 8j+2, 8j+4, 8j+6; byte i = input
//   8j + 2i) and word 2j + 1 the odd ones, so that a weight word masked
//   with 0x0F0F0F0F (even codes) or shifted by 4 first (odd codes) lines
//   up with one x word. Needs cols % 8 == 0.
//
// Bindings:
//   @binding(0) x:  array<f32> [rows, cols]
//   @binding(1) y:  array<f32> [rows, cols]  output            (not PACKED)
//   @binding(1) yq: array<u32> [rows, cols / 4]  output        (PACKED)
//   @binding(2) p:  Params
//   @binding(3) sx: array<f32> [rows]  output, the scales s    (PACKED)
// Constants: WG. Flags: SUBGROUP, PACKED.

#include "common.wgsl"

struct Params {
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
#if PACKED
@group(0) @binding(1) var<storage, read_write> yq: array<u32>;
@group(0) @binding(3) var<storage, read_write> sx: array<f32>;
#else
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
#endif
@group(0) @binding(2) var<uniform> p: Params;

// The scale of the row starting at `base`; called by every thread.
fn row_scale(base: u32) -> f32 {
    var m = 0.0;
    for (var i = tid; i < p.cols; i += WG) {
        m = max(m, abs(x[base + i]));
    }
    return max(max1(m), 1e-5) / 127.0;
}

fn q_of(v: f32, s: f32) -> f32 {
    return clamp(round(v / s), -128.0, 127.0);
}

#if !PACKED
@compute @workgroup_size(WG)
fn act_quant_int8(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    let s = row_scale(base);
    for (var i = tid; i < p.cols; i += WG) {
        y[base + i] = q_of(x[base + i], s) * s;
    }
}
#else
@compute @workgroup_size(WG)
fn act_quant_int8_packed(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    let s = row_scale(base);
    if tid == 0u {
        sx[row] = s;
    }
    let words = p.cols / 4u;
    for (var w = tid; w < words; w += WG) {
        let i0 = base + 8u * (w / 2u) + (w % 2u);
        var word = 0u;
        for (var i = 0u; i < 4u; i++) {
            let q = i32(q_of(x[i0 + 2u * i], s));
            word |= (bitcast<u32>(q) & 255u) << (8u * i);
        }
        yq[row * words + w] = word;
    }
}
#endif
