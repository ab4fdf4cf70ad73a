// fake_quant.wgsl: the scale search's fake-quantized weight on the device
// (Search::fake_quant in backend/search.rs; the CPU reference is
// quant::pseudo::fake_quant_scaled).
//
// One thread per quantization group of the weight `W s`: weight-only,
// asymmetric min/max per group of `group` inputs, then divided by s; or
// (flag SYM) W4A8's symmetric INT4 per output row (`group` = `inp`).
// Every value the reference rounds to f16 is rounded here with integer
// arithmetic (`rf16`, `div_f16`: round to nearest even, f16 subnormals and
// overflow to infinity included), because WGSL neither promises that
// `pack2x16float` rounds to nearest even nor that `/` is correctly
// rounded; so the codes, scales and zeros are the reference's bit for bit.
// Only the weight-only path's last division by s is a WGSL `/`.
//
//   x = f16(w s), per group:
//   asymmetric: scale = f16(max(f16(max x - min x), f16(1e-5)) / maxq)
//               zero  = clamp(-round(f16(min x / scale)), 0, maxq)
//               q     = clamp(round(f16(x / scale)) + zero, 0, maxq)
//               y     = f16((q - zero) scale) / s
//   SYM:        scale = f16(max(max |x|, f16(1e-5)) / 7)
//               y     = f16(clamp(round(f16(x / scale)), -8, 7) scale)
//
// Bindings:
//   @binding(0) w: array<u32> (F16: two f16 per word) or array<f32>; rows
//                  of `ld` elements (the input weight's chunk; this
//                  dispatch's rows start at its row `in_row0`)
//   @binding(1) s: array<f32> [inp]
//   @binding(2) y: array<f32> [rows, ld]  output (an f32 weight chunk)
//   @binding(3) qp: QParams
// Constants: WG. Flags: F16, SYM.

#include "common.wgsl"

// f32 -> f16 -> f32, round to nearest even (|x| >= 65520 -> infinity).
fn rf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let a = b & 0x7fffffffu;
    if a >= 0x7f800000u {
        return x;
    }
    if a >= 0x477ff000u {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    let e = i32(a >> 23u);
    // Mantissa bits dropped: 13 for f16 normals, more below 2^-14.
    let drop = 13 + max(0, 113 - e);
    if e == 0 || drop > 24 {
        return bitcast<f32>(sign);
    }
    let m = (a & 0x7fffffu) | 0x800000u;
    let d = u32(drop);
    var q = m >> d;
    let lost = m & ((1u << d) - 1u);
    let half = 1u << (d - 1u);
    if lost > half || (lost == half && (q & 1u) == 1u) {
        q += 1u;
    }
    let v = ldexp(f32(q), e - 150 + drop);
    return select(v, -v, sign != 0u);
}

// f16(a / b) for f16 values a and b != 0, correctly rounded (what the
// reference's f32 division then f16 rounding gives: 24 >= 2 * 11 + 2
// bits, so the double rounding is exact).
fn div_f16(a: f32, b: f32) -> f32 {
    let ba = bitcast<u32>(a);
    let bb = bitcast<u32>(b);
    let sign = (ba ^ bb) & 0x80000000u;
    if (ba & 0x7fffffffu) == 0u {
        return bitcast<f32>(sign);
    }
    if (ba & 0x7fffffffu) >= 0x7f800000u {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    let ea = i32((ba >> 23u) & 0xffu);
    let eb = i32((bb >> 23u) & 0xffu);
    // f16 values are f32 normals: 11 significant bits each.
    let ma = ((ba & 0x7fffffu) | 0x800000u) >> 13u;
    let mb = ((bb & 0x7fffffu) | 0x800000u) >> 13u;
    let num = ma << 20u;
    let q = num / mb;
    let sticky = (num % mb) != 0u;
    // The quotient is (q + rest) 2^lsb, q of 20 or 21 bits.
    let lsb = ea - eb - 20;
    let nb = select(20, 21, q >= (1u << 20u));
    let top = lsb + nb - 1;
    if top > 15 {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    let ulp = max(top - 10, -24);
    let drop = ulp - lsb;
    if drop >= 31 {
        return bitcast<f32>(sign);
    }
    let d = u32(drop);
    var r = q >> d;
    let lost = q & ((1u << d) - 1u);
    let half = 1u << (d - 1u);
    if lost > half || (lost == half && (sticky || (r & 1u) == 1u)) {
        r += 1u;
    }
    var v = ldexp(f32(r), ulp);
    if v > 65504.0 {
        v = bitcast<f32>(0x7f800000u);
    }
    return select(v, -v, sign != 0u);
}

struct QParams {
    rows: u32,
    inp: u32,
    ld: u32,
    in_row0: u32,
    group: u32,
    maxq: u32,
}

#if F16
@group(0) @binding(0) var<storage, read> w: array<u32>;
#else
@group(0) @binding(0) var<storage, read> w: array<f32>;
#endif
@group(0) @binding(1) var<storage, read> s: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> qp: QParams;

// f16(w[r, c] s[c]), r a row of the output chunk.
fn x_at(r: u32, c: u32) -> f32 {
    let e = (qp.in_row0 + r) * qp.ld + c;
#if F16
    let v = half_at(w[e >> 1u], e);
#else
    let v = w[e];
#endif
    return rf16(v * s[c]);
}

@compute @workgroup_size(WG)
fn fake_quant(ids: Ids) {
    setup(ids);
    let per_row = qp.inp / qp.group;
    let gi = wgi * WG + tid;
    if gi >= qp.rows * per_row {
        return;
    }
    let r = gi / per_row;
    let c0 = (gi % per_row) * qp.group;
    let c1 = c0 + qp.group;
    let floor = rf16(1e-5);
    let out = r * qp.ld;
#if !SYM
    let maxq = f32(qp.maxq);
    var mx = x_at(r, c0);
    var mn = mx;
    for (var c = c0 + 1u; c < c1; c++) {
        let x = x_at(r, c);
        mx = max(mx, x);
        mn = min(mn, x);
    }
    let scale = div_f16(max(rf16(mx - mn), floor), maxq);
    let zero = clamp(-round(div_f16(mn, scale)), 0.0, maxq);
    for (var c = c0; c < c1; c++) {
        let q = clamp(round(div_f16(x_at(r, c), scale)) + zero, 0.0, maxq);
        y[out + c] = rf16((q - zero) * scale) / s[c];
    }
#else
    var amax = 0.0;
    for (var c = c0; c < c1; c++) {
        amax = max(amax, abs(x_at(r, c)));
    }
    let scale = div_f16(max(amax, floor), 7.0);
    for (var c = c0; c < c1; c++) {
        let q = clamp(round(div_f16(x_at(r, c), scale)), -8.0, 7.0);
        y[out + c] = rf16(q * scale);
    }
#endif
}
