// Runs the CUDA kernels of kernels/*.cu on the CPU (one std::thread per CUDA
// thread, see prelude.h) against f64 references, for machines with no GPU:
// it checks the kernels' indexing, the packed format reading (pack_group
// below is transcribed from src/quant/format.rs), bias and tail handling and
// the warp / block reductions, not performance or device alignment rules.
// Prints one line per case and "N failed"; exits non-zero on a failure.
// Build and run: tests/cuda_host_emu/run.sh (called by scripts/test.sh).
#include "prelude.h"
namespace packed {
#include "../../kernels/gemv_packed.cu"
}
namespace dense {
#include "../../kernels/gemv_f16.cu"
}
namespace ew {
#include "../../kernels/elementwise.cu"
}
// pack_group of src/quant/format.rs, transcribed.
static void pack_group(const uint8_t *codes, int g, int bits, uint32_t *words) {
    int wpg = g * bits / 32;
    for (int i = 0; i < wpg; i++) words[i] = 0;
    if (bits == 3) {
        int hi_base = g / 16;
        for (int k = 0; k < g; k++) {
            uint32_t c = codes[k];
            words[k / 16] |= (c & 3) << (2 * (k % 16));
            words[hi_base + k / 32] |= (c >> 2) << (k % 32);
        }
    } else {
        int per = 32 / bits;
        for (int k = 0; k < g; k++) words[k / per] |= (uint32_t)codes[k] << (bits * (k % per));
    }
}
int fails = 0, passes = 0;
// Error relative to sum |terms| + 1 (f32 accumulation in another order).
static const double TOL = 1e-5;
static void check(const char *name, const std::vector<float> &y, const std::vector<double> &want, const std::vector<double> &scale) {
    double maxe = 0;
    for (size_t i = 0; i < y.size(); i++) {
        double e = std::fabs(y[i] - want[i]) / (scale[i] + 1.0);
        maxe = std::max(maxe, e);
    }
    bool ok = maxe < TOL;
    if (!ok) fails++; else passes++;
    printf("%-22s max rel err %.2e %s\n", name, maxe, ok ? "OK" : "NOT OK");
}
typedef void (*PK)(const float *, const uint32_t *, const uint32_t *, const float *, float *, int, int);
int main() {
    struct E { int bits, group; PK k; };
    E es[] = {{3, 32, packed::gemv_packed_w3_g32}, {3, 64, packed::gemv_packed_w3_g64}, {3, 128, packed::gemv_packed_w3_g128},
              {4, 32, packed::gemv_packed_w4_g32}, {4, 64, packed::gemv_packed_w4_g64}, {4, 128, packed::gemv_packed_w4_g128},
              {8, 32, packed::gemv_packed_w8_g32}, {8, 64, packed::gemv_packed_w8_g64}, {8, 128, packed::gemv_packed_w8_g128}};
    int shapes[][3] = {{37, 384, 1}, {9, 1152, 0}, {3, 128, 1}};
    for (auto &e : es) for (auto &sh : shapes) {
        int out = sh[0], in = sh[1], with_bias = sh[2];
        if (in % e.group) continue;
        int groups = in / e.group, wpg = e.group * e.bits / 32;
        std::vector<uint8_t> codes(out * in);
        for (auto &c : codes) c = rnd() % (1u << e.bits);
        std::vector<uint32_t> q(out * groups * wpg), sz(out * groups);
        std::vector<float> s(out * groups), z(out * groups);
        for (int i = 0; i < out * groups; i++) {
            pack_group(&codes[i * e.group], e.group, e.bits, &q[i * wpg]);
            unsigned short sh16 = 0x2000 + rnd() % 0x1000;  // scales in [2^-7, 2^-6)
            unsigned short zh = f2h((float)(rnd() % (1u << e.bits)));
            s[i] = mbq_host_f16(sh16); z[i] = mbq_host_f16(zh);
            sz[i] = sh16 | ((uint32_t)zh << 16);
        }
        std::vector<float> x(in), bias(out), y(out, -1.0f);
        for (auto &v : x) v = rf();
        for (auto &v : bias) v = rf();
        std::vector<double> want(out), scale(out);
        for (int o = 0; o < out; o++) {
            double acc = with_bias ? bias[o] : 0, sc = 0;
            for (int i = 0; i < in; i++) {
                int gi = o * groups + i / e.group;
                double w = ((double)codes[o * in + i] - z[gi]) * s[gi];
                acc += w * x[i]; sc += std::fabs(w * x[i]);
            }
            want[o] = acc; scale[o] = sc;
        }
        launch((out + 7) / 8, 128, [&] { e.k(x.data(), q.data(), sz.data(), with_bias ? bias.data() : nullptr, y.data(), in, out); });
        char name[64]; snprintf(name, 64, "w%d_g%d %dx%d%s", e.bits, e.group, out, in, with_bias ? "+b" : "");
        check(name, y, want, scale);
    }
    for (auto sh : std::vector<std::pair<int,int>>{{33, 256}, {10, 37}}) {
        int out = sh.first, in = sh.second;
        std::vector<unsigned short> w(out * in);
        for (auto &v : w) v = (rnd() % 0x3c00) | (rnd() & 0x8000);
        std::vector<float> x(in), bias(out), y(out);
        for (auto &v : x) v = rf();
        for (auto &v : bias) v = rf();
        std::vector<double> want(out), scale(out);
        for (int o = 0; o < out; o++) {
            double acc = bias[o], sc = 0;
            for (int i = 0; i < in; i++) { double p = mbq_host_f16(w[o * in + i]) * (double)x[i]; acc += p; sc += std::fabs(p); }
            want[o] = acc; scale[o] = sc;
        }
        launch((out + 7) / 8, 128, [&] { dense::gemv_f16(w.data(), x.data(), bias.data(), y.data(), in, out); });
        char name[64]; snprintf(name, 64, "f16 %dx%d", out, in);
        check(name, y, want, scale);
    }
    {
        int n = 1000;
        std::vector<float> a(n), b(n), y(n);
        for (auto &v : a) v = 4 * rf();
        for (auto &v : b) v = rf();
        std::vector<double> want(n), scale(n, 0.0);
        launch(2, 256, [&] { ew::add_f32(a.data(), b.data(), y.data(), n); });
        for (int i = 0; i < n; i++) want[i] = (double)a[i] + b[i];
        check("add_f32", y, want, scale);
        launch(2, 256, [&] { ew::silu_mul_f32(a.data(), b.data(), y.data(), n); });
        for (int i = 0; i < n; i++) want[i] = a[i] / (1 + std::exp(-(double)a[i])) * b[i];
        check("silu_mul_f32", y, want, scale);
        int rows = 5, cols = 200;
        std::vector<float> yr(rows * cols);
        launch(rows, 256, [&] { ew::rms_norm_f32(a.data(), b.data(), yr.data(), rows, cols, 1e-6f); });
        std::vector<double> wr(rows * cols), sr(rows * cols, 0.0);
        for (int r = 0; r < rows; r++) {
            double ss = 0; for (int i = 0; i < cols; i++) ss += (double)a[r * cols + i] * a[r * cols + i];
            double inv = 1 / std::sqrt(ss / cols + 1e-6);
            for (int i = 0; i < cols; i++) wr[r * cols + i] = b[i] * a[r * cols + i] * inv;
        }
        check("rms_norm_f32", yr, wr, sr);
    }
    printf("%d passed, %d failed\n", passes, fails);
    return fails != 0;
}
