// logprob_kernels.cu - see logprob_kernels.cuh. Per row (one block): each thread scans a
// strided share of the vocabulary keeping its maximum and its own sorted top list; a
// block reduction gives the maximum; a second pass sums exp(l - max) in double; the top
// lists are merged by n_top rounds of a block arg-max over the threads' list heads.
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>

#include "cuda_common.cuh"
#include "logprob_kernels.cuh"
#include "logprob_kernels.h"

namespace orcd {
namespace cu {
namespace {

constexpr int kLpThreads = 256;

__device__ __forceinline__ float sanitized(float v) {
    if (isnan(v)) return -INFINITY;
    return v > FLT_MAX ? FLT_MAX : v;
}

// (v, id) ordered by value descending, then id ascending; valid entries before invalid ones.
__device__ __forceinline__ bool better(bool va, float a, int ia, bool vb, float b, int ib) {
    if (va != vb) return va;
    return a > b || (a == b && ia < ib);
}

__global__ void __launch_bounds__(kLpThreads)
logprob_rows_kernel(const float* rows, int V, const LogprobJob* jobs, const int32_t* chosen, LogprobOut* out) {
    __shared__ float s_v[kLpThreads];
    __shared__ int s_i[kLpThreads];
    __shared__ int s_ok[kLpThreads];
    __shared__ double s_sum[kLpThreads];
    const int t = threadIdx.x;
    const float* l = rows + size_t(blockIdx.x) * size_t(V);
    const LogprobJob job = jobs[blockIdx.x];
    const int n_top = job.n_top < V ? job.n_top : V;

    float tv[kMaxTopLogprobs];
    int ti[kMaxTopLogprobs];
    int nt = 0;
    float m = -INFINITY;
    for (int i = t; i < V; i += kLpThreads) {
        const float v = sanitized(l[i]);
        m = fmaxf(m, v);
        if (n_top == 0 || (nt == n_top && !(v > tv[n_top - 1]))) continue;  // ids ascend: ties keep the first
        int j = nt < n_top ? nt++ : n_top - 1;
        while (j > 0 && v > tv[j - 1]) {
            tv[j] = tv[j - 1];
            ti[j] = ti[j - 1];
            --j;
        }
        tv[j] = v;
        ti[j] = i;
    }
    s_v[t] = m;
    __syncthreads();
    for (int off = kLpThreads / 2; off > 0; off >>= 1) {
        if (t < off) s_v[t] = fmaxf(s_v[t], s_v[t + off]);
        __syncthreads();
    }
    m = s_v[0];
    __syncthreads();
    if (!(m > -INFINITY)) {
        if (t == 0) out[blockIdx.x].n_top = -1;
        return;
    }
    double sum = 0.0;
    for (int i = t; i < V; i += kLpThreads) sum += exp(double(sanitized(l[i])) - double(m));
    s_sum[t] = sum;
    __syncthreads();
    for (int off = kLpThreads / 2; off > 0; off >>= 1) {
        if (t < off) s_sum[t] += s_sum[t + off];
        __syncthreads();
    }
    const double lse = double(m) + log(s_sum[0]);

    LogprobOut* o = out + blockIdx.x;
    int h = 0;  // this thread's next list entry
    for (int r = 0; r < n_top; ++r) {
        s_ok[t] = h < nt;
        s_v[t] = h < nt ? tv[h] : 0.0f;
        s_i[t] = h < nt ? ti[h] : 0x7fffffff;
        __syncthreads();
        for (int off = kLpThreads / 2; off > 0; off >>= 1) {
            if (t < off && better(s_ok[t + off], s_v[t + off], s_i[t + off], s_ok[t], s_v[t], s_i[t])) {
                s_ok[t] = s_ok[t + off];
                s_v[t] = s_v[t + off];
                s_i[t] = s_i[t + off];
            }
            __syncthreads();
        }
        const int win = s_i[0];
        if (t == 0) {
            o->ids[r] = win;
            o->lps[r] = float(double(s_v[0]) - lse);
        }
        if (h < nt && ti[h] == win) ++h;  // ids are unique: exactly one thread owns the winner
        __syncthreads();
    }
    if (t == 0) {
        o->n_top = n_top;
        o->logprob = float(double(sanitized(l[chosen[job.src]])) - lse);
    }
}

}  // namespace

void launch_logprob_rows(const float* rows, int n_jobs, int n_vocab, const LogprobJob* jobs, const int32_t* chosen,
                         LogprobOut* out, cudaStream_t stream) {
    if (n_jobs <= 0) return;
    logprob_rows_kernel<<<n_jobs, kLpThreads, 0, stream>>>(rows, n_vocab, jobs, chosen, out);
    CUDA_LAUNCH_CHECK("logprob_rows");
}

namespace {

void to_logprobs(const LogprobOut& o, int row, Logprobs& lp) {
    if (o.n_top < 0) throw Error("logprobs: every logit of row " + std::to_string(row) + " is -inf or NaN");
    lp.logprob = o.logprob;
    lp.top.resize(size_t(o.n_top));
    for (int j = 0; j < o.n_top; ++j) lp.top[size_t(j)] = {o.ids[j], o.lps[j]};
}

}  // namespace

// ---------------------------------------------------------------- LogprobRows

LogprobRows::~LogprobRows() { release(); }

void LogprobRows::release() noexcept {
    if (dev_ >= 0) cudaSetDevice(dev_);
    if (saved_) cudaFree(saved_);
    if (d_jobs_) cudaFree(d_jobs_);
    if (d_out_) cudaFree(d_out_);
    if (h_jobs_) cudaFreeHost(h_jobs_);
    if (h_out_) cudaFreeHost(h_out_);
    saved_ = nullptr;
    d_jobs_ = nullptr;
    d_out_ = nullptr;
    h_jobs_ = nullptr;
    h_out_ = nullptr;
    cap_ = 0;
    row_elems_ = 0;
}

void LogprobRows::reserve(int n_jobs, int n_vocab) {
    if (n_jobs <= cap_ && size_t(n_vocab) == row_elems_) return;
    release();
    CUDA_CHECK(cudaGetDevice(&dev_), "logprobs buffers");
    const size_t n = size_t(n_jobs);
    CUDA_CHECK(cudaMalloc(&saved_, n * size_t(n_vocab) * sizeof(float)), "logprobs saved rows");
    CUDA_CHECK(cudaMalloc(&d_jobs_, n * sizeof(LogprobJob)), "logprobs jobs");
    CUDA_CHECK(cudaMalloc(&d_out_, n * sizeof(LogprobOut)), "logprobs results");
    CUDA_CHECK(cudaMallocHost(&h_jobs_, n * sizeof(LogprobJob)), "logprobs jobs (pinned)");
    CUDA_CHECK(cudaMallocHost(&h_out_, n * sizeof(LogprobOut)), "logprobs results (pinned)");
    cap_ = n_jobs;
    row_elems_ = size_t(n_vocab);
}

bool LogprobRows::save(const float* logits, int n, int n_vocab, const DeviceSampleRow* rows, cudaStream_t stream) {
    n_jobs_ = 0;
    int asking = 0;
    for (int i = 0; i < n; ++i) asking += rows[i].n_logprobs >= 0;
    if (asking == 0) return false;
    for (int i = 0; i < n; ++i)
        if (rows[i].n_logprobs > kMaxTopLogprobs || (rows[i].n_logprobs >= 0 && !rows[i].logprobs))
            throw Error("logprobs: row " + std::to_string(i) + " asks for " + std::to_string(rows[i].n_logprobs) +
                        " top logprobs (at most " + std::to_string(kMaxTopLogprobs) + ", with an output)");
    reserve(asking, n_vocab);  // the previous finish() synchronised: the pinned jobs are free
    for (int i = 0; i < n; ++i) {
        if (rows[i].n_logprobs < 0) continue;
        h_jobs_[n_jobs_] = {int32_t(i), int32_t(rows[i].n_logprobs)};
        CUDA_CHECK(cudaMemcpyAsync(saved_ + size_t(n_jobs_) * size_t(n_vocab), logits + size_t(i) * size_t(n_vocab),
                                   size_t(n_vocab) * sizeof(float), cudaMemcpyDeviceToDevice, stream),
                   "logprobs row copy");
        ++n_jobs_;
    }
    CUDA_CHECK(cudaMemcpyAsync(d_jobs_, h_jobs_, size_t(n_jobs_) * sizeof(LogprobJob), cudaMemcpyHostToDevice, stream),
               "logprobs jobs upload");
    return true;
}

void LogprobRows::finish(const int32_t* chosen, int n_vocab, DeviceSampleRow* rows, cudaStream_t stream) {
    if (n_jobs_ == 0) return;
    launch_logprob_rows(saved_, n_jobs_, n_vocab, d_jobs_, chosen, d_out_, stream);
    CUDA_CHECK(cudaMemcpyAsync(h_out_, d_out_, size_t(n_jobs_) * sizeof(LogprobOut), cudaMemcpyDeviceToHost, stream),
               "logprobs results copy");
    CUDA_CHECK(cudaStreamSynchronize(stream), "logprobs");
    const int n = n_jobs_;
    n_jobs_ = 0;
    for (int k = 0; k < n; ++k) to_logprobs(h_out_[k], h_jobs_[k].src, *rows[h_jobs_[k].src].logprobs);
}

}  // namespace cu

// ---------------------------------------------------------------- test entry

namespace cuda_test {

std::vector<Logprobs> logprob_rows(const float* logits, int n_rows, int n_vocab, const int32_t* chosen, int n_top) {
    if (n_rows < 1 || n_vocab < 1) throw Error("logprob_rows: need n_rows >= 1 and n_vocab >= 1");
    if (n_top < 0 || n_top > kMaxTopLogprobs)
        throw Error("logprob_rows: n_top must be in [0, " + std::to_string(kMaxTopLogprobs) + "] (got " +
                    std::to_string(n_top) + ")");
    for (int r = 0; r < n_rows; ++r)
        if (chosen[r] < 0 || chosen[r] >= n_vocab)
            throw Error("logprob_rows: token id " + std::to_string(chosen[r]) + " out of range");
    std::vector<DeviceSampleRow> rows(static_cast<size_t>(n_rows));
    std::vector<Logprobs> out(static_cast<size_t>(n_rows));
    for (int r = 0; r < n_rows; ++r) {
        rows[size_t(r)].n_logprobs = n_top;
        rows[size_t(r)].logprobs = &out[size_t(r)];
    }
    const size_t n = size_t(n_rows) * size_t(n_vocab);
    float* d_logits = nullptr;
    int32_t* d_chosen = nullptr;
    cu::LogprobRows lp;
    try {
        CUDA_CHECK(cudaMalloc(&d_logits, n * sizeof(float)), "logprob_rows logits");
        CUDA_CHECK(cudaMalloc(&d_chosen, size_t(n_rows) * 4), "logprob_rows chosen");
        CUDA_CHECK(cudaMemcpy(d_logits, logits, n * sizeof(float), cudaMemcpyHostToDevice), "logprob_rows logits");
        CUDA_CHECK(cudaMemcpy(d_chosen, chosen, size_t(n_rows) * 4, cudaMemcpyHostToDevice), "logprob_rows chosen");
        lp.save(d_logits, n_rows, n_vocab, rows.data(), nullptr);
        lp.finish(d_chosen, n_vocab, rows.data(), nullptr);
    } catch (...) {
        cudaFree(d_logits);
        cudaFree(d_chosen);
        throw;
    }
    cudaFree(d_logits);
    cudaFree(d_chosen);
    return out;
}

}  // namespace cuda_test
}  // namespace orcd
