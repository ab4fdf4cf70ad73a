// norm.cu: LayerNorm on f32 rows (RMSNorm is rms_norm_f32 in elementwise.cu).
// The CUDA counterpart of `layer_norm` in src/backend/cpu.rs.
//
// Kernel:
//   layer_norm_f32(const float *x, const float *w, const float *b, float *y,
//                  int rows, int cols, float eps)
//       x, y: [rows, cols] row-major; w, b: [cols].
//       mean = sum_i x[r, i] / cols, var = sum_i (x[r, i] - mean)^2 / cols,
//       y[r, i] = (x[r, i] - mean) * (1 / sqrt(var + eps)) * w[i] + b[i]
//       (two passes over the row, as the CPU reference).
//     Launch: blockDim = (NORM_THREADS = 256, 1, 1) (a multiple of 32, at
//     most 1024), gridDim = (rows, 1, 1): one block per row; no dynamic
//     shared memory. y may alias x.

#define NORM_THREADS 256

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// The sum of `v` over the block (blockDim.x a multiple of 32, <= 1024),
// returned to every thread. The leading barrier lets it be called twice in
// a row (the second call's writes wait for the first call's reads).
static __device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

extern "C" __global__ void __launch_bounds__(1024)
    layer_norm_f32(const float *x, const float *w, const float *b, float *y, int rows, int cols,
                   float eps) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;  // the whole block leaves together
    }
    const float *xr = x + (long long)row * cols;
    float *yr = y + (long long)row * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        s += xr[i];
    }
    const float mean = block_sum(s) / (float)cols;
    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float d = xr[i] - mean;
        v = fmaf(d, d, v);
    }
    const float inv = 1.0f / sqrtf(block_sum(v) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
    }
}
