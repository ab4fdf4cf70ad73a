// gemm.cu: the f32 matrix product of the prefill linears when cuBLAS is not
// used (no libcublas, or MBQ_CUDA_NO_CUBLAS=1), and the bias add that
// follows a cuBLAS SGEMM (src/backend/cuda/linear.rs).
//
// Kernels:
//   gemm_f32(const float *x, const float *w, const float *bias, float *y,
//            int rows, int out, int in)
//       x: [rows, in], w: [out, in], bias: [out] or NULL, y: [rows, out],
//       all row-major f32: y[r, o] = sum_i x[r, i] w[o, i] (+ bias[o]).
//     Launch: blockDim = (GEMM_TILE = 16, GEMM_TILE, 1), gridDim =
//     (ceil(out / 16), ceil(rows / 16), 1), no dynamic shared memory:
//     16 x 16 output tiles, the inputs staged through shared memory 16
//     columns at a time. Any sizes (edges are masked).
//
//   bias_rows_f32(float *y, const float *bias, int rows, int cols)
//       y[r, c] += bias[c], y: [rows, cols].
//     Launch: blockDim = (GEMM_BIAS_THREADS = 256, 1, 1), any gridDim.x >= 1
//     (grid-stride loop).

#define GEMM_TILE 16
#define GEMM_BIAS_THREADS 256

extern "C" __global__ void __launch_bounds__(GEMM_TILE * GEMM_TILE)
    gemm_f32(const float *x, const float *w, const float *bias, float *y, int rows, int out,
             int in) {
    __shared__ float xs[GEMM_TILE][GEMM_TILE + 1];
    __shared__ float ws[GEMM_TILE][GEMM_TILE + 1];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int o0 = blockIdx.x * GEMM_TILE;
    const int r0 = blockIdx.y * GEMM_TILE;
    const int r = r0 + ty;
    const int o = o0 + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < in; k0 += GEMM_TILE) {
        const int k = k0 + tx;
        xs[ty][tx] = (r < rows && k < in) ? x[(long long)r * in + k] : 0.0f;
        // row o0 + ty of w, column k
        ws[ty][tx] = (o0 + ty < out && k < in) ? w[(long long)(o0 + ty) * in + k] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_TILE; kk++) {
            acc = fmaf(xs[ty][kk], ws[tx][kk], acc);
        }
        __syncthreads();
    }
    if (r < rows && o < out) {
        y[(long long)r * out + o] = acc + (bias != 0 ? bias[o] : 0.0f);
    }
}

extern "C" __global__ void __launch_bounds__(GEMM_BIAS_THREADS)
    bias_rows_f32(float *y, const float *bias, int rows, int cols) {
    const long long n = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        y[i] += bias[i % cols];
    }
}
