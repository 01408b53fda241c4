// test_matmul.cpp - matmul / weight_row / weight_view against a naive reference.
//
// Reference: W dequantized with dequantize_row (quants.h), then a float64
// product with the float32 activations.
//
// Tolerances (per output element y[i, r]):
//  * float weights (F32/F16/BF16) and the dequantize fallback types: only
//    float32 rounding in the sums, bounded by 2*n_in*eps32 * sum_k |x_k w_k|
//    (the classic gamma_n bound, eps32 = 2^-24 relative, doubled for the
//    per-block scale products); observed errors are far below it.
//  * integer kernels (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K): the activations
//    are quantized to int16 per block of 32 (K-quants: 256) with step
//    dx = amax/QMAX (QMAX = 32767, K-quants 16383), so each
//    |x - dx*qx| <= amax/(2*QMAX) and
//        |y - y_ref| <= sum_blocks amax_block/(2*QMAX) * sum_{k in block} |w_k|
//    plus the same float32 rounding term. This bound is rigorous, so it is
//    checked exactly rather than with a guessed relative tolerance; the test
//    also checks the typical relative error is small (< 5e-4 with the
//    synthetic 20-sigma outliers used here).
//  * SIMD vs scalar kernels: same integers, different float summation order:
//    |y_simd - y_scalar| <= 1e-5 * sum_k |x_k w_k| (+1e-30).
//  * different thread counts: bitwise identical (a given output is always
//    computed by the same kernel call; only the row split differs).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "error.h"
#include "ggml_types.h"
#include "gguf.h"
#include "matmul.h"
#include "quants.h"
#include "threadpool.h"

using namespace orcd;

namespace {

// Byte offsets of the fp16 scale fields inside one block of each type.
std::vector<int> f16_fields(uint32_t type) {
    switch (type) {
        case T_Q4_0: case T_Q5_0: case T_Q8_0: return {0};
        case T_Q4_1: case T_Q5_1: return {0, 2};
        case T_Q2_K: return {80, 82};
        case T_Q3_K: return {108};
        case T_Q4_K: case T_Q5_K: return {0, 2};
        case T_Q6_K: return {208};
        default: return {};
    }
}

// Random weights of `type`: n_out rows of n_in elements. Quantized blocks
// get random code bytes and sane fp16 scales (no inf/nan).
std::vector<uint8_t> random_weights(uint32_t type, int64_t n_in, int64_t n_out, std::mt19937& rng) {
    const TypeInfo* ti = type_info(type);
    const int64_t nblocks = n_in / ti->block_size * n_out;
    std::vector<uint8_t> w((size_t)(nblocks * ti->block_bytes));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int> byte(0, 255);
    if (type == T_F32) {
        for (int64_t k = 0; k < n_in * n_out; ++k) {
            float f = nd(rng);
            std::memcpy(&w[(size_t)k * 4], &f, 4);
        }
        return w;
    }
    if (type == T_F16 || type == T_BF16) {
        for (int64_t k = 0; k < n_in * n_out; ++k) {
            float f = nd(rng);
            uint16_t h;
            if (type == T_F16) {
                h = fp32_to_fp16(f);
            } else {
                uint32_t u;
                std::memcpy(&u, &f, 4);
                h = (uint16_t)(u >> 16);
            }
            std::memcpy(&w[(size_t)k * 2], &h, 2);
        }
        return w;
    }
    for (auto& b : w) b = (uint8_t)byte(rng);
    std::uniform_real_distribution<float> ud(0.001f, 0.05f);
    for (int64_t b = 0; b < nblocks; ++b)
        for (int off : f16_fields(type)) {
            float f = ud(rng) * (byte(rng) & 1 ? 1.0f : -1.0f);
            uint16_t h = fp32_to_fp16(f);
            std::memcpy(&w[(size_t)(b * ti->block_bytes + off)], &h, 2);
        }
    return w;
}

// Activations like a transformer's: Gaussian with a few large outliers, and
// one all-zero block.
std::vector<float> random_acts(int64_t m, int64_t n_in, std::mt19937& rng) {
    std::vector<float> x((size_t)(m * n_in));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int64_t> pos(0, n_in - 1);
    for (auto& v : x) v = nd(rng);
    for (int64_t i = 0; i < m; ++i) {
        for (int o = 0; o < 3; ++o) x[(size_t)(i * n_in + pos(rng))] *= 20.0f;
        if (n_in >= 64 && i % 2 == 1)
            for (int k = 32; k < 64; ++k) x[(size_t)(i * n_in + k)] = 0.0f;
    }
    return x;
}

struct Ref {
    std::vector<double> y, abs_sum, bound;  // [m * n_out]
};

// Float64 reference and the per-output error bound (see the header comment).
Ref reference(uint32_t type, const std::vector<uint8_t>& wb, int64_t n_in, int64_t n_out, const std::vector<float>& x,
              int64_t m) {
    const TypeInfo* ti = type_info(type);
    const size_t row_bytes = (size_t)(n_in / ti->block_size * ti->block_bytes);
    std::vector<float> W((size_t)(n_in * n_out));
    for (int64_t r = 0; r < n_out; ++r) dequantize_row(type, wb.data() + r * row_bytes, &W[(size_t)(r * n_in)], n_in);
    const bool int_kernel = matmul_has_kernel(type) && type != T_F32 && type != T_F16 && type != T_BF16;
    const int64_t qb = (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) ? 256 : 32;
    Ref R;
    R.y.resize((size_t)(m * n_out));
    R.abs_sum.resize(R.y.size());
    R.bound.resize(R.y.size());
    const double eps = std::ldexp(1.0, -24);
    for (int64_t i = 0; i < m; ++i) {
        const float* xi = &x[(size_t)(i * n_in)];
        std::vector<double> amax((size_t)(n_in / qb + 1), 0.0);
        for (int64_t k = 0; k < n_in; ++k) amax[(size_t)(k / qb)] = std::max(amax[(size_t)(k / qb)], (double)std::fabs(xi[k]));
        for (int64_t r = 0; r < n_out; ++r) {
            const float* wr = &W[(size_t)(r * n_in)];
            double s = 0, a = 0, qerr = 0;
            for (int64_t k = 0; k < n_in; ++k) {
                s += (double)xi[k] * wr[k];
                a += std::fabs((double)xi[k] * wr[k]);
                if (int_kernel) qerr += amax[(size_t)(k / qb)] / (qb == 256 ? 2.0 * 16383 : 2.0 * 32767) * std::fabs(wr[k]);
            }
            const size_t o = (size_t)(i * n_out + r);
            R.y[o] = s;
            R.abs_sum[o] = a;
            // quantization term (x1.001 for the rounding of dx itself) + float32 sums
            R.bound[o] = qerr * 1.001 + 2.0 * n_in * eps * (a + qerr) + 1e-30;
        }
    }
    return R;
}

const uint32_t kAllTypes[] = {T_F32, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0,
                              T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K};

struct ScalarGuard {
    explicit ScalarGuard(bool on) { matmul_force_scalar(on); }
    ~ScalarGuard() { matmul_force_scalar(false); }
};

}  // namespace

TEST_CASE("matmul: every supported type vs the dequantized float64 reference") {
    std::mt19937 rng(1234);
    ThreadPool pool1(1), pool2(2), pool3(3);
    for (uint32_t type : kAllTypes) {
        const TypeInfo* ti = type_info(type);
        const std::string tname = ti->name;
        CAPTURE(tname);
        REQUIRE(matmul_supports(type));
        // n_in: 3 super-blocks for K-quants, an odd-ish length for plain floats
        const int64_t n_in = ti->block_size == 256 ? 768 : (ti->block_size == 32 ? 352 : 301);
        const int64_t n_out = 37;  // odd, not a multiple of any thread count used
        auto wb = random_weights(type, n_in, n_out, rng);
        WeightView w = make_weight_view(type, wb.data(), n_in, n_out);
        // m >= 16 takes the packed-tile path (AVX512-VNNI builds)
        for (int64_t m : {1, 2, 3, 5, 7, 9, 17, 30}) {
            CAPTURE(m);
            auto x = random_acts(m, n_in, rng);
            Ref R = reference(type, wb, n_in, n_out, x, m);
            std::vector<float> y1((size_t)(m * n_out), NAN), y2 = y1, y3 = y1;
            matmul(w, x.data(), m, y1.data(), pool1);
            matmul(w, x.data(), m, y2.data(), pool2);
            matmul(w, x.data(), m, y3.data(), pool3);
            double num = 0, den = 0;
            int bad = 0;
            for (size_t o = 0; o < y1.size(); ++o) {
                const double err = std::fabs((double)y1[o] - R.y[o]);
                if (!(err <= R.bound[o])) {
                    if (bad++ < 5) FAIL_CHECK("output " << o << ": " << y1[o] << " vs " << R.y[o] << " bound " << R.bound[o]);
                }
                num += err * err;
                den += R.y[o] * R.y[o];
                // bitwise identical for any thread count
                REQUIRE(std::memcmp(&y1[o], &y2[o], 4) == 0);
                REQUIRE(std::memcmp(&y1[o], &y3[o], 4) == 0);
            }
            CHECK(bad == 0);
            const double rel = std::sqrt(num / den);
            if (matmul_has_kernel(type) && type != T_F32 && type != T_F16 && type != T_BF16)
                CHECK(rel < 5e-4);
            else
                CHECK(rel < 1e-5);
        }
    }
}

TEST_CASE("matmul: SIMD and scalar kernels agree up to float summation order") {
    std::mt19937 rng(99);
    ThreadPool pool(2);
    MESSAGE("matmul kernels: " << std::string(matmul_kernel_name()));
    for (uint32_t type : kAllTypes) {
        const TypeInfo* ti = type_info(type);
        const std::string tname = ti->name;
        CAPTURE(tname);
        const int64_t n_in = ti->block_size == 256 ? 512 : (ti->block_size == 32 ? 256 : 203);
        const int64_t n_out = 23;
        auto wb = random_weights(type, n_in, n_out, rng);
        WeightView w = make_weight_view(type, wb.data(), n_in, n_out);
        for (int64_t m : {1, 4, 6, 21}) {
            auto x = random_acts(m, n_in, rng);
            Ref R = reference(type, wb, n_in, n_out, x, m);
            std::vector<float> ys((size_t)(m * n_out)), yv = ys;
            matmul(w, x.data(), m, yv.data(), pool);
            {
                ScalarGuard g(true);
                CHECK(std::string(matmul_kernel_name()) == "scalar");
                matmul(w, x.data(), m, ys.data(), pool);
            }
            for (size_t o = 0; o < ys.size(); ++o)
                REQUIRE(std::fabs((double)ys[o] - yv[o]) <= 1e-5 * R.abs_sum[o] + 1e-30);
        }
    }
}

TEST_CASE("matmul: the real model's shapes, many activation tiles, large n_out") {
    std::mt19937 rng(7);
    ThreadPool pool(2);
    for (uint32_t type : {T_Q5_0, T_Q8_0, T_Q4_K, T_Q6_K}) {
        const std::string tname = type_name(type);
        CAPTURE(tname);
        // attention/ffn-up shapes read 896 inputs; ffn_down (the K-quants) 4864
        const int64_t n_in = (type == T_Q4_K || type == T_Q6_K) ? 4864 : 896, n_out = 131;
        auto wb = random_weights(type, n_in, n_out, rng);
        WeightView w = make_weight_view(type, wb.data(), n_in, n_out);
        const int64_t m = 19;
        auto x = random_acts(m, n_in, rng);
        Ref R = reference(type, wb, n_in, n_out, x, m);
        std::vector<float> y((size_t)(m * n_out));
        matmul(w, x.data(), m, y.data(), pool);
        for (size_t o = 0; o < y.size(); ++o) REQUIRE(std::fabs((double)y[o] - R.y[o]) <= R.bound[o]);
        // one row at a time gives the same numbers as the tiled product
        std::vector<float> y1((size_t)n_out);
        for (int64_t i = 0; i < m; i += 6) {
            matmul(w, x.data() + i * n_in, 1, y1.data(), pool);
            for (int64_t r = 0; r < n_out; ++r)
                REQUIRE(std::fabs(y1[(size_t)r] - y[(size_t)(i * n_out + r)]) <= 1e-5 * R.abs_sum[(size_t)(i * n_out + r)]);
        }
    }
}

TEST_CASE("matmul: strided rows (row_bytes larger than a row)") {
    std::mt19937 rng(21);
    ThreadPool pool(2);
    for (uint32_t type : {T_F32, T_F16, T_Q8_0, T_Q4_K, T_Q4_1}) {
        const std::string tname = type_name(type);
        CAPTURE(tname);
        const TypeInfo* ti = type_info(type);
        const int64_t n_in = ti->block_size == 256 ? 256 : 64, n_out = 19;
        // a matrix of 2*n_in columns; the view covers the second half of each row
        auto wide = random_weights(type, 2 * n_in, n_out, rng);
        const size_t half = (size_t)(n_in / ti->block_size * ti->block_bytes);
        WeightView w = make_weight_view(type, wide.data() + half, n_in, n_out);
        w.row_bytes = 2 * half;
        std::vector<uint8_t> packed((size_t)n_out * half);
        for (int64_t r = 0; r < n_out; ++r) std::memcpy(&packed[(size_t)r * half], wide.data() + r * 2 * half + half, half);
        WeightView wp = make_weight_view(type, packed.data(), n_in, n_out);
        for (int64_t m : {1, 5, 20}) {
            auto x = random_acts(m, n_in, rng);
            std::vector<float> ys((size_t)(m * n_out)), yp = ys;
            matmul(w, x.data(), m, ys.data(), pool);
            matmul(wp, x.data(), m, yp.data(), pool);
            CHECK(std::memcmp(ys.data(), yp.data(), ys.size() * 4) == 0);
        }
        std::vector<float> row((size_t)n_in), rowp = row;
        weight_row(w, 7, row.data());
        weight_row(wp, 7, rowp.data());
        CHECK(std::memcmp(row.data(), rowp.data(), row.size() * 4) == 0);
    }
}

TEST_CASE("matmul: m = 0 and n_out = 0 do nothing; bad views throw") {
    ThreadPool pool(2);
    std::vector<uint8_t> wb(34 * 4, 0);
    WeightView w = make_weight_view(T_Q8_0, wb.data(), 64, 2);
    float y = 123.0f;
    matmul(w, nullptr, 0, &y, pool);
    CHECK(y == 123.0f);
    CHECK_THROWS_AS(make_weight_view(T_Q8_0, wb.data(), 48, 2), Error);   // not a multiple of 32
    CHECK_THROWS_AS(make_weight_view(T_Q8_K, wb.data(), 256, 1), Error);  // no kernel, not dequantizable
    CHECK_THROWS_AS(make_weight_view(12345, wb.data(), 256, 1), Error);
    WeightView bad = w;
    bad.row_bytes = 10;
    CHECK_THROWS_AS(matmul(bad, nullptr, 1, &y, pool), Error);
    CHECK(matmul_supports(T_Q4_1));
    CHECK_FALSE(matmul_has_kernel(T_Q4_1));
    CHECK(matmul_has_kernel(T_Q6_K));
    CHECK_FALSE(matmul_supports(16));  // IQ2_XXS
}

TEST_CASE("weight_view: checks 2-D and the type, naming the tensor") {
    std::vector<uint8_t> wb(144 * 8, 0);
    TensorInfo t;
    t.name = "blk.3.ffn_down.weight";
    t.n_dims = 2;
    t.ne[0] = 512;
    t.ne[1] = 4;
    t.type = T_Q4_K;
    t.data = wb.data();
    t.nbytes = wb.size();
    WeightView w = weight_view(t);
    CHECK(w.n_in == 512);
    CHECK(w.n_out == 4);
    CHECK(w.row_bytes == 288);
    CHECK(w.data == wb.data());
    CHECK(w.type == T_Q4_K);

    TensorInfo v = t;
    v.n_dims = 1;
    v.ne[1] = 1;
    try {
        weight_view(v);
        FAIL("1-D tensor accepted");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("blk.3.ffn_down.weight") != std::string::npos);
    }
    TensorInfo u = t;
    u.type = 16;  // IQ2_XXS: no kernel, not dequantizable
    try {
        weight_view(u);
        FAIL("unsupported type accepted");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("blk.3.ffn_down.weight") != std::string::npos);
        CHECK(std::string(e.what()).find("IQ2_XXS") != std::string::npos);
    }
    TensorInfo z = t;
    z.n_dims = 3;
    z.ne[2] = 2;
    CHECK_THROWS_AS(weight_view(z), Error);
}

TEST_CASE("weight_row: one row as float equals dequantize_row") {
    std::mt19937 rng(5);
    for (uint32_t type : kAllTypes) {
        const TypeInfo* ti = type_info(type);
        const std::string tname = ti->name;
        CAPTURE(tname);
        const int64_t n_in = ti->block_size == 1 ? 96 : 2 * ti->block_size, n_out = 5;
        auto wb = random_weights(type, n_in, n_out, rng);
        WeightView w = make_weight_view(type, wb.data(), n_in, n_out);
        std::vector<float> row((size_t)n_in), ref((size_t)n_in);
        for (int64_t r = 0; r < n_out; ++r) {
            weight_row(w, r, row.data());
            dequantize_row(type, wb.data() + r * w.row_bytes, ref.data(), n_in);
            CHECK(std::memcmp(row.data(), ref.data(), row.size() * 4) == 0);
        }
        CHECK_THROWS_AS(weight_row(w, n_out, row.data()), Error);
        CHECK_THROWS_AS(weight_row(w, -1, row.data()), Error);
    }
}

TEST_CASE("weight_row: F16 rows keep every fp16 pattern exactly, signalling NaNs included") {
    // a copy must not go through an arithmetic-grade conversion (F16C quiets
    // signalling NaNs); fp16_to_fp32 is checked against NumPy by tests/test_dequant.py
    std::vector<uint8_t> wb(2 * 65536);
    for (uint32_t h = 0; h < 65536; ++h) {
        wb[2 * h] = uint8_t(h & 0xFF);
        wb[2 * h + 1] = uint8_t(h >> 8);
    }
    WeightView w = make_weight_view(T_F16, wb.data(), 65536, 1);
    std::vector<float> row(65536);
    weight_row(w, 0, row.data());
    int bad = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
        const float want = fp16_to_fp32(uint16_t(h));
        if (std::memcmp(&row[h], &want, 4) != 0) ++bad;
    }
    CHECK(bad == 0);
}
