// step_loop.cpp - see step_loop.h for what one step does and in which order.
#include "step_loop.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "error.h"

namespace orcd {

namespace {
// The event that ends request `id` without a token (cancelled, shut down, failed).
StepEvent end_event(int64_t id, Finish finish, std::string message) {
    StepEvent e;
    e.id = id;
    e.finish = finish;
    e.message = std::move(message);
    return e;
}
}  // namespace

const char* finish_name(Finish f) {
    switch (f) {
        case Finish::none: return "";
        case Finish::stop: return "stop";
        case Finish::length: return "length";
        case Finish::cancelled: return "cancelled";
        case Finish::error: return "error";
    }
    return "";
}

StepLoop::StepLoop(std::unique_ptr<Engine> engine, int max_waiting, int prefill_chunk)
    : engine_(std::move(engine)), max_waiting_(max_waiting), prefill_chunk_(prefill_chunk) {
    if (!engine_) throw Error("StepLoop: no engine");
    if (max_waiting < 0) throw Error("max_waiting must be >= 0 (got " + std::to_string(max_waiting) + ")");
    if (prefill_chunk < 1) throw Error("prefill_chunk must be >= 1 (got " + std::to_string(prefill_chunk) + ")");
    const int n = engine_->n_slots();
    slot_cache_.assign(size_t(n), {});
    slot_free_.assign(size_t(n), true);
    n_free_ = n;
    stats_.kv_positions = engine_->kv_stats().capacity;
    thread_ = std::thread([this] { run(); });
}

StepLoop::~StepLoop() { shutdown(); }

void StepLoop::submit(StepRequest r) {
    const ModelDesc& d = engine_->desc();
    const int n_ctx = engine_->n_ctx();
    const std::string who = "request " + std::to_string(r.id) + ": ";
    if (r.prompt.empty()) throw Error(who + "prompt is empty");
    for (int32_t t : r.prompt)
        if (t < 0 || t >= d.n_vocab)
            throw Error(who + "prompt token id " + std::to_string(t) + " out of range [0, " +
                        std::to_string(d.n_vocab) + ")");
    if (int64_t(r.prompt.size()) >= n_ctx)
        throw Error(who + "prompt of " + std::to_string(r.prompt.size()) + " tokens does not fit in n_ctx=" +
                    std::to_string(n_ctx) + " (at least one position must stay free for generation)");
    if (r.max_tokens < 1) throw Error(who + "max_tokens must be >= 1 (got " + std::to_string(r.max_tokens) + ")");
    auto check_lp = [&](const char* name, int v) {
        if (v < -1 || v > kMaxTopLogprobs)
            throw Error(who + name + " must be in [-1, " + std::to_string(kMaxTopLogprobs) + "] (got " +
                        std::to_string(v) + ")");
    };
    check_lp("n_logprobs", r.n_logprobs);
    check_lp("n_prompt_logprobs", r.n_prompt_logprobs);
    auto s = std::make_unique<Seq>(std::move(r));  // validates the sampling parameters
    s->history = s->req.prompt;
    s->limit = std::min(s->req.max_tokens, n_ctx - int(s->req.prompt.size()));
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_) throw Error("the step loop is shut down");
        if (live_.count(s->req.id)) throw Error(who + "id is already in use by a live request");
        if (int(waiting_.size()) >= max_waiting_ + n_free_)
            throw QueueFull(who + "queue full (" + std::to_string(waiting_.size()) + " waiting)");
        live_[s->req.id] = s.get();
        waiting_.push_back(std::move(s));
        stats_.waiting = int(waiting_.size());
    }
    work_cv_.notify_one();
}

bool StepLoop::cancel(int64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = live_.find(id);
    if (it == live_.end()) return false;
    it->second->cancel_requested = true;
    work_cv_.notify_one();
    return true;
}

std::vector<StepEvent> StepLoop::take_events(int timeout_ms) {
    std::unique_lock<std::mutex> lk(mu_);
    if (events_.empty() && timeout_ms > 0)
        event_cv_.wait_for(lk, std::chrono::milliseconds(timeout_ms), [&] { return !events_.empty() || stopping_; });
    std::vector<StepEvent> out;
    out.swap(events_);
    return out;
}

StepStats StepLoop::stats() {
    std::lock_guard<std::mutex> lk(mu_);
    return stats_;
}

void StepLoop::shutdown() {
    std::lock_guard<std::mutex> one_at_a_time(shutdown_mu_);
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_ && !thread_.joinable()) return;
        stopping_ = true;
    }
    work_cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    // The thread is gone: end what is left, each with its terminal event.
    std::vector<StepEvent> out;
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& s : running_) finish_seq(*s, Finish::cancelled, "the step loop shut down", out);
    running_.clear();
    for (auto& s : waiting_) {
        out.push_back(end_event(s->req.id, Finish::cancelled, "the step loop shut down"));
        live_.erase(s->req.id);
        stats_.finished++;
    }
    waiting_.clear();
    stats_.running = 0;
    stats_.waiting = 0;
    events_.insert(events_.end(), out.begin(), out.end());
    event_cv_.notify_all();
}

void StepLoop::run() {
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(mu_);
            work_cv_.wait(lk, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
            if (stopping_) return;
        }
        step();
    }
}

// Under mu_: cancelled waiting requests end here; waiting ones take free slots, each the
// free slot whose cached tokens share the longest prefix with its prompt.
void StepLoop::admit_locked() {
    std::vector<StepEvent> out;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->cancel_requested) {
            out.push_back(end_event((*it)->req.id, Finish::cancelled, ""));
            live_.erase((*it)->req.id);
            stats_.finished++;
            it = waiting_.erase(it);
        } else {
            ++it;
        }
    }
    while (!waiting_.empty()) {
        int best = -1, best_len = -1;
        const StepRequest& req = waiting_.front()->req;
        const std::vector<int32_t>& p = req.prompt;
        for (size_t k = 0; k < slot_free_.size(); ++k) {
            if (!slot_free_[k]) continue;
            const std::vector<int32_t>& c = slot_cache_[k];
            // at least the last prompt token is evaluated: its logits are needed; prompt
            // logprobs need every prompt row's logits, so nothing cached is reused then
            const size_t cap = req.n_prompt_logprobs >= 0 || !req.reuse_prefix ? 0 : std::min(c.size(), p.size() - 1);
            size_t n = 0;
            while (n < cap && c[n] == p[n]) ++n;
            if (int(n) > best_len) { best_len = int(n); best = int(k); }
        }
        if (best < 0) break;
        // KV memory for the whole request (prompt + every token it may generate), so a
        // running sequence never meets a full pool.
        const int need = int(p.size()) + waiting_.front()->limit;
        bool reserved = false;
        try {
            reserved = reserve_kv_locked(best, need, &best_len);
        } catch (const std::exception& e) {  // the device failed: this request ends, the loop goes on
            out.push_back(end_event(req.id, Finish::error, e.what()));
            live_.erase(req.id);
            stats_.finished++;
            waiting_.pop_front();
            continue;
        }
        if (!reserved) {
            stats_.kv_waits++;
            break;  // the oldest request waits for memory; the younger ones wait behind it
        }
        std::unique_ptr<Seq> s = std::move(waiting_.front());
        waiting_.pop_front();
        s->slot = best;
        s->n_done = best_len;
        slot_free_[size_t(best)] = false;
        running_.push_back(std::move(s));
    }
    const KvPoolStats kv = engine_->kv_stats();
    stats_.kv_positions = kv.capacity;
    stats_.kv_reserved = kv.reserved;
    n_free_ = int(std::count(slot_free_.begin(), slot_free_.end(), true));
    stats_.waiting = int(waiting_.size());
    stats_.running = int(running_.size());
    if (!out.empty()) {
        events_.insert(events_.end(), out.begin(), out.end());
        event_cv_.notify_all();
    }
}

// Under mu_: `need` positions of KV memory for free slot `slot`, whose cached prefix of
// *reuse tokens the new request keeps. When the pool has no room, idle slots give their
// cached prefixes back (the other idle slots first, then this one's own, *reuse = 0) until
// it does; false when even that is not enough (running sequences hold the rest).
bool StepLoop::reserve_kv_locked(int slot, int need, int* reuse) {
    if (engine_->kv_reserve(slot, need)) return true;
    for (size_t k = 0; k < slot_free_.size(); ++k) {
        if (!slot_free_[k] || int(k) == slot || engine_->kv_reserved(int(k)) == 0) continue;
        engine_->kv_release(int(k));
        slot_cache_[k].clear();
        if (engine_->kv_reserve(slot, need)) return true;
    }
    if (engine_->kv_reserved(slot) > 0) {
        engine_->kv_release(slot);
        slot_cache_[size_t(slot)].clear();
        *reuse = 0;
        if (engine_->kv_reserve(slot, need)) return true;
    }
    return false;
}

void StepLoop::finish_seq(Seq& s, Finish f, const std::string& msg, std::vector<StepEvent>& out) {
    StepEvent ev;
    ev.id = s.req.id;
    ev.finish = f;
    ev.message = msg;
    publish(s, std::move(ev), out);
    end_seq(s);
}

void StepLoop::publish(Seq& s, StepEvent ev, std::vector<StepEvent>& out) {
    if (s.req.n_prompt_logprobs >= 0 && !s.prompt_lps_sent && s.n_done >= int(s.req.prompt.size())) {
        ev.has_prompt_logprobs = true;
        ev.prompt_logprobs = std::move(s.prompt_lps);
        s.prompt_lps_sent = true;
    }
    out.push_back(std::move(ev));
}

void StepLoop::end_seq(Seq& s) {
    if (s.slot >= 0) {
        // positions [0, n_done) hold this sequence's K/V: a later prompt may reuse them
        slot_cache_[size_t(s.slot)].assign(s.history.begin(), s.history.begin() + s.n_done);
        slot_free_[size_t(s.slot)] = true;
        s.slot = -1;
    }
    s.ended = true;
}

void StepLoop::take_token(Seq& s, const float* logits, std::vector<StepEvent>& out, const uint32_t* mask) {
    int32_t tok;
    Logprobs lp;
    try {
        const int V = engine_->desc().n_vocab;
        // logprobs are of the raw distribution: from logits before the mask (a copy is masked)
        const float* sample_from = s.req.mask_fn ? masked_logits(s, logits, mask) : logits;
        tok = s.sampler.sample(sample_from, V, s.history.data(), int(s.history.size()));
        if (s.req.n_logprobs >= 0) compute_logprobs(logits, V, tok, s.req.n_logprobs, lp);
    } catch (const std::exception& e) {
        finish_seq(s, Finish::error, e.what(), out);
        return;
    }
    accept_token(s, tok, s.req.n_logprobs >= 0 ? &lp : nullptr, out);
}

bool StepLoop::mask_allows_any(const std::vector<uint32_t>& mask, int n_vocab) {
    for (int w = 0; w < token_mask_words(n_vocab); ++w) {
        const int used = std::min(32, n_vocab - 32 * w);  // the last word's bits past n_vocab do not count
        const uint32_t bits = used == 32 ? mask[size_t(w)] : mask[size_t(w)] & ((1u << used) - 1u);
        if (bits) return true;
    }
    return false;
}

std::vector<uint32_t> StepLoop::seq_mask(const Seq& s) const {
    const int V = engine_->desc().n_vocab;
    std::vector<uint32_t> m(size_t(token_mask_words(V)), 0u);
    const size_t n_prompt = s.req.prompt.size();
    s.req.mask_fn(s.history.data() + n_prompt, int(s.history.size() - n_prompt), m.data());
    // an empty mask is this request's error, not its step's (the device sampler would fail the
    // whole step on a row with nothing to draw)
    if (!mask_allows_any(m, V)) throw Error("structured output: the constraint allows no token here");
    return m;
}

const float* StepLoop::masked_logits(const Seq& s, const float* logits, const uint32_t* mask) {
    const int V = engine_->desc().n_vocab;
    if (!mask) {
        mask_ = seq_mask(s);
        mask = mask_.data();
    }
    masked_logits_.assign(logits, logits + V);
    apply_token_mask(masked_logits_.data(), V, mask);
    return masked_logits_.data();
}

void StepLoop::accept_token(Seq& s, int32_t tok, const Logprobs* lp, std::vector<StepEvent>& out) {
    if (std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), tok) != s.req.stop_ids.end()) {
        finish_seq(s, Finish::stop, "", out);
        return;
    }
    s.history.push_back(tok);
    s.generated++;
    StepEvent ev;
    ev.id = s.req.id;
    ev.token = tok;
    if (lp) {
        ev.has_logprobs = true;
        ev.logprobs = *lp;
    }
    const bool last = s.generated >= s.limit;
    ev.finish = last ? Finish::length : Finish::none;
    publish(s, std::move(ev), out);
    if (last) end_seq(s);
}

bool StepLoop::lone_block(Seq& s, std::vector<StepEvent>& out) {
    const int k = std::min(lone_block_steps, s.limit - s.generated);
    if (k < 2 || s.req.mask_fn || s.req.n_logprobs >= 0) return false;
    DeviceSampleRow row{s.sampler.params(), s.sampler.rng_state(), s.history.data(), int(s.history.size())};
    std::vector<int32_t> toks(static_cast<size_t>(k));
    try {
        if (!engine_->decode_sample_steps(s.slot, s.history.back(), s.n_done, k, row, toks.data())) return false;
    } catch (const std::exception& e) {
        finish_seq(s, Finish::error, e.what(), out);
        return true;
    }
    // draw i was made after evaluating the token before it: each accepted draw moves n_done by one;
    // draws after a stop (or the last allowed token) are dropped, their K/V positions unclaimed
    for (int i = 0; i < k && !s.ended; ++i) {
        s.n_done++;
        accept_token(s, toks[size_t(i)], nullptr, out);
    }
    if (!s.ended) s.sampler.set_rng_state(row.rng_state);
    return true;
}

void StepLoop::prompt_chunk_with_logprobs(Seq& s, int n, std::vector<StepEvent>& out) {
    const int V = engine_->desc().n_vocab;
    const int plen = int(s.req.prompt.size());
    prompt_logits_.resize(size_t(prompt_logprob_rows) * size_t(V));
    for (int done = 0; done < n;) {
        const int m = std::min(prompt_logprob_rows, n - done);
        engine_->forward(s.slot, s.history.data() + s.n_done, m, s.n_done, prompt_logits_.data(), true, nullptr);
        for (int r = 0; r < m; ++r) {
            const int next = s.n_done + r + 1;  // the row at position p predicts prompt token p + 1
            if (next >= plen) break;
            Logprobs lp;
            compute_logprobs(prompt_logits_.data() + size_t(r) * V, V, s.req.prompt[size_t(next)],
                             s.req.n_prompt_logprobs, lp);
            s.prompt_lps.push_back(std::move(lp));
        }
        s.n_done += m;
        done += m;
    }
    if (s.n_done == plen) take_token(s, prompt_logits_.data() + size_t((n - 1) % prompt_logprob_rows) * V, out);
}

void StepLoop::step() {
    std::vector<StepEvent> out;
    bool others_wait = false;  // requests still waiting for a slot or memory after the admissions
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (auto& s : running_)
            if (s->cancel_requested && !s->ended) finish_seq(*s, Finish::cancelled, "", out);
        admit_locked();
        others_wait = !waiting_.empty();
    }
    const int V = engine_->desc().n_vocab;
    logits_.resize(size_t(V));
    int64_t prompt_tokens = 0;
    int64_t host_sampled = 0;  // decode rows sampled from host logits this step

    // 1. Prompt chunks, oldest request first, prefill_chunk tokens in all: the chunks of several
    // requests go through the engine as one pass (forward_rows), a lone chunk as a forward.
    int budget = prefill_chunk_;
    std::vector<std::pair<Seq*, int>> chunks;  // (sequence, tokens this step)
    for (auto& sp : running_) {
        Seq& s = *sp;
        const int plen = int(s.req.prompt.size());
        if (s.ended || s.n_done >= plen || budget <= 0) continue;
        const int n = std::min(budget, plen - s.n_done);
        if (s.req.n_prompt_logprobs >= 0) {
            try {
                prompt_chunk_with_logprobs(s, n, out);
                budget -= n;
                prompt_tokens += n;
            } catch (const std::exception& e) {
                finish_seq(s, Finish::error, e.what(), out);
            }
            continue;
        }
        chunks.emplace_back(&s, n);
        budget -= n;
    }
    if (chunks.size() == 1) {
        Seq& s = *chunks[0].first;
        const int n = chunks[0].second;
        try {
            engine_->forward(s.slot, s.history.data() + s.n_done, n, s.n_done, logits_.data(), false, nullptr);
            s.n_done += n;
            prompt_tokens += n;
            if (s.n_done == int(s.req.prompt.size())) take_token(s, logits_.data(), out);
        } catch (const std::exception& e) {
            finish_seq(s, Finish::error, e.what(), out);
        }
    } else if (chunks.size() > 1) {
        std::vector<int32_t> slots, toks, pos, out_rows;
        std::vector<Seq*> done;  // prompts that end in this pass, in out_rows order
        for (auto& [s, n] : chunks) {
            for (int j = 0; j < n; ++j) {
                slots.push_back(s->slot);
                toks.push_back(s->history[size_t(s->n_done + j)]);
                pos.push_back(s->n_done + j);
            }
            if (s->n_done + n == int(s->req.prompt.size())) {
                out_rows.push_back(int32_t(slots.size()) - 1);
                done.push_back(s);
            }
        }
        std::vector<float> lg(out_rows.size() * size_t(V));
        try {
            engine_->forward_rows(int(slots.size()), slots.data(), toks.data(), pos.data(), int(out_rows.size()),
                                  out_rows.data(), lg.data());
            for (auto& [s, n] : chunks) s->n_done += n;
            prompt_tokens += int64_t(slots.size());
            for (size_t o = 0; o < done.size(); ++o) take_token(*done[o], lg.data() + o * size_t(V), out);
        } catch (const std::exception& e) {
            for (auto& [s, n] : chunks) finish_seq(*s, Finish::error, e.what(), out);
        }
    }

    // 2. One decode step for every sequence whose last token is sampled but not evaluated.
    std::vector<Seq*> dec;
    for (auto& sp : running_)
        if (!sp->ended && sp->n_done == int(sp->history.size()) - 1 && sp->generated > 0) dec.push_back(sp.get());
    // A sequence alone in the loop (no prompt ran this step, nobody waits) takes a block of
    // steps from one engine call where the engine can (the CUDA engine's decode_sample_steps:
    // each draw feeds the next step on the device), so the host's round trip is paid once a
    // block; a request arriving meanwhile waits at most lone_block steps for its admission.
    if (dec.size() == 1 && chunks.empty() && prompt_tokens == 0 && !others_wait && running_.size() == 1 &&
        lone_block(*dec[0], out))
        dec.clear();
    if (!dec.empty()) {
        const int n = int(dec.size());
        const size_t un = dec.size();
        std::vector<int32_t> slots(un), toks(un), pos(un);
        for (size_t i = 0; i < un; ++i) {
            slots[i] = dec[i]->slot;
            toks[i] = dec[i]->history.back();
            pos[i] = dec[i]->n_done;
        }
        // Sampled where the logits are when the engine can (only token ids come back), else
        // the logits come to the host and each sequence's Sampler picks.
        std::vector<DeviceSampleRow> rows(un);
        std::vector<Logprobs> lps(un);
        for (size_t i = 0; i < un; ++i) {
            rows[i] = {dec[i]->sampler.params(), dec[i]->sampler.rng_state(), dec[i]->history.data(),
                       int(dec[i]->history.size())};
            rows[i].n_logprobs = dec[i]->req.n_logprobs;
            if (rows[i].n_logprobs >= 0) rows[i].logprobs = &lps[i];
        }
        std::vector<int32_t> picked(un);
        // Structured output: each masked row's mask for this step, computed once; the device
        // sampler applies it next to the logits, the host path below takes the same words. A row
        // whose mask function fails is evaluated with the others and then ends with the error.
        std::vector<std::vector<uint32_t>> masks(un);
        std::vector<std::string> mask_err(un);
        for (size_t i = 0; i < un; ++i) {
            if (!dec[i]->req.mask_fn) continue;
            try {
                masks[i] = seq_mask(*dec[i]);
                rows[i].mask = masks[i].data();
            } catch (const std::exception& e) {
                mask_err[i] = e.what();
                masks[i].clear();
            }
        }
        try {
            if (engine_->decode_batch_sample(n, slots.data(), toks.data(), pos.data(), rows.data(), picked.data())) {
                for (size_t i = 0; i < un; ++i) {
                    dec[i]->n_done++;
                    dec[i]->sampler.set_rng_state(rows[i].rng_state);
                    if (!mask_err[i].empty()) finish_seq(*dec[i], Finish::error, mask_err[i], out);
                    else accept_token(*dec[i], picked[i], rows[i].logprobs, out);
                }
            } else {
                std::vector<float> logits(un * size_t(V));
                engine_->decode_batch(n, slots.data(), toks.data(), pos.data(), logits.data());
                host_sampled += int64_t(un);
                for (size_t i = 0; i < un; ++i) {
                    dec[i]->n_done++;
                    if (!mask_err[i].empty()) finish_seq(*dec[i], Finish::error, mask_err[i], out);
                    else take_token(*dec[i], logits.data() + i * size_t(V), out, masks[i].empty() ? nullptr : masks[i].data());
                }
            }
        } catch (const std::exception& e) {
            for (Seq* s : dec) finish_seq(*s, Finish::error, e.what(), out);
        }
    }

    // 3. Publish; drop the sequences that ended.
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& sp : running_)  // cancelled while this step ran
        if (sp->cancel_requested && !sp->ended) finish_seq(*sp, Finish::cancelled, "", out);
    int64_t emitted = 0;
    for (const StepEvent& e : out) emitted += e.token >= 0;
    for (auto it = running_.begin(); it != running_.end();) {
        if ((*it)->ended) {
            live_.erase((*it)->req.id);
            stats_.finished++;
            it = running_.erase(it);
        } else {
            ++it;
        }
    }
    stats_.steps++;
    stats_.prompt_tokens += prompt_tokens;
    stats_.host_sampled += host_sampled;
    stats_.generated += emitted;
    stats_.running = int(running_.size());
    n_free_ = int(std::count(slot_free_.begin(), slot_free_.end(), true));
    if (!out.empty()) {
        events_.insert(events_.end(), out.begin(), out.end());
        event_cv_.notify_all();
    }
}

}  // namespace orcd
