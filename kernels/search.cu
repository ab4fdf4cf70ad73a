// search.cu: the scale search's device ops (src/backend/search.rs): the
// fake-quantized weight Q(W s) of one grid point, made from the layer's
// weight on the device, the output error reduced to three sums, and the
// activation statistics (per-column |x| sums and maxima, masked |x| sums).
//
// fake_quant reproduces the CPU reference (`quant::pseudo::fake_quant_scaled`
// -> `quantize_group` / `fake_quantize`, and `quant::w4a8::quantize_row` /
// `fake_quantize_w4_per_channel`) bit for bit: x = w[o, i] * s[i] is one f32
// multiply, and every value the reference rounds to f16 is rounded here
// with r(v) = f32 -> f16 round-to-nearest-even (PTX cvt.rn.f16.f32, which
// overflows to inf and keeps f16 subnormals) -> f32. Divisions and products
// are the IEEE-rounded intrinsics (__fdiv_rn, __fmul_rn: no fast-math, no
// contraction), rint is round-half-to-even, and the clamps are written in
// the reference's order (clamp(v, lo, hi) = fminf(fmaxf(v, lo), hi)).
//
// Kernels:
//   fake_quant_group_f32(const float *w, const float *s, float *y,
//                        int out, int inp, int bits, int group)
//   fake_quant_group_f16(const unsigned short *w, const float *s, float *y,
//                        int out, int inp, int bits, int group)
//       Weight-only asymmetric min/max per group of `group` inputs (a
//       multiple of 32 dividing inp), m = 2^bits - 1, over x = w s:
//         mx = max r(x), mn = min r(x) over the group
//         scale = r(max(r(mx - mn), r(1e-5)) / m)
//         zero  = clamp(-rint(r(mn / scale)), 0, m)
//         code  = clamp(rint(r(r(x) / scale)) + zero, 0, m)   (an integer)
//         y[o, i] = r((code - zero) * scale) / s[i]
//       w: [out, inp] row-major (f32, or f16 bits); s: [inp]; y: [out, inp] f32.
//     Launch: blockDim = (SEARCH_THREADS = 256, 1, 1) (a multiple of 32),
//     any gridDim.x >= 1: one warp per (row, group), a grid-stride loop over
//     the out * inp / group groups. y must not alias w.
//   fake_quant_w4_f32(const float *w, const float *s, float *y, int out, int inp)
//   fake_quant_w4_f16(const unsigned short *w, const float *s, float *y,
//                     int out, int inp)
//       W4A8's weights: symmetric INT4 per output row of x = w s:
//         scale = r(max(max_i |r(x)|, r(1e-5)) / 7)
//         y[o, i] = r(clamp(rint(r(r(x) / scale)), -8, 7) * scale)
//       (no division by s: the linear divides its input). Shapes as above.
//     Launch: one block per row (gridDim.x = out), blockDim.x a multiple of
//     32, <= 1024 (SEARCH_THREADS).
//   loss_rows_f32(const float *want, const float *got, float *err,
//                 int rows, int cols, int dist)
//       err[r] = sum_c dist(want[r, c] - got[r, c]) in f32, dist 0: |d|,
//       1: d^2 (`Distance::code`); want, got: [rows, cols]; err: [rows].
//     Launch: one block per row (gridDim.x = rows), blockDim.x a multiple
//     of 32, <= 1024.
//   loss_terms_f32(const float *err, const float *masks, float *terms, int rows)
//       terms[0] = sum of err[r] over the rows with masks[r, 0] != 0
//       (caption), terms[1] likewise with masks[r, 1] (vision), terms[2]
//       over every row; masks: [rows, 2]; terms: [3].
//     Launch: one block (gridDim.x = 1), blockDim.x a multiple of 32,
//     <= 1024; after loss_rows_f32 (or abs_rows_f32) on the same stream.
//   abs_rows_f32(const float *x, float *err, int rows, int cols)
//       err[r] = sum_c |x[r, c]| in f32: loss_rows_f32 with got = 0 and
//       dist |d|. With loss_terms_f32 after it: Search::abs_terms.
//     Launch: as loss_rows_f32.
//   abs_col_stats_f32(const float *x, float *out, int rows, int cols)
//   abs_col_stats_acc_f32(const float *x, const float *acc, float *out,
//                         int rows, int cols)
//       Per column c, over the rows in order:
//         out[0, c] + out[1, c] = (acc[0, c] + acc[1, c]) + sum_r |x[r, c]|
//         out[2, c]             = max(acc[2, c], max_r |x[r, c]|)
//       (acc = 0 for abs_col_stats_f32). The sum is compensated in f32
//       (Neumaier: the running sum s and the sum e of the rounding errors of
//       every s + v), then normalized: hi = s + e, lo = e - (hi - s). Every
//       operation is an IEEE-rounded intrinsic (__fadd_rn, __fsub_rn), which
//       the compiler neither contracts nor reassociates. x: [rows, cols];
//       acc, out: [3, cols] (hi, lo, max); out must not alias acc.
//     Launch: any grid and block (a grid-stride loop over the columns, one
//     thread per column: adjacent threads read adjacent columns of a row).

#define SEARCH_THREADS 256

// r(v): v rounded to the nearest f16 (ties to even), back to f32.
static __device__ __forceinline__ float sq_f16_round(float v) {
#ifdef MBQ_HOST_EMULATION
    return mbq_host_f16(mbq_host_f32_to_f16(v));
#else
    unsigned short h;
    float f;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// Weight element i as f32: f32 as is, f16 bits converted (exact).
static __device__ __forceinline__ float sq_load(const float *w, long long i) {
    return w[i];
}

static __device__ __forceinline__ float sq_load(const unsigned short *w, long long i) {
#ifdef MBQ_HOST_EMULATION
    return mbq_host_f16(w[i]);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(w[i]));
    return f;
#endif
}

static __device__ __forceinline__ float sq_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

static __device__ __forceinline__ float sq_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

static __device__ __forceinline__ float sq_warp_min(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

// Block-wide sum / max (of values >= 0) to every thread (blockDim.x a
// multiple of 32); the leading barrier makes back-to-back calls safe.
static __device__ __forceinline__ float sq_block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = sq_warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    return sq_warp_sum(v);
}

static __device__ __forceinline__ float sq_block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = sq_warp_max(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    return sq_warp_max(v);
}

// r(w[i] s[c]): the scaled weight as the reference rounds it.
template <typename W>
static __device__ __forceinline__ float sq_scaled(const W *w, long long i, const float *s, int c) {
    return sq_f16_round(__fmul_rn(sq_load(w, i), s[c]));
}

template <typename W>
static __device__ __forceinline__ void fake_quant_group(const W *w, const float *s, float *y,
                                                        int out, int inp, int bits, int group) {
    const int lane = threadIdx.x & 31;
    const long long groups = (long long)out * (inp / group);
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const float max_int = (float)((1u << bits) - 1u);
    const float eps = sq_f16_round(1e-5f);
    // The loop bound depends on the warp only, so the shuffles are uniform.
    for (long long g = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; g < groups;
         g += warps) {
        const long long base = g * group;
        const int c0 = (int)(base % inp);
        // group >= 32: every lane has at least its first value.
        float mx = sq_scaled(w, base + lane, s, c0 + lane);
        float mn = mx;
        for (int k = lane + 32; k < group; k += 32) {
            const float x = sq_scaled(w, base + k, s, c0 + k);
            mx = fmaxf(mx, x);
            mn = fminf(mn, x);
        }
        mx = sq_warp_max(mx);
        mn = sq_warp_min(mn);
        const float scale =
            sq_f16_round(__fdiv_rn(fmaxf(sq_f16_round(__fsub_rn(mx, mn)), eps), max_int));
        const float zero =
            fminf(fmaxf(-rintf(sq_f16_round(__fdiv_rn(mn, scale))), 0.0f), max_int);
        for (int k = lane; k < group; k += 32) {
            const float x = sq_scaled(w, base + k, s, c0 + k);
            const float q = rintf(sq_f16_round(__fdiv_rn(x, scale)));
            // The reference's u8 code (an integer: -0 becomes 0).
            const float code = (float)(int)fminf(fmaxf(__fadd_rn(q, zero), 0.0f), max_int);
            const float v = sq_f16_round(__fmul_rn(__fsub_rn(code, zero), scale));
            y[base + k] = __fdiv_rn(v, s[c0 + k]);
        }
    }
}

template <typename W>
static __device__ __forceinline__ void fake_quant_w4(const W *w, const float *s, float *y,
                                                     int out, int inp) {
    const int row = blockIdx.x;
    if (row >= out) {
        return;
    }
    const long long base = (long long)row * inp;
    float m = 0.0f;
    for (int i = threadIdx.x; i < inp; i += blockDim.x) {
        m = fmaxf(m, fabsf(sq_scaled(w, base + i, s, i)));
    }
    const float scale =
        sq_f16_round(__fdiv_rn(fmaxf(sq_block_max(m), sq_f16_round(1e-5f)), 7.0f));
    for (int i = threadIdx.x; i < inp; i += blockDim.x) {
        const float x = sq_scaled(w, base + i, s, i);
        const float q = fminf(fmaxf(rintf(sq_f16_round(__fdiv_rn(x, scale))), -8.0f), 7.0f);
        y[base + i] = sq_f16_round(__fmul_rn(q, scale));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    fake_quant_group_f32(const float *w, const float *s, float *y, int out, int inp, int bits,
                         int group) {
    fake_quant_group(w, s, y, out, inp, bits, group);
}

extern "C" __global__ void __launch_bounds__(1024)
    fake_quant_group_f16(const unsigned short *w, const float *s, float *y, int out, int inp,
                         int bits, int group) {
    fake_quant_group(w, s, y, out, inp, bits, group);
}

extern "C" __global__ void __launch_bounds__(1024)
    fake_quant_w4_f32(const float *w, const float *s, float *y, int out, int inp) {
    fake_quant_w4(w, s, y, out, inp);
}

extern "C" __global__ void __launch_bounds__(1024)
    fake_quant_w4_f16(const unsigned short *w, const float *s, float *y, int out, int inp) {
    fake_quant_w4(w, s, y, out, inp);
}

// loss_rows_f32 (Got) and abs_rows_f32 (got = 0, not read).
template <bool Got>
static __device__ __forceinline__ void sq_loss_rows(const float *want, const float *got, float *err,
                                                    int rows, int cols, int dist) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float *a = want + (long long)row * cols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = Got ? a[c] - got[(long long)row * cols + c] : a[c];
        acc += dist == 0 ? fabsf(d) : d * d;
    }
    acc = sq_block_sum(acc);
    if (threadIdx.x == 0) {
        err[row] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    loss_rows_f32(const float *want, const float *got, float *err, int rows, int cols, int dist) {
    sq_loss_rows<true>(want, got, err, rows, cols, dist);
}

extern "C" __global__ void __launch_bounds__(1024)
    abs_rows_f32(const float *x, float *err, int rows, int cols) {
    sq_loss_rows<false>(x, nullptr, err, rows, cols, 0);
}

// abs_col_stats_f32 (acc = nullptr) and abs_col_stats_acc_f32.
static __device__ __forceinline__ void sq_abs_col_stats(const float *x, const float *acc, float *out,
                                                        int rows, int cols) {
    const int stride = gridDim.x * blockDim.x;
    for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < cols; col += stride) {
        float s = 0.0f, e = 0.0f, m = 0.0f;
        if (acc != nullptr) {
            s = acc[col];
            e = acc[cols + col];
            m = acc[2 * cols + col];
        }
        for (int r = 0; r < rows; r++) {
            const float v = fabsf(x[(long long)r * cols + col]);
            const float t = __fadd_rn(s, v);
            // The rounding error of s + v, exact: the smaller operand minus
            // what of it the sum kept.
            e = __fadd_rn(e, fabsf(s) >= v ? __fadd_rn(__fsub_rn(s, t), v)
                                           : __fadd_rn(__fsub_rn(v, t), s));
            s = t;
            m = fmaxf(m, v);
        }
        const float hi = __fadd_rn(s, e);
        out[col] = hi;
        out[cols + col] = __fsub_rn(e, __fsub_rn(hi, s));
        out[2 * cols + col] = m;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    abs_col_stats_f32(const float *x, float *out, int rows, int cols) {
    sq_abs_col_stats(x, nullptr, out, rows, cols);
}

extern "C" __global__ void __launch_bounds__(1024)
    abs_col_stats_acc_f32(const float *x, const float *acc, float *out, int rows, int cols) {
    sq_abs_col_stats(x, acc, out, rows, cols);
}

extern "C" __global__ void __launch_bounds__(1024)
    loss_terms_f32(const float *err, const float *masks, float *terms, int rows) {
    float caption = 0.0f, vision = 0.0f, all = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const float e = err[r];
        if (masks[2 * r] != 0.0f) {
            caption += e;
        }
        if (masks[2 * r + 1] != 0.0f) {
            vision += e;
        }
        all += e;
    }
    caption = sq_block_sum(caption);
    vision = sq_block_sum(vision);
    all = sq_block_sum(all);
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        terms[0] = caption;
        terms[1] = vision;
        terms[2] = all;
    }
}
