// CPU emulation of the CUDA built-ins the kernels in kernels/*.cu use, so
// that main.cpp can include and run them with g++: each CUDA thread is a
// std::thread, blocks run one after another, __shfl_xor_sync goes through a
// per-warp buffer and barrier, __syncthreads is a block barrier, and
// MBQ_HOST_EMULATION swaps the PTX f16 conversion for mbq_host_f16.
#pragma once
#define MBQ_HOST_EMULATION 1
#include <cstdint>
#include <cmath>
#include <thread>
#include <barrier>
#include <vector>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <functional>
using std::min;
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__ static
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct Dim { unsigned x, y, z; };
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
static std::vector<std::barrier<>*> warp_bar;
static std::barrier<>* block_bar;
static float shfl_buf[1024];
static float __shfl_xor_sync(unsigned, float v, int off) {
    int t = threadIdx.x, w = t >> 5;
    shfl_buf[t] = v;
    warp_bar[w]->arrive_and_wait();
    float r = shfl_buf[t ^ off];
    warp_bar[w]->arrive_and_wait();
    return r;
}
static void __syncthreads() { block_bar->arrive_and_wait(); }
static float mbq_host_f16(unsigned short h) {
    unsigned s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
// f32 -> f16 bits, round to nearest even (PTX cvt.rn.f16.f32): overflow to
// inf, f16 subnormals kept, NaN stays NaN.
static unsigned short mbq_host_f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: rounds past 65504
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    if (e < 113) {  // below 2^-14: a multiple of 2^-24 (a subnormal or 0)
        if (e < 102) return sign;  // below 2^-25: rounds to 0
        uint32_t shift = 126 - e, q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return sign | q;
    }
    uint32_t h = ((e - 112) << 10) | ((ax & 0x7fffffu) >> 13), rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;  // a carry moves into the exponent
    return sign | h;
}
// f32 arithmetic without contraction (the CUDA intrinsics of the same names).
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
// A 2-D launch (grid x, y; block x, y): threads of a block are numbered
// x-fastest; warps are 32 consecutive threads of that numbering, which is
// threadIdx.x for the 1-D blocks of the kernels that shuffle.
static void launch2(Dim grid, Dim block, std::function<void()> k) {
    gridDim = grid;
    blockDim = block;
    unsigned nt = block.x * block.y;
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            warp_bar.clear();
            for (unsigned w = 0; w < (nt + 31) / 32; w++) warp_bar.push_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
            block_bar = new std::barrier<>(nt);
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < nt; t++)
                ts.emplace_back([&, t, bx, by] {
                    threadIdx = {t % block.x, t / block.x, 0};
                    blockIdx = {bx, by, 0};
                    k();
                });
            for (auto &t : ts) t.join();
            for (auto p : warp_bar) delete p;
            delete block_bar;
        }
}
static void launch(unsigned grid, unsigned block, std::function<void()> k) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; b++) {
        warp_bar.clear();
        for (unsigned w = 0; w < block / 32; w++) warp_bar.push_back(new std::barrier<>(32));
        block_bar = new std::barrier<>(block);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; t++)
            ts.emplace_back([&, t, b] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; k(); });
        for (auto &t : ts) t.join();
        for (auto p : warp_bar) delete p;
        delete block_bar;
    }
}
static uint64_t rs = 7;
static unsigned rnd() { rs = rs * 6364136223846793005ull + 1442695040888963407ull; return (unsigned)(rs >> 33); }
static float rf() { return rnd() / 2147483648.0f * 2.0f - 1.0f; }
static unsigned short f2h(float f) {  // exact for the values used (normal, representable)
    for (unsigned h = 0; h < 0x7c00; h++) if (mbq_host_f16(h) == std::fabs(f)) return h | (f < 0 ? 0x8000 : 0);
    return 0;
}
