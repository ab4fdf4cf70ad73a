//! Elementwise math over whole rows, written so the compiler vectorises
//! it: the activations and the softmax. `exp` is computed inline
//! ([`exp`]: range reduction and a degree-6 polynomial, about 1e-7
//! relative error), not through libm's scalar call, and each loop is
//! compiled twice, for the baseline target and for AVX2 + FMA, chosen at
//! run time. The sigmoid-shaped activations are all `x / (1 + e^-t)`
//! (GELU-tanh too: `0.5 x (1 + tanh u) = x / (1 + e^-2u)`).

use super::kernels::Isa;
use crate::config::Act;

/// `e^x` for f32 without a library call: `x = n ln 2 + r`, `|r| <= ln 2 /
/// 2`, `e^r` by its Taylor polynomial to degree 6, `2^n` built in the
/// exponent bits. Inputs are clamped to -87.3..=88.3 (below -87.3 the
/// result is about 1e-38, not 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.3);
    // Round to the nearest integer by adding and removing 1.5 * 2^23 (the
    // f32 sum has no fraction bits left): `floor` would be a libm call and
    // a float-to-int cast a scalar one (its saturation), either of which
    // stops the loop from vectorising. The sum's low bits hold `n` itself.
    const SHIFTER: f32 = 12_582_912.0;
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n: `n + 127` in the exponent field (n is within -126..=127).
    p * f32::from_bits(t.to_bits().wrapping_sub(SHIFTER.to_bits() - 127) << 23)
}

/// The activation of one value ([`exp`]-based where it has an exponential;
/// exact GELU through libm's `erf`).
#[inline(always)]
pub fn act(x: f32, act: Act) -> f32 {
    match act {
        Act::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Act::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            x / (1.0 + exp(-2.0 * c * (x + 0.044715 * x * x * x)))
        }
        Act::QuickGelu => x / (1.0 + exp(-1.702 * x)),
        Act::Silu => x / (1.0 + exp(-x)),
        Act::Relu => x.max(0.0),
    }
}

/// Picks the AVX2 + FMA build of a loop where the CPU has it.
macro_rules! dispatch {
    ($plain:ident, $avx2:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Scalar {
            // SAFETY: a non-scalar ISA is only detected with AVX2 and FMA.
            return unsafe { $avx2($($arg),*) };
        }
        $plain($($arg),*)
    }};
}

/// `f` over a slice, eight lanes at a time (so the compiler maps them onto
/// a vector).
#[inline(always)]
fn map8(xs: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for v in c.iter_mut() {
            *v = f(*v);
        }
    }
    chunks.into_remainder().iter_mut().for_each(|v| *v = f(*v));
}

/// `g = f(g) * u`, eight lanes at a time.
#[inline(always)]
fn zip8(g: &mut [f32], u: &[f32], f: impl Fn(f32) -> f32) {
    let mut gc = g.chunks_exact_mut(8);
    let mut uc = u.chunks_exact(8);
    for (g, u) in (&mut gc).zip(&mut uc) {
        for l in 0..8 {
            g[l] = f(g[l]) * u[l];
        }
    }
    for (g, u) in gc.into_remainder().iter_mut().zip(uc.remainder()) {
        *g = f(*g) * u;
    }
}

/// One loop per activation (a `match` inside the loop would keep it
/// scalar).
macro_rules! per_act {
    ($a:expr, $run:ident $(, $arg:expr)*) => {
        match $a {
            Act::Gelu => $run($($arg,)* |x| act(x, Act::Gelu)),
            Act::GeluTanh => $run($($arg,)* |x| act(x, Act::GeluTanh)),
            Act::QuickGelu => $run($($arg,)* |x| act(x, Act::QuickGelu)),
            Act::Silu => $run($($arg,)* |x| act(x, Act::Silu)),
            Act::Relu => $run($($arg,)* |x| act(x, Act::Relu)),
        }
    };
}

#[inline(always)]
fn act_loop(xs: &mut [f32], a: Act) {
    per_act!(a, map8, xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn act_loop_avx2(xs: &mut [f32], a: Act) {
    act_loop(xs, a)
}

/// `x = act(x)` over a slice.
pub fn act_in_place(xs: &mut [f32], a: Act) {
    dispatch!(act_loop, act_loop_avx2, xs, a)
}

#[inline(always)]
fn gated_loop(g: &mut [f32], u: &[f32], a: Act) {
    per_act!(a, zip8, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_loop_avx2(g: &mut [f32], u: &[f32], a: Act) {
    gated_loop(g, u, a)
}

/// `g = act(g) * u` over a slice (the gated MLP).
pub fn gated_in_place(g: &mut [f32], u: &[f32], a: Act) {
    dispatch!(gated_loop, gated_loop_avx2, g, u, a)
}

#[inline(always)]
fn softmax_loop(row: &mut [f32]) {
    // Eight lanes written out, so the compiler maps them onto a vector.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut acc = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for s in chunks.into_remainder() {
        *s = exp(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_loop_avx2(row: &mut [f32]) {
    softmax_loop(row)
}

/// Softmax of one row of scores, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    dispatch!(softmax_loop, softmax_loop_avx2, row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's `exp`, over the range softmax and the activations use.
    #[test]
    fn exp_is_within_two_ulps_of_f64() {
        let mut worst = 0.0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3 + 0.000_37;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e30) < 1e-37 && exp(1e30).is_finite());
    }

    /// Each activation against its textbook definition in f64, through
    /// both builds of the row loop.
    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0071 + 0.001).collect();
        let c = (2.0f64 / std::f64::consts::PI).sqrt();
        type Def = fn(f64, f64) -> f64;
        let defs: [(Act, Def); 4] = [
            (Act::GeluTanh, |x, c| {
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }),
            (Act::QuickGelu, |x, _| x / (1.0 + (-1.702 * x).exp())),
            (Act::Silu, |x, _| x / (1.0 + (-x).exp())),
            (Act::Relu, |x, _| x.max(0.0)),
        ];
        for (a, def) in defs {
            let mut plain = xs.clone();
            act_loop(&mut plain, a);
            let mut fast = xs.clone();
            act_in_place(&mut fast, a);
            for ((x, p), f) in xs.iter().zip(&plain).zip(&fast) {
                let want = def(*x as f64, c);
                for got in [p, f] {
                    let err = (*got as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * (1.0 + want.abs()),
                        "{a:?}({x}) = {got}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_matches_f64() {
        let row: Vec<f32> = (0..301)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.31)
            .collect();
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut got = row.clone();
        softmax_in_place(&mut got);
        for (g, e) in got.iter().zip(&e) {
            assert!((*g as f64 - e / sum).abs() <= 1e-6 * (e / sum) + 1e-9);
        }
    }
}
