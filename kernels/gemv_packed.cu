// gemv_packed.cu: fused dequantize + matrix product with a packed weight
// for a few tokens (decode, 1..MAXM rows of x), reading the packed words
// directly. The format is the one of src/quant/format.rs (the one
// definition; shaders/packed.wgsl reads the same bytes):
//
//   y[t, o] = sum_i x[t, i] * (q[o, i] - z[o, i / GROUP]) * s[o, i / GROUP] (+ bias[o])
//                                                            for t < m
//
// Layout of the packed weight W [out, in], groups of GROUP inputs per row,
// WPG = GROUP * BITS / 32 words per group, group g of row o at word
// (o * (in / GROUP) + g) * WPG of `q`:
//   8 bits: code k of a group in word k / 4, bits 8 (k % 4)..
//   4 bits: code k in word k / 8, bits 4 (k % 8)..
//   3 bits: two bit planes: the low two bits of code k in word k / 16, bits
//           2 (k % 16)..; the high bit in word GROUP / 16 + k / 32, bit k % 32.
// `sz` holds one u32 per (row, group), [out, in / GROUP]: the f16 scale in
// the low half, the f16 zero in the high half (the little-endian f16 pair
// (scale, zero) of `scales_zeros`).
//
// Kernels (one per BITS in {3, 4, 8} x GROUP in {32, 64, 128}):
//   gemv_packed_w{BITS}_g{GROUP}(
//       const float *x,      // [m, in] activations, f32, row-major, 16-byte aligned
//       const uint32_t *q,   // [out, in * BITS / 32] packed codes, 16-byte aligned
//       const uint32_t *sz,  // [out, in / GROUP] (scale, zero) f16 pairs
//       const float *bias,   // [out] or NULL for no bias
//       float *y,            // [m, out] output, row-major (row stride out)
//       int in,              // input features, a multiple of GROUP
//       int out,             // output features (rows of W)
//       int m)               // tokens (rows of x and y), 1 <= m <= MAXM = 8
//
// Launch: blockDim = (GEMV_PACKED_THREADS = 128, 1, 1), gridDim =
// (ceil(out / GEMV_PACKED_ROWS), 1, 1), no dynamic shared memory; one
// launch for all m tokens. Each warp computes ROWS_PER_WARP = 2 consecutive
// rows, so a block computes GEMV_PACKED_ROWS = 8 rows, for every token, with
// one accumulator per (row, token). The lanes of a warp stride over the
// input in blocks of 32 values (a group is 1, 2 or 4 such blocks, all with
// the same (s, z)); the codes and (s, z) of a block are loaded once per row
// and used for all m tokens; per token the block of x is loaded once (8 x
// 128-bit loads) and used for both rows. The zero point is folded per block:
//   sum_i (q_i - z) s x_i = s (sum_i q_i x_i - z sum_i x_i),
// so a weight costs one integer extract and one FMA per token, and (s, z)
// one load and two FMAs per token per 32 weights. The codes of a block are
// 128-bit loads for 4 and 8 bits (4 / 8 words), a 64-bit load of the low
// plane plus one word of the high plane for 3 bits (32-bit loads for GROUP
// 32, whose groups are 3 words and so not 8-byte aligned). Per token the
// accumulation order is the one of the single-token kernel (m = 1 computes
// exactly as before). The per-lane sums are reduced with warp shuffles per
// (row, token); lane 0 writes.

typedef unsigned int u32;

#define GEMV_PACKED_THREADS 128
#define ROWS_PER_WARP 2
#define GEMV_PACKED_ROWS ((GEMV_PACKED_THREADS / 32) * ROWS_PER_WARP)
// Most tokens per launch (the host's GEMV_MAX_ROWS, src/backend/cuda/mod.rs).
#define MAXM 8

// An IEEE half (its 16 bits in the low half of `h`) as f32, without
// cuda_fp16.h: one PTX conversion (tests/cuda_host_emu runs these kernels
// on the CPU with its own conversion).
static __device__ __forceinline__ float f16_to_f32(u32 h) {
    unsigned short b = (unsigned short)(h & 0xffffu);
#ifdef MBQ_HOST_EMULATION
    return mbq_host_f16(b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// sum_k code[k] * x[k] over 8 codes of 4 bits in `w` (code k at bits 4k..).
static __device__ __forceinline__ float dot8_w4(u32 w, float4 a, float4 b) {
    float s = (float)(w & 15u) * a.x;
    s = fmaf((float)((w >> 4) & 15u), a.y, s);
    s = fmaf((float)((w >> 8) & 15u), a.z, s);
    s = fmaf((float)((w >> 12) & 15u), a.w, s);
    s = fmaf((float)((w >> 16) & 15u), b.x, s);
    s = fmaf((float)((w >> 20) & 15u), b.y, s);
    s = fmaf((float)((w >> 24) & 15u), b.z, s);
    s = fmaf((float)(w >> 28), b.w, s);
    return s;
}

// sum_k code[k] * x[k] over 4 codes of 8 bits in `w`.
static __device__ __forceinline__ float dot4_w8(u32 w, float4 a) {
    float s = (float)(w & 255u) * a.x;
    s = fmaf((float)((w >> 8) & 255u), a.y, s);
    s = fmaf((float)((w >> 16) & 255u), a.z, s);
    s = fmaf((float)(w >> 24), a.w, s);
    return s;
}

// sum_k code[k] * x[k] over 4 codes of 3 bits: the low two bits at bits
// 2k.. of `lo`, the high bit at bit k of `hi`.
static __device__ __forceinline__ float dot4_w3(u32 lo, u32 hi, float4 a) {
    float s = (float)((lo & 3u) | ((hi & 1u) << 2)) * a.x;
    s = fmaf((float)(((lo >> 2) & 3u) | ((hi << 1) & 4u)), a.y, s);
    s = fmaf((float)(((lo >> 4) & 3u) | (hi & 4u)), a.z, s);
    s = fmaf((float)(((lo >> 6) & 3u) | ((hi >> 1) & 4u)), a.w, s);
    return s;
}

// The words holding the 32 codes kg..kg+31 (kg % 32 == 0) of the group
// starting at word `gw` of `q`: 8 words for 8 bits, 4 for 4 bits; for 3 bits
// the two low-plane words then the high-plane word (w[0], w[1], w[2]).
template <int BITS, int GROUP>
static __device__ __forceinline__ void load32(const u32 *__restrict__ q, long long gw, int kg,
                                              u32 (&w)[8]) {
    if (BITS == 8) {
        const uint4 *p = reinterpret_cast<const uint4 *>(q + gw + kg / 4);
        const uint4 w0 = p[0];
        const uint4 w1 = p[1];
        w[0] = w0.x; w[1] = w0.y; w[2] = w0.z; w[3] = w0.w;
        w[4] = w1.x; w[5] = w1.y; w[6] = w1.z; w[7] = w1.w;
    } else if (BITS == 4) {
        const uint4 v = *reinterpret_cast<const uint4 *>(q + gw + kg / 8);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {
        if ((GROUP * 3 / 32) % 2 == 0) {
            const uint2 lo = *reinterpret_cast<const uint2 *>(q + gw + kg / 16);
            w[0] = lo.x;
            w[1] = lo.y;
        } else {
            w[0] = q[gw + kg / 16];
            w[1] = q[gw + kg / 16 + 1];
        }
        w[2] = q[gw + GROUP / 16 + kg / 32];
    }
}

// sum_k code[k] * xs[k] over the 32 codes of `w` (as load32 read them).
template <int BITS>
static __device__ __forceinline__ float dot32(const u32 (&w)[8], const float4 (&xs)[8]) {
    float acc = 0.0f;
    if (BITS == 8) {
        acc = dot4_w8(w[0], xs[0]) + dot4_w8(w[1], xs[1]) + dot4_w8(w[2], xs[2]) +
              dot4_w8(w[3], xs[3]) + dot4_w8(w[4], xs[4]) + dot4_w8(w[5], xs[5]) +
              dot4_w8(w[6], xs[6]) + dot4_w8(w[7], xs[7]);
    } else if (BITS == 4) {
        acc = dot8_w4(w[0], xs[0], xs[1]) + dot8_w4(w[1], xs[2], xs[3]) +
              dot8_w4(w[2], xs[4], xs[5]) + dot8_w4(w[3], xs[6], xs[7]);
    } else {
        const u32 lo0 = w[0], lo1 = w[1], hi = w[2];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc += dot4_w3(lo0 >> (8 * j), hi >> (4 * j), xs[j]);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            acc += dot4_w3(lo1 >> (8 * j), hi >> (16 + 4 * j), xs[4 + j]);
        }
    }
    return acc;
}

template <int BITS, int GROUP>
static __device__ __forceinline__ void gemv_packed(const float *__restrict__ x,
                                                   const u32 *__restrict__ q,
                                                   const u32 *__restrict__ sz,
                                                   const float *__restrict__ bias,
                                                   float *__restrict__ y, int in, int out, int m) {
    const int WPG = GROUP * BITS / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int first = blockIdx.x * GEMV_PACKED_ROWS + warp * ROWS_PER_WARP;
    if (first >= out) {
        return;  // the whole warp leaves together: no shuffle is left waiting
    }
    const int groups = in / GROUP;
    const int blocks = in / 32;
    int rows[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        rows[r] = min(first + r, out - 1);  // a row past the end repeats the last one
    }
    float acc[ROWS_PER_WARP][MAXM];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
#pragma unroll
        for (int t = 0; t < MAXM; t++) {
            acc[r][t] = 0.0f;
        }
    }
    for (int blk = lane; blk < blocks; blk += 32) {
        const int k0 = blk * 32;
        const int g = k0 / GROUP;
        const int kg = k0 % GROUP;
        // The weight of this block, once for all tokens: codes and (s, z).
        u32 w[ROWS_PER_WARP][8];
        float s[ROWS_PER_WARP], z[ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            const long long gi = (long long)rows[r] * groups + g;
            const u32 pair = sz[gi];
            s[r] = f16_to_f32(pair);
            z[r] = f16_to_f32(pair >> 16);
            load32<BITS, GROUP>(q, gi * WPG, kg, w[r]);
        }
#pragma unroll
        for (int t = 0; t < MAXM; t++) {
            if (t < m) {
                const float4 *x4 = reinterpret_cast<const float4 *>(x + (long long)t * in);
                float4 xs[8];
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    xs[i] = x4[blk * 8 + i];
                    v.x += xs[i].x;
                    v.y += xs[i].y;
                    v.z += xs[i].z;
                    v.w += xs[i].w;
                }
                const float xsum = (v.x + v.y) + (v.z + v.w);
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; r++) {
                    const float qx = dot32<BITS>(w[r], xs);
                    acc[r][t] = fmaf(s[r], fmaf(-z[r], xsum, qx), acc[r][t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MAXM; t++) {
        if (t < m) {  // m is the same for the whole warp
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                acc[r][t] = warp_sum(acc[r][t]);
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            const int o = first + r;
            if (o < out) {
                const float bo = bias != 0 ? bias[o] : 0.0f;
#pragma unroll
                for (int t = 0; t < MAXM; t++) {
                    if (t < m) {
                        y[(long long)t * out + o] = acc[r][t] + bo;
                    }
                }
            }
        }
    }
}

#define GEMV_PACKED_ENTRY(BITS, GROUP)                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_PACKED_THREADS)                        \
        gemv_packed_w##BITS##_g##GROUP(const float *__restrict__ x, const u32 *__restrict__ q, \
                                       const u32 *__restrict__ sz,                           \
                                       const float *__restrict__ bias,                       \
                                       float *__restrict__ y, int in, int out, int m) {      \
        gemv_packed<BITS, GROUP>(x, q, sz, bias, y, in, out, m);                             \
    }

GEMV_PACKED_ENTRY(3, 32)
GEMV_PACKED_ENTRY(3, 64)
GEMV_PACKED_ENTRY(3, 128)
GEMV_PACKED_ENTRY(4, 32)
GEMV_PACKED_ENTRY(4, 64)
GEMV_PACKED_ENTRY(4, 128)
GEMV_PACKED_ENTRY(8, 32)
GEMV_PACKED_ENTRY(8, 64)
GEMV_PACKED_ENTRY(8, 128)
