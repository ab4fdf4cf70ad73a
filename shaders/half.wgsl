// half.wgsl: activations the scale search keeps as f16 (Search::to_half and
// Search::half_to_f32 in backend/search.rs; the CPU reference is the `half`
// crate's conversion, round to nearest even).
//
//   to_half:   one thread per output word, two values each:
//              h[i] = f16(x[2i]) | f16(x[2i + 1]) << 16 (the last word's high
//              half 0 when n is odd); f16() rounds to nearest even and
//              saturates at +-65504 (f16's largest finite value)
//   half_to_f32: one thread per value: y[i] = f32(half i of h) (exact)
//
// The conversions are integer arithmetic on the bits, because WGSL neither
// promises that `pack2x16float` rounds to nearest even nor that
// `unpack2x16float` keeps f16 subnormals: so the values are the reference's
// bit for bit (f16 subnormals kept, |x| >= 65504 to +-65504, NaN stays NaN).
//
// Bindings (both entry points; f32 values travel as their bits):
//   @binding(0) src: array<u32>  x [n] (to_half) or h [ceil(n / 2)] (half_to_f32)
//   @binding(2) dst: array<u32>  h [ceil(n / 2)] (to_half) or y [n] (half_to_f32)
//   @binding(3) p: Params        n, the number of values
// Constants: WG.
// Dispatch: ceil(ceil(n / 2) / WG) workgroups (to_half), ceil(n / WG)
// (half_to_f32).

#include "common.wgsl"

struct Params {
    n: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

// The f16 bits of the f32 with bits `b`, rounded to nearest even,
// saturating at +-65504.
fn f16_bits(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if a > 0x7f800000u {
        // NaN: quiet, the payload's top bits.
        return sign | 0x7e00u | ((a & 0x7fffffu) >> 13u);
    }
    if a >= 0x477fe000u {
        // 65504 and above (infinity included): the largest finite f16.
        return sign | 0x7bffu;
    }
    if a < 0x33000000u {
        // Below 2^-25: zero.
        return sign;
    }
    let e = a >> 23u;
    if e >= 113u {
        // An f16 normal: rebias the exponent, drop 13 mantissa bits; a carry
        // into the exponent is the right result (below 65504: no overflow).
        var h = (a - (112u << 23u)) >> 13u;
        let lost = a & 0x1fffu;
        if lost > 0x1000u || (lost == 0x1000u && (h & 1u) == 1u) {
            h += 1u;
        }
        return sign | h;
    }
    // An f16 subnormal (units of 2^-24): the significand shifted right by
    // 126 - e (14..24) bits, rounded.
    let m = (a & 0x7fffffu) | 0x800000u;
    let d = 126u - e;
    var h = m >> d;
    let lost = m & ((1u << d) - 1u);
    let half = 1u << (d - 1u);
    if lost > half || (lost == half && (h & 1u) == 1u) {
        h += 1u;
    }
    return sign | h;
}

// The f32 bits of the f16 with bits `h` (exact).
fn f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0x1fu {
        return sign | 0x7f800000u | (m << 13u);
    }
    if e == 0u {
        if m == 0u {
            return sign;
        }
        // m 2^-24: an f32 normal, exact.
        return sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

@compute @workgroup_size(WG)
fn to_half(ids: Ids) {
    setup(ids);
    let i = wgi * WG + tid;
    let words = (p.n + 1u) / 2u;
    if i >= words {
        return;
    }
    let lo = f16_bits(src[2u * i]);
    var hi = 0u;
    if 2u * i + 1u < p.n {
        hi = f16_bits(src[2u * i + 1u]);
    }
    dst[i] = lo | (hi << 16u);
}

@compute @workgroup_size(WG)
fn half_to_f32(ids: Ids) {
    setup(ids);
    let i = wgi * WG + tid;
    if i >= p.n {
        return;
    }
    dst[i] = f32_bits((src[i / 2u] >> (16u * (i & 1u))) & 0xffffu);
}
