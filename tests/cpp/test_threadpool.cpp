// test_threadpool.cpp - ThreadPool::parallel_for: coverage, chunking, reuse, pool of 1.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "error.h"
#include "threadpool.h"

using orcd::ThreadPool;

namespace {

struct Chunk {
    int64_t b, e;
    int t;
};

std::vector<Chunk> run_chunks(ThreadPool& pool, int64_t n, int64_t grain, std::vector<int>& hits) {
    std::mutex mu;
    std::vector<Chunk> chunks;
    hits.assign((size_t)n, 0);
    std::vector<std::atomic<int>> h((size_t)n);
    for (auto& v : h) v = 0;
    pool.parallel_for(
        n,
        [&](int64_t b, int64_t e, int t) {
            for (int64_t i = b; i < e; ++i) h[(size_t)i]++;
            std::lock_guard<std::mutex> lk(mu);
            chunks.push_back({b, e, t});
        },
        grain);
    for (int64_t i = 0; i < n; ++i) hits[(size_t)i] = h[(size_t)i];
    return chunks;
}

}  // namespace

TEST_CASE("threadpool: every index of [0,n) is covered exactly once") {
    for (int nt : {1, 2, 3, 4, 7}) {
        ThreadPool pool(nt);
        CHECK(pool.size() == std::min(nt, orcd::max_pool_threads()));
        for (int64_t n : {1, 2, 3, 5, 7, 8, 64, 100, 1000, 4097}) {
            std::vector<int> hits;
            auto chunks = run_chunks(pool, n, 1, hits);
            for (int64_t i = 0; i < n; ++i) REQUIRE(hits[(size_t)i] == 1);
            // at most one chunk per thread, thread indices distinct and in range
            std::set<int> ids;
            for (auto& c : chunks) {
                CHECK(c.b < c.e);
                CHECK(c.t >= 0);
                CHECK(c.t < nt);
                ids.insert(c.t);
            }
            CHECK(ids.size() == chunks.size());
            CHECK((int64_t)chunks.size() <= std::min<int64_t>(nt, n));
        }
    }
}

TEST_CASE("threadpool: chunks are contiguous multiples of grain, the calling thread takes chunk 0") {
    ThreadPool pool(3);
    for (int64_t grain : {1, 2, 4, 16, 100}) {
        for (int64_t n : {1, 5, 16, 17, 33, 250, 1001}) {
            std::vector<int> hits;
            auto chunks = run_chunks(pool, n, grain, hits);
            for (int64_t i = 0; i < n; ++i) REQUIRE(hits[(size_t)i] == 1);
            for (auto& c : chunks) {
                CHECK(c.b % grain == 0);
                if (c.e != n) CHECK(c.e % grain == 0);
                if (c.b == 0) CHECK(c.t == 0);
            }
            // chunk of thread t starts after the chunk of thread t-1
            for (auto& c1 : chunks)
                for (auto& c2 : chunks)
                    if (c1.t < c2.t) CHECK(c1.e <= c2.b);
        }
    }
}

TEST_CASE("threadpool: work is actually spread over the workers") {
    ThreadPool pool(3);
    std::vector<int> hits;
    auto chunks = run_chunks(pool, 1000, 1, hits);
    CHECK(chunks.size() == 3);
    // While the caller is busy with chunk 0 the workers claim chunks 1 and 2
    // (a chunk no worker has claimed is run by the caller after its own).
    std::set<std::thread::id> tids;
    std::mutex mu;
    pool.parallel_for(3, [&](int64_t b, int64_t, int) {
        if (b == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
        std::lock_guard<std::mutex> lk(mu);
        tids.insert(std::this_thread::get_id());
    });
    CHECK(tids.size() >= 2);
}

TEST_CASE("threadpool: a chunk index never runs on two threads at once") {
    ThreadPool pool(4);
    std::vector<std::atomic<int>> busy(4);
    for (auto& b : busy) b = 0;
    std::atomic<int> clashes{0};
    for (int rep = 0; rep < 2000; ++rep) {
        pool.parallel_for(4 * 64, [&](int64_t, int64_t, int t) {
            if (busy[(size_t)t]++ != 0) clashes++;
            volatile int spin = 0;
            for (int i = 0; i < 200; ++i) spin = spin + i;
            busy[(size_t)t]--;
        }, 64);
    }
    CHECK(clashes == 0);
}

TEST_CASE("threadpool: reuse across many jobs") {
    ThreadPool pool(2);
    std::atomic<int64_t> total{0};
    const int jobs = 20000;
    for (int j = 0; j < jobs; ++j) {
        const int64_t n = 1 + j % 13;
        pool.parallel_for(n, [&](int64_t b, int64_t e, int) { total += e - b; });
    }
    int64_t expect = 0;
    for (int j = 0; j < jobs; ++j) expect += 1 + j % 13;
    CHECK(total == expect);
    // results of one job are visible to the caller when parallel_for returns
    std::vector<int64_t> v(10000, 0);
    for (int rep = 0; rep < 200; ++rep) {
        pool.parallel_for((int64_t)v.size(), [&](int64_t b, int64_t e, int) {
            for (int64_t i = b; i < e; ++i) v[(size_t)i] += i;
        });
    }
    for (size_t i = 0; i < v.size(); ++i) REQUIRE(v[i] == (int64_t)i * 200);
}

TEST_CASE("threadpool: jobs after a pause (workers asleep) still run") {
    ThreadPool pool(2);
    for (int rep = 0; rep < 3; ++rep) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        std::vector<int> hits;
        run_chunks(pool, 10, 1, hits);
        for (int h : hits) CHECK(h == 1);
    }
}

TEST_CASE("threadpool: pool of 1 runs inline on the caller") {
    ThreadPool pool(1);
    CHECK(pool.size() == 1);
    const auto me = std::this_thread::get_id();
    int calls = 0;
    pool.parallel_for(100, [&](int64_t b, int64_t e, int t) {
        ++calls;
        CHECK(b == 0);
        CHECK(e == 100);
        CHECK(t == 0);
        const bool same_thread = std::this_thread::get_id() == me;
        CHECK(same_thread);
    }, 7);
    CHECK(calls == 1);
}

TEST_CASE("threadpool: n <= 0 calls nothing; default size is the core count") {
    ThreadPool pool(2);
    int calls = 0;
    pool.parallel_for(0, [&](int64_t, int64_t, int) { ++calls; });
    pool.parallel_for(-5, [&](int64_t, int64_t, int) { ++calls; });
    CHECK(calls == 0);
    ThreadPool dflt;
    CHECK(dflt.size() == orcd::available_cores());
    CHECK(orcd::available_cores() >= 1);
}

TEST_CASE("threadpool: exceptions reach the caller and the pool stays usable") {
    ThreadPool pool(2);
    // thrown by the worker's chunk (index 1 of 2)
    CHECK_THROWS_AS(pool.parallel_for(2, [&](int64_t b, int64_t, int) {
                        if (b == 1) throw std::runtime_error("worker");
                    }),
                    std::runtime_error);
    // thrown by the caller's chunk
    CHECK_THROWS_AS(pool.parallel_for(2, [&](int64_t b, int64_t, int) {
                        if (b == 0) throw std::runtime_error("caller");
                    }),
                    std::runtime_error);
    std::vector<int> hits;
    run_chunks(pool, 50, 1, hits);
    for (int h : hits) CHECK(h == 1);
}

TEST_CASE("threadpool: a nested parallel_for on the same pool runs inline") {
    ThreadPool pool(2);
    std::atomic<int64_t> total{0};
    pool.parallel_for(4, [&](int64_t b, int64_t e, int) {
        for (int64_t i = b; i < e; ++i)
            pool.parallel_for(10, [&](int64_t b2, int64_t e2, int t2) {
                CHECK(t2 == 0);
                total += e2 - b2;
            });
    });
    CHECK(total == 40);
    std::vector<int> hits;
    run_chunks(pool, 9, 1, hits);
    for (int h : hits) CHECK(h == 1);
}

// ---------------------------------------------------------------- size bounds and failed starts

TEST_CASE("threadpool: requests are capped at 4 x available cores") {
    const int cap = orcd::max_pool_threads();
    CHECK(cap == std::max(4, 4 * orcd::available_cores()));
    ThreadPool big(100000);
    CHECK(big.size() == cap);
    std::vector<int> hits;
    run_chunks(big, 1000, 1, hits);
    for (int h : hits) REQUIRE(h == 1);
    ThreadPool at_cap(cap);
    CHECK(at_cap.size() == cap);
}

#if defined(__SANITIZE_ADDRESS__)
#define ORCD_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ORCD_TEST_ASAN 1
#endif
#endif

#ifndef ORCD_TEST_ASAN  // ASan reserves terabytes of address space: RLIMIT_AS cannot apply
namespace {
// Virtual memory of this process in bytes (/proc/self/statm, first field).
long vm_bytes() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    long pages = 0;
    if (f) {
        if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
        std::fclose(f);
    }
    return pages * sysconf(_SC_PAGESIZE);
}
}  // namespace

TEST_CASE("threadpool: a thread that cannot start is a clear error, not a hang or abort") {
    // In a child: cap the address space a little above what is mapped now and
    // keep building pools (each holding its workers' stacks) until a thread
    // cannot start. The pool that fails must join the workers it had
    // started and throw orcd::Error; the pools built before must still shut
    // down. The child exits 0 on that outcome; a hang is cut by alarm().
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        alarm(30);
        struct rlimit rl;
        rl.rlim_cur = rl.rlim_max = (rlim_t)(vm_bytes() + (24l << 20));
        if (setrlimit(RLIMIT_AS, &rl) != 0) _exit(10);
        std::vector<std::unique_ptr<ThreadPool>> pools;
        int code = 11;  // every pool started: the limit never bit
        try {
            for (int i = 0; i < 256; ++i) pools.push_back(std::make_unique<ThreadPool>(orcd::max_pool_threads()));
        } catch (const orcd::Error& e) {
            code = std::strstr(e.what(), "could not start thread") ? 0 : 12;
        } catch (...) {
            code = 13;
        }
        if (code == 0 && !pools.empty()) {  // the pools built before still work
            std::atomic<int64_t> sum{0};
            pools[0]->parallel_for(100, [&](int64_t b, int64_t e, int) { sum += e - b; });
            if (sum != 100) code = 14;
        }
        pools.clear();
        _exit(code);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    INFO("child status " << status << (WIFSIGNALED(status) ? " (signal " + std::to_string(WTERMSIG(status)) + ")" : ""));
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}
#endif
