// convert.cu: weight expansion and gathers: f16 -> f32, embedding rows,
// packed -> f32 dequantization (the weight side of the prefill GEMM, see
// src/backend/cuda/linear.rs).
//
// Kernels (all: blockDim = (CONVERT_THREADS = 256, 1, 1), any gridDim.x >= 1,
// grid-stride loops, no shared memory; outputs never alias inputs):
//   f16_to_f32(const unsigned short *src, float *dst, long long n)
//       dst[i] = (float)src[i] (IEEE half bits), i < n.
//   f32_to_f16(const float *src, unsigned short *dst, long long n)
//       dst[i] = the half bits of src[i] rounded to nearest even, f16
//       subnormals kept, saturating at +-65504 (f16's largest finite
//       value), NaN stays NaN, i < n (the scale search's activations kept
//       in f16: Search::to_half).
//   embedding_f16(const unsigned short *table, const unsigned int *ids,
//                 float *y, int n, int dim)
//       table: [vocab, dim] f16 bits; ids: [n], each < vocab (checked on the
//       host); y: [n, dim], y[r, c] = table[ids[r], c].
//   embedding_f32(const float *table, const unsigned int *ids, float *y, int n, int dim)
//       the same with an f32 table.
//   dequant_packed_f32(const unsigned int *q, const unsigned int *sz, float *w,
//                      int out, int in, int bits, int group)
//       The packed format of src/quant/format.rs (layout in gemv_packed.cu;
//       bits in {3, 4, 8}, group a multiple of 32 dividing in):
//       w[o, i] = (code(o, i) - z[o, i / group]) * s[o, i / group] in f32,
//       w: [out, in] row-major; sz: [out, in / group] (scale | zero << 16) f16 pairs.
//       Equal to `PackedLinear::dequantize` bit for bit.

typedef unsigned int u32;

#define CONVERT_THREADS 256

// An IEEE half (its 16 bits in the low half of `h`) as f32, without
// cuda_fp16.h (see gemv_f16.cu).
static __device__ __forceinline__ float f16_to_f32_bits(u32 h) {
    unsigned short b = (unsigned short)(h & 0xffffu);
#ifdef MBQ_HOST_EMULATION
    return mbq_host_f16(b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
}

extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
    f16_to_f32(const unsigned short *src, float *dst, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        dst[i] = f16_to_f32_bits(src[i]);
    }
}

extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
    f32_to_f16(const float *src, unsigned short *dst, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float v = src[i];
        if (v == v) v = fminf(fmaxf(v, -65504.0f), 65504.0f);
#ifdef MBQ_HOST_EMULATION
        dst[i] = mbq_host_f32_to_f16(v);
#else
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        dst[i] = h;
#endif
    }
}

extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
    embedding_f16(const unsigned short *table, const u32 *ids, float *y, int n, int dim) {
    const long long total = (long long)n * dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long r = i / dim;
        const long long c = i % dim;
        y[i] = f16_to_f32_bits(table[(long long)ids[r] * dim + c]);
    }
}

extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
    embedding_f32(const float *table, const u32 *ids, float *y, int n, int dim) {
    const long long total = (long long)n * dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long r = i / dim;
        const long long c = i % dim;
        y[i] = table[(long long)ids[r] * dim + c];
    }
}

extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
    dequant_packed_f32(const u32 *q, const u32 *sz, float *w, int out, int in, int bits,
                       int group) {
    const long long total = (long long)out * in;
    const int groups = in / group;
    const int wpg = group * bits / 32;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long o = t / in;
        const int i = (int)(t % in);
        const long long gi = o * groups + i / group;
        const int kk = i % group;
        const u32 *gw = q + gi * wpg;
        u32 code;
        if (bits == 3) {
            const u32 lo = (gw[kk / 16] >> (2 * (kk % 16))) & 3u;
            const u32 hi = (gw[group / 16 + kk / 32] >> (kk % 32)) & 1u;
            code = lo | (hi << 2);
        } else {
            const int per = 32 / bits;
            code = (gw[kk / per] >> (bits * (kk % per))) & ((1u << bits) - 1u);
        }
        const u32 pair = sz[gi];
        const float s = f16_to_f32_bits(pair);
        const float z = f16_to_f32_bits(pair >> 16);
        w[t] = __fmul_rn(__fsub_rn((float)code, z), s);
    }
}
