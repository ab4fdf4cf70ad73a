// loss.wgsl: the error sums of the scale search (Search::loss_terms in
// backend/search.rs; the CPU reference is `Search for Cpu` there).
//
// `loss_rows`, one workgroup per row:  e[r] = sum_c dist(a[r, c] - b[r, c])
// (dist |d|, or d^2 with flag SQUARED); without flag GOT, b is 0 and not
// bound (Search::abs_terms: the sums of |a|).
// `loss_total`, one workgroup:         t = (sum of e over the rows whose
// caption flag m[r, 0] is set, over those whose vision flag m[r, 1] is
// set, over every row).
//
// Bindings of loss_rows:
//   @binding(0) a: array<f32> [rows, cols]   want
//   @binding(1) b: array<f32> [rows, cols]   got (flag GOT)
//   @binding(2) e: array<f32> [rows]         output
//   @binding(3) p: Params
// Bindings of loss_total (flag TOTAL):
//   @binding(0) e: array<f32> [rows]
//   @binding(1) m: array<f32> [rows, 2]      caption, vision flags
//   @binding(2) t: array<f32> [3]            output
//   @binding(3) p: Params
// Constants: WG. Flags: SQUARED, GOT, TOTAL.

#include "common.wgsl"

struct Params {
    rows: u32,
    cols: u32,
}

@group(0) @binding(3) var<uniform> p: Params;

#if !TOTAL
@group(0) @binding(0) var<storage, read> a: array<f32>;
#if GOT
@group(0) @binding(1) var<storage, read> b: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> e: array<f32>;

@compute @workgroup_size(WG)
fn loss_rows(ids: Ids) {
    setup(ids);
    let row = wgi;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    var acc = 0.0;
    for (var c = tid; c < p.cols; c += WG) {
#if GOT
        let d = a[base + c] - b[base + c];
#else
        let d = a[base + c];
#endif
#if SQUARED
        acc += d * d;
#else
        acc += abs(d);
#endif
    }
    let total = sum1(acc);
    if tid == 0u {
        e[row] = total;
    }
}
#else
@group(0) @binding(0) var<storage, read> e: array<f32>;
@group(0) @binding(1) var<storage, read> m: array<f32>;
@group(0) @binding(2) var<storage, read_write> t: array<f32>;

@compute @workgroup_size(WG)
fn loss_total(ids: Ids) {
    setup(ids);
    var acc = vec4<f32>(0.0);
    for (var r = tid; r < p.rows; r += WG) {
        let v = e[r];
        acc += vec4<f32>(select(0.0, v, m[2u * r] != 0.0), select(0.0, v, m[2u * r + 1u] != 0.0), v, 0.0);
    }
    let total = sum4(acc);
    if tid == 0u {
        t[0] = total.x;
        t[1] = total.y;
        t[2] = total.z;
    }
}
#endif
