// threadpool.h - a fixed set of worker threads for the CPU kernels.
//
// parallel_for splits [0, n) into contiguous chunks, one per thread, and
// blocks until all are done. The calling thread takes chunk 0, so a pool of
// size 1 runs everything inline with no synchronisation.
//
// Size: n_threads <= 0 means available_cores(); any request is capped at
// max_pool_threads() = 4 x available_cores() (at least 4),
// because the workers spin-wait between jobs and thousands of them on a few
// cores turn a millisecond step into seconds. If the system refuses to create
// a thread, the constructor stops and joins the workers already started and
// throws orcd::Error saying how many started.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace orcd {

class ThreadPool {
public:
    // n_threads <= 0: the number of cores this process may run on; capped
    // at max_pool_threads().
    explicit ThreadPool(int n_threads = 0);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // fn(begin, end, thread_index) over disjoint chunks covering [0, n).
    // Chunks are rounded to multiples of `grain` (except the last).
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain = 1);

private:
    void worker(int index);
    void stop_and_join();

    int n_threads_ = 1;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_start_, cv_done_;
    const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;  // current job
    int64_t job_n_ = 0, job_grain_ = 1;
    uint64_t generation_ = 0;  // bumped per job so workers know there is new work
    int pending_ = 0;          // workers still running the current job
    bool stop_ = false;
};

// Cores this process may run on (sched_getaffinity), at least 1.
int available_cores();

// The largest pool ThreadPool creates: 4 x available_cores(), at least 4.
int max_pool_threads();

}  // namespace orcd
