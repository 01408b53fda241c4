// threadpool.cpp - the persistent worker pool behind parallel_for.
//
// Scheme. n_threads-1 workers live as long as the pool. parallel_for splits
// [0, n) into nc = min(n_threads, ceil(n/grain)) contiguous chunks; chunk t
// is passed to fn with thread_index = t, and the calling thread always runs
// chunk 0. The other chunks are *claimed*: each one is run by whichever
// thread claims it first, a worker or, once it has finished chunk 0, the
// caller itself. So a worker that is slow to wake up (on a loaded machine the
// OS may not run it for milliseconds) never holds the caller up: the caller
// runs the unclaimed chunks and returns as soon as every claimed chunk has
// finished. Each chunk index runs on exactly one thread, so fn may use
// thread_index to pick per-thread scratch.
//
// State (the plain integer members of threadpool.h, accessed with __atomic
// builtins):
//   generation_ = job number << 32 | chunk count << 16 | next unclaimed chunk
//   pending_    = chunks of the current job not finished yet
// A claim is a compare-and-swap on generation_ that checks the job number
// and bumps the next-chunk field, so a late worker can never claim a chunk of
// a job that has already finished. job_, job_n_ and job_grain_ are written
// before the job is published and stay valid until pending_ reaches 0, which
// cannot happen while a claimed chunk runs.
//
// Waiting (a worker for the next job, the caller for claimed chunks) spins
// for a short while first, because the CPU engine issues hundreds of small
// jobs per token back to back and a futex wake-up costs tens of microseconds;
// after the spin budget it sleeps on the condition variable (mu_,
// cv_start_/cv_done_), so an idle pool uses no CPU.
//
// Exceptions thrown by fn are caught on whichever thread runs the chunk and
// the first one is rethrown on the calling thread after all claimed chunks
// finished. A parallel_for issued from inside a chunk of the same pool runs
// inline on that thread (as fn(0, n, 0)) instead of deadlocking. One pool
// serves one calling thread at a time (concurrent callers need their own pools).
#include "threadpool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <map>
#include <string>

#include "error.h"

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

// Exceptions from chunks run by workers, keyed by pool (the header has no
// member for them).
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

// Chunk `t` of [0, n) split into `nc` chunks in multiples of `grain`.
inline void chunk_of(int64_t n, int64_t grain, int64_t nc, int64_t t, int64_t& b, int64_t& e) {
    const int64_t blocks = (n + grain - 1) / grain;
    const int64_t per = (blocks + nc - 1) / nc;  // grain-blocks per chunk
    b = std::min(n, t * per * grain);
    e = std::min(n, b + per * grain);
}

inline uint64_t job_of(uint64_t s) { return s >> 32; }
inline uint32_t count_of(uint64_t s) { return (uint32_t)(s >> 16) & 0xFFFF; }
inline uint32_t next_of(uint64_t s) { return (uint32_t)s & 0xFFFF; }

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

// The pool whose chunk this thread is running (nested calls run inline).
thread_local const ThreadPool* tl_in_pool = nullptr;

struct InPool {
    const ThreadPool* prev;
    explicit InPool(const ThreadPool* p) : prev(tl_in_pool) { tl_in_pool = p; }
    ~InPool() { tl_in_pool = prev; }
};

// Claims the next chunk of job `job` from the packed state; -1 if none.
inline int64_t claim(uint64_t* state, uint64_t job) {
    uint64_t s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
    for (;;) {
        if (job_of(s) != job || next_of(s) >= count_of(s)) return -1;
        if (__atomic_compare_exchange_n(state, &s, s + 1, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return next_of(s);
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

// The chunk count is a 16-bit field of generation_, hence the inner bound.
int max_pool_threads() { return std::max(4, 4 * std::min(available_cores(), 16383)); }

ThreadPool::ThreadPool(int n_threads) {
    n_threads_ = n_threads > 0 ? n_threads : available_cores();
    n_threads_ = std::max(1, std::min(n_threads_, max_pool_threads()));
    try {
        threads_.reserve(n_threads_ - 1);
        for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
    } catch (const std::exception& e) {
        // The destructor does not run for a half-built object: stop and join
        // the workers already started here, or their condition variable and
        // mutex would be destroyed under them.
        const size_t started = threads_.size();
        stop_and_join();
        throw Error("thread pool: could not start thread " + std::to_string(started + 1) + " of " +
                    std::to_string(n_threads_) + " (" + e.what() + "); ask for fewer threads or raise the " +
                    "process's memory / thread limits");
    }
}

void ThreadPool::stop_and_join() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        __atomic_store_n(&stop_, true, __ATOMIC_RELEASE);
    }
    cv_start_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
}

ThreadPool::~ThreadPool() {
    stop_and_join();
    take_exception(this);  // drop anything left over
}

void ThreadPool::worker(int) {
    uint64_t seen = 0;  // last job this worker looked at
    for (;;) {
        // Wait for a new job (or stop): spin first, then sleep.
        auto ready = [&] {
            return job_of(__atomic_load_n(&generation_, __ATOMIC_ACQUIRE)) != seen ||
                   __atomic_load_n(&stop_, __ATOMIC_ACQUIRE);
        };
        if (!spin_until(ready)) {
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, ready);
        }
        if (__atomic_load_n(&stop_, __ATOMIC_ACQUIRE)) return;
        const uint64_t job = job_of(__atomic_load_n(&generation_, __ATOMIC_ACQUIRE));
        seen = job;
        for (;;) {
            const int64_t c = claim(&generation_, job);
            if (c < 0) break;
            // The claim keeps the job alive: its fields are stable until our
            // chunk is counted as done.
            const auto* fn = job_;
            const int64_t n = job_n_, grain = job_grain_;
            const int64_t nc = count_of(__atomic_load_n(&generation_, __ATOMIC_ACQUIRE));
            int64_t b, e;
            chunk_of(n, grain, nc, c, b, e);
            if (b < e) {
                InPool guard(this);
                try {
                    (*fn)(b, e, (int)c);
                } catch (...) {
                    store_exception(this, std::current_exception());
                }
            }
            if (__atomic_sub_fetch(&pending_, 1, __ATOMIC_ACQ_REL) == 0) {
                // Lock so the caller cannot miss the wake-up between its
                // predicate check and its wait.
                { std::lock_guard<std::mutex> lk(mu_); }
                cv_done_.notify_one();
            }
        }
    }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int64_t blocks = (n + grain - 1) / grain;
    const int64_t nc = std::min<int64_t>(n_threads_, blocks);
    if (nc <= 1 || tl_in_pool == this) {
        fn(0, n, 0);
        return;
    }
    InPool guard(this);
    uint64_t job;
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &fn;
        job_n_ = n;
        job_grain_ = grain;
        __atomic_store_n(&pending_, (int)nc, __ATOMIC_RELAXED);
        job = (job_of(generation_) + 1) & 0xFFFFFFFFu;
        if (job == 0) job = 1;  // workers start with seen = 0
        // chunk 0 is the caller's: next unclaimed chunk is 1
        __atomic_store_n(&generation_, job << 32 | (uint64_t)nc << 16 | 1u, __ATOMIC_RELEASE);
    }
    cv_start_.notify_all();

    std::exception_ptr err;
    auto run = [&](int64_t c) {
        int64_t b, e;
        chunk_of(n, grain, nc, c, b, e);
        try {
            if (b < e) fn(b, e, (int)c);
        } catch (...) {
            if (!err) err = std::current_exception();
        }
        __atomic_sub_fetch(&pending_, 1, __ATOMIC_ACQ_REL);
    };
    run(0);
    // Chunks no worker has claimed yet are run here.
    for (int64_t c; (c = claim(&generation_, job)) >= 0;) run(c);

    auto done = [&] { return __atomic_load_n(&pending_, __ATOMIC_ACQUIRE) == 0; };
    if (!spin_until(done)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_done_.wait(lk, done);
    }
    job_ = nullptr;
    std::exception_ptr werr = take_exception(this);
    if (err) std::rethrow_exception(err);
    if (werr) std::rethrow_exception(werr);
}

}  // namespace orcd
