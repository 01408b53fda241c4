// step_loop.h - the per-token loop of many sequences, in C++ on its own thread.
//
// Callers submit requests (prompt token ids + sampling parameters + limits) and
// take events (one token id per event, and one terminal event per request). The
// loop thread owns the engine: each step it admits waiting requests into free
// cache slots (reusing the longest cached prefix among the free slots), runs one
// prompt chunk for sequences still in their prompt, one decode_batch for all
// sequences that are generating, samples each sequence with its own Sampler (so a
// seed gives the same tokens whatever else is in the batch) and publishes the
// tokens. Requests join and leave at any step; a cancelled request ends at the
// next step and its slot is free at once. No Python and no GIL inside.
//
// Order inside one step: admissions and cancellations -> prompt chunks
// (prefill_chunk tokens in all, oldest request first; the chunks of several
// requests go to the engine as one forward_rows pass) -> one decode_batch ->
// sampling -> events. A request whose prompt completes in this step samples its
// first token from the prompt's last logits and joins the same step's decode_batch.
// A sequence alone in the loop (nothing else running or waiting, no prompt in this step)
// takes a block of up to lone_block_steps tokens from one engine call instead, where the
// engine samples on its device (the same draws as that many single steps).
//
// Limits: a request's prompt plus generated tokens never exceed the engine's
// n_ctx (generation ends with "length" there); at most max_waiting requests
// wait for a slot (submit throws past that: the caller answers "busy").
//
// KV memory: admission reserves a request's prompt + max_tokens (capped by n_ctx)
// positions of the engine's pool (cpp/kv_pool.h) for its slot, so a running sequence
// never meets a full pool. A free slot keeps its cached prefix (and memory) until an
// admission needs the room; when even the idle slots' memory is not enough, the oldest
// waiting request waits (and the ones behind it) until running ones finish.
// Every request fits an empty pool: the engines hold at least n_ctx positions.
//
// Logprobs (cpp/logprobs.h: the raw distribution, before the sampling chain): a request
// with n_logprobs >= 0 gets, on each token event, the token's log-probability and the
// n_logprobs most likely tokens (on the CUDA engine computed next to the logits, see
// DeviceSampleRow). n_prompt_logprobs >= 0 (OpenAI's echo): its prompt is evaluated with
// every row's logits (prompt_logprob_rows at a time, no cached prefix reused) and its first
// event carries the log-probability of each prompt token after the first. Requests
// without them cost nothing extra.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine.h"
#include "error.h"
#include "sampler.h"

namespace orcd {

// Structured output: fills mask[token_mask_words(n_vocab)] (sampler.h) with the tokens allowed
// next, given the tokens generated so far; throws to end the request with an error.
using TokenMaskFn = std::function<void(const int32_t* generated, int n_generated, uint32_t* mask)>;

struct StepRequest {
    int64_t id = 0;                   // unique among live requests
    std::vector<int32_t> prompt;      // token ids, non-empty, each in [0, n_vocab)
    SamplerParams sampling;
    int max_tokens = 256;             // >= 1; capped by n_ctx - prompt size
    std::vector<int32_t> stop_ids;    // sampling one ends the request ("stop"), not emitted
    int n_logprobs = -1;              // -1: none; [0, kMaxTopLogprobs]: see the header comment
    int n_prompt_logprobs = -1;       // -1: none; [0, kMaxTopLogprobs]: the prompt's, on the first event
    // Optional (structured output): called on the loop thread before each of this request's
    // tokens is sampled; the disallowed tokens' logits become -inf. A step with such a request
    // samples every row from host logits (decode_batch + Sampler). Requests without one pay nothing.
    TokenMaskFn mask_fn;
    // Reuse the longest cached prefix of a free slot (llama.cpp's cache_prompt). On the GPU the
    // tokens after a reused prefix are evaluated in other shapes than a whole prompt is (the
    // single-token kernels, other GEMM sizes), whose rounding differs: with false a given seed
    // gives the same tokens as the first evaluation of the prompt did.
    bool reuse_prefix = true;
};

// submit() when max_waiting requests already wait: the caller answers "busy, retry".
struct QueueFull : Error {
    using Error::Error;
};

enum class Finish : int { none = 0, stop = 1, length = 2, cancelled = 3, error = 4 };
const char* finish_name(Finish f);

// token >= 0: a generated token (finish == none, or length when it is the last);
// token < 0: a terminal event without a token (stop, cancelled, error + message).
struct StepEvent {
    int64_t id = 0;
    int32_t token = -1;
    Finish finish = Finish::none;
    std::string message;
    bool has_logprobs = false;         // token >= 0 of a request with n_logprobs >= 0
    Logprobs logprobs;
    bool has_prompt_logprobs = false;  // the first event of a request with n_prompt_logprobs >= 0
    std::vector<Logprobs> prompt_logprobs;  // prompt tokens 1 .. n-1 (token 0 has no context)
};

struct StepStats {
    int running = 0;              // requests holding a slot
    int waiting = 0;              // submitted, not yet in a slot
    int64_t steps = 0;            // loop iterations that did work
    int64_t prompt_tokens = 0;    // evaluated prompt tokens (cached prefixes not counted)
    int64_t generated = 0;        // tokens emitted
    int64_t finished = 0;         // requests ended (any reason)
    int64_t kv_positions = 0;     // the engine's KV pool (cpp/kv_pool.h), in positions
    int64_t kv_reserved = 0;      // positions held by slots (running requests and cached prefixes)
    int64_t kv_waits = 0;         // admissions deferred because the pool had no room
    int64_t host_sampled = 0;     // decode rows whose logits came to the host to be sampled (an engine
                                  // without a device sampler, or a step with parameters beyond it)
};

class StepLoop {
public:
    // Prompt rows evaluated per forward for a request asking for prompt logprobs (each row's
    // logits come to the host: this bounds that buffer).
    static constexpr int prompt_logprob_rows = 32;
    // Steps a sequence alone in the loop takes from one engine call (lone_block), for the reason
    // of Model's DEVICE_BLOCK (python/orcd/model.py); fewer here, as the loop's host turnaround is
    // C++ only, and a request arriving meanwhile waits for the block. A stop wastes at most 7 steps.
    static constexpr int lone_block_steps = 8;

    // Takes the engine (it keeps its file alive) and starts the thread.
    StepLoop(std::unique_ptr<Engine> engine, int max_waiting, int prefill_chunk);
    ~StepLoop();  // shutdown()
    StepLoop(const StepLoop&) = delete;
    StepLoop& operator=(const StepLoop&) = delete;

    // Validates (throws orcd::Error naming the problem) and queues the request.
    void submit(StepRequest r);
    // Ends a live request at the next step with a "cancelled" event; false if unknown.
    bool cancel(int64_t id);
    // Events so far; waits up to timeout_ms (0: no wait) when there are none.
    std::vector<StepEvent> take_events(int timeout_ms);
    StepStats stats();
    // Cancels every live request (each gets its terminal event) and joins the thread.
    void shutdown();

    const ModelDesc& desc() const { return engine_->desc(); }
    int n_ctx() const { return engine_->n_ctx(); }
    int n_slots() const { return engine_->n_slots(); }

private:
    struct Seq {
        StepRequest req;
        Sampler sampler;
        int slot = -1;
        std::vector<int32_t> history;  // prompt + generated tokens
        int n_done = 0;                // history entries whose K/V are in the slot's cache
        int generated = 0;
        int limit = 0;                 // max tokens to generate (max_tokens capped by n_ctx)
        bool cancel_requested = false;  // set by cancel(), under mu_
        bool ended = false;             // its terminal event is out; removed at the end of the step
        std::vector<Logprobs> prompt_lps;  // n_prompt_logprobs >= 0: filled as the prompt runs
        bool prompt_lps_sent = false;
        explicit Seq(StepRequest r) : req(std::move(r)), sampler(req.sampling) {}
    };

    void run();
    void admit_locked();
    bool reserve_kv_locked(int slot, int need, int* reuse);
    void step();
    // Seq alone in the loop: up to lone_block_steps of its tokens from one decode_sample_steps
    // call, accepted in order until it ends. False, having done nothing, where the engine or the
    // request cannot (then the step's decode_batch runs it).
    bool lone_block(Seq& s, std::vector<StepEvent>& out);
    // Samples seq's next token from logits and publishes it, or its end (stop, length,
    // or a sampling error).
    // mask: seq's structured-output mask for this token when already computed (else computed here).
    void take_token(Seq& s, const float* logits, std::vector<StepEvent>& out, const uint32_t* mask = nullptr);
    // Publishes tok as seq's next token (with lp when the request asked for logprobs), or its
    // end when tok is a stop id or the last allowed.
    void accept_token(Seq& s, int32_t tok, const Logprobs* lp, std::vector<StepEvent>& out);
    // Appends ev, first attaching seq's prompt logprobs when they are complete and not yet sent.
    void publish(Seq& s, StepEvent ev, std::vector<StepEvent>& out);
    // Evaluates n prompt tokens of seq with every row's logits, recording the prompt logprobs;
    // samples the first token when the prompt is done.
    void prompt_chunk_with_logprobs(Seq& s, int n, std::vector<StepEvent>& out);
    // Structured output: seq's mask for its next token (its mask function on the tokens it generated);
    // an Error when it allows no token.
    std::vector<uint32_t> seq_mask(const Seq& s) const;
    // Whether a mask lets any of the n_vocab tokens through.
    static bool mask_allows_any(const std::vector<uint32_t>& mask, int n_vocab);
    // Structured output: mask (or seq_mask's when null) applied to a copy of logits (in masked_logits_).
    const float* masked_logits(const Seq& s, const float* logits, const uint32_t* mask = nullptr);
    // Publishes seq's terminal event (without a token) and ends it.
    void finish_seq(Seq& s, Finish f, const std::string& msg, std::vector<StepEvent>& out);
    // Frees seq's slot (remembering the tokens whose K/V it holds) and marks it ended.
    void end_seq(Seq& s);

    std::unique_ptr<Engine> engine_;
    const int max_waiting_;
    const int prefill_chunk_;

    std::mutex mu_;                       // guards everything below except the loop-only fields
    std::condition_variable work_cv_;     // the loop waits for requests
    std::condition_variable event_cv_;    // take_events waits for events
    std::deque<std::unique_ptr<Seq>> waiting_;
    std::unordered_map<int64_t, Seq*> live_;  // waiting and running, by id
    int n_free_ = 0;                          // free slots as of the last step
    std::vector<StepEvent> events_;
    StepStats stats_;
    bool stopping_ = false;
    std::mutex shutdown_mu_;              // concurrent shutdown() calls join the thread once

    // loop thread only
    std::vector<std::unique_ptr<Seq>> running_;          // holding a slot, admission order
    std::vector<std::vector<int32_t>> slot_cache_;       // tokens whose K/V each slot holds
    std::vector<bool> slot_free_;
    std::vector<float> logits_;
    std::vector<float> prompt_logits_;  // prompt_logprob_rows x n_vocab, for n_prompt_logprobs requests
    std::vector<uint32_t> mask_;          // structured output: the token mask of the row being sampled
    std::vector<float> masked_logits_;
    std::thread thread_;
};

}  // namespace orcd
