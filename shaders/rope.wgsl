// rope.wgsl: rotary position embedding, rotate-half convention (Llama,
// Qwen2). The cos/sin table is computed on the host exactly as the CPU
// reference does (f32 `inv_freq[i] * pos`, then sin/cos), so the rotation
// is the same to the last bit apart from the multiply-adds.
//
// One thread per (row r, head h, i < half):
//   y[r, h*d + i]        = x[.., i] * cos - x[.., i + half] * sin
//   y[r, h*d + i + half] = x[.., i + half] * cos + x[.., i] * sin
//
// Bindings:
//   @binding(0) x:  array<f32> [rows, heads * d]
//   @binding(1) cs: array<vec2<f32>> [rows, half]   (cos, sin) of row r
//   @binding(2) y:  array<f32> [rows, heads * d]    output
//   @binding(3) p:  Params
// Constants: WG.

#include "common.wgsl"

struct Params {
    rows: u32,
    heads: u32,
    d: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> cs: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn rope(ids: Ids) {
    setup(ids);
    let half = p.d / 2u;
    let idx = wgi * WG + tid;
    if idx >= p.rows * p.heads * half {
        return;
    }
    let i = idx % half;
    let h = (idx / half) % p.heads;
    let r = idx / (half * p.heads);
    let c = cs[r * half + i];
    let lo = r * p.heads * p.d + h * p.d + i;
    let a = x[lo];
    let b = x[lo + half];
    y[lo] = a * c.x - b * c.y;
    y[lo + half] = b * c.x + a * c.y;
}
