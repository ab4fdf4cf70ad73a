// Runs the CUDA kernels of kernels/*.cu on the CPU (one std::thread per CUDA
// thread, see prelude.h) against f64 references, for machines with no GPU:
// it checks the kernels' indexing, the packed format reading (pack_group
// below is transcribed from src/quant/format.rs), bias and tail handling and
// the warp / block reductions, not performance or device alignment rules.
// Prints one line per case and "N failed"; exits non-zero on a failure.
// search.cu's cases are in search_cases.h.
// Build and run: tests/cuda_host_emu/run.sh (called by scripts/test.sh);
// `run.sh search` runs search.cu's cases alone.
#include "prelude.h"
#include <array>
namespace packed {
#include "../../kernels/gemv_packed.cu"
}
namespace dense {
#include "../../kernels/gemv_f16.cu"
}
namespace ew {
#include "../../kernels/elementwise.cu"
}
namespace norm {
#include "../../kernels/norm.cu"
}
namespace act {
#include "../../kernels/act.cu"
}
namespace aq {
#include "../../kernels/act_quant.cu"
}
namespace rope {
#include "../../kernels/rope.cu"
}
namespace attn {
#include "../../kernels/attention.cu"
}
namespace conv {
#include "../../kernels/convert.cu"
}
namespace gemm {
#include "../../kernels/gemm.cu"
}
namespace bw {
#include "../../kernels/backward.cu"
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
static void check_tol(const char *name, const std::vector<float> &y, const std::vector<double> &want, const std::vector<double> &scale, double tol) {
    double maxe = 0;
    bool nan = false;
    for (size_t i = 0; i < y.size(); i++) {
        double e = std::fabs(y[i] - want[i]) / (scale[i] + 1.0);
        nan = nan || std::isnan(e);
        maxe = std::max(maxe, e);
    }
    bool ok = !nan && maxe <= tol;
    if (!ok) fails++; else passes++;
    printf("%-22s max rel err %.2e %s\n", name, maxe, ok ? "OK" : "NOT OK");
}
static void check(const char *name, const std::vector<float> &y, const std::vector<double> &want, const std::vector<double> &scale) {
    check_tol(name, y, want, scale, TOL);
}
static void new_kernels();
static void backward_kernels();
#include "search_cases.h"
typedef void (*PK)(const float *, const uint32_t *, const uint32_t *, const float *, float *, int, int, int);
// Each GEMV case at these token counts (x [m, in], y [m, out], one launch).
static const int GEMV_MS[] = {1, 2, 3, 5, 8};
// Token t of an m-token launch must equal the single-token launch on row t
// bit for bit (the same accumulation order per token).
static void check_rows_exact(const char *name, const std::vector<float> &y, int m, int out,
                             const std::function<void(int, float *)> &one) {
    std::vector<float> y1(out);
    std::vector<double> want(m * out), sc(m * out, 0.0);
    for (int t = 0; t < m; t++) {
        std::fill(y1.begin(), y1.end(), -2.0f);
        one(t, y1.data());
        for (int o = 0; o < out; o++) want[t * out + o] = y1[o];
    }
    check_tol(name, y, want, sc, 0.0);
}
int main(int argc, char **argv) {
    // `run.sh search`: search.cu's cases alone.
    if (argc > 1 && std::strcmp(argv[1], "search") == 0) {
        search_kernels();
        printf("%d passed, %d failed\n", passes, fails);
        return fails != 0;
    }
    struct E { int bits, group; PK k; };
    E es[] = {{3, 32, packed::gemv_packed_w3_g32}, {3, 64, packed::gemv_packed_w3_g64}, {3, 128, packed::gemv_packed_w3_g128},
              {4, 32, packed::gemv_packed_w4_g32}, {4, 64, packed::gemv_packed_w4_g64}, {4, 128, packed::gemv_packed_w4_g128},
              {8, 32, packed::gemv_packed_w8_g32}, {8, 64, packed::gemv_packed_w8_g64}, {8, 128, packed::gemv_packed_w8_g128}};
    int shapes[][3] = {{37, 384, 1}, {9, 1152, 0}, {3, 128, 1}};
    for (auto &e : es) for (auto &sh : shapes) for (int m : GEMV_MS) {
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
        std::vector<float> x(m * in), bias(out), y(m * out, -1.0f);
        for (auto &v : x) v = rf();
        for (auto &v : bias) v = rf();
        std::vector<double> want(m * out), scale(m * out);
        for (int t = 0; t < m; t++)
            for (int o = 0; o < out; o++) {
                double acc = with_bias ? bias[o] : 0, sc = 0;
                for (int i = 0; i < in; i++) {
                    int gi = o * groups + i / e.group;
                    double w = ((double)codes[o * in + i] - z[gi]) * s[gi];
                    acc += w * x[t * in + i]; sc += std::fabs(w * x[t * in + i]);
                }
                want[t * out + o] = acc; scale[t * out + o] = sc;
            }
        const float *bp = with_bias ? bias.data() : nullptr;
        launch((out + 7) / 8, 128, [&] { e.k(x.data(), q.data(), sz.data(), bp, y.data(), in, out, m); });
        char name[64]; snprintf(name, 64, "w%d_g%d m%d %dx%d%s", e.bits, e.group, m, out, in, with_bias ? "+b" : "");
        check(name, y, want, scale);
        if (m > 1 && out == shapes[0][0]) {
            snprintf(name, 64, "w%d_g%d m%d %dx%d =m1", e.bits, e.group, m, out, in);
            check_rows_exact(name, y, m, out, [&](int t, float *y1) {
                launch((out + 7) / 8, 128, [&] { e.k(x.data() + t * in, q.data(), sz.data(), bp, y1, in, out, 1); });
            });
        }
    }
    // in % 8 == 0 (128-bit loads) and not (one value at a time).
    for (auto sh : std::vector<std::pair<int,int>>{{33, 256}, {10, 37}, {3, 8}}) for (int m : GEMV_MS) {
        int out = sh.first, in = sh.second;
        std::vector<unsigned short> w(out * in);
        for (auto &v : w) v = (rnd() % 0x3c00) | (rnd() & 0x8000);
        std::vector<float> x(m * in), bias(out), y(m * out, -1.0f);
        for (auto &v : x) v = rf();
        for (auto &v : bias) v = rf();
        std::vector<double> want(m * out), scale(m * out);
        for (int t = 0; t < m; t++)
            for (int o = 0; o < out; o++) {
                double acc = bias[o], sc = 0;
                for (int i = 0; i < in; i++) {
                    double p = mbq_host_f16(w[o * in + i]) * (double)x[t * in + i];
                    acc += p; sc += std::fabs(p);
                }
                want[t * out + o] = acc; scale[t * out + o] = sc;
            }
        launch((out + 7) / 8, 128, [&] { dense::gemv_f16(w.data(), x.data(), bias.data(), y.data(), in, out, m); });
        char name[64]; snprintf(name, 64, "f16 m%d %dx%d", m, out, in);
        check(name, y, want, scale);
        if (m > 1) {
            snprintf(name, 64, "f16 m%d %dx%d =m1", m, out, in);
            check_rows_exact(name, y, m, out, [&](int t, float *y1) {
                launch((out + 7) / 8, 128, [&] { dense::gemv_f16(w.data(), x.data() + t * in, bias.data(), y1, in, out, 1); });
            });
        }
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
        {
            int cols = 37;  // 1000 values: 27 rows and a partial one
            std::vector<float> s(cols);
            for (auto &v : s) v = 0.05f + 4 * std::fabs(rf());
            launch(2, 256, [&] { ew::div_cols_f32(a.data(), s.data(), y.data(), n, cols); });
            for (int i = 0; i < n; i++) want[i] = (double)a[i] / s[i % cols];
            check("div_cols_f32", y, want, scale);
        }
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
    new_kernels();
    backward_kernels();
    search_kernels();
    printf("%d passed, %d failed\n", passes, fails);
    return fails != 0;
}

// The kernels of the CUDA backend (src/backend/cuda): norms, activations,
// INT8 activation quantization, RoPE, attention, conversions, GEMM.
static std::vector<float> rvec(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto &x : v) x = scale * rf();
    return v;
}
static void new_kernels() {
    char name[96];
    // LayerNorm, f64 reference; odd widths, one block per row.
    for (auto sh : std::vector<std::pair<int, int>>{{5, 300}, {3, 33}, {1, 7}}) {
        int rows = sh.first, cols = sh.second;
        auto x = rvec(rows * cols, 3.0f), w = rvec(cols, 1.5f), b = rvec(cols, 0.5f);
        std::vector<float> y(rows * cols);
        launch(rows, 256, [&] { norm::layer_norm_f32(x.data(), w.data(), b.data(), y.data(), rows, cols, 1e-5f); });
        std::vector<double> want(rows * cols), sc(rows * cols, 0.0);
        for (int r = 0; r < rows; r++) {
            double m = 0, v = 0;
            for (int i = 0; i < cols; i++) m += x[r * cols + i];
            m /= cols;
            for (int i = 0; i < cols; i++) v += (x[r * cols + i] - m) * (x[r * cols + i] - m);
            double inv = 1 / std::sqrt(v / cols + 1e-5);
            for (int i = 0; i < cols; i++) want[r * cols + i] = (x[r * cols + i] - m) * inv * w[i] + b[i];
        }
        snprintf(name, 96, "layer_norm %dx%d", rows, cols);
        check(name, y, want, sc);
        launch(rows, 256, [&] { ew::rms_norm_f32(x.data(), w.data(), y.data(), rows, cols, 1e-6f); });
        for (int r = 0; r < rows; r++) {
            double ss = 0;
            for (int i = 0; i < cols; i++) ss += (double)x[r * cols + i] * x[r * cols + i];
            double inv = 1 / std::sqrt(ss / cols + 1e-6);
            for (int i = 0; i < cols; i++) want[r * cols + i] = w[i] * x[r * cols + i] * inv;
        }
        snprintf(name, 96, "rms_norm %dx%d", rows, cols);
        check(name, y, want, sc);
    }
    // Activations and gated, f64 formulas, error relative to max(1, |x|) (|up|).
    {
        int n = 777;
        auto x = rvec(n, 6.0f), u = rvec(n, 2.0f);
        std::vector<float> y(n);
        const char *names[] = {"gelu", "gelu_tanh", "quick_gelu", "silu", "relu"};
        for (int a = 0; a < 5; a++) {
            std::vector<double> want(n), sc(n), wg(n), sg(n);
            for (int i = 0; i < n; i++) {
                double v = x[i], f;
                switch (a) {
                    case 0: f = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); break;
                    case 1: f = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); break;
                    case 2: f = v / (1 + std::exp(-1.702 * v)); break;
                    case 3: f = v / (1 + std::exp(-v)); break;
                    default: f = v > 0 ? v : 0;
                }
                want[i] = f; sc[i] = std::max(0.0, std::fabs(v) - 1);
                wg[i] = f * u[i]; sg[i] = std::max(0.0, std::fabs(v * u[i]) - 1);
            }
            launch(2, 256, [&] { act::act_f32(x.data(), y.data(), n, a); });
            snprintf(name, 96, "act %s", names[a]);
            check_tol(name, y, want, sc, 1e-6);
            launch(2, 256, [&] { act::gated_f32(x.data(), u.data(), y.data(), n, a); });
            snprintf(name, 96, "gated %s", names[a]);
            check_tol(name, y, wg, sg, 1e-6);
        }
    }
    // INT8 fake quantization: equal to the same f32 formula (round half to even).
    for (auto sh : std::vector<std::pair<int, int>>{{7, 129}, {3, 1}, {4, 300}}) {
        int rows = sh.first, cols = sh.second;
        auto x = rvec(rows * cols, 3.0f);
        if (rows > 2) {
            for (int i = 0; i < cols; i++) x[cols + i] = 0;  // a zero row
            x[2 * cols] = 127;
            for (int i = 1; i < cols; i++) x[2 * cols + i] = (float)(i % 50) - 25 + 0.5f;  // .5 boundaries
        }
        std::vector<float> y(rows * cols);
        launch(rows, 256, [&] { aq::act_quant_int8_f32(x.data(), y.data(), rows, cols); });
        std::vector<double> want(rows * cols), sc(rows * cols, 0.0);
        for (int r = 0; r < rows; r++) {
            float m = 0;
            for (int i = 0; i < cols; i++) m = std::max(m, std::fabs(x[r * cols + i]));
            float s = std::max(m, 1e-5f) / 127.0f;
            for (int i = 0; i < cols; i++)
                want[r * cols + i] = std::min(std::max(std::nearbyint(x[r * cols + i] / s), -128.0f), 127.0f) * s;
        }
        snprintf(name, 96, "act_quant_int8 %dx%d", rows, cols);
        check_tol(name, y, want, sc, 0.0);
    }
    // RoPE: bit-exact against the same table and f32 products.
    for (int pos0 : {0, 17, 4093}) {
        int rows = 5, heads = 3, d = 10, half = d / 2;
        auto x = rvec(rows * heads * d, 2.0f);
        std::vector<float> cs(rows * d), y(rows * heads * d);
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < half; i++) {
                float f = (1.0f / std::pow(10000.0f, 2.0f * i / d)) * (float)(pos0 + r);
                cs[r * d + i] = std::cos(f);
                cs[r * d + half + i] = std::sin(f);
            }
        launch(3, 256, [&] { rope::rope_f32(x.data(), cs.data(), y.data(), rows, heads, d); });
        std::vector<double> want(rows * heads * d), sc(rows * heads * d, 0.0);
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < half; i++) {
                    int o = r * heads * d + h * d + i;
                    float c = cs[r * d + i], s = cs[r * d + half + i];
                    want[o] = __fsub_rn(__fmul_rn(x[o], c), __fmul_rn(x[o + half], s));
                    want[o + half] = __fadd_rn(__fmul_rn(x[o + half], c), __fmul_rn(x[o], s));
                }
        snprintf(name, 96, "rope pos0 %d", pos0);
        check_tol(name, y, want, sc, 0.0);
    }
    // Attention, f64 reference: non-causal GQA, causal (prefill at pos0),
    // launched in two row chunks; the error relative to the output's scale.
    struct A { int n, len, heads, kvh, d, causal; };
    for (A a : {A{13, 13, 4, 2, 10, -1}, A{5, 9, 2, 1, 33, 4}, A{1, 40, 3, 3, 8, 39}}) {
        auto q = rvec(a.n * a.heads * a.d, 1.0f), k = rvec(a.len * a.kvh * a.d, 1.0f), v = rvec(a.len * a.kvh * a.d, 1.0f);
        std::vector<float> y(a.n * a.heads * a.d, -7.0f);
        float scale = 1.0f / std::sqrt((float)a.d);
        int chunk = (a.n + 1) / 2;
        std::vector<float> scores(chunk * a.heads * a.len);
        for (int row0 = 0; row0 < a.n; row0 += chunk)
            launch2({(unsigned)a.heads, (unsigned)std::min(chunk, a.n - row0), 1}, {128, 1, 1}, [&] {
                attn::attention_f32(q.data(), k.data(), v.data(), scores.data(), y.data(), a.n, a.len, a.heads, a.kvh, a.d, scale, row0, a.causal);
            });
        std::vector<double> want(y.size()), sc(y.size(), 0.0);
        double ymax = 0;
        int group = a.heads / a.kvh;
        for (int r = 0; r < a.n; r++)
            for (int h = 0; h < a.heads; h++) {
                int vis = a.causal < 0 ? a.len : std::min(a.len, a.causal + r + 1);
                int kh = h / group;
                std::vector<double> s(vis);
                double m = -1e300, sum = 0;
                for (int j = 0; j < vis; j++) {
                    double t = 0;
                    for (int e = 0; e < a.d; e++) t += (double)q[r * a.heads * a.d + h * a.d + e] * k[j * a.kvh * a.d + kh * a.d + e];
                    s[j] = t * scale; m = std::max(m, s[j]);
                }
                for (int j = 0; j < vis; j++) { s[j] = std::exp(s[j] - m); sum += s[j]; }
                for (int e = 0; e < a.d; e++) {
                    double acc = 0;
                    for (int j = 0; j < vis; j++) acc += s[j] / sum * v[j * a.kvh * a.d + kh * a.d + e];
                    want[r * a.heads * a.d + h * a.d + e] = acc;
                    ymax = std::max(ymax, std::fabs(acc));
                }
            }
        for (auto &x : sc) x = ymax - 1;  // error relative to max(1, max |y|)
        snprintf(name, 96, "attention n%d len%d h%d/%d d%d c%d", a.n, a.len, a.heads, a.kvh, a.d, a.causal);
        check(name, y, want, sc);
    }
    // Conversions: exact.
    {
        int vocab = 41, dim = 13;
        std::vector<unsigned short> t16(vocab * dim);
        for (auto &h : t16) h = (rnd() % 0x3c00) | (rnd() & 0x8000);
        std::vector<float> t32(vocab * dim);
        for (int i = 0; i < vocab * dim; i++) t32[i] = mbq_host_f16(t16[i]);
        std::vector<unsigned> ids = {0, 40, 7, 7, 23, 1};
        int n = ids.size();
        std::vector<float> y(n * dim);
        std::vector<double> want(n * dim), sc(n * dim, 0.0);
        for (int r = 0; r < n; r++)
            for (int c = 0; c < dim; c++) want[r * dim + c] = t32[ids[r] * dim + c];
        launch(1, 256, [&] { conv::embedding_f16(t16.data(), ids.data(), y.data(), n, dim); });
        check_tol("embedding_f16", y, want, sc, 0.0);
        std::fill(y.begin(), y.end(), 0.0f);
        launch(1, 256, [&] { conv::embedding_f32(t32.data(), ids.data(), y.data(), n, dim); });
        check_tol("embedding_f32", y, want, sc, 0.0);
        std::vector<float> e(vocab * dim);
        launch(1, 256, [&] { conv::f16_to_f32(t16.data(), e.data(), (long long)t16.size()); });
        std::vector<double> we(t32.begin(), t32.end()), se(t32.size(), 0.0);
        check_tol("f16_to_f32", e, we, se, 0.0);
        // f32 -> f16 against the nearest half found by search (ties to the
        // even code, saturating at 65504): normals and subnormals over the
        // whole range, exact ties, overflow, the tiniest values.
        std::vector<float> xs;
        for (int i = 0; i < 600; i++) xs.push_back(rf() * std::ldexp(1.0f, (int)(rnd() % 44) - 28));
        for (unsigned h : {0x0001u, 0x03ffu, 0x0400u, 0x3c00u, 0x3c01u, 0x7bfeu}) {
            float mid = (mbq_host_f16(h) + mbq_host_f16(h + 1)) / 2;  // exact in f32
            xs.push_back(mid);
            xs.push_back(-mid);
        }
        for (float v : {65504.0f, 65519.0f, 65520.0f, -1e6f, -INFINITY, std::ldexp(1.0f, -25),
                        std::ldexp(1.5f, -25), std::ldexp(1.0f, -26), 0.0f})
            xs.push_back(v);
        std::vector<unsigned short> hs(xs.size());
        launch(2, 256, [&] { conv::f32_to_f16(xs.data(), hs.data(), (long long)xs.size()); });
        std::vector<float> got(xs.size());
        std::vector<double> wh(xs.size()), sh(xs.size(), 0.0);
        for (size_t i = 0; i < xs.size(); i++) {
            float a = std::fabs(xs[i]);
            unsigned best = 0x7bff;
            if (a < 65504.0f) {
                double be = 1e300;
                for (unsigned h = 0; h < 0x7c00; h++) {
                    double d = std::fabs((double)mbq_host_f16(h) - a);
                    if (d < be || (d == be && (h & 1) == 0)) be = d, best = h;
                }
            }
            float w = mbq_host_f16(best);
            wh[i] = xs[i] < 0 ? -w : w;
            got[i] = mbq_host_f16(hs[i]);
        }
        check_tol("f32_to_f16", got, wh, sh, 0.0);
    }
    for (int bits : {3, 4, 8})
        for (int group : {32, 64, 128}) {
            int out = 5, in = 384, groups = in / group, wpg = group * bits / 32;
            std::vector<uint8_t> codes(out * in);
            for (auto &c : codes) c = rnd() % (1u << bits);
            std::vector<uint32_t> q(out * groups * wpg), sz(out * groups);
            std::vector<float> s(out * groups), z(out * groups);
            for (int i = 0; i < out * groups; i++) {
                pack_group(&codes[i * group], group, bits, &q[i * wpg]);
                unsigned short sh16 = 0x2000 + rnd() % 0x1000;
                unsigned short zh = f2h((float)(rnd() % (1u << bits)));
                s[i] = mbq_host_f16(sh16); z[i] = mbq_host_f16(zh);
                sz[i] = sh16 | ((uint32_t)zh << 16);
            }
            std::vector<float> w(out * in);
            launch(2, 256, [&] { conv::dequant_packed_f32(q.data(), sz.data(), w.data(), out, in, bits, group); });
            std::vector<double> want(out * in), sc(out * in, 0.0);
            for (int o = 0; o < out; o++)
                for (int i = 0; i < in; i++) {
                    int gi = o * groups + i / group;
                    want[o * in + i] = ((float)codes[o * in + i] - z[gi]) * s[gi];  // f32, as format.rs
                }
            snprintf(name, 96, "dequant w%d g%d", bits, group);
            check_tol(name, w, want, sc, 0.0);
        }
    // GEMM (the no-cuBLAS path) and the bias add after cuBLAS.
    for (auto sh : std::vector<std::array<int, 4>>{{7, 37, 45, 1}, {70, 131, 83, 0}, {1, 5, 3, 1}}) {
        int rows = sh[0], out = sh[1], in = sh[2], with_bias = sh[3];
        auto x = rvec(rows * in, 1.0f), w = rvec(out * in, 0.5f), b = rvec(out, 0.5f);
        std::vector<float> y(rows * out, -3.0f);
        launch2({(unsigned)(out + 15) / 16, (unsigned)(rows + 15) / 16, 1}, {16, 16, 1},
                [&] { gemm::gemm_f32(x.data(), w.data(), with_bias ? b.data() : nullptr, y.data(), rows, out, in); });
        std::vector<double> want(rows * out), sc(rows * out);
        for (int r = 0; r < rows; r++)
            for (int o = 0; o < out; o++) {
                double acc = with_bias ? b[o] : 0, a = 0;
                for (int i = 0; i < in; i++) { double p = (double)x[r * in + i] * w[o * in + i]; acc += p; a += std::fabs(p); }
                want[r * out + o] = acc; sc[r * out + o] = a;
            }
        snprintf(name, 96, "gemm_f32 %dx%dx%d%s", rows, out, in, with_bias ? "+b" : "");
        check(name, y, want, sc);
        std::vector<float> yb = y;
        launch(2, 256, [&] { gemm::bias_rows_f32(yb.data(), b.data(), rows, out); });
        std::vector<double> wb(rows * out), sb(rows * out, 0.0);
        for (int i = 0; i < rows * out; i++) wb[i] = (double)(y[i] + b[i % out]);
        check_tol("bias_rows_f32", yb, wb, sb, 0.0);
    }
}

// backward.cu (the sensitivity pass): f64 references of the formulas in
// src/backend/backward.rs.
static void backward_kernels() {
    char name[96];
    // gated_backward: dg = dy up act'(g), du = dy act(g); error relative to
    // max(1, |g|) max(1, |up|) max(1, |dy|) (as verify/ops/backward.rs).
    {
        int n = 777;
        auto g = rvec(n, 6.0f), u = rvec(n, 2.0f), d = rvec(n, 1.5f);
        std::vector<float> dg(n), du(n);
        const char *names[] = {"gelu", "gelu_tanh", "quick_gelu", "silu", "relu"};
        for (int a = 0; a < 5; a++) {
            std::vector<double> wg(n), wu(n), sc(n);
            for (int i = 0; i < n; i++) {
                double x = g[i], f, fp;
                double sq = std::sqrt(2 / M_PI);
                switch (a) {
                    case 0:
                        f = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
                        fp = 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
                        break;
                    case 1: {
                        double t = std::tanh(sq * (x + 0.044715 * x * x * x));
                        f = 0.5 * x * (1 + t);
                        fp = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * sq * (1 + 3 * 0.044715 * x * x);
                        break;
                    }
                    case 2: {
                        double s = 1 / (1 + std::exp(-1.702 * x));
                        f = x * s;
                        fp = s + 1.702 * x * s * (1 - s);
                        break;
                    }
                    case 3: {
                        double s = 1 / (1 + std::exp(-x));
                        f = x * s;
                        fp = s * (1 + x * (1 - s));
                        break;
                    }
                    default: f = x > 0 ? x : 0; fp = x > 0 ? 1 : 0;
                }
                double scale = std::max(1.0, std::fabs(x)) * std::max(1.0, (double)std::fabs(u[i])) *
                               std::max(1.0, (double)std::fabs(d[i]));
                // check_tol divides by (scale + 1): pass scale - 1.
                wg[i] = d[i] * u[i] * fp; wu[i] = d[i] * f; sc[i] = scale - 1;
            }
            launch(2, 256, [&] { bw::gated_backward_f32(g.data(), u.data(), d.data(), dg.data(), du.data(), n, a); });
            snprintf(name, 96, "gated_backward dg %s", names[a]);
            check_tol(name, dg, wg, sc, 2e-6);
            snprintf(name, 96, "gated_backward du %s", names[a]);
            check_tol(name, du, wu, sc, 2e-6);
        }
    }
    // rms_norm_backward, one block per row; error relative to the row's scale.
    for (auto sh : std::vector<std::pair<int, int>>{{5, 300}, {3, 33}, {1, 7}}) {
        int rows = sh.first, cols = sh.second;
        auto x = rvec(rows * cols, 2.0f), w = rvec(cols, 1.5f), d = rvec(rows * cols, 1.0f);
        std::vector<float> dx(rows * cols);
        launch(rows, 256, [&] { bw::rms_norm_backward_f32(x.data(), w.data(), d.data(), dx.data(), rows, cols, 1e-6f); });
        std::vector<double> want(rows * cols), sc(rows * cols, 0.0);
        for (int r = 0; r < rows; r++) {
            double ss = 0, dot = 0;
            for (int i = 0; i < cols; i++) {
                double v = x[r * cols + i];
                ss += v * v;
                dot += (double)d[r * cols + i] * w[i] * v;
            }
            double inv = 1 / std::sqrt(ss / cols + 1e-6);
            double k = inv * inv * inv * dot / cols;
            for (int i = 0; i < cols; i++) want[r * cols + i] = inv * w[i] * d[r * cols + i] - k * x[r * cols + i];
        }
        snprintf(name, 96, "rms_norm_backward %dx%d", rows, cols);
        check(name, dx, want, sc);
    }
    // linear_backward: dx = dy W (W [out, in] not transposed), f32 and f16
    // weights, some dy exactly zero (skipped by the kernel).
    for (auto sh : std::vector<std::array<int, 3>>{{7, 37, 45}, {1, 5, 3}, {13, 130, 67}}) {
        int rows = sh[0], out = sh[1], in = sh[2];
        auto d = rvec(rows * out, 1.0f), w = rvec(out * in, 0.5f);
        for (int i = 0; i < rows * out; i += 3) d[i] = 0;
        std::vector<unsigned short> wh(out * in);
        std::vector<float> wf(out * in);
        for (int i = 0; i < out * in; i++) {
            wh[i] = (unsigned short)(0x3000 + rnd() % 0x0c00) | (rnd() & 1 ? 0x8000 : 0);
            wf[i] = mbq_host_f16(wh[i]);
        }
        for (int f16 = 0; f16 < 2; f16++) {
            const std::vector<float> &wv = f16 ? wf : w;
            std::vector<float> dx(rows * in, -3.0f);
            if (f16)
                launch(3, 256, [&] { bw::linear_backward_f16(d.data(), wh.data(), dx.data(), rows, out, in); });
            else
                launch(3, 256, [&] { bw::linear_backward_f32(d.data(), w.data(), dx.data(), rows, out, in); });
            std::vector<double> want(rows * in), sc(rows * in);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < in; j++) {
                    double acc = 0, a = 0;
                    for (int o = 0; o < out; o++) { double p = (double)d[r * out + o] * wv[o * in + j]; acc += p; a += std::fabs(p); }
                    want[r * in + j] = acc; sc[r * in + j] = a;
                }
            snprintf(name, 96, "linear_backward_%s %dx%dx%d", f16 ? "f16" : "f32", rows, out, in);
            check(name, dx, want, sc);
        }
    }
    // attention_backward rows then cols (causal GQA), f64 reference;
    // error relative to sum |terms| + 1 of each output.
    for (auto sh : std::vector<std::array<int, 4>>{{13, 4, 2, 10}, {37, 2, 1, 40}}) {
        int n = sh[0], heads = sh[1], kvh = sh[2], d = sh[3];
        int qs = heads * d, kvs = kvh * d, group = heads / kvh;
        float scale = 1.0f / std::sqrt((float)d);
        auto q = rvec(n * qs, 1.0f), k = rvec(n * kvs, 1.0f), v = rvec(n * kvs, 1.0f), dout = rvec(n * qs, 1.0f);
        std::vector<float> P(heads * n * n), S(heads * n * n), dq(n * qs, -3.0f), dk(n * kvs, -3.0f), dv(n * kvs, -3.0f);
        launch(n * heads, 256, [&] {
            bw::attention_backward_rows_f32(q.data(), k.data(), v.data(), dout.data(), P.data(), S.data(), dq.data(), n, heads, kvh, d, scale);
        });
        launch(n * kvh, 256, [&] {
            bw::attention_backward_cols_f32(q.data(), dout.data(), P.data(), S.data(), dk.data(), dv.data(), n, heads, kvh, d, scale);
        });
        std::vector<double> wq(n * qs, 0), wk(n * kvs, 0), wv(n * kvs, 0), sq(n * qs, 0), sk(n * kvs, 0), sv(n * kvs, 0);
        for (int h = 0; h < heads; h++) {
            int ko = (h / group) * d;
            for (int r = 0; r < n; r++) {
                std::vector<double> p(r + 1), dp(r + 1);
                double m = -1e300, l = 0, dd = 0;
                for (int j = 0; j <= r; j++) {
                    double s = 0;
                    for (int c = 0; c < d; c++) s += (double)q[r * qs + h * d + c] * k[j * kvs + ko + c];
                    p[j] = s * scale;
                    m = std::max(m, p[j]);
                }
                for (int j = 0; j <= r; j++) { p[j] = std::exp(p[j] - m); l += p[j]; }
                for (int j = 0; j <= r; j++) {
                    p[j] /= l;
                    double g = 0;
                    for (int c = 0; c < d; c++) g += (double)dout[r * qs + h * d + c] * v[j * kvs + ko + c];
                    dp[j] = g;
                    dd += p[j] * g;
                }
                for (int j = 0; j <= r; j++) {
                    double ds = p[j] * (dp[j] - dd);
                    for (int c = 0; c < d; c++) {
                        double a = scale * ds * k[j * kvs + ko + c];
                        wq[r * qs + h * d + c] += a; sq[r * qs + h * d + c] += std::fabs(a);
                        double b = scale * ds * q[r * qs + h * d + c];
                        wk[j * kvs + ko + c] += b; sk[j * kvs + ko + c] += std::fabs(b);
                        double e = p[j] * dout[r * qs + h * d + c];
                        wv[j * kvs + ko + c] += e; sv[j * kvs + ko + c] += std::fabs(e);
                    }
                }
            }
        }
        snprintf(name, 96, "attn_backward dq n%d %d/%d d%d", n, heads, kvh, d);
        check(name, dq, wq, sq);
        snprintf(name, 96, "attn_backward dk n%d %d/%d d%d", n, heads, kvh, d);
        check(name, dk, wk, sk);
        snprintf(name, 96, "attn_backward dv n%d %d/%d d%d", n, heads, kvh, d);
        check(name, dv, wv, sv);
    }
    // cross_entropy: one block per row; the f64 mean of the per-row losses
    // relative to the f64 reference's, the gradient absolute (its values
    // are within [-1, 1] / rows), both against f64 log-sum-exp; vocab
    // below, at and above the block of 256 threads.
    for (auto sh : std::vector<std::pair<int, int>>{{6, 301}, {3, 1000}, {1, 7}, {4, 256}}) {
        int rows = sh.first, vocab = sh.second;
        auto x = rvec(rows * vocab, 8.0f);
        std::vector<unsigned> lab(rows);
        for (int r = 0; r < rows; r++) lab[r] = (unsigned)((r * 97 + 5) % vocab);
        std::vector<float> g(rows * vocab, -7.0f), loss(rows, -7.0f);
        launch(rows, 256, [&] { bw::cross_entropy_f32(x.data(), lab.data(), g.data(), loss.data(), rows, vocab); });
        std::vector<double> want(rows * vocab), sc(rows * vocab, 0.0);
        double wl = 0, got = 0;
        for (int r = 0; r < rows; r++) {
            const float *l = &x[r * vocab];
            double m = -INFINITY, s = 0;
            for (int j = 0; j < vocab; j++) m = std::max(m, (double)l[j]);
            for (int j = 0; j < vocab; j++) s += std::exp(l[j] - m);
            double lse = m + std::log(s);
            wl += lse - l[lab[r]];
            got += loss[r];
            for (int j = 0; j < vocab; j++)
                want[r * vocab + j] = (std::exp(l[j] - lse) - (j == (int)lab[r] ? 1.0 : 0.0)) / rows;
        }
        wl /= rows;
        got /= rows;
        snprintf(name, 96, "cross_entropy grad %dx%d", rows, vocab);
        check_tol(name, g, want, sc, 1e-6);
        snprintf(name, 96, "cross_entropy loss %dx%d", rows, vocab);
        check_tol(name, {(float)(got / wl - 1.0)}, {0.0}, {0.0}, 1e-6);
    }
}
