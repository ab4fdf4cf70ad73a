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
// `gw` (kg % 32 == 0): 8 bits: words kg / 4 ..; 4 bits: words kg / 8 ..;
// 3 bits: the two low-bit words kg / 16, kg / 16 + 1, then the high-bit
// word GROUP / 16 + kg / 32. Loaded once, decoded by `dot32` as often as
// there are tokens.
fn words32(gw: u32, kg: u32) -> array<u32, BITS> {
    var ws: array<u32, BITS>;
    if BITS == 8u {
        for (var i = 0u; i < BITS; i++) {
            ws[i] = q[gw + kg / 4u + i];
        }
    } else if BITS == 4u {
        for (var i = 0u; i < BITS; i++) {
            ws[i] = q[gw + kg / 8u + i];
        }
    } else {
        ws[0] = q[gw + kg / 16u];
        ws[1] = q[gw + kg / 16u + 1u];
        ws[2] = q[gw + GROUP / 16u + kg / 32u];
    }
    return ws;
}

// sum_i code[i] * xs[i] over the 32 codes in `ws` (`words32`).
fn dot32(ws: array<u32, BITS>, xs: ptr<function, array<vec4<f32>, 8>>) -> f32 {
    var acc = 0.0;
    if BITS == 8u {
        for (var i = 0u; i < 8u; i++) {
            let word = ws[i];
            let c = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u));
            acc += dot(c, (*xs)[i]);
        }
    } else if BITS == 4u {
        for (var i = 0u; i < 4u; i++) {
            let word = ws[i];
            let c0 = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
            let c1 = vec4<f32>((vec4<u32>(word) >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u));
            acc += dot(c0, (*xs)[2u * i]) + dot(c1, (*xs)[2u * i + 1u]);
        }
    } else {
        let hi = ws[2];
        for (var i = 0u; i < 2u; i++) {
            let lo = ws[i];
            for (var j = 0u; j < 4u; j++) {
                let l = (vec4<u32>(lo >> (8u * j)) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
                let h = (vec4<u32>(hi >> (16u * i + 4u * j)) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
                acc += dot(vec4<f32>(l | (h << vec4<u32>(2u))), (*xs)[4u * i + j]);
            }
        }
    }
    return acc;
}
