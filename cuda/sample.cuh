// sample.cuh - sampling on the GPU: per row of logits the chain of
// cpp/sampler.h (its CPU twin, Sampler::sample) step for step, so only token ids
// leave the device.
//
// Same as the CPU: penalties over the row's history window, greedy (first maximum),
// top_k, top_p over the top_k set at temperature 1, min_p as a logit threshold,
// temperature, the draw in ascending token-id order with the same splitmix64 stream
// (the row's generator state goes in and comes out advanced, so a request can move
// between the CPU and GPU samplers without changing its draws).
// Differences, all rounding: sums of probabilities are added in another order (a
// block reduction instead of a loop), so where a cumulative sum lands within ~1e-15
// of a top_p target or of the drawn u the two may pick neighbours. Greedy is exact.
//
// Supported on the GPU (device_sampling_supports in cpp/sampler.h): greedy; top_k in
// [1, 1024]; top_k off with top_p == 1 (the whole vocabulary, min_p optional); penalty
// windows up to 4096 tokens. Anything else samples on the CPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "sampler.h"

namespace orcd {
namespace cu {

// One row's inputs. history: the row's last n_history tokens (prompt + generated) in
// device memory; the kernel reads the penalty window from its end.
struct SampleRow {
    SamplerParams p;
    uint64_t rng_state;        // Sampler::rng_state() before this draw
    const int32_t* history;    // device pointer
    int n_history;
};

// logits: [n_rows, n_vocab] fp32 on the device, overwritten (penalised, sanitised).
// rows: n_rows SampleRow on the device. out_token[r]: the token (-1 if every logit is
// -inf/NaN); out_state[r]: the generator state after the draw.
//
// Rows that are greedy or have top_k in [1, kDeviceTopKMax] (below n_vocab) take the split
// path when `split`: one block per slice of kSampleSlice logits sanitises and penalises its
// slice and keeps its first maximum and its own top_k (ties: lowest ids), then one block per
// row merges those and runs the same chain on them. The global top_k set is contained in the
// union of the slices' top_k sets (ordered by (logit desc, id asc)), the merge lays it out in
// the order the one-block kernel does and runs the same code on it, so the tokens and
// generator states are the one-block kernel's bit for bit. Other rows (top_k off) take the
// one-block kernel.
// Rows with top_k <= 64 take warp-level code on both kernels: ordered by the 64-bit composite
// key_of(logit) << 32 | ~id (distinct per id, larger = higher logit, then lower id: the tie rule
// above, ties at the k-th logit going to the lowest ids), each slice keeps its 64 largest sorted
// (bitonic networks in registers), the merge folds the slices' lists and one warp runs the chain
// with the one-block kernel's additions in the same order (its Hillis-Steele scan restricted to
// the 64 positions that can be non-zero), so the same doubles come out. The one difference: where
// rounding makes a prefix sum smaller than the one before it and several positions meet a top_p
// cut or the drawn u, the one-block kernel lets them race and this takes the lowest.
// host_rows: the same rows on the host (picks the launches; null: every kernel is launched
// and each row's kernel is chosen on the device). workspace: sample_workspace_bytes(n_rows,
// n_vocab) bytes of device memory.
constexpr int kSampleSlice = 1024;
size_t sample_workspace_bytes(int n_rows, int n_vocab);
// split_full (with split): rows with top_k off (the whole vocabulary) take the split path too:
// the slice kernel, then the chunk sums of the one-block kernel over many blocks and its scan and
// walk in one block per row (the same token and state bit for bit; ~150k exponentials of a
// 151,936-logit row spread over the GPU).
void launch_sample_rows(float* logits, int n_rows, int n_vocab, const SampleRow* rows, int32_t* out_token,
                        uint64_t* out_state, cudaStream_t stream, void* workspace, const SampleRow* host_rows,
                        bool split, bool split_full = false);
// Structured output: for each i < n_masked, row rows_of[i] of logits (n_vocab each) gets the
// mask masks[i] (token_mask_words(n_vocab) words, cpp/sampler.h's layout): a logit whose bit is
// clear becomes -inf, as apply_token_mask (its CPU twin) does. Launched only for steps with a
// masked row, before launch_sample_rows; rows_of and masks in device memory.
void launch_apply_token_masks(float* logits, int n_vocab, int n_masked, const int32_t* rows_of,
                              const uint32_t* masks, cudaStream_t stream);
// Which kernels launch_sample_rows takes for a row with these parameters: 0 the one-block
// kernel, 1 the split path (top_k / greedy), 2 the whole-vocabulary split path.
int sample_rows_path(const SamplerParams& p, int n_vocab, bool split, bool split_full);

}  // namespace cu
}  // namespace orcd
