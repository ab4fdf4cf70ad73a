// common.wgsl: included by every kernel (`#include "common.wgsl"`).
//
// Needs from Rust: `const WG: u32` (threads per workgroup, a power of two).
// Flag SUBGROUP: reductions use subgroup operations (adapter feature
// SUBGROUP); without it they go through workgroup memory.
//
// Every entry point takes `ids: Ids` and calls `setup(ids)` first; then
// `tid` is the thread's index in its workgroup and `wgi` the linear index
// of the workgroup (dispatches wider than the per-dimension limit use y).

struct Ids {
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
#endif
}

var<private> tid: u32;
var<private> wgi: u32;
var<private> sg_lane: u32;
var<private> sg_id: u32;
var<private> n_sg: u32;

fn setup(ids: Ids) {
    tid = ids.lid;
    wgi = ids.wid.x + ids.wid.y * ids.nwg.x;
#if SUBGROUP
    sg_lane = ids.sg_lane;
    sg_id = ids.sg_id;
    n_sg = ids.n_sg;
#endif
}

// One slot per thread (fallback) or per subgroup.
var<workgroup> red: array<vec4<f32>, WG>;

// The sum of `v` over the workgroup, returned to every thread. Must be
// called by every thread of the workgroup (uniform control flow).
fn sum4(v: vec4<f32>) -> vec4<f32> {
#if SUBGROUP
    let s = subgroupAdd(v);
    if sg_lane == 0u {
        red[sg_id] = s;
    }
    workgroupBarrier();
    var t = vec4<f32>(0.0);
    for (var i = 0u; i < n_sg; i++) {
        t += red[i];
    }
    workgroupBarrier();
    return t;
#else
    red[tid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
#endif
}

fn sum1(v: f32) -> f32 {
    return sum4(vec4<f32>(v, 0.0, 0.0, 0.0)).x;
}

// The maximum of `v` over the workgroup, returned to every thread.
fn max1(v: f32) -> f32 {
#if SUBGROUP
    let s = subgroupMax(v);
    if sg_lane == 0u {
        red[sg_id].x = s;
    }
    workgroupBarrier();
    var t = red[0].x;
    for (var i = 1u; i < n_sg; i++) {
        t = max(t, red[i].x);
    }
    workgroupBarrier();
    return t;
#else
    red[tid].x = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid].x = max(red[tid].x, red[tid + s].x);
        }
        workgroupBarrier();
    }
    let t = red[0].x;
    workgroupBarrier();
    return t;
#endif
}

// Element `e` of a row-major matrix of f16 values stored two per u32
// (element 2i in the low half of word i).
fn half_at(words: u32, e: u32) -> f32 {
    return unpack2x16float(words)[e & 1u];
}
