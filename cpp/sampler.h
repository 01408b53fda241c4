// sampler.h - turning logits into the next token: one implementation shared
// by every backend, so the same seed gives the same tokens on CPU and GPU.
//
// Order of operations (llama.cpp's default chain): penalties on the tokens
// seen so far -> greedy if temperature == 0 -> top_k -> top_p -> min_p ->
// temperature -> softmax -> draw with the seeded generator.
#pragma once
#include <cstdint>
#include <vector>

namespace orcd {

struct SamplerParams {
    float temperature = 0.8f;         // 0: greedy (argmax, lowest index on ties)
    int top_k = 40;                   // <= 0: off
    float top_p = 0.95f;              // (0, 1]; 1: off
    float min_p = 0.05f;              // [0, 1]; 0: off. Drop tokens with p < min_p * p_max
    float repetition_penalty = 1.0f;  // > 0; 1: off. CTRL-style divide/multiply of seen tokens' logits
    float presence_penalty = 0.0f;    // [-2, 2]; subtracted once from each seen token's logit
    float frequency_penalty = 0.0f;   // [-2, 2]; subtracted per occurrence
    int penalty_last_n = 64;          // how many recent tokens the penalties look at; -1: all
    uint64_t seed = 0;                // generator seed
};

// Throws orcd::Error naming the first invalid parameter and its value.
void validate(const SamplerParams& p);

// Whether the GPU sampler (cuda/sample.cuh) runs these parameters over a history of
// n_history tokens: greedy; top_k in [1, kDeviceTopKMax]; or top_k off with top_p == 1;
// and a penalty window of at most kDevicePenaltyWindowMax tokens. Otherwise sample on the CPU.
constexpr int kDeviceTopKMax = 1024;
constexpr int kDevicePenaltyWindowMax = 4096;
bool device_sampling_supports(const SamplerParams& p, int n_vocab, int n_history);

// Structured output: the words of a token mask over n_vocab tokens, and its application.
// Bit t % 32 of mask[t / 32] set: token t may be sampled. apply_token_mask sets the logits of
// every other token to -inf, which the Sampler never picks.
inline int token_mask_words(int n_vocab) { return (n_vocab + 31) / 32; }
void apply_token_mask(float* logits, int n_vocab, const uint32_t* mask);

class Sampler {
public:
    explicit Sampler(const SamplerParams& p);  // validates
    // Picks the next token from logits[n_vocab] (not modified) given the
    // tokens so far (prompt and generated), for the penalties.
    int32_t sample(const float* logits, int n_vocab, const int32_t* history, int n_history);
    const SamplerParams& params() const { return p_; }
    // The generator's state: the GPU sampler (cuda/sample.cuh) continues the same stream.
    uint64_t rng_state() const { return state_; }
    void set_rng_state(uint64_t s) { state_ = s; }

private:
    SamplerParams p_;
    uint64_t state_;             // splitmix64/xoshiro state: portable, seeded
    std::vector<float> work_;    // scratch logits
    std::vector<int32_t> idx_;   // scratch candidate ids
    double next_uniform();       // [0, 1)
};

}  // namespace orcd
