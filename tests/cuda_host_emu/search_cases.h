// search.cu on the CPU (included by main.cpp after its check helpers):
// fake_quant against a C++ port of the CPU reference
// (`quant::pseudo::quantize_group` / `fake_quantize` / `fake_quant_scaled`
// and `quant::w4a8::quantize_row` / `fake_quantize_w4_per_channel`),
// compared bit for bit, with the reference's f16 rounding computed in f64
// arithmetic (not the prelude's bit conversion that the kernels use here);
// loss_rows + loss_terms against f64 sums, 1e-5 relative; abs_col_stats
// (chained over samples) and abs_rows + loss_terms (abs_terms) against the
// CPU reference's f64 sums (`Search for Cpu` in src/backend/search.rs).
namespace sq {
#include "../../kernels/search.cu"
}

// r(v) of the reference: v rounded to the nearest f16, ties to even
// (overflow to inf, subnormals kept), in f64.
static float ref_r16(float v) {
    if (!std::isfinite(v) || v == 0.0f) return v;
    double a = std::fabs((double)v);
    int e;
    std::frexp(a, &e);  // a = f 2^e, f in [0.5, 1): the leading bit is 2^(e - 1)
    double ulp = std::ldexp(1.0, std::max(e - 1, -14) - 10);
    double r = std::nearbyint(a / ulp) * ulp;  // a / ulp is exact
    if (r > 65504.0) r = INFINITY;
    return (float)std::copysign(r, (double)v);
}

// What the reference did on the way (that the inputs reach the edge cases).
struct QuantStats { int inf_quotients = 0, subnormal_scales = 0, ties = 0; };

// fake_quant_scaled of the CPU, transcribed: bits 0 means W4PerChannel.
static std::vector<float> ref_fake_quant(const std::vector<float> &w, int out, int inp,
                                         const std::vector<float> &s, int bits, int group,
                                         QuantStats &st) {
    std::vector<float> ws(w.size()), y(w.size());
    for (int o = 0; o < out; o++)
        for (int i = 0; i < inp; i++) ws[o * inp + i] = w[o * inp + i] * s[i];
    auto note = [&](float quotient, float scale) {
        st.inf_quotients += std::isinf(quotient);
        st.subnormal_scales += scale < 6.103515625e-05f;
        st.ties += std::fabs(quotient - std::trunc(quotient)) == 0.5f;
    };
    if (bits == 0) {  // quant::w4a8::quantize_row
        for (int o = 0; o < out; o++) {
            const float *x = &ws[o * inp];
            float max = 0.0f;
            for (int i = 0; i < inp; i++) max = std::max(max, std::fabs(ref_r16(x[i])));
            float scale = ref_r16(std::max(max, ref_r16(1e-5f)) / 7.0f);
            for (int i = 0; i < inp; i++) {
                float t = ref_r16(ref_r16(x[i]) / scale);
                note(t, scale);
                float q = std::clamp(std::nearbyint(t), -8.0f, 7.0f);
                y[o * inp + i] = ref_r16(q * scale);
            }
        }
        return y;
    }
    float max_int = (float)((1u << bits) - 1);
    for (size_t g0 = 0; g0 < ws.size(); g0 += group) {  // quant::pseudo::quantize_group
        float mx = -INFINITY, mn = INFINITY;
        for (int k = 0; k < group; k++) {
            mx = std::max(mx, ref_r16(ws[g0 + k]));
            mn = std::min(mn, ref_r16(ws[g0 + k]));
        }
        float scale = ref_r16(std::max(ref_r16(mx - mn), ref_r16(1e-5f)) / max_int);
        float zt = ref_r16(mn / scale);
        note(zt, scale);
        float zero = std::clamp(-std::nearbyint(zt), 0.0f, max_int);
        // The packed format stores both as f16 (exact); dequantize in f32.
        float sf = ref_r16(scale), zf = ref_r16(zero);
        for (int k = 0; k < group; k++) {
            float t = ref_r16(ref_r16(ws[g0 + k]) / scale);
            note(t, scale);
            uint8_t code = (uint8_t)std::clamp(std::nearbyint(t) + zero, 0.0f, max_int);
            y[g0 + k] = ref_r16(((float)code - zf) * sf) / s[(g0 + k) % inp];
        }
    }
    return y;
}

// Bit-exact comparison (0 and -0 count as different).
static void check_bits(const char *name, const std::vector<float> &y, const std::vector<float> &want,
                       const char *extra) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < y.size(); i++)
        if (std::memcmp(&y[i], &want[i], 4) != 0 && bad++ == 0) first = i;
    bool ok = bad == 0;
    if (!ok) fails++; else passes++;
    if (ok)
        printf("%-34s bit-exact %s OK\n", name, extra);
    else
        printf("%-34s %zu of %zu differ, first [%zu] %.9g want %.9g NOT OK\n", name, bad, y.size(),
               first, y[first], want[first]);
}

// The harness's weight (verify/ops/search.rs `search_weight`): a constant
// row (at s = 1: range 0, the 1e-5 clamp; at 8 bits its quotients overflow
// f16 to inf), a row of
// values about 1e-6 (subnormal scales), a row with an outlier, a row of
// multiples of 1/32 (ties at s = 1), then random rows of varied scale.
static std::vector<float> search_weight(int out, int inp) {
    std::vector<float> w(out * inp);
    for (int o = 0; o < out; o++)
        for (int i = 0; i < inp; i++) {
            float v = 0.05f * rf();
            switch (o) {
                case 0: v = 0.0123f; break;
                case 1: v *= 2e-5f; break;
                case 2: v = i == inp / 3 ? 900.0f : v; break;
                case 3: v = (float)(i % 31) / 32.0f; break;
                default: v *= 1.0f + (float)(o % 7);
            }
            w[o * inp + i] = v;
        }
    return w;
}

// verify/ops/search.rs `varied`: in each column one value about 1e4 (at a
// row that moves with the column) among values of 1e-3..1, either sign,
// every 17th column zero.
static std::vector<float> varied(int rows, int cols, int seed) {
    std::vector<float> x((size_t)rows * cols);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            float sign = rnd() & 1 ? 1.0f : -1.0f, u = std::fabs(rf());
            float v = j % 17 == 5 ? 0.0f
                      : (j * 7 + seed) % rows == i ? 1e4f * (1.0f + u)
                                                   : std::pow(10.0f, -3.0f + 3.0f * u);
            x[(size_t)i * cols + j] = sign * v;
        }
    return x;
}

// abs_col_stats: samples one after another (the first without acc), each
// result against the reference: hi + lo (as f64) relative to the f64 sum
// per column, the max exactly. tol: Tolerances::abs_col_stats.
static void abs_col_stats_cases(double tol) {
    char name[128];
    struct C { int cols; std::vector<int> samples; };
    std::vector<C> cases = {{1, {1}}, {129, {37}}, {65, {1000, 3, 517}}, {3000, {300, 211}},
                            {1031, {999}}, {257, {1, 700, 64}}};
    for (size_t k = 0; k < cases.size(); k++) {
        const C &c = cases[k];
        int cols = c.cols;
        std::vector<double> sum(cols, 0.0);
        std::vector<float> mx(cols, 0.0f), naive(cols, 0.0f), acc, out;
        for (size_t i = 0; i < c.samples.size(); i++) {
            int rows = c.samples[i];
            auto x = varied(rows, cols, (int)(k + 3 * i));
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < cols; j++) {
                    float v = std::fabs(x[(size_t)r * cols + j]);
                    sum[j] += v;
                    mx[j] = std::max(mx[j], v);
                    naive[j] += v;
                }
            out.assign(3 * cols, -1.0f);
            // Fewer threads than columns: the grid-stride loop runs.
            if (i == 0)
                launch(3, 64, [&] { sq::abs_col_stats_f32(x.data(), out.data(), rows, cols); });
            else
                launch(3, 64, [&] { sq::abs_col_stats_acc_f32(x.data(), acc.data(), out.data(), rows, cols); });
            double err = 0, nerr = 0;
            size_t max_bad = 0;
            for (int j = 0; j < cols; j++) {
                double got = (double)out[j] + (double)out[cols + j];
                err = std::max(err, std::fabs(got - sum[j]) / std::max(sum[j], 1e-30));
                nerr = std::max(nerr, std::fabs((double)naive[j] - sum[j]) / std::max(sum[j], 1e-30));
                max_bad += std::memcmp(&out[2 * cols + j], &mx[j], 4) != 0;
            }
            bool ok = err <= tol && max_bad == 0;
            if (!ok) fails++; else passes++;
            snprintf(name, 128, "abs_col_stats [%d, %d] %zu/%zu", rows, cols, i + 1, c.samples.size());
            printf("%-40s sum rel err %.2e (f32 without compensation %.1e), max %zu differ %s\n", name,
                   err, nerr, max_bad, ok ? "OK" : "NOT OK");
            acc = out;
        }
    }
}

// abs_rows then loss_terms (Search::abs_terms): masks that overlap, with
// no caption rows, with no vision rows. tol: Tolerances::abs_terms.
static void abs_terms_cases(double tol) {
    char name[96];
    struct C { int rows, cols, kind; };  // kind 0 overlapping, 1 no caption, 2 no vision
    for (C c : std::vector<C>{{37, 129, 0}, {1, 3584, 0}, {300, 65, 1}, {2, 1, 2}, {1000, 17, 0}, {513, 700, 2}}) {
        auto x = varied(c.rows, c.cols, c.rows);
        std::vector<float> masks(2 * c.rows), err(c.rows, -1.0f), terms(3, -1.0f);
        std::vector<double> want(3, 0.0);
        for (int r = 0; r < c.rows; r++) {
            masks[2 * r] = c.kind != 1 && r % 3 == 0;
            masks[2 * r + 1] = c.kind != 2 && (r % 3 == 1 || r % 5 == 0);
            double e = 0;
            for (int j = 0; j < c.cols; j++) e += std::fabs((double)x[(size_t)r * c.cols + j]);
            if (masks[2 * r] != 0) want[0] += e;
            if (masks[2 * r + 1] != 0) want[1] += e;
            want[2] += e;
        }
        // One warp a row (a block of 32: fewer host threads than 128).
        launch(c.rows, 32, [&] { sq::abs_rows_f32(x.data(), err.data(), c.rows, c.cols); });
        launch(1, 256, [&] { sq::loss_terms_f32(err.data(), masks.data(), terms.data(), c.rows); });
        // Relative to each sum; absolute where the sum is 0 (no such rows:
        // the kernel's must be 0 too). check_tol divides by scale + 1.
        std::vector<double> sc(3);
        for (int k = 0; k < 3; k++) sc[k] = want[k] == 0.0 ? 0.0 : std::fabs(want[k]) - 1.0;
        snprintf(name, 96, "abs_terms %dx%d%s", c.rows, c.cols,
                 c.kind == 1 ? " no caption" : c.kind == 2 ? " no vision" : "");
        check_tol(name, terms, want, sc, tol);
    }
}

static void search_kernels() {
    char name[96], extra[96];
    struct C { int out, inp, bits, group; bool unit_s; };  // bits 0: W4PerChannel
    std::vector<C> cases;
    for (int bits : {3, 4, 8})
        for (int group : {32, 64, 128}) cases.push_back({37, 384, bits, group, false});
    cases.push_back({5, 256, 3, 128, false});
    cases.push_back({9, 128, 4, 32, true});
    cases.push_back({7, 256, 8, 64, true});  // row 0 at s = 1: range 0, quotients overflow f16
    cases.push_back({37, 300, 0, 0, false});
    cases.push_back({4, 1, 0, 0, false});
    cases.push_back({6, 96, 0, 0, true});
    for (const C &c : cases) {
        auto w32 = search_weight(c.out, c.inp);
        std::vector<float> s(c.inp);
        for (auto &v : s) v = c.unit_s ? 1.0f : 0.25f + 3.75f * std::fabs(rf());
        std::vector<unsigned short> w16(w32.size());
        std::vector<float> w16f(w32.size());
        for (size_t i = 0; i < w32.size(); i++) {
            w16[i] = mbq_host_f32_to_f16(w32[i]);
            w16f[i] = mbq_host_f16(w16[i]);
        }
        for (int f16 = 0; f16 < 2; f16++) {
            QuantStats st;
            auto want = ref_fake_quant(f16 ? w16f : w32, c.out, c.inp, s, c.bits, c.group, st);
            std::vector<float> y(w32.size(), -5.0f);
            if (c.bits == 0) {
                launch(c.out, 256, [&] {
                    if (f16) sq::fake_quant_w4_f16(w16.data(), s.data(), y.data(), c.out, c.inp);
                    else sq::fake_quant_w4_f32(w32.data(), s.data(), y.data(), c.out, c.inp);
                });
                snprintf(name, 96, "fake_quant w4 %s %dx%d%s", f16 ? "f16" : "f32", c.out, c.inp,
                         c.unit_s ? " s=1" : "");
            } else {
                // Fewer warps than groups: the grid-stride loop runs.
                launch(3, 256, [&] {
                    if (f16)
                        sq::fake_quant_group_f16(w16.data(), s.data(), y.data(), c.out, c.inp, c.bits, c.group);
                    else
                        sq::fake_quant_group_f32(w32.data(), s.data(), y.data(), c.out, c.inp, c.bits, c.group);
                });
                snprintf(name, 96, "fake_quant w%d g%d %s %dx%d%s", c.bits, c.group, f16 ? "f16" : "f32",
                         c.out, c.inp, c.unit_s ? " s=1" : "");
            }
            snprintf(extra, 96, "(inf %d, subn. scales %d, ties %d)", st.inf_quotients,
                     st.subnormal_scales, st.ties);
            check_bits(name, y, want, extra);
        }
    }
    // ref_r16 and the prelude's conversion agree on a sweep of f32 values
    // (every 4099th bit pattern, both signs, zero to NaN).
    {
        size_t bad = 0, n = 0;
        for (uint64_t b = 0; b < 0x80000000ull; b += 4099) {
            for (uint32_t sign : {0u, 0x80000000u}) {
                uint32_t x = (uint32_t)b | sign;
                float f;
                std::memcpy(&f, &x, 4);
                if (std::isnan(f)) continue;
                float a = mbq_host_f16(mbq_host_f32_to_f16(f)), r = ref_r16(f);
                bad += std::memcmp(&a, &r, 4) != 0;
                n++;
            }
        }
        bool ok = bad == 0;
        if (!ok) fails++; else passes++;
        printf("%-34s %zu of %zu differ %s\n", "f32->f16 rounding (prelude)", bad, n, ok ? "OK" : "NOT OK");
    }
    // loss_rows then loss_terms: masks that overlap and rows in neither.
    for (auto sh : std::vector<std::pair<int, int>>{{37, 129}, {1, 3584}, {300, 65}, {2, 1}}) {
        int rows = sh.first, cols = sh.second;
        std::vector<float> a(rows * cols), b(rows * cols), masks(rows * 2);
        for (int i = 0; i < rows * cols; i++) {
            a[i] = 2.0f * rf();
            b[i] = a[i] + 0.01f * rf();
        }
        for (int r = 0; r < rows; r++) {
            masks[2 * r] = r % 3 == 0;
            masks[2 * r + 1] = r % 3 == 1 || r % 5 == 0;
        }
        for (int dist : {0, 1}) {
            std::vector<float> err(rows, -1.0f), terms(3, -1.0f);
            launch(rows, 128, [&] { sq::loss_rows_f32(a.data(), b.data(), err.data(), rows, cols, dist); });
            launch(1, 256, [&] { sq::loss_terms_f32(err.data(), masks.data(), terms.data(), rows); });
            std::vector<double> want(3, 0.0);
            for (int r = 0; r < rows; r++) {
                double e = 0;
                for (int c = 0; c < cols; c++) {
                    double d = (double)a[r * cols + c] - b[r * cols + c];
                    e += dist ? d * d : std::fabs(d);
                }
                if (masks[2 * r] != 0) want[0] += e;
                if (masks[2 * r + 1] != 0) want[1] += e;
                want[2] += e;
            }
            // Relative to each sum: scale = |sum| - 1 (check_tol divides by scale + 1).
            std::vector<double> sc(3);
            for (int k = 0; k < 3; k++) sc[k] = std::max(std::fabs(want[k]), 1e-30) - 1.0;
            snprintf(name, 96, "loss_terms %s %dx%d", dist ? "squared" : "abs", rows, cols);
            check_tol(name, terms, want, sc, 1e-5);
        }
    }
    abs_col_stats_cases(1e-9);
    abs_terms_cases(1e-5);
}
