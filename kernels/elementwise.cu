// elementwise.cu: element-by-element ops and RMSNorm on f32 arrays (the CUDA
// counterparts of shaders/elementwise.wgsl and shaders/norm.wgsl).
//
// Kernels:
//   add_f32(const float *a, const float *b, float *y, int n)
//       y[i] = a[i] + b[i], i < n.
//   silu_mul_f32(const float *gate, const float *up, float *y, int n)
//       y[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]
//       (the SwiGLU MLP's gated activation; `gated` with act silu).
//   div_cols_f32(const float *x, const float *s, float *y, int n, int cols)
//       y[i] = x[i] / s[i % cols], i < n: x, y row-major [n / cols, cols],
//       s [cols] (every column divided by its scale).
//     Launch (all three): blockDim = (ELEMENTWISE_THREADS = 256, 1, 1), any
//     gridDim.x >= 1 (grid-stride loop; ceil(n / 256) capped at a few
//     thousand blocks is plenty). y may alias a or b.
//
//   rms_norm_f32(const float *x, const float *w, float *y, int rows, int cols, float eps)
//       x, y: [rows, cols] row-major; w: [cols].
//       y[r, i] = w[i] * (x[r, i] / sqrt(mean_i(x[r, i]^2) + eps)).
//     Launch: blockDim = (NORM_THREADS = 256, 1, 1) (a multiple of 32, at
//     most 1024), gridDim = (rows, 1, 1): one block per row; no dynamic
//     shared memory. y may alias x.

#define ELEMENTWISE_THREADS 256
#define NORM_THREADS 256

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    add_f32(const float *a, const float *b, float *y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = a[i] + b[i];
    }
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    silu_mul_f32(const float *gate, const float *up, float *y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float g = gate[i];
        y[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    div_cols_f32(const float *x, const float *s, float *y, int n, int cols) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = x[i] / s[i % cols];
    }
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// The sum of `v` over the block (blockDim.x a multiple of 32, <= 1024),
// returned to every thread.
static __device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_f32(const float *x, const float *w, float *y, int rows, int cols, float eps) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;  // the whole block leaves together
    }
    const float *xr = x + (long long)row * cols;
    float *yr = y + (long long)row * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = xr[i];
        s = fmaf(v, v, s);
    }
    const float inv = 1.0f / sqrtf(block_sum(s) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        yr[i] = w[i] * (xr[i] * inv);
    }
}
