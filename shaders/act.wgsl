// act.wgsl: the activations, included by elementwise.wgsl and
// backward.wgsl (`#include "act.wgsl"`); no bindings. Codes (`act_code` in
// src/backend/mod.rs): 0 gelu (erf), 1 gelu_tanh, 2 quick_gelu, 3 silu,
// 4 relu.
//
//   act_fn(x, act):   act(x)
//   act_grad(x, act): d act(x) / dx, the formulas of src/backend/backward.rs

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

// d act(x) / dx (src/backend/backward.rs `act_grad`).
fn act_grad(x: f32, act: u32) -> f32 {
    switch act {
        case 0u: {
            // Phi(x) + x phi(x).
            let cdf = 0.5 * (1.0 + erf_(x * 0.70710678118654752));
            let pdf = exp(-0.5 * x * x) * 0.39894228040143268; // 1 / sqrt(2 pi)
            return cdf + x * pdf;
        }
        case 1u: {
            let c = 0.79788456080286536; // sqrt(2 / pi)
            let t = tanh_(c * (x + 0.044715 * x * x * x));
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
        }
        case 2u: {
            let s = 1.0 / (1.0 + exp(-1.702 * x));
            return s + 1.702 * x * s * (1.0 - s);
        }
        case 3u: {
            let s = 1.0 / (1.0 + exp(-x));
            return s * (1.0 + x * (1.0 - s));
        }
        default: {
            return select(0.0, 1.0, x > 0.0);
        }
    }
}
