// stats.wgsl: per-column |x| statistics of the scale search
// (Search::abs_col_stats in backend/search.rs; the CPU reference, in f64, is
// `Search for Cpu` there).
//
// `abs_col_stats`, one thread per column, looping over the rows in order
// (adjacent threads read adjacent columns of a row: coalesced):
//   o[0, c] + o[1, c] = (a[0, c] + a[1, c]) + sum_r |x[r, c]|   (hi, lo)
//   o[2, c]           = max(a[2, c], max_r |x[r, c]|)
// with a = 0 without flag ACC. The sum is compensated in f32 (Neumaier:
// the running sum s and the sum c of the rounding errors of every s + v),
// then normalized: hi = fl(s + c), lo = c - (hi - s).
//
// Bindings:
//   @binding(0) x: array<f32> [rows, cols]
//   @binding(1) a: array<f32> [3, cols]   earlier statistics (flag ACC)
//   @binding(2) o: array<f32> [3, cols]   output (hi, lo, max)
//   @binding(3) p: Params                 rows, cols, one (= 1.0)
// Constants: WG. Flags: ACC.
// Dispatch: ceil(cols / WG) workgroups.
//
// Keeping the compensation: naga marks no operation exact (SPIR-V
// NoContraction), so a driver may apply algebraic rules that hold for real
// numbers, and (s - (s + v)) + v is 0 for them. Every rounded sum t that
// an error term subtracts is therefore computed as (s + v) * p.one: the
// same value (p.one is 1.0), but a uniform the compiler cannot see through,
// so no rule folds the error term away. A contraction of the product into
// an FMA (s - t as fma(-(s + v), one, s)) gives the same value too.
// Measured on lavapipe (Mesa 22.3, LLVM 15), the op harness's cases
// (verify/ops/search.rs): with the guard the sums are within 2.4e-12 of
// the f64 reference; without it (t = s + v, hi = s + c) 5e-8..8.5e-8 (an
// ulp of f32 or so: the compiler folded the compensation, at least in
// part); plain f32, 4e-7..5e-6.

#include "common.wgsl"

struct Params {
    rows: u32,
    cols: u32,
    one: f32,
}

@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(0) var<storage, read> x: array<f32>;
#if ACC
@group(0) @binding(1) var<storage, read> a: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> o: array<f32>;

@compute @workgroup_size(WG)
fn abs_col_stats(ids: Ids) {
    setup(ids);
    let col = wgi * WG + tid;
    if col >= p.cols {
        return;
    }
    var s = 0.0;
    var c = 0.0;
    var m = 0.0;
#if ACC
    s = a[col];
    c = a[p.cols + col];
    m = a[2u * p.cols + col];
#endif
    var i = col;
    for (var r = 0u; r < p.rows; r++) {
        let v = abs(x[i]);
        let t = (s + v) * p.one;
        // The rounding error of s + v, exact: the smaller operand minus
        // what of it the sum kept.
        c += select((v - t) + s, (s - t) + v, abs(s) >= v);
        s = t;
        m = max(m, v);
        i += p.cols;
    }
    let hi = (s + c) * p.one;
    o[col] = hi;
    o[p.cols + col] = c - (hi - s);
    o[2u * p.cols + col] = m;
}
