// attention.cu: softmax attention of f32 queries over f32 keys / values,
// one block per (head, query row), with the scores in a global scratch
// buffer (no limit on the number of keys). Grouped-query attention: query
// head h reads key / value head h / (heads / kv_heads). The CUDA
// counterpart of `attention_core` / `attend_row` in src/backend/cpu.rs.
//
// Kernel:
//   attention_f32(
//       const float *q,    // [rows, heads * d] row-major
//       const float *k,    // [len, kv_heads * d] row-major (keys 0..len)
//       const float *v,    // [len, kv_heads * d]
//       float *scores,     // scratch, [gridDim.y, heads, len]
//       float *y,          // [rows, heads * d] output
//       int rows, int len, int heads, int kv_heads, int d,
//       float scale,       // softmax scale (usually d^-0.5)
//       int row0,          // first query row of this launch
//       int causal_pos0)   // < 0: every query sees keys 0..len (non-causal);
//                          // >= 0: query r sees keys 0..min(len, causal_pos0 + r + 1)
//   For query row r = row0 + blockIdx.y, head h = blockIdx.x:
//     s_j = scale * sum_t q[r, h d + t] k[j, kvh d + t]   (j visible)
//     p_j = exp(s_j - max_j s_j) / sum_j exp(s_j - max_j s_j)
//     y[r, h d + t] = sum_j p_j v[j, kvh d + t]
//   Launch: blockDim = (ATTN_THREADS = 128, 1, 1) (a multiple of 32),
//   gridDim = (heads, chunk, 1) with chunk <= 65535 query rows (the host
//   launches row0 = 0, chunk, 2 chunk, ...; blocks past `rows` leave), no
//   dynamic shared memory. d <= ATTN_MAX_D = 512; at least one key visible.

#define ATTN_THREADS 128
#define ATTN_MAX_D 512
// The lowest finite float: the identity of the max reduction (scores are finite).
#define ATTN_NEG_MAX (-3.402823466e+38f)

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

// Block-wide sum / max to every thread; the leading barrier makes
// back-to-back calls safe and publishes earlier global writes of the block.
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
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    return warp_sum(v);
}

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
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : ATTN_NEG_MAX;
    return warp_max(v);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_f32(const float *q, const float *k, const float *v, float *scores, float *y,
                  int rows, int len, int heads, int kv_heads, int d, float scale, int row0,
                  int causal_pos0) {
    __shared__ float qs[ATTN_MAX_D];
    const int r = row0 + blockIdx.y;
    if (r >= rows) {
        return;  // the whole block leaves together
    }
    const int h = blockIdx.x;
    const int kvh = h / (heads / kv_heads);
    const long long qstride = (long long)heads * d;
    const long long kvstride = (long long)kv_heads * d;
    const int vis = causal_pos0 < 0 ? len : min(len, causal_pos0 + r + 1);
    float *sc = scores + ((long long)blockIdx.y * heads + h) * len;
    const float *qr = q + r * qstride + (long long)h * d;
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
        qs[t] = qr[t];
    }
    __syncthreads();
    const float *kh = k + (long long)kvh * d;
    const float *vh = v + (long long)kvh * d;
    float m = ATTN_NEG_MAX;
    for (int j = threadIdx.x; j < vis; j += blockDim.x) {
        const float *kr = kh + j * kvstride;
        float s = 0.0f;
        for (int t = 0; t < d; t++) {
            s = fmaf(qs[t], kr[t], s);
        }
        s *= scale;
        sc[j] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vis; j += blockDim.x) {
        const float e = expf(sc[j] - m);  // written by this thread above
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum);
    for (int j = threadIdx.x; j < vis; j += blockDim.x) {
        sc[j] = sc[j] / sum;
    }
    __syncthreads();  // every p_j written before any thread reads them all
    float *yr = y + r * qstride + (long long)h * d;
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < vis; j++) {
            acc = fmaf(sc[j], vh[j * kvstride + t], acc);
        }
        yr[t] = acc;
    }
}
