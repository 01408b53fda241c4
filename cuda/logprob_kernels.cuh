// logprob_kernels.cuh - logprobs next to the logits (the CUDA twin of cpp/logprobs.h):
// per row the log-sum-exp of the raw logits, the chosen token's logprob and the top
// n_top (token, logprob) pairs, one 256-thread block per row. Same sanitising (NaN as
// -inf, +inf as FLT_MAX) and order (logprob descending, id ascending) as the CPU; the
// sum of exp is added in another order (differences ~1e-7 relative).
//
// LogprobRows is what CudaEngineImpl::decode_batch_sample uses: the sampler overwrites
// its logits (penalties), so the rows asking for logprobs are first copied aside
// (save), and after the draw one kernel computes their logprobs from the copies with
// the sampled ids still on the device (finish). Nothing is launched or allocated while
// no row asks. Buffers grow on first use to the batch's asking rows.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "engine.h"
#include "logprobs.h"

namespace orcd {
namespace cu {

// One row to compute: the batch row whose sampled id it reports and its top count.
struct LogprobJob {
    int32_t src;
    int32_t n_top;
};

// One row's result. n_top: -1 when every logit was -inf / NaN.
struct LogprobOut {
    float logprob;
    int32_t n_top;
    int32_t ids[kMaxTopLogprobs];
    float lps[kMaxTopLogprobs];
};

// rows: [n_jobs, n_vocab] device logits (job k's row is row k); chosen: device ids indexed
// by jobs[k].src; out: n_jobs results on the device.
void launch_logprob_rows(const float* rows, int n_jobs, int n_vocab, const LogprobJob* jobs, const int32_t* chosen,
                         LogprobOut* out, cudaStream_t stream);

class LogprobRows {
public:
    LogprobRows() = default;
    ~LogprobRows();
    LogprobRows(const LogprobRows&) = delete;
    LogprobRows& operator=(const LogprobRows&) = delete;

    // Before sampling: copies logits row i (of n, n_vocab each, on the device) aside for
    // every rows[i] with n_logprobs >= 0. Returns false, doing nothing, when none asks.
    bool save(const float* logits, int n, int n_vocab, const DeviceSampleRow* rows, cudaStream_t stream);
    // After the draw (chosen: the n sampled ids on the device): computes the saved rows'
    // logprobs into rows[i].logprobs. Synchronises the stream.
    void finish(const int32_t* chosen, int n_vocab, DeviceSampleRow* rows, cudaStream_t stream);

private:
    void reserve(int n_jobs, int n_vocab);
    void release() noexcept;
    int dev_ = -1;
    int cap_ = 0;            // rows the buffers hold
    size_t row_elems_ = 0;   // n_vocab they were sized for
    int n_jobs_ = 0;         // saved by the last save()
    float* saved_ = nullptr;         // device [cap_, n_vocab]
    LogprobJob* d_jobs_ = nullptr;   // device [cap_]
    LogprobJob* h_jobs_ = nullptr;   // pinned [cap_]
    LogprobOut* d_out_ = nullptr;    // device [cap_]
    LogprobOut* h_out_ = nullptr;    // pinned [cap_]
};

}  // namespace cu
}  // namespace orcd
