// elementwise.wgsl: element-by-element ops on flat f32 arrays of `n` values.
//
// Entry points (one thread per value, `WG` threads per workgroup):
//   add:   y = a + b
//   act:   y = act(a)
//   gated: y = act(a) * b           (SwiGLU when act is silu)
//   div_cols: y[i] = a[i] / b[i % cols]  (a row-major [n / cols, cols], b [cols])
//
// Bindings:
//   @binding(0) a: array<f32> [n]   (x of act, gate of gated)
//   @binding(1) b: array<f32> [n]   (unused by act; [cols] for div_cols)
//   @binding(2) y: array<f32> [n]   output
//   @binding(3) p: Params
// Constants: WG. `p.arg`: act and gated: the activation, 0 gelu (erf),
// 1 gelu_tanh, 2 quick_gelu, 3 silu, 4 relu; div_cols: cols.

#include "common.wgsl"
#include "act.wgsl"

struct Params {
    n: u32,
    arg: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn index() -> u32 {
    return wgi * WG + tid;
}

@compute @workgroup_size(WG)
fn add(ids: Ids) {
    setup(ids);
    let i = index();
    if i < p.n {
        y[i] = a[i] + b[i];
    }
}

@compute @workgroup_size(WG)
fn act(ids: Ids) {
    setup(ids);
    let i = index();
    if i < p.n {
        y[i] = act_fn(a[i], p.arg);
    }
}

@compute @workgroup_size(WG)
fn gated(ids: Ids) {
    setup(ids);
    let i = index();
    if i < p.n {
        y[i] = act_fn(a[i], p.arg) * b[i];
    }
}

@compute @workgroup_size(WG)
fn div_cols(ids: Ids) {
    setup(ids);
    let i = index();
    if i < p.n {
        y[i] = a[i] / b[i % p.arg];
    }
}
