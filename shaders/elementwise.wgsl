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

struct Params {
    n: u32,
    arg: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

// erf(x) from the complementary error function's Chebyshev fit
// (Numerical Recipes `erfcc`): fractional error of erfc < 1.2e-7 for every
// x, so |erf error| < 2e-7 (WGSL has no erf).
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * exp(poly);
    return select(erfc - 1.0, 1.0 - erfc, x >= 0.0);
}

// tanh without exp overflow (some drivers' tanh gives NaN for large |x|).
fn tanh_(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    let t = (1.0 - e) / (1.0 + e);
    return select(-t, t, x >= 0.0);
}

fn act_fn(x: f32, act: u32) -> f32 {
    switch act {
        case 0u: {
            return 0.5 * x * (1.0 + erf_(x * 0.70710678118654752));
        }
        case 1u: {
            let c = 0.79788456080286536; // sqrt(2 / pi)
            return 0.5 * x * (1.0 + tanh_(c * (x + 0.044715 * x * x * x)));
        }
        case 2u: {
            return x / (1.0 + exp(-1.702 * x));
        }
        case 3u: {
            return x / (1.0 + exp(-x));
        }
        default: {
            return max(x, 0.0);
        }
    }
}

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
