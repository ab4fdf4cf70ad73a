// act.cu: element-wise activations on f32 arrays, every `Act` of
// src/config.rs with the formulas of `act_fn` in src/backend/cpu.rs.
//
// `act` codes (src/backend/cuda/ops.rs `act_code`):
//   0 gelu       0.5 x (1 + erf(x / sqrt 2))
//   1 gelu_tanh  0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
//   2 quick_gelu x / (1 + exp(-1.702 x))
//   3 silu       x / (1 + exp(-x))
//   4 relu       max(x, 0)
//
// Kernels:
//   act_f32(const float *x, float *y, int n, int act)
//       y[i] = act(x[i]), i < n.
//   gated_f32(const float *gate, const float *up, float *y, int n, int act)
//       y[i] = act(gate[i]) * up[i] (SwiGLU / GeGLU MLPs).
//     Launch (both): blockDim = (ACT_THREADS = 256, 1, 1), any gridDim.x >= 1
//     (grid-stride loop). y may alias the inputs.

#define ACT_THREADS 256

static __device__ __forceinline__ float act_fn(float x, int act) {
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

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    act_f32(const float *x, float *y, int n, int act) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = act_fn(x[i], act);
    }
}

extern "C" __global__ void __launch_bounds__(ACT_THREADS)
    gated_f32(const float *gate, const float *up, float *y, int n, int act) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = act_fn(gate[i], act) * up[i];
    }
}
