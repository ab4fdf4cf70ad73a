// act_quant.cu: per-row (per-token) symmetric INT8 fake quantization of f32
// activations, the A8 of W4A8 (`quant::w4a8::fake_quantize_act_int8`):
//
//   s = max(max_i |x[r, i]|, 1e-5) / 127
//   y[r, i] = clamp(round_half_even(x[r, i] / s), -128, 127) * s
//
// Kernel:
//   act_quant_int8_f32(const float *x, float *y, int rows, int cols)
//       x, y: [rows, cols] row-major.
//     Launch: blockDim = (ACT_QUANT_THREADS = 256, 1, 1) (a multiple of 32,
//     at most 1024), gridDim = (rows, 1, 1): one block per row; no dynamic
//     shared memory. y may alias x.

#define ACT_QUANT_THREADS 256

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

// The maximum of `v` over the block (blockDim.x a multiple of 32), to every thread.
static __device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_max(v);
}

extern "C" __global__ void __launch_bounds__(1024)
    act_quant_int8_f32(const float *x, float *y, int rows, int cols) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float *xr = x + (long long)row * cols;
    float *yr = y + (long long)row * cols;
    float m = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        m = fmaxf(m, fabsf(xr[i]));
    }
    const float s = fmaxf(block_max(m), 1e-5f) / 127.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        yr[i] = fminf(fmaxf(rintf(xr[i] / s), -128.0f), 127.0f) * s;
    }
}
