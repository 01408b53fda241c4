// engine.h - what every backend (CPU, CUDA) implements.
//
// An engine owns the weights (as the file stores them) and a KV cache of
// n_slots sequences x n_ctx positions. It knows nothing of tokenizers or
// sampling: it maps token ids to logits. The Python layer keeps, per slot,
// how many positions are valid and calls forward with pos0 = that count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "model.h"

namespace orcd {

// Hidden states for parity checks: hidden[0] is the embedding output,
// hidden[l+1] the residual stream after layer l; each is n_tokens x n_embd.
struct Trace {
    int n_tokens = 0;
    int n_embd = 0;
    std::vector<std::vector<float>> hidden;
};

class Engine {
public:
    virtual ~Engine() = default;
    virtual const ModelDesc& desc() const = 0;
    virtual int n_ctx() const = 0;    // positions per slot
    virtual int n_slots() const = 0;  // independent sequences in the cache

    // Runs tokens[0..n) of sequence `slot` at positions pos0 .. pos0+n-1,
    // attending to cache entries [0, pos0) plus themselves (causal), and
    // writes their K/V into the slot's cache. Writes n_vocab logits of the last
    // token to `logits`, or n*n_vocab (row per token) when all_logits.
    // When `trace` is non-null it receives the per-layer hidden states.
    // Throws orcd::Error if pos0 + n > n_ctx or slot/tokens are out of range.
    virtual void forward(int slot, const int32_t* tokens, int n, int pos0,
                         float* logits, bool all_logits, Trace* trace) = 0;

    // One decode step for `n` distinct slots: token[i] at position pos[i] of
    // slot slots[i]; logits is n x n_vocab. Equivalent to n forward() calls.
    virtual void decode_batch(int n, const int32_t* slots, const int32_t* tokens,
                              const int32_t* pos, float* logits) = 0;

    // Greedy decoding of one sequence: n_steps single-token steps of `slot`,
    // step i evaluating token t_i at position pos + i (t_0 = first_token) and
    // writing t_{i+1} = argmax of its logits (first maximum) to out_tokens[i].
    // Equivalent to forward + argmax per step; a backend may keep the argmax
    // on its device (the CUDA engine does) so only token ids reach the host.
    virtual void decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) {
        std::vector<float> logits(size_t(desc().n_vocab));
        int32_t t = first_token;
        for (int i = 0; i < n_steps; ++i) {
            forward(slot, &t, 1, pos + i, logits.data(), false, nullptr);
            t = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
            out_tokens[i] = t;
        }
    }
};

// The CPU engine (cpp/cpu_engine.cpp). `file` must outlive the engine.
std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<GGUFFile> file, int n_ctx,
                                        int n_slots, int n_threads);

}  // namespace orcd
