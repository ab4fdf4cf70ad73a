// gemv_f16.cu: dense matrix-vector product with an f16 weight (one token),
// the baseline that gemv_packed.cu is measured against:
//
//   y[o] = sum_i w[o, i] * x[i] (+ bias[o])
//
// Kernel:
//   gemv_f16(
//       const unsigned short *w,  // [out, in] f16 bits, row-major, 16-byte aligned
//       const float *x,           // [in] f32, 16-byte aligned
//       const float *bias,        // [out] or NULL for no bias
//       float *y,                 // [out] output
//       int in,                   // input features (any value >= 0)
//       int out)                  // output features
//
// Launch: blockDim = (GEMV_F16_THREADS = 128, 1, 1), gridDim =
// (ceil(out / GEMV_F16_ROWS), 1, 1), no dynamic shared memory. Each warp
// computes ROWS_PER_WARP = 2 consecutive rows (GEMV_F16_ROWS = 8 rows per
// block); the lanes stride over the input 8 values at a time with one
// 128-bit load of w (8 halves) per row and two 128-bit loads of x, shared by
// both rows. When `in` is not a multiple of 8 (rows not 16-byte aligned) the
// kernel falls back to one value at a time. Warp-shuffle reduction; lane 0
// writes.

typedef unsigned int u32;

#define GEMV_F16_THREADS 128
#define ROWS_PER_WARP 2
#define GEMV_F16_ROWS ((GEMV_F16_THREADS / 32) * ROWS_PER_WARP)

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
             const float *__restrict__ bias, float *__restrict__ y, int in, int out) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int first = blockIdx.x * GEMV_F16_ROWS + warp * ROWS_PER_WARP;
    if (first >= out) {
        return;  // the whole warp leaves together
    }
    int rows[ROWS_PER_WARP];
    float acc[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        rows[r] = min(first + r, out - 1);
        acc[r] = 0.0f;
    }
    if (in % 8 == 0) {
        const int chunks = in / 8;
        const float4 *x4 = reinterpret_cast<const float4 *>(x);
        for (int c = lane; c < chunks; c += 32) {
            const float4 a = x4[2 * c];
            const float4 b = x4[2 * c + 1];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                const uint4 *row = reinterpret_cast<const uint4 *>(w + (long long)rows[r] * in);
                const uint4 v = row[c];
                float s = acc[r];
                s = dot2(v.x, a.x, a.y, s);
                s = dot2(v.y, a.z, a.w, s);
                s = dot2(v.z, b.x, b.y, s);
                s = dot2(v.w, b.z, b.w, s);
                acc[r] = s;
            }
        }
    } else {
        for (int i = lane; i < in; i += 32) {
            const float xi = x[i];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                acc[r] = fmaf(f16_to_f32(w[(long long)rows[r] * in + i]), xi, acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        acc[r] = warp_sum(acc[r]);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            const int o = first + r;
            if (o < out) {
                y[o] = acc[r] + (bias != 0 ? bias[o] : 0.0f);
            }
        }
    }
}
