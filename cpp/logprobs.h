// logprobs.h - log-probabilities of tokens for the OpenAI `logprobs` / `top_logprobs`
// options: the chosen token's and the n_top most likely ones, for one row of logits.
//
// Which distribution: the model's raw one, log_softmax of the logits as the engine
// produced them, before penalties, temperature, top_k / top_p / min_p and any token
// mask (vLLM's default). Sanitised as the sampler does: NaN counts as -inf, +inf as the
// largest float. Order of the top list: logprob descending, token id ascending on ties
// (the sampler's strict total order). exp in float, sums in double.
//
// Bounds: 0 <= n_top <= kMaxTopLogprobs (OpenAI's chat limit; completions allow 5,
// vLLM 20); n_top > n_vocab yields n_vocab entries. The CUDA twin is
// cuda/logprob_kernels.cuh (tests/test_cuda_logprobs.py compares the two).
#pragma once
#include <cstdint>
#include <vector>

namespace orcd {

constexpr int kMaxTopLogprobs = 20;

struct TokenLogprob {
    int32_t token = -1;
    float logprob = 0.0f;
};

// One position: the chosen token's log-probability and the top list, best first.
struct Logprobs {
    float logprob = 0.0f;
    std::vector<TokenLogprob> top;
};

// Throws orcd::Error when n_top is out of [0, kMaxTopLogprobs], chosen is out of
// [0, n_vocab), n_vocab < 1, or every logit is -inf / NaN.
void compute_logprobs(const float* logits, int n_vocab, int32_t chosen, int n_top, Logprobs& out);

}  // namespace orcd
