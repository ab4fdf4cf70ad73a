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
//   attention_backward_rows_f32(const float *q, const float *k, const float *v,
//                               const float *dout, float *P, float *S, float *dq,
//                               int n, int heads, int kv_heads, int d, float scale)
//   attention_backward_cols_f32(const float *q, const float *dout, const float *P,
//                               const float *S, float *dk, float *dv,
//                               int n, int heads, int kv_heads, int d, float scale)
//       The backward of causal GQA at positions 0..n (query r sees keys
//       0..=r) in two launches without atomics, through a global scratch
//       P, S [heads, n, n] (only j <= r is written and read). q, dout, dq
//       [n, heads d]; k, v, dk, dv [n, kv_heads d].
//       rows: one block per (r, h) (blockIdx.x = r heads + h), threads over
//       the keys: s_j = scale q_r.k_j, p = softmax(s), dP_j = do_r.v_j,
//       D = sum_j p_j dP_j, dS_j = p_j (dP_j - D) -> P, S; then threads over
//       the dims: dq[r, h d + c] = scale sum_j dS_j k_j[c].
//       cols: one block per (j, g) (blockIdx.x = j kv_heads + g), threads
//       over the dims: dk[j, g d + c] = scale sum_{h in group g, r >= j}
//       S[h, r, j] q_r[h d + c], dv likewise with P and dout.
//     Launch (both): blockDim.x a multiple of 32, <= 1024 (BW_THREADS).
//   cross_entropy_f32(const float *logits, const unsigned *labels, float *grad,
//                     float *loss, int rows, int vocab)
//       logits, grad [rows, vocab], labels, loss [rows] (each label < vocab,
//       checked on the host). Per row r, label t, max and sum in f32:
//       m = max_j l_j, s = sum_j exp(l_j - m), loss[r] = log(s) + m - l_t,
//       grad[r, j] = (exp(l_j - m) / s - [j == t]) / rows. The host sums
//       the per-row losses in f64 for the mean.
//     Launch: one block per row (gridDim.x = rows), blockDim.x = BW_THREADS.

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

// The sums of `v` over the block, returned to every thread (every thread
// of the block calls it; it may be called again).
static __device__ __forceinline__ float2 bw_block_sum2(float2 v) {
    __shared__ float2 partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call's readers are done with `partial`
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

// The maximum of `v` over the block, returned to every thread.
static __device__ __forceinline__ float bw_block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : -3.0e38f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    attention_backward_rows_f32(const float *q, const float *k, const float *v,
                                const float *dout, float *P, float *S, float *dq, int n,
                                int heads, int kv_heads, int d, float scale) {
    const int r = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    if (r >= n) {
        return;  // the whole block leaves together
    }
    const long long qs = (long long)heads * d;
    const long long kvs = (long long)kv_heads * d;
    const long long ko = (long long)(h / (heads / kv_heads)) * d;
    const float *qr = q + r * qs + (long long)h * d;
    const float *dor = dout + r * qs + (long long)h * d;
    float *Pr = P + ((long long)h * n + r) * n;
    float *Sr = S + ((long long)h * n + r) * n;
    const int len = r + 1;
    float m = -3.0e38f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float *kj = k + j * kvs + ko;
        float s = 0.0f;
        for (int c = 0; c < d; c++) {
            s += qr[c] * kj[c];
        }
        s *= scale;
        Pr[j] = s;
        m = fmaxf(m, s);
    }
    m = bw_block_max(m);
    float l = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float e = expf(Pr[j] - m);
        Pr[j] = e;
        l += e;
    }
    l = bw_block_sum2(make_float2(l, 0.0f)).x;
    float dd = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float pj = Pr[j] / l;
        Pr[j] = pj;
        const float *vj = v + j * kvs + ko;
        float g = 0.0f;
        for (int c = 0; c < d; c++) {
            g += dor[c] * vj[c];
        }
        Sr[j] = g;
        dd += pj * g;
    }
    dd = bw_block_sum2(make_float2(dd, 0.0f)).x;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        Sr[j] = Pr[j] * (Sr[j] - dd);
    }
    __syncthreads();  // Sr complete for every thread of the block
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; j++) {
            acc += Sr[j] * k[j * kvs + ko + c];
        }
        dq[r * qs + (long long)h * d + c] = scale * acc;
    }
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    attention_backward_cols_f32(const float *q, const float *dout, const float *P,
                                const float *S, float *dk, float *dv, int n, int heads,
                                int kv_heads, int d, float scale) {
    const int j = blockIdx.x / kv_heads;
    const int g = blockIdx.x % kv_heads;
    if (j >= n) {
        return;
    }
    const long long qs = (long long)heads * d;
    const long long kvs = (long long)kv_heads * d;
    const int group = heads / kv_heads;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int r = j; r < n; r++) {
                const long long e = ((long long)h * n + r) * n + j;
                const long long o = r * qs + (long long)h * d + c;
                ak += S[e] * q[o];
                av += P[e] * dout[o];
            }
        }
        dk[j * kvs + (long long)g * d + c] = scale * ak;
        dv[j * kvs + (long long)g * d + c] = av;
    }
}

extern "C" __global__ void __launch_bounds__(BW_THREADS)
    cross_entropy_f32(const float *logits, const unsigned *labels, float *grad, float *loss,
                      int rows, int vocab) {
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float *l = logits + (size_t)r * vocab;
    float *g = grad + (size_t)r * vocab;
    // The most negative finite f32: the identity of max for finite logits.
    float m = -3.4028235e38f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        m = fmaxf(m, l[j]);
    }
    m = bw_block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        s += expf(l[j] - m);
    }
    s = bw_block_sum2(make_float2(s, 0.0f)).x;
    const float inv = 1.0f / s;
    const float per = 1.0f / (float)rows;
    const int t = (int)labels[r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float q = expf(l[j] - m) * inv;
        g[j] = (j == t ? q - 1.0f : q) * per;
    }
    if (threadIdx.x == 0) {
        loss[r] = logf(s) + m - l[t];
    }
}
