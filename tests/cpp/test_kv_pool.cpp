// test_kv_pool.cpp - KvPool (cpp/kv_pool.h) against a position-by-position model of the pool:
// random reserve / release sequences never give two slots one position, keep a slot's size
// at least what it asked for in whole units, report the free space and longest free range the
// model sees, and refuse a reservation only when the model has no free run that long.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "error.h"
#include "kv_pool.h"

using namespace orcd;

namespace {

// owner[p]: the slot holding pool position p, -1 when free.
std::vector<int> owners(const KvPool& pool, int n_slots, int64_t capacity) {
    std::vector<int> owner(size_t(capacity), -1);
    for (int s = 0; s < n_slots; ++s) {
        if (pool.offset(s) < 0) {
            REQUIRE(pool.size(s) == 0);
            continue;
        }
        REQUIRE(pool.offset(s) + pool.size(s) <= capacity);
        for (int64_t p = pool.offset(s); p < pool.offset(s) + pool.size(s); ++p) {
            REQUIRE(owner[size_t(p)] == -1);  // two slots never share a position
            owner[size_t(p)] = s;
        }
    }
    return owner;
}

int64_t longest_free(const std::vector<int>& owner) {
    int64_t best = 0, run = 0;
    for (int o : owner) {
        run = o < 0 ? run + 1 : 0;
        best = std::max(best, run);
    }
    return best;
}

}  // namespace

TEST_CASE("kv pool: random reserve and release against a model of every position") {
    const int n_slots = 7, unit = 4;
    const int64_t capacity = 30 * unit;
    std::mt19937 rng(12345);
    KvPool pool(n_slots, capacity, unit);
    std::vector<int64_t> asked(n_slots, 0);
    for (int it = 0; it < 20000; ++it) {
        const int s = int(rng() % n_slots);
        const std::vector<int> before = owners(pool, n_slots, capacity);
        if (rng() % 4 == 0) {
            pool.release(s);
            asked[size_t(s)] = 0;
        } else {
            const int64_t n = 1 + int64_t(rng() % (12 * unit));
            const int64_t old_off = pool.offset(s), old_len = pool.size(s);
            KvPool::Move mv;
            const bool ok = pool.reserve(s, n, &mv);
            if (ok) {
                CHECK(pool.size(s) >= n);
                CHECK(pool.size(s) % unit == 0);
                if (old_len >= n) CHECK((pool.offset(s) == old_off && pool.size(s) == old_len));
                if (mv.n > 0) {  // moved: the old range's contents go to the new one
                    CHECK(mv.from == old_off);
                    CHECK(mv.n == old_len);
                    CHECK(mv.to == pool.offset(s));
                } else if (old_off >= 0) {
                    CHECK(pool.offset(s) == old_off);  // grown in place
                }
                asked[size_t(s)] = std::max(asked[size_t(s)], n);
            } else {
                // refused: unchanged, and no free run (counting the slot's own range if it
                // can grow in place) is long enough
                CHECK(pool.offset(s) == old_off);
                CHECK(pool.size(s) == old_len);
                const int64_t want = (n + unit - 1) / unit * unit;
                CHECK(longest_free(before) < want);
            }
        }
        const std::vector<int> after = owners(pool, n_slots, capacity);
        const KvPoolStats st = pool.stats();
        const int64_t free_now = std::count(after.begin(), after.end(), -1);
        CHECK(st.capacity == capacity);
        CHECK(st.reserved == capacity - free_now);
        CHECK(st.largest_free == longest_free(after));
    }
    for (int s = 0; s < n_slots; ++s) pool.release(s);
    CHECK(pool.stats().largest_free == capacity);  // every freed neighbour merged
}

TEST_CASE("kv pool: sizes and errors") {
    CHECK_THROWS_AS(KvPool(0, 64, 64), Error);
    CHECK_THROWS_AS(KvPool(1, 63, 64), Error);
    KvPool pool(2, 100, 64);  // rounded down to whole units
    CHECK(pool.stats().capacity == 64);
    CHECK(pool.reserve(0, 64, nullptr));
    CHECK_FALSE(pool.reserve(1, 1, nullptr));
    CHECK_THROWS_AS(pool.reserve(2, 1, nullptr), Error);
    CHECK_FALSE(pool.reserve(0, 65, nullptr));  // beyond the capacity
    CHECK(kv_pool_positions("t", 3, 100, 0, 10) == 3 * 128);  // each slot's n_ctx in whole units
    CHECK(kv_pool_positions("t", 3, 100, 200 * 10, 10) == 192);
    CHECK(kv_pool_positions("t", 3, 100, 1'000'000, 10) == 3 * 128);  // capped at every slot's n_ctx
    CHECK_THROWS_WITH_AS(kv_pool_positions("t", 3, 100, 127 * 10, 10),
                         doctest::Contains("one sequence of n_ctx = 100 needs 1280 bytes"), Error);
}
