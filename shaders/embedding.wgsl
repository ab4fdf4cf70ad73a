// embedding.wgsl: rows of an embedding table. A table larger than one
// storage binding is split by rows; each part is one dispatch that writes
// the output rows whose id falls inside it.
//
// One thread per output value (r, c):
//   y[r, c] = table[ids[r] - row0, c]   if row0 <= ids[r] < row0 + n_rows
//
// Bindings:
//   @binding(0) table: array<u32> (F16: two f16 per word) or array<f32>;
//                      rows of `ld` elements (ld >= dim, zero padded)
//   @binding(1) ids:   array<u32> [n]
//   @binding(2) y:     array<f32> [n, dim]   output
//   @binding(3) p:     Params
// Constants: WG. Flag F16.

#include "common.wgsl"

struct Params {
    n: u32,
    dim: u32,
    ld: u32,
    row0: u32,
    n_rows: u32,
}

#if F16
@group(0) @binding(0) var<storage, read> table: array<u32>;
#else
@group(0) @binding(0) var<storage, read> table: array<f32>;
#endif
@group(0) @binding(1) var<storage, read> ids_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn embedding(ids: Ids) {
    setup(ids);
    let idx = wgi * WG + tid;
    if idx >= p.n * p.dim {
        return;
    }
    let r = idx / p.dim;
    let c = idx % p.dim;
    let id = ids_in[r];
    if id < p.row0 || id >= p.row0 + p.n_rows {
        return;
    }
    let e = (id - p.row0) * p.ld + c;
#if F16
    y[idx] = half_at(table[e >> 1u], e);
#else
    y[idx] = table[e];
#endif
}
