// rope.cu: rotary position embedding, rotate-half convention (the one of
// `rope` in src/backend/cpu.rs). The cos / sin table is computed on the
// host exactly as the CPU reference does (f32 `inv_freq[i] * position`,
// then sin_cos), so only these multiply-adds run here, rounded like the
// CPU's (no contraction into FMAs): the result is bit-exact.
//
// Kernel:
//   rope_f32(const float *x, const float *cs, float *y, int rows, int heads, int d)
//       x, y: [rows, heads * d] row-major; cs: [rows, d] where cs[r, i] =
//       cos(f) and cs[r, d/2 + i] = sin(f), f = inv_freq[i] * (pos0 + r),
//       i < d / 2. With half = d / 2, for each row r, head h, i < half:
//         a = x[r, h d + i], b = x[r, h d + i + half]
//         y[r, h d + i]        = a cos - b sin
//         y[r, h d + i + half] = b cos + a sin
//     Launch: blockDim = (ROPE_THREADS = 256, 1, 1), any gridDim.x >= 1
//     (grid-stride loop over rows * heads * half). y must not alias x.

#define ROPE_THREADS 256

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_f32(const float *x, const float *cs, float *y, int rows, int heads, int d) {
    const int half = d / 2;
    const long long n = (long long)rows * heads * half;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n;
         t += (long long)blockDim.x * gridDim.x) {
        const int i = (int)(t % half);
        const long long rh = t / half;
        const int h = (int)(rh % heads);
        const long long r = rh / heads;
        const float c = cs[r * d + i];
        const float s = cs[r * d + half + i];
        const long long o = r * heads * d + (long long)h * d + i;
        const float a = x[o];
        const float b = x[o + half];
        y[o] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        y[o + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}
