// test_logprobs.cpp - orcd::compute_logprobs against log_softmax written out here in long
// double, its top-list order and its bounds. Run: orcd_tests -tc='*logprob*'
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "error.h"
#include "logprobs.h"

namespace {

std::vector<long double> log_softmax(const std::vector<float>& x) {
    long double m = -INFINITY;
    for (float v : x)
        if (!std::isnan(v)) m = std::max(m, (long double)v);
    long double s = 0;
    for (float v : x)
        if (!std::isnan(v)) s += std::exp((long double)v - m);
    std::vector<long double> out;
    for (float v : x) out.push_back(std::isnan(v) ? -INFINITY : (long double)v - m - std::log(s));
    return out;
}

}  // namespace

TEST_CASE("logprobs: chosen and top-n equal log_softmax, best first, ties by id") {
    std::mt19937 g(3);
    std::normal_distribution<float> d(0.0f, 3.0f);
    std::vector<float> x(4099);
    for (float& v : x) v = d(g);
    x[100] = x[200] = 40.0f;  // a tie at the top
    x[7] = std::numeric_limits<float>::quiet_NaN();
    const auto ref = log_softmax(x);
    orcd::Logprobs lp;
    orcd::compute_logprobs(x.data(), int(x.size()), 200, 20, lp);
    CHECK(std::fabs(lp.logprob - double(ref[200])) < 1e-5);
    REQUIRE(lp.top.size() == 20);
    CHECK(lp.top[0].token == 100);
    CHECK(lp.top[1].token == 200);
    double mass = 0;
    for (size_t j = 0; j < lp.top.size(); ++j) {
        CHECK(std::fabs(lp.top[j].logprob - double(ref[size_t(lp.top[j].token)])) < 1e-5);
        if (j) CHECK(lp.top[j - 1].logprob >= lp.top[j].logprob);
        mass += std::exp(double(lp.top[j].logprob));
    }
    CHECK(mass <= 1.0 + 1e-6);
    // nothing outside the list beats its last entry
    for (size_t i = 0; i < x.size(); ++i) {
        bool in = false;
        for (auto& t : lp.top) in |= size_t(t.token) == i;
        if (!in) CHECK(ref[i] <= (long double)lp.top.back().logprob + 1e-6L);
    }
    orcd::compute_logprobs(x.data(), int(x.size()), 7, 0, lp);  // NaN: -inf, and no list
    CHECK(std::isinf(lp.logprob));
    CHECK(lp.top.empty());
}

TEST_CASE("logprobs: bounds are errors naming the problem") {
    std::vector<float> x = {1.0f, 2.0f};
    orcd::Logprobs lp;
    CHECK_THROWS_AS(orcd::compute_logprobs(x.data(), 2, 0, orcd::kMaxTopLogprobs + 1, lp), orcd::Error);
    CHECK_THROWS_AS(orcd::compute_logprobs(x.data(), 2, 2, 1, lp), orcd::Error);
    CHECK_THROWS_AS(orcd::compute_logprobs(x.data(), 0, 0, 1, lp), orcd::Error);
    std::vector<float> bad = {-INFINITY, std::numeric_limits<float>::quiet_NaN()};
    CHECK_THROWS_AS(orcd::compute_logprobs(bad.data(), 2, 0, 1, lp), orcd::Error);
    orcd::compute_logprobs(x.data(), 2, 0, 20, lp);  // n_top beyond n_vocab: every token
    CHECK(lp.top.size() == 2);
}
