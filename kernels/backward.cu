// backward.cu: the backward of ops for the sensitivity pass (activation
// gradients only; src/backend/backward.rs has the formulas and the CPU
// reference every kernel is tested against).
//
// `act` codes as act.cu (src/backend/mod.rs `act_code`): 0 gelu (erf),
// 1 gelu_tanh, 2 quick_gelu, 3 silu, 4 relu.
//
// Kernels:
//   gated_backward_f32(const float *gate, const float *up, const float *dy,
//                      float *dg, float *du, int n, int act)
//       y = act(gate) up:  dg[i] = dy[i] up[i] act'(gate[i]),
//       du[i] = dy[i] act(gate[i]), i < n.
//     Launch: blockDim = (BW_THREADS = 256, 1, 1), any gridDim.x >= 1
//     (grid-stride loop).
//   rms_norm_backward_f32(const float *x, const float *w, const float *dy,
//                         float *dx, int rows, int cols, float eps)
//       x, dy, dx [rows, cols], w [cols]; r = (mean(x^2) + eps)^-1/2:
//       dx_j = r w_j dy_j - r^3 x_j / cols * sum_i dy_i w_i x_i (sums in f32).
//     Launch: one block per row (gridDim.x = rows), blockDim.x a multiple of
//     32, <= 1024.
//   linear_backward_f32(const float *dy, const float *w, float *dx,
//                       int m, int out, int inp)
//   linear_backward_f16(const float *dy, const unsigned short *w, float *dx,
//                       int m, int out, int inp)
//       dX = dY W: dy [m, out], w [out, inp] row-major (f32, or f16 bits),
//       dx [m, inp]: dx[r, j] = sum_o dy[r, o] w[o, j], f32 accumulation
//       over o in order (skipping zero dy, as the CPU reference).
//     Launch: blockDim = (BW_THREADS, 1, 1), any gridDim.x >= 1
//     (grid-stride loop over m * inp outputs; consecutive threads read
//     consecutive columns of a row of w).

#define BW_THREADS 256

static __device__ __forceinline__ float bw_sigmoid(float z) {
    return 1.0f / (1.0f + expf(-z));
}

static __device__ __forceinline__ float bw_act(float x, int act) {
    switch (act) {
        case 0:
            return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case 1: {
            const float c = sqrtf(2.0f / 3.14159265358979f);
            return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
        }
        case 2:
            return x / (1.0f + expf(-1.702f * x));
        case 3:
            return x / (1.0f + expf(-x));
        default:
            return fmaxf(x, 0.0f);
    }
}

// d act(x) / dx (src/backend/backward.rs `act_grad`).
static __device__ __forceinline__ float bw_act_grad(float x, int act) {
    switch (act) {
        case 0: {
            const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
            const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
            return cdf + x * pdf;
        }
        case 1: {
            const float c = sqrtf(2.0f / 3.14159265358979f);
            const float t = tanhf(c * (x + 0.044715f * x * x * x));
            return 0.5f * (1.0f + t) +
                   0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
        }
        case 2: {
            const float s = bw_sigmoid(1.702f * x);
            return s + 1.702f * x * s * (1.0f - s);
        }
        case 3: {
            const float s = bw_sigmoid(x);
            return s * (1.0f + x * (1.0f - s));
        }
        default:
            return x > 0.0f ? 1.0f : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    gated_backward_f32(const float *gate, const float *up, const float *dy, float *dg,
                       float *du, int n, int act) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float g = gate[i];
        const float d = dy[i];
        dg[i] = d * up[i] * bw_act_grad(g, act);
        du[i] = d * bw_act(g, act);
    }
}

static __device__ __forceinline__ float2 bw_warp_sum2(float2 v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
    }
    return v;
}

// The sums of `v` over the block, returned to every thread (called once).
static __device__ __forceinline__ float2 bw_block_sum2(float2 v) {
    __shared__ float2 partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = bw_warp_sum2(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : make_float2(0.0f, 0.0f);
    return bw_warp_sum2(v);
}

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_backward_f32(const float *x, const float *w, const float *dy, float *dx, int rows,
                          int cols, float eps) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;  // the whole block leaves together
    }
    const float *xr = x + (long long)row * cols;
    const float *dyr = dy + (long long)row * cols;
    float *dxr = dx + (long long)row * cols;
    float2 s = make_float2(0.0f, 0.0f);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = xr[i];
        s.x = fmaf(v, v, s.x);
        s.y = fmaf(dyr[i] * w[i], v, s.y);
    }
    s = bw_block_sum2(s);
    const float inv = 1.0f / sqrtf(s.x / (float)cols + eps);
    const float k = inv * inv * inv * s.y / (float)cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        dxr[i] = inv * w[i] * dyr[i] - k * xr[i];
    }
}

// An IEEE half (its 16 bits) as f32, without cuda_fp16.h (see gemv_f16.cu).
static __device__ __forceinline__ float bw_f16(unsigned short b) {
#ifdef MBQ_HOST_EMULATION
    return mbq_host_f16(b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    linear_backward_f32(const float *dy, const float *w, float *dx, int m, int out, int inp) {
    const long long total = (long long)m * inp;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long r = i / inp;
        const int j = (int)(i % inp);
        const float *dyr = dy + r * out;
        float acc = 0.0f;
        for (int o = 0; o < out; o++) {
            const float g = dyr[o];
            if (g != 0.0f) {
                acc += g * w[(long long)o * inp + j];
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    linear_backward_f16(const float *dy, const unsigned short *w, float *dx, int m, int out,
                        int inp) {
    const long long total = (long long)m * inp;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long r = i / inp;
        const int j = (int)(i % inp);
        const float *dyr = dy + r * out;
        float acc = 0.0f;
        for (int o = 0; o < out; o++) {
            const float g = dyr[o];
            if (g != 0.0f) {
                acc += g * bw_f16(w[(long long)o * inp + j]);
            }
        }
        dx[i] = acc;
    }
}
