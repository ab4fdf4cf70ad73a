// packed.wgsl: reading the packed weight format (src/quant/format.rs, the
// one definition). Included by gemv_packed.wgsl and gemm.wgsl.
//
// A row of W [out, in] is in / GROUP groups; group g of row r holds WPG =
// GROUP * BITS / 32 words starting at word (r * groups + g) * WPG of `q`:
//   8 bits: code k in word k / 4, bits 8 (k % 4)..
//   4 bits: code k in word k / 8, bits 4 (k % 8)..
//   3 bits: low two bits of code k in word k / 16, bits 2 (k % 16)..; the
//           high bit in word GROUP / 16 + k / 32, bit k % 32.
// `sz` holds one u32 per (row, group): f16 scale (low half), f16 zero
// (high half); w = (code - zero) * scale.
//
// Needs: `q: array<u32>`, `sz: array<u32>`, constants BITS and GROUP.

const WPG: u32 = GROUP * BITS / 32u;

// (scale, zero) of group g of row r, `groups` groups per row.
fn scale_zero(r: u32, g: u32, groups: u32) -> vec2<f32> {
    return unpack2x16float(sz[r * groups + g]);
}

// Codes kg..kg+3 of the group starting at word `gw` (kg % 4 == 0).
fn codes4(gw: u32, kg: u32) -> vec4<f32> {
    if BITS == 8u {
        let word = q[gw + kg / 4u];
        return vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u));
    } else if BITS == 4u {
        let word = q[gw + kg / 8u] >> (4u * (kg % 8u));
        return vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
    } else {
        let lo = q[gw + kg / 16u] >> (2u * (kg % 16u));
        let hi = q[gw + GROUP / 16u + kg / 32u] >> (kg % 32u);
        let l = (vec4<u32>(lo) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
        let h = (vec4<u32>(hi) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
        return vec4<f32>(l | (h << vec4<u32>(2u)));
    }
}

// The BITS words holding codes kg..kg+31 of the group starting at word
// `gw` (kg % 32 == 0), in `a` then `b`: 8 bits: words kg / 4 .. (a, b);
// 4 bits: words kg / 8 .. (a); 3 bits: the two low-bit words kg / 16,
// kg / 16 + 1 (a.x, a.y), then the high-bit word GROUP / 16 + kg / 32
// (a.z). Loaded once, decoded by `dot32` as often as there are tokens.
// (Vectors rather than an array: no dynamically indexed local memory.)
struct Words32 {
    a: vec4<u32>,
    b: vec4<u32>,
}

fn words32(gw: u32, kg: u32) -> Words32 {
    var ws = Words32(vec4<u32>(0u), vec4<u32>(0u));
    if BITS == 8u {
        let w0 = gw + kg / 4u;
        ws.a = vec4<u32>(q[w0], q[w0 + 1u], q[w0 + 2u], q[w0 + 3u]);
        ws.b = vec4<u32>(q[w0 + 4u], q[w0 + 5u], q[w0 + 6u], q[w0 + 7u]);
    } else if BITS == 4u {
        let w0 = gw + kg / 8u;
        ws.a = vec4<u32>(q[w0], q[w0 + 1u], q[w0 + 2u], q[w0 + 3u]);
    } else {
        let w0 = gw + kg / 16u;
        ws.a = vec4<u32>(q[w0], q[w0 + 1u], q[gw + GROUP / 16u + kg / 32u], 0u);
    }
    return ws;
}

// The 4 8-bit codes of `word` at xs[i], dotted.
fn dot8bit(word: u32, x: vec4<f32>) -> f32 {
    let c = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u));
    return dot(c, x);
}

// sum_i code[i] * xs[i] over the 32 codes in `ws` (`words32`).
fn dot32(ws: Words32, xs: ptr<function, array<vec4<f32>, 8>>) -> f32 {
    var acc = 0.0;
    if BITS == 8u {
        for (var i = 0u; i < 4u; i++) {
            acc += dot8bit(ws.a[i], (*xs)[i]);
        }
        for (var i = 0u; i < 4u; i++) {
            acc += dot8bit(ws.b[i], (*xs)[4u + i]);
        }
    } else if BITS == 4u {
        for (var i = 0u; i < 4u; i++) {
            let word = ws.a[i];
            let c0 = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
            let c1 = vec4<f32>((vec4<u32>(word) >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u));
            acc += dot(c0, (*xs)[2u * i]) + dot(c1, (*xs)[2u * i + 1u]);
        }
    } else {
        let hi = ws.a.z;
        for (var i = 0u; i < 2u; i++) {
            let lo = ws.a[i];
            for (var j = 0u; j < 4u; j++) {
                let l = (vec4<u32>(lo >> (8u * j)) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
                let h = (vec4<u32>(hi >> (16u * i + 4u * j)) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
                acc += dot(vec4<f32>(l | (h << vec4<u32>(2u))), (*xs)[4u * i + j]);
            }
        }
    }
    return acc;
}
