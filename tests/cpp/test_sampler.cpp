// test_sampler.cpp - orcd::Sampler: validation, greedy, penalties, filters,
// determinism. Run: orcd_tests -tc='*sampl*'
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "error.h"
#include "sampler.h"

using orcd::Sampler;
using orcd::SamplerParams;

namespace {

SamplerParams plain(float temperature = 1.0f) {
    SamplerParams p;
    p.temperature = temperature;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.penalty_last_n = 64;
    p.seed = 1;
    return p;
}

std::string error_of(const SamplerParams& p) {
    try {
        orcd::validate(p);
    } catch (const orcd::Error& e) {
        return e.what();
    }
    return "";
}

int32_t greedy(const std::vector<float>& logits, const std::vector<int32_t>& hist, SamplerParams p) {
    p.temperature = 0.0f;
    Sampler s(p);
    return s.sample(logits.data(), int(logits.size()), hist.data(), int(hist.size()));
}

// Deterministic pseudo-random logits for the tests (not the sampler's generator).
std::vector<float> test_logits(int n, uint32_t seed, float scale = 4.0f) {
    std::vector<float> v(static_cast<size_t>(n));
    uint32_t x = seed * 2654435761u + 12345u;
    for (int i = 0; i < n; ++i) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        v[size_t(i)] = scale * (float(x % 100000u) / 100000.0f - 0.5f);
    }
    return v;
}

std::vector<int32_t> draws(SamplerParams p, const std::vector<float>& logits, int n,
                           const std::vector<int32_t>& hist = {}) {
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i)
        out.push_back(s.sample(logits.data(), int(logits.size()), hist.data(), int(hist.size())));
    return out;
}

}  // namespace

TEST_CASE("sampler: validation messages name the parameter and value") {
    CHECK(error_of(SamplerParams{}) == "");
    SamplerParams p;
    p.temperature = -1.0f;
    CHECK(error_of(p) == "temperature must be >= 0 (got -1)");
    p = SamplerParams{};
    p.temperature = NAN;
    CHECK(error_of(p).rfind("temperature must be >= 0 (got ", 0) == 0);
    p = SamplerParams{};
    p.temperature = INFINITY;
    CHECK(error_of(p) == "temperature must be finite (got inf)");
    p = SamplerParams{};
    p.top_p = 1.5f;
    CHECK(error_of(p) == "top_p must be in (0, 1] (got 1.5)");
    p.top_p = 0.0f;
    CHECK(error_of(p) == "top_p must be in (0, 1] (got 0)");
    p = SamplerParams{};
    p.min_p = -0.25f;
    CHECK(error_of(p) == "min_p must be in [0, 1] (got -0.25)");
    p.min_p = 2.0f;
    CHECK(error_of(p) == "min_p must be in [0, 1] (got 2)");
    p = SamplerParams{};
    p.repetition_penalty = 0.0f;
    CHECK(error_of(p) == "repetition_penalty must be > 0 (got 0)");
    p = SamplerParams{};
    p.presence_penalty = 2.5f;
    CHECK(error_of(p) == "presence_penalty must be in [-2, 2] (got 2.5)");
    p = SamplerParams{};
    p.frequency_penalty = -3.0f;
    CHECK(error_of(p) == "frequency_penalty must be in [-2, 2] (got -3)");
    p = SamplerParams{};
    p.penalty_last_n = -2;
    CHECK(error_of(p) == "penalty_last_n must be >= -1 (got -2)");
    // The constructor validates too.
    p = SamplerParams{};
    p.top_p = 1.5f;
    CHECK_THROWS_AS(Sampler{p}, orcd::Error);
    // Boundaries are accepted.
    p = SamplerParams{};
    p.temperature = 0.0f; p.top_p = 1.0f; p.min_p = 1.0f; p.top_k = -5;
    p.presence_penalty = -2.0f; p.frequency_penalty = 2.0f; p.penalty_last_n = -1;
    CHECK(error_of(p) == "");
}

TEST_CASE("sampler: greedy picks the argmax, lowest index on ties") {
    std::vector<float> l = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
    CHECK(greedy(l, {}, plain()) == 1);
    std::vector<float> flat(1000, 0.25f);
    CHECK(greedy(flat, {}, plain()) == 0);
    flat[999] = 0.5f;
    flat[500] = 0.5f;
    CHECK(greedy(flat, {}, plain()) == 500);
    // NaN never wins; +inf wins.
    std::vector<float> odd = {NAN, 1.0f, INFINITY, 2.0f};
    CHECK(greedy(odd, {}, plain()) == 2);
    // Greedy ignores top_k/top_p/min_p (they never remove the argmax).
    SamplerParams p = SamplerParams{};
    CHECK(greedy(l, {}, p) == 1);
}

TEST_CASE("sampler: repetition penalty is CTRL-style, once per distinct token") {
    SamplerParams p = plain();
    p.repetition_penalty = 2.0f;
    // token 0: 3.0 -> 1.5 (positive: divided), token 1 stays 1.6 -> 1 wins.
    CHECK(greedy({3.0f, 1.6f}, {0}, p) == 1);
    CHECK(greedy({3.0f, 1.4f}, {0}, p) == 0);
    // Seen three times: still divided once (1.5), not 3/8.
    CHECK(greedy({3.0f, 1.4f}, {0, 0, 0}, p) == 0);
    // Negative logit multiplied: -1 -> -2.
    CHECK(greedy({-1.0f, -1.9f}, {0}, p) == 1);
    CHECK(greedy({-1.0f, -2.1f}, {0}, p) == 0);
    // Zero logit: not > 0, multiplied, stays 0.
    CHECK(greedy({0.0f, -0.01f}, {0}, p) == 0);
    // Penalty < 1 boosts.
    p.repetition_penalty = 0.5f;
    CHECK(greedy({1.0f, 1.95f}, {0}, p) == 0);  // 1 / 0.5 = 2 > 1.95
    CHECK(greedy({1.0f, 2.05f}, {0}, p) == 1);
    CHECK(greedy({-1.0f, -0.45f}, {0}, p) == 1);  // -1 * 0.5 = -0.5 < -0.45
    CHECK(greedy({-1.0f, -0.55f}, {0}, p) == 0);
}

TEST_CASE("sampler: presence and frequency penalties") {
    SamplerParams p = plain();
    p.presence_penalty = 0.5f;
    // 1.0 - 0.5 = 0.5 once, however often seen.
    CHECK(greedy({1.0f, 0.49f}, {0, 0, 0, 0}, p) == 0);
    CHECK(greedy({1.0f, 0.51f}, {0, 0, 0, 0}, p) == 1);
    p = plain();
    p.frequency_penalty = 0.5f;
    // 1.0 - 3*0.5 = -0.5
    CHECK(greedy({1.0f, -0.49f, -5.0f}, {0, 2, 0, 0}, p) == 1);
    CHECK(greedy({1.0f, -0.51f, -5.0f}, {0, 2, 0, 0}, p) == 0);
    // All three together (llama.cpp order: repetition, then frequency and presence):
    // 4.0 / 2 - 2*0.25 - 0.5 = 1.0
    p = plain();
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.25f;
    p.presence_penalty = 0.5f;
    CHECK(greedy({4.0f, 0.99f}, {0, 0}, p) == 0);
    CHECK(greedy({4.0f, 1.01f}, {0, 0}, p) == 1);
    // Negative presence penalty boosts seen tokens.
    p = plain();
    p.presence_penalty = -1.0f;
    CHECK(greedy({1.0f, 1.9f}, {0}, p) == 0);
}

TEST_CASE("sampler: penalty_last_n window") {
    SamplerParams p = plain();
    p.frequency_penalty = 1.0f;
    p.penalty_last_n = 2;
    // history: 0 0 1 1 -> window {1, 1}: token 1 gets -2, token 0 untouched.
    std::vector<float> l = {1.0f, 2.5f};
    CHECK(greedy(l, {0, 0, 1, 1}, p) == 0);   // 1.0 vs 0.5
    p.penalty_last_n = 3;                      // window {0, 1, 1}: 0.0 vs 0.5
    CHECK(greedy(l, {0, 0, 1, 1}, p) == 1);
    p.penalty_last_n = -1;                     // all: -1.0 vs 0.5
    CHECK(greedy({1.0f, 2.5f}, {0, 0, 1, 1}, p) == 1);
    CHECK(greedy({1.6f, 2.5f}, {0, 0, 1, 1}, p) == 1);  // -0.4 vs 0.5
    p.penalty_last_n = 0;                      // off
    CHECK(greedy({2.6f, 2.5f}, {0, 0, 0, 0}, p) == 0);
    // Longer window than history is fine.
    p.penalty_last_n = 1000;
    CHECK(greedy({2.6f, 2.5f}, {0}, p) == 1);
}

TEST_CASE("sampler: input checks") {
    Sampler s(plain());
    std::vector<float> l = {1.0f, 2.0f};
    std::vector<int32_t> bad = {5};
    SamplerParams p = plain();
    p.repetition_penalty = 1.1f;
    Sampler sp(p);
    CHECK_THROWS_WITH_AS(sp.sample(l.data(), 2, bad.data(), 1),
                         "sample: history token 5 out of range [0, 2)", orcd::Error);
    // Checked with the penalties off too.
    CHECK_THROWS_WITH_AS(s.sample(l.data(), 2, bad.data(), 1),
                         "sample: history token 5 out of range [0, 2)", orcd::Error);
    std::vector<float> dead = {-INFINITY, NAN};
    CHECK_THROWS_AS(s.sample(dead.data(), 2, nullptr, 0), orcd::Error);
    CHECK_THROWS_AS(s.sample(l.data(), 0, nullptr, 0), orcd::Error);
    // The logits are not modified.
    std::vector<float> copy = l;
    std::vector<int32_t> h = {1, 1};
    sp.sample(l.data(), 2, h.data(), 2);
    CHECK(l == copy);
}

TEST_CASE("sampler: top_k = 1 equals greedy") {
    for (uint32_t seed = 0; seed < 20; ++seed) {
        auto l = test_logits(5000, seed);
        SamplerParams p = SamplerParams{};
        p.top_k = 1;
        p.temperature = 1.5f;
        p.seed = seed;
        std::vector<int32_t> hist = {int32_t(seed), 7, 7, 4000};
        p.repetition_penalty = 1.3f;
        p.frequency_penalty = 0.2f;
        int32_t g = greedy(l, hist, p);
        for (int32_t t : draws(p, l, 5, hist)) CHECK(t == g);
    }
}

TEST_CASE("sampler: the same seed gives the same tokens") {
    auto l = test_logits(151936, 3, 10.0f);
    SamplerParams p = SamplerParams{};  // defaults: top_k 40, top_p .95, min_p .05
    p.temperature = 1.0f;
    p.seed = 1234;
    auto a = draws(p, l, 200);
    auto b = draws(p, l, 200);
    CHECK(a == b);
    p.seed = 1235;
    auto c = draws(p, l, 200);
    CHECK(a != c);
    // Not stuck on one token.
    CHECK(std::set<int32_t>(a.begin(), a.end()).size() > 5);
    // Seeds are independent of the order in which samplers are created.
    p.seed = 1234;
    Sampler s1(p), s2(p);
    for (int i = 0; i < 20; ++i) {
        int32_t x = s1.sample(l.data(), int(l.size()), nullptr, 0);
        int32_t y = s2.sample(l.data(), int(l.size()), nullptr, 0);
        CHECK(x == y);
    }
}

TEST_CASE("sampler: golden sequence (portable generator)") {
    // Eight equally likely tokens: each draw reads the top 3 bits of
    // next_uniform, so this pins the generator (splitmix64) and the walk.
    std::vector<float> flat(8, 0.0f);
    SamplerParams p = plain();
    p.seed = 42;
    auto got = draws(p, flat, 16);
    // Reference: splitmix64 seeded with state = splitmix64(42), u = (x >> 11) * 2^-53,
    // token = floor(8u).
    uint64_t s = 42;
    auto sm = [](uint64_t& st) {
        uint64_t z = (st += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    };
    uint64_t st = sm(s);
    std::vector<int32_t> want;
    for (int i = 0; i < 16; ++i) want.push_back(int32_t(sm(st) >> 61));
    CHECK(got == want);
    // splitmix64 reference values (Vigna's splitmix64.c, seed 1234567).
    uint64_t r = 1234567;
    CHECK(sm(r) == 6457827717110365317ull);
    CHECK(sm(r) == 3203168211198807973ull);
}

TEST_CASE("sampler: top_p, min_p and top_k keep the right sets") {
    // p = softmax([ln .5, ln .3, ln .15, ln .05]) = [.5, .3, .15, .05]
    std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
    auto hist_of = [&](SamplerParams p, int n) {
        std::vector<int> c(4, 0);
        for (int32_t t : draws(p, l, n)) c[size_t(t)]++;
        return c;
    };
    SamplerParams p = plain();
    p.top_p = 0.7f;  // .5 < .7 <= .8 -> {0, 1}
    auto c = hist_of(p, 4000);
    CHECK(c[2] == 0);
    CHECK(c[3] == 0);
    CHECK(std::abs(double(c[0]) / 4000.0 - 0.625) < 0.04);
    p.top_p = 0.85f;  // -> {0, 1, 2}
    c = hist_of(p, 4000);
    CHECK(c[2] > 0);
    CHECK(c[3] == 0);
    p = plain();
    p.min_p = 0.5f;  // keep p >= .25 -> {0, 1}
    c = hist_of(p, 4000);
    CHECK(c[1] > 0);
    CHECK(c[2] + c[3] == 0);
    p.min_p = 0.29f;  // keep p >= .145 -> {0, 1, 2}
    c = hist_of(p, 4000);
    CHECK(c[2] > 0);
    CHECK(c[3] == 0);
    p = plain();
    p.top_k = 2;
    c = hist_of(p, 4000);
    CHECK(c[2] + c[3] == 0);
    CHECK(std::abs(double(c[0]) / 4000.0 - 0.625) < 0.04);
    // top_p after top_k: renormalized over {0, 1} = [.625, .375]; top_p .6 -> {0}
    p.top_p = 0.6f;
    c = hist_of(p, 1000);
    CHECK(c[0] == 1000);
    // Temperature after the filters: high temperature flattens the kept set only.
    p = plain(100.0f);
    p.top_k = 2;
    c = hist_of(p, 4000);
    CHECK(c[2] + c[3] == 0);
    CHECK(std::abs(double(c[0]) / 4000.0 - 0.5) < 0.04);
    // Low temperature concentrates on the argmax.
    p = plain(0.05f);
    c = hist_of(p, 1000);
    CHECK(c[0] == 1000);
    // At least one token survives the tightest settings.
    p = plain();
    p.top_p = 1e-6f;
    p.min_p = 1.0f;
    c = hist_of(p, 100);
    CHECK(c[0] == 100);
}

TEST_CASE("sampler: nucleus on a full vocabulary matches a full sort") {
    const int n = 151936;
    auto l = test_logits(n, 11, 12.0f);
    for (float top_p : {0.5f, 0.9f, 0.99f}) {
        for (float min_p : {0.0f, 0.01f}) {
            // Reference nucleus by a full sort.
            std::vector<int32_t> ord(static_cast<size_t>(n));
            std::iota(ord.begin(), ord.end(), 0);
            std::sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) {
                return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
            });
            double lmax = l[size_t(ord[0])], z = 0.0;
            for (float v : l) z += std::exp(double(v) - lmax);
            std::set<int32_t> allowed;
            double cum = 0.0;
            for (int32_t t : ord) {
                double pr = std::exp(double(l[size_t(t)]) - lmax);
                if (min_p > 0 && pr < min_p) break;
                allowed.insert(t);
                cum += pr;
                if (cum >= top_p * z) break;
            }
            SamplerParams p = plain();
            p.top_p = top_p;
            p.min_p = min_p;
            p.seed = 99;
            auto d = draws(p, l, 300);
            std::set<int32_t> seen(d.begin(), d.end());
            for (int32_t t : seen) CHECK(allowed.count(t) == 1);
            if (allowed.size() > 20) CHECK(seen.size() > 10);
        }
    }
}

TEST_CASE("sampler: top_p cutoff among ties keeps the lowest ids") {
    // Equal logits: the order is by id, so top_p = k/n keeps ids [0, k).
    // n = 8 takes the sorting path, n = 4096 the histogram path (k/n exact in float).
    for (int n : {8, 4096}) {
        std::vector<float> flat(static_cast<size_t>(n), 1.0f);
        for (int k : {1, n / 4, n / 2 + 1}) {
            SamplerParams p = plain();
            p.top_p = float(k) / float(n);
            p.seed = uint64_t(k);
            auto d = draws(p, flat, 2000);
            int mx = *std::max_element(d.begin(), d.end());
            CHECK(mx < k);
            if (k > 1) CHECK(mx >= k * 9 / 10);  // the whole range is used
        }
    }
    // Ties straddling the cutoff, with higher-logit tokens before them.
    std::vector<float> l(3000, 0.0f);
    l[2999] = 50.0f;                  // carries ~all the mass: kept alone
    SamplerParams p = plain();
    p.top_p = 0.5f;
    for (int32_t t : draws(p, l, 200)) CHECK(t == 2999);
}

TEST_CASE("sampler: speed on n_vocab = 151936") {
    const int n = 151936;
    auto l = test_logits(n, 5, 15.0f);
    std::vector<int32_t> hist(200);
    for (int i = 0; i < 200; ++i) hist[size_t(i)] = (i * 7919) % n;
    struct Case { const char* name; SamplerParams p; };
    SamplerParams def = SamplerParams{};
    def.repetition_penalty = 1.1f;
    SamplerParams nucleus = plain();
    nucleus.top_p = 0.9f;
    SamplerParams full = plain();
    for (const Case& c : {Case{"defaults", def}, Case{"top_p only", nucleus}, Case{"no filter", full}}) {
        Sampler s(c.p);
        auto t0 = std::chrono::steady_clock::now();
        const int iters = 50;
        for (int i = 0; i < iters; ++i) s.sample(l.data(), n, hist.data(), int(hist.size()));
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
        MESSAGE(std::string(c.name) << ": " << ms << " ms/token");
        CHECK(ms < 50.0);  // generous: shared CI machines
    }
}
