// threadpool.cpp - the persistent worker pool behind parallel_for.
//
// Scheme: n_threads-1 workers live as long as the pool. A job is published
// under mu_ by storing the callable, n and grain and bumping generation_;
// every worker runs its own chunk (computed from n, grain and its index)
// and decrements pending_; the caller runs chunk 0 and then waits until
// pending_ is 0. Waiting (both a worker waiting for the next job and the
// caller waiting for the workers) first spins for a short while on an
// atomic load of the counter, because the CPU engine issues hundreds of
// small jobs per token back to back and a futex wake-up costs tens of
// microseconds; after the spin budget it sleeps on the condition variable,
// so an idle pool uses no CPU. All writes of the shared fields happen under
// mu_; the spinning reads use __atomic builtins on the same fields (the
// members are plain integers as declared in threadpool.h).
//
// Exceptions: an exception thrown by fn on the calling thread is rethrown
// after the workers have finished; one thrown on a worker is captured and
// rethrown on the calling thread too (the first one wins).
#include "threadpool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <map>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ORCD_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define ORCD_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define ORCD_CPU_RELAX() ((void)0)
#endif

namespace orcd {

namespace {

// How long a waiting thread spins before it sleeps on the condition variable.
constexpr std::chrono::microseconds kSpin{300};

// Worker exceptions, keyed by pool (the header has no member for them).
std::mutex g_exc_mu;
std::map<const ThreadPool*, std::exception_ptr>& exc_map() {
    static std::map<const ThreadPool*, std::exception_ptr> m;
    return m;
}
std::atomic<int> g_exc_count{0};

void store_exception(const ThreadPool* pool, std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(g_exc_mu);
    auto& slot = exc_map()[pool];
    if (!slot) {
        slot = e;
        g_exc_count.fetch_add(1);
    }
}

std::exception_ptr take_exception(const ThreadPool* pool) {
    if (g_exc_count.load() == 0) return nullptr;
    std::lock_guard<std::mutex> lk(g_exc_mu);
    auto it = exc_map().find(pool);
    if (it == exc_map().end()) return nullptr;
    std::exception_ptr e = it->second;
    exc_map().erase(it);
    g_exc_count.fetch_sub(1);
    return e;
}

// Chunk `t` of [0, n) when split over `nt` threads in multiples of `grain`.
inline void chunk_of(int64_t n, int64_t grain, int nt, int t, int64_t& b, int64_t& e) {
    const int64_t blocks = (n + grain - 1) / grain;
    const int64_t per = (blocks + nt - 1) / nt;  // blocks per thread
    b = std::min(n, (int64_t)t * per * grain);
    e = std::min(n, b + per * grain);
}

// Spins until pred() holds or the spin budget runs out; true if pred() held.
template <class Pred>
bool spin_until(Pred pred) {
    auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            if (pred()) return true;
            ORCD_CPU_RELAX();
        }
        if (std::chrono::steady_clock::now() - t0 > kSpin) return pred();
    }
}

}  // namespace

int available_cores() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc > 0 ? (int)hc : 1;
}

ThreadPool::ThreadPool(int n_threads) {
    n_threads_ = n_threads > 0 ? n_threads : available_cores();
    if (n_threads_ < 1) n_threads_ = 1;
    threads_.reserve(n_threads_ - 1);
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        __atomic_store_n(&stop_, true, __ATOMIC_RELEASE);
    }
    cv_start_.notify_all();
    for (auto& t : threads_) t.join();
    take_exception(this);  // drop anything left over
}

void ThreadPool::worker(int index) {
    uint64_t seen = 0;
    for (;;) {
        // Wait for a new generation (or stop): spin first, then sleep.
        spin_until([&] {
            return __atomic_load_n(&generation_, __ATOMIC_ACQUIRE) != seen ||
                   __atomic_load_n(&stop_, __ATOMIC_ACQUIRE);
        });
        const std::function<void(int64_t, int64_t, int)>* job;
        int64_t n, grain;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            job = job_;
            n = job_n_;
            grain = job_grain_;
        }
        int64_t b, e;
        chunk_of(n, grain, n_threads_, index, b, e);
        if (b < e) {
            try {
                (*job)(b, e, index);
            } catch (...) {
                store_exception(this, std::current_exception());
            }
        }
        bool last;
        {
            std::lock_guard<std::mutex> lk(mu_);
            last = __atomic_sub_fetch(&pending_, 1, __ATOMIC_ACQ_REL) == 0;
        }
        if (last) cv_done_.notify_one();
    }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n_threads_ == 1 || n <= grain) {
        fn(0, n, 0);
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &fn;
        job_n_ = n;
        job_grain_ = grain;
        __atomic_store_n(&pending_, n_threads_ - 1, __ATOMIC_RELEASE);
        __atomic_store_n(&generation_, generation_ + 1, __ATOMIC_RELEASE);
    }
    cv_start_.notify_all();

    std::exception_ptr err;
    int64_t b, e;
    chunk_of(n, grain, n_threads_, 0, b, e);
    try {
        if (b < e) fn(b, e, 0);
    } catch (...) {
        err = std::current_exception();
    }

    spin_until([&] { return __atomic_load_n(&pending_, __ATOMIC_ACQUIRE) == 0; });
    {
        std::unique_lock<std::mutex> lk(mu_);
        cv_done_.wait(lk, [&] { return pending_ == 0; });
        job_ = nullptr;
    }
    std::exception_ptr werr = take_exception(this);
    if (err) std::rethrow_exception(err);
    if (werr) std::rethrow_exception(werr);
}

}  // namespace orcd
