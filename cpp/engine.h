// engine.h - what every backend (CPU, CUDA) implements.
//
// An engine owns the weights (as the file stores them) and the KV memory of
// n_slots sequences of up to n_ctx positions each: one pool (cpp/kv_pool.h) of
// kv_stats().capacity positions that the slots share, at least n_ctx and at most
// n_slots x n_ctx. It knows nothing of tokenizers or sampling: it maps token ids
// to logits. The caller keeps, per slot, how many positions are valid and calls
// forward with pos0 = that count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "error.h"
#include "kv_pool.h"
#include "logprobs.h"
#include "model.h"
#include "sampler.h"

namespace orcd {

// Hidden states for parity checks: hidden[0] is the embedding output,
// hidden[l+1] the residual stream after layer l; each is n_tokens x n_embd.
struct Trace {
    int n_tokens = 0;
    int n_embd = 0;
    std::vector<std::vector<float>> hidden;
};

class Engine;

// One row of sampling where the logits are (decode_batch_sample): what Sampler::sample
// takes, with the sampler's generator state passed in and handed back advanced.
struct DeviceSampleRow {
    SamplerParams params;
    uint64_t rng_state = 0;           // in: Sampler::rng_state() before the draw; out: after it
    const int32_t* history = nullptr;  // the sequence so far (prompt + generated), host memory
    int n_history = 0;
    // -1: none; 0..kMaxTopLogprobs: *logprobs receives the sampled token's log-probability and
    // this many top ones (cpp/logprobs.h: the raw distribution, before the sampling chain)
    int n_logprobs = -1;
    Logprobs* logprobs = nullptr;
    // Structured output: null, or token_mask_words(n_vocab) words in host memory (sampler.h's
    // layout: bit t % 32 of mask[t / 32] set = token t may be drawn). The mask goes on the logits
    // after the logprobs are taken (they stay of the raw distribution) and before the chain, as
    // apply_token_mask does on the host.
    const uint32_t* mask = nullptr;
};

// ---- argument checks, shared by every backend and the bindings, so a bad call
// gets the same orcd::Error whichever engine serves it. `who` names the call
// ("forward", "decode_batch", "decode_greedy", ...) and starts the message:
//   forward: slot 3 out of range [0, 2)
//   forward: token id 151936 out of range [0, 151936)
//   forward: no tokens
//   forward: context full: positions 30..34 do not fit in n_ctx = 32
//   decode_batch: context full: position 32 of slot 1 does not fit in n_ctx = 32
//   decode_batch: slot 1 appears twice
//   decode_greedy: n_steps must be >= 0 (got -1)
inline void check_slot(const char* who, const Engine& e, int slot);
inline void check_tokens(const char* who, const Engine& e, const int32_t* tokens, int n);
// forward_rows: slots in range, a slot's rows at consecutive positions in n_ctx, out rows in [0, n).
inline void check_forward_rows_args(const Engine& e, int n, const int32_t* slots, const int32_t* tokens,
                                    const int32_t* pos, int k, const int32_t* out_rows);
// n >= 1 tokens of `slot` at positions pos0 .. pos0+n-1.
inline void check_forward_args(const char* who, const Engine& e, int slot, const int32_t* tokens, int n, int pos0);
// n >= 1 (slot, token, position) triples, each slot at most once.
inline void check_decode_batch_args(const Engine& e, int n, const int32_t* slots, const int32_t* tokens,
                                    const int32_t* pos);
// n_steps >= 0 single-token steps of `slot` from `pos` (positions pos .. pos+n_steps-1).
inline void check_greedy_args(const char* who, const Engine& e, int slot, int32_t first_token, int pos, int n_steps);

class Engine {
public:
    virtual ~Engine() = default;
    virtual const ModelDesc& desc() const = 0;
    virtual int n_ctx() const = 0;    // positions per slot
    virtual int n_slots() const = 0;  // independent sequences in the cache

    // KV memory. A slot holds positions [0, its reservation) of the pool. forward, decode_batch
    // and decode_greedy reserve what they write when the slot holds less (an Error naming the
    // pool's state when it has no room: the caller releases slots or waits). kv_reserve takes
    // n_positions (1 .. n_ctx) ahead and says false, changing nothing, when the pool has no
    // room; a slot's cached positions survive its growth. kv_release gives the slot's memory
    // back: its cached positions are gone.
    virtual bool kv_reserve(int slot, int n_positions) = 0;
    virtual void kv_release(int slot) = 0;
    virtual KvPoolStats kv_stats() const = 0;
    virtual int64_t kv_reserved(int slot) const = 0;  // positions the slot holds now

    // Runs tokens[0..n) of sequence `slot` at positions pos0 .. pos0+n-1,
    // attending to cache entries [0, pos0) plus themselves (causal), and
    // writes their K/V into the slot's cache. Writes n_vocab logits of the last
    // token to `logits`, or n*n_vocab (row per token) when all_logits.
    // When `trace` is non-null it receives the per-layer hidden states.
    // Throws orcd::Error if pos0 + n > n_ctx or slot/tokens are out of range.
    virtual void forward(int slot, const int32_t* tokens, int n, int pos0,
                         float* logits, bool all_logits, Trace* trace) = 0;

    // Prompt chunks of several slots in one pass: row i is tokens[i] at position pos[i] of slot
    // slots[i]; a slot's rows come in position order, right after what it holds (each row sees
    // its slot's positions up to its own). The logits of the k rows out_rows[0..k) go to
    // logits (k x n_vocab). Equivalent to one forward per slot (this default does that); the
    // CUDA engine runs the rows as one batch, so a burst of short prompts costs one pass.
    virtual void forward_rows(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos, int k,
                              const int32_t* out_rows, float* logits) {
        check_forward_rows_args(*this, n, slots, tokens, pos, k, out_rows);
        const size_t V = size_t(desc().n_vocab);
        for (int i = 0; i < n;) {  // runs of one slot at consecutive positions
            int j = i + 1;
            while (j < n && slots[j] == slots[i] && pos[j] == pos[j - 1] + 1) ++j;
            bool inner = false;  // an out row before the run's last: every row's logits
            for (int o = 0; o < k; ++o) inner = inner || (out_rows[o] >= i && out_rows[o] < j - 1);
            std::vector<float> got((inner ? size_t(j - i) : 1) * V);
            forward(slots[i], tokens + i, j - i, pos[i], got.data(), inner, nullptr);
            for (int o = 0; o < k; ++o)
                if (out_rows[o] >= i && out_rows[o] < j)
                    std::copy_n(got.data() + (inner ? size_t(out_rows[o] - i) * V : 0), V, logits + size_t(o) * V);
            i = j;
        }
    }

    // One decode step for `n` distinct slots: token[i] at position pos[i] of
    // slot slots[i]; logits is n x n_vocab. Equivalent to n forward() calls.
    virtual void decode_batch(int n, const int32_t* slots, const int32_t* tokens,
                              const int32_t* pos, float* logits) = 0;

    // decode_batch, then each row's next token sampled on the engine's device, so only
    // token ids come back (the CUDA engine; logits never leave the GPU). Returns false,
    // having done nothing, where the engine has no such path (the CPU engine: its logits
    // are on the host already) or a row's parameters are beyond the device sampler
    // (device_sampling_supports): the caller then runs decode_batch and a Sampler.
    virtual bool decode_batch_sample(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                                     DeviceSampleRow* rows, int32_t* out_tokens) {
        return false;
    }

    // n_steps single-token steps of one slot from (token, pos), each next token sampled on the
    // engine's device with row's parameters and fed to the next step without a round trip to the
    // host: out_tokens[i] is step i's draw, row.rng_state advances as n_steps draws do. Returns
    // false, having done nothing, where the engine has no such path (the CPU engine, a row with
    // penalties, logprobs or a mask, parameters beyond the device sampler). Equivalent to n_steps
    // decode_batch_sample calls of one row, each given the previous call's token.
    virtual bool decode_sample_steps(int slot, int32_t token, int pos, int n_steps, DeviceSampleRow& row,
                                     int32_t* out_tokens) {
        return false;
    }

    // Greedy decoding of one sequence: n_steps single-token steps of `slot`,
    // step i evaluating token t_i at position pos + i (t_0 = first_token) and
    // writing t_{i+1} = argmax of its logits (first maximum) to out_tokens[i].
    // Equivalent to forward + argmax per step; a backend may keep the argmax
    // on its device (the CUDA engine does) so only token ids reach the host.
    virtual void decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) {
        check_greedy_args("decode_greedy", *this, slot, first_token, pos, n_steps);
        std::vector<float> logits(size_t(desc().n_vocab));
        int32_t t = first_token;
        for (int i = 0; i < n_steps; ++i) {
            forward(slot, &t, 1, pos + i, logits.data(), false, nullptr);
            t = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
            out_tokens[i] = t;
        }
    }
};

// ---- the checks (inline: the CUDA library uses them without the CPU one)
namespace engine_args {
inline std::string span(int64_t first, int64_t n) {  // "position 7" / "positions 7..9"
    return n == 1 ? "position " + std::to_string(first)
                  : "positions " + std::to_string(first) + ".." + std::to_string(first + n - 1);
}
inline void check_range(const char* who, const Engine& e, int64_t first, int64_t n, const std::string& of) {
    if (first < 0 || first + n > e.n_ctx())
        throw Error(std::string(who) + ": context full: " + span(first, n) + of + (n == 1 ? " does" : " do") +
                    " not fit in n_ctx = " + std::to_string(e.n_ctx()));
}
// Grows the slot's reservation to cover positions [0, end): the engines call it before writing.
inline void ensure_kv(const char* who, Engine& e, int slot, int64_t end) {
    if (e.kv_reserved(slot) >= end || e.kv_reserve(slot, int(end))) return;
    const KvPoolStats s = e.kv_stats();
    throw Error(std::string(who) + ": KV memory full: slot " + std::to_string(slot) + " needs " +
                std::to_string(end) + " positions; the pool of " + std::to_string(s.capacity) + " positions has " +
                std::to_string(s.capacity - s.reserved) + " free, at most " + std::to_string(s.largest_free) +
                " in one range (release slots, or give the engine more kv_memory)");
}
}  // namespace engine_args

inline void check_slot(const char* who, const Engine& e, int slot) {
    if (slot < 0 || slot >= e.n_slots())
        throw Error(std::string(who) + ": slot " + std::to_string(slot) + " out of range [0, " +
                    std::to_string(e.n_slots()) + ")");
}

inline void check_tokens(const char* who, const Engine& e, const int32_t* tokens, int n) {
    const int32_t n_vocab = e.desc().n_vocab;
    for (int i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= n_vocab)
            throw Error(std::string(who) + ": token id " + std::to_string(tokens[i]) + " out of range [0, " +
                        std::to_string(n_vocab) + ")");
}

inline void check_forward_args(const char* who, const Engine& e, int slot, const int32_t* tokens, int n,
                               int pos0) {
    check_slot(who, e, slot);
    if (n < 1) throw Error(std::string(who) + ": no tokens");
    engine_args::check_range(who, e, pos0, n, "");
    check_tokens(who, e, tokens, n);
}

inline void check_decode_batch_args(const Engine& e, int n, const int32_t* slots, const int32_t* tokens,
                                    const int32_t* pos) {
    const char* who = "decode_batch";
    if (n < 1) throw Error(std::string(who) + ": no tokens");
    std::vector<char> seen(size_t(e.n_slots()), 0);
    for (int i = 0; i < n; ++i) {
        check_slot(who, e, slots[i]);
        if (seen[size_t(slots[i])]++)
            throw Error(std::string(who) + ": slot " + std::to_string(slots[i]) + " appears twice");
        engine_args::check_range(who, e, pos[i], 1, " of slot " + std::to_string(slots[i]));
    }
    check_tokens(who, e, tokens, n);
}

inline void check_greedy_args(const char* who, const Engine& e, int slot, int32_t first_token, int pos,
                              int n_steps) {
    check_slot(who, e, slot);
    if (n_steps < 0) throw Error(std::string(who) + ": n_steps must be >= 0 (got " + std::to_string(n_steps) + ")");
    if (n_steps > 0) engine_args::check_range(who, e, pos, n_steps, "");
    check_tokens(who, e, &first_token, 1);
}

inline void check_forward_rows_args(const Engine& e, int n, const int32_t* slots, const int32_t* tokens,
                                    const int32_t* pos, int k, const int32_t* out_rows) {
    const char* who = "forward_rows";
    if (n < 1) throw Error(std::string(who) + ": no tokens");
    std::vector<int64_t> next(size_t(e.n_slots()), -1);  // each slot's next position, once seen
    for (int i = 0; i < n; ++i) {
        check_slot(who, e, slots[i]);
        engine_args::check_range(who, e, pos[i], 1, " of slot " + std::to_string(slots[i]));
        int64_t& nx = next[size_t(slots[i])];
        if (nx >= 0 && pos[i] != nx)
            throw Error(std::string(who) + ": row " + std::to_string(i) + " of slot " + std::to_string(slots[i]) +
                        " is at position " + std::to_string(pos[i]) + ", its slot's previous row at " +
                        std::to_string(nx - 1) + " (a slot's rows must be consecutive positions)");
        nx = int64_t(pos[i]) + 1;
    }
    check_tokens(who, e, tokens, n);
    if (k < 0 || k > n) throw Error(std::string(who) + ": k must be in [0, n] (got " + std::to_string(k) + ")");
    for (int o = 0; o < k; ++o)
        if (out_rows[o] < 0 || out_rows[o] >= n)
            throw Error(std::string(who) + ": out row " + std::to_string(out_rows[o]) + " out of range [0, " +
                        std::to_string(n) + ")");
}

inline void check_kv_reserve_args(const Engine& e, int slot, int n_positions) {
    check_slot("kv_reserve", e, slot);
    if (n_positions < 1 || n_positions > e.n_ctx())
        throw Error("kv_reserve: n_positions must be in [1, n_ctx = " + std::to_string(e.n_ctx()) + "] (got " +
                    std::to_string(n_positions) + ")");
}

// The CPU engine (cpp/cpu_engine.cpp). `file` must outlive the engine.
// kv_memory: bytes for the K/V pool (0: every slot's n_ctx positions; see kv_pool_positions).
std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<GGUFFile> file, int n_ctx,
                                        int n_slots, int n_threads, size_t kv_memory = 0);

}  // namespace orcd
