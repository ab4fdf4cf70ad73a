// gemv_f16.cu: dense matrix product with an f16 weight for a few tokens
// (decode, 1..MAXM rows of x), the baseline that gemv_packed.cu is
// measured against:
//
//   y[t, o] = sum_i w[o, i] * x[t, i] (+ bias[o])      for t < m
//
// Kernel:
//   gemv_f16(
//       const unsigned short *w,  // [out, in] f16 bits, row-major, 16-byte aligned
//       const float *x,           // [m, in] f32, row-major, 16-byte aligned
//       const float *bias,        // [out] or NULL for no bias
//       float *y,                 // [m, out] output, row-major (row stride out)
//       int in,                   // input features (any value >= 0)
//       int out,                  // output features
//       int m)                    // tokens (rows of x and y), 1 <= m <= MAXM = 8
//
// Launch: blockDim = (GEMV_F16_THREADS = 128, 1, 1), gridDim =
// (ceil(out / GEMV_F16_ROWS), 1, 1), no dynamic shared memory; one launch
// for all m tokens. Each warp computes ROWS_PER_WARP = 2 consecutive rows of
// W (GEMV_F16_ROWS = 8 rows per block) for every token, with one accumulator
// per (row, token): each weight value is loaded once and used for all m
// tokens. The lanes stride over the input 8 values at a time with one
// 128-bit load of w (8 halves) per row and, per token, two 128-bit loads of
// x shared by both rows. When `in` is not a multiple of 8 (rows not 16-byte
// aligned) the kernel falls back to one value at a time. Per token the
// accumulation order is the one of the single-token kernel (m = 1 computes
// exactly as before). Warp-shuffle reduction per (row, token); lane 0
// writes.

typedef unsigned int u32;

#define GEMV_F16_THREADS 128
#define ROWS_PER_WARP 2
#define GEMV_F16_ROWS ((GEMV_F16_THREADS / 32) * ROWS_PER_WARP)
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

// sum over the two halves of `w` times (a, b).
static __device__ __forceinline__ float dot2(u32 w, float a, float b, float acc) {
    acc = fmaf(f16_to_f32(w), a, acc);
    return fmaf(f16_to_f32(w >> 16), b, acc);
}

extern "C" __global__ void __launch_bounds__(GEMV_F16_THREADS)
    gemv_f16(const unsigned short *__restrict__ w, const float *__restrict__ x,
             const float *__restrict__ bias, float *__restrict__ y, int in, int out, int m) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int first = blockIdx.x * GEMV_F16_ROWS + warp * ROWS_PER_WARP;
    if (first >= out) {
        return;  // the whole warp leaves together
    }
    int rows[ROWS_PER_WARP];
    float acc[ROWS_PER_WARP][MAXM];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        rows[r] = min(first + r, out - 1);
#pragma unroll
        for (int t = 0; t < MAXM; t++) {
            acc[r][t] = 0.0f;
        }
    }
    if (in % 8 == 0) {
        const int chunks = in / 8;
        for (int c = lane; c < chunks; c += 32) {
            uint4 v[ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                v[r] = reinterpret_cast<const uint4 *>(w + (long long)rows[r] * in)[c];
            }
#pragma unroll
            for (int t = 0; t < MAXM; t++) {
                if (t < m) {
                    const float4 *x4 = reinterpret_cast<const float4 *>(x + (long long)t * in);
                    const float4 a = x4[2 * c];
                    const float4 b = x4[2 * c + 1];
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; r++) {
                        float s = acc[r][t];
                        s = dot2(v[r].x, a.x, a.y, s);
                        s = dot2(v[r].y, a.z, a.w, s);
                        s = dot2(v[r].z, b.x, b.y, s);
                        s = dot2(v[r].w, b.z, b.w, s);
                        acc[r][t] = s;
                    }
                }
            }
        }
    } else {
        for (int i = lane; i < in; i += 32) {
            float wv[ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                wv[r] = f16_to_f32(w[(long long)rows[r] * in + i]);
            }
#pragma unroll
            for (int t = 0; t < MAXM; t++) {
                if (t < m) {
                    const float xi = x[(long long)t * in + i];
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; r++) {
                        acc[r][t] = fmaf(wv[r], xi, acc[r][t]);
                    }
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
