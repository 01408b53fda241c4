// sampler.cpp - see sampler.h for the chain and the parameters.
//
// Determinism: every ordering decision uses the strict total order
// (logit descending, token id ascending), so the kept set does not depend on
// how a standard library implements sort or heaps; the draw walks the kept
// tokens in ascending id order; the generator is splitmix64 (64-bit state,
// period 2^64, no std:: distributions). Greedy sampling (temperature 0) does
// not advance the generator.
//
// Cost for n_vocab = 151936: one copy and one max pass; top_k keeps a heap
// of k in one pass (0.33 ms in all with the defaults); top_p on a large set
// finds its cutoff with a histogram of the
// probability mass and sorts only the tokens of the bin where it falls;
// min_p is a logit threshold (p_i >= min_p * p_max <=> l_i >= l_max + ln min_p).
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "error.h"

namespace orcd {

namespace {

std::string num(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}

[[noreturn]] void bad(const char* what, const char* rule, double v) {
    throw Error(std::string(what) + " must be " + rule + " (got " + num(v) + ")");
}

uint64_t splitmix64(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

}  // namespace

void validate(const SamplerParams& p) {
    // Comparisons are written so that NaN fails them.
    if (!(p.temperature >= 0.0f)) bad("temperature", ">= 0", p.temperature);
    if (!std::isfinite(p.temperature)) bad("temperature", "finite", p.temperature);
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad("top_p", "in (0, 1]", p.top_p);
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) bad("min_p", "in [0, 1]", p.min_p);
    if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
        bad("repetition_penalty", "> 0", p.repetition_penalty);
    if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f))
        bad("presence_penalty", "in [-2, 2]", p.presence_penalty);
    if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f))
        bad("frequency_penalty", "in [-2, 2]", p.frequency_penalty);
    if (p.penalty_last_n < -1) bad("penalty_last_n", ">= -1", p.penalty_last_n);
    // top_k: any value; <= 0 means off. seed: any value.
}

bool device_sampling_supports(const SamplerParams& p, int n_vocab, int n_history) {
    const bool penalties = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    const int window = p.penalty_last_n < 0 ? n_history : std::min(n_history, p.penalty_last_n);
    if (penalties && window > kDevicePenaltyWindowMax) return false;
    if (p.temperature == 0.0f) return true;
    const bool top_k_on = p.top_k > 0 && p.top_k < n_vocab;
    if (top_k_on) return p.top_k <= kDeviceTopKMax;
    return p.top_p >= 1.0f;
}

void apply_token_mask(float* logits, int n_vocab, const uint32_t* mask) {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int w = 0; w < token_mask_words(n_vocab); ++w) {
        const uint32_t bits = mask[w];
        if (bits == 0xFFFFFFFFu) continue;
        const int end = std::min(n_vocab, (w + 1) * 32);
        for (int t = w * 32; t < end; ++t)
            if (!((bits >> (t & 31)) & 1u)) logits[t] = ninf;
    }
}

Sampler::Sampler(const SamplerParams& p) : p_(p) {
    validate(p_);
    // Run the seed through one splitmix64 step so that nearby seeds
    // (0, 1, 2, ...) start far apart in the sequence.
    uint64_t s = p_.seed;
    state_ = splitmix64(s);
}

double Sampler::next_uniform() {
    // 53 random bits -> [0, 1) exactly representable.
    return double(splitmix64(state_) >> 11) * (1.0 / 9007199254740992.0);
}

int32_t Sampler::sample(const float* logits, int n_vocab, const int32_t* history, int n_history) {
    if (n_vocab <= 0) throw Error("sample: n_vocab must be > 0 (got " + std::to_string(n_vocab) + ")");
    if (n_history < 0) throw Error("sample: n_history must be >= 0 (got " + std::to_string(n_history) + ")");
    if (n_history > 0 && history == nullptr) throw Error("sample: history is null");
    for (int i = 0; i < n_history; ++i)
        if (history[i] < 0 || history[i] >= n_vocab)
            throw Error("sample: history token " + std::to_string(history[i]) + " out of range [0, " +
                        std::to_string(n_vocab) + ")");

    // 1. Copy, sanitizing: NaN never wins, +inf becomes the largest float so
    //    differences stay finite.
    work_.resize(size_t(n_vocab));
    float* w = work_.data();
    const float ninf = -std::numeric_limits<float>::infinity();
    const float fmax = std::numeric_limits<float>::max();
    for (int i = 0; i < n_vocab; ++i) {
        float v = logits[i];
        if (std::isnan(v)) v = ninf;
        else if (v > fmax) v = fmax;
        w[i] = v;
    }

    // 2. Penalties over the last penalty_last_n tokens of history.
    const bool rep = p_.repetition_penalty != 1.0f;
    const bool pres = p_.presence_penalty != 0.0f;
    const bool freq = p_.frequency_penalty != 0.0f;
    if ((rep || pres || freq) && n_history > 0 && p_.penalty_last_n != 0) {
        int n = p_.penalty_last_n < 0 ? n_history : std::min(n_history, p_.penalty_last_n);
        idx_.assign(history + (n_history - n), history + n_history);
        std::sort(idx_.begin(), idx_.end());
        for (size_t a = 0; a < idx_.size();) {
            size_t b = a;
            while (b < idx_.size() && idx_[b] == idx_[a]) ++b;
            const int32_t t = idx_[a];
            const float count = float(b - a);
            float v = w[t];
            if (rep) v = v > 0.0f ? v / p_.repetition_penalty : v * p_.repetition_penalty;
            v -= count * p_.frequency_penalty + p_.presence_penalty;
            if (std::isnan(v)) v = ninf;
            w[t] = v;
            a = b;
        }
    }

    // 3. Greedy: argmax, lowest index on ties.
    int32_t best = -1;
    float lmax = ninf;
    for (int i = 0; i < n_vocab; ++i)
        if (w[i] > lmax) { lmax = w[i]; best = i; }
    if (best < 0) throw Error("sample: every logit is -inf or NaN");
    if (p_.temperature == 0.0f) return best;

    // Strict total order: higher logit first, then lower id.
    auto better = [w](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };

    // 4. Candidates: every token with a finite logit, in id order; with top_k,
    // only the k best, found in one pass with a heap whose top is the worst
    // kept token (a vocabulary-sized nth_element costs ~10x more).
    idx_.clear();
    bool id_sorted = true;
    if (p_.top_k > 0 && p_.top_k < n_vocab) {
        const size_t k = size_t(p_.top_k);
        idx_.reserve(k);
        // heap ordered by `better`: front() is the worst of the kept tokens
        for (int i = 0; i < n_vocab; ++i) {
            if (!(w[i] > ninf)) continue;
            if (idx_.size() < k) {
                idx_.push_back(i);
                std::push_heap(idx_.begin(), idx_.end(), better);
            } else if (w[i] > w[idx_.front()]) {  // ids ascend: an equal logit never wins the tie
                std::pop_heap(idx_.begin(), idx_.end(), better);
                idx_.back() = i;
                std::push_heap(idx_.begin(), idx_.end(), better);
            }
        }
        id_sorted = false;
    } else {
        idx_.reserve(size_t(n_vocab));
        for (int i = 0; i < n_vocab; ++i)
            if (w[i] > ninf) idx_.push_back(i);
    }

    // min_p as a logit threshold, applied below (it keeps a prefix of the
    // order, as top_k and top_p do, so the result is the shortest prefix).
    const bool use_min_p = p_.min_p > 0.0f;
    const double lmin = use_min_p ? double(lmax) + std::log(double(p_.min_p)) : 0.0;
    auto keep_min_p = [&]() {
        size_t o = 0;
        for (size_t i = 0; i < idx_.size(); ++i)
            if (double(w[idx_[i]]) >= lmin) idx_[o++] = idx_[i];
        idx_.resize(o);
    };

    if (p_.top_p < 1.0f) {
        // Normalizer over the top_k set (probabilities at temperature 1).
        double z = 0.0;
        for (int32_t t : idx_) z += std::exp(double(w[t]) - double(lmax));
        const double target = double(p_.top_p) * z;
        if (use_min_p) keep_min_p();
        if (idx_.size() <= 1024) {
            std::sort(idx_.begin(), idx_.end(), better);
            double cum = 0.0;
            size_t keep = idx_.size();  // min_p set ran out first (or rounding)
            for (size_t i = 0; i < idx_.size(); ++i) {
                cum += std::exp(double(w[idx_[i]]) - double(lmax));
                if (cum >= target) { keep = i + 1; break; }
            }
            idx_.resize(keep);
            id_sorted = false;
        } else {
            // Large set: no full sort. Histogram of the mass by distance from
            // the max logit (bins of 1/32 nat; monotone in the order), find
            // the bin where the cumulative mass crosses top_p, sort only that
            // bin's tokens to find the exact cutoff token, then keep every
            // token ordered before it (this keeps id order).
            constexpr int NB = 4096;
            constexpr double SCALE = 32.0;
            auto bin_of = [&](int32_t t) {
                const double d = (double(lmax) - double(w[t])) * SCALE;
                return d >= double(NB - 1) ? NB - 1 : int(d);
            };
            std::vector<double> mass(NB, 0.0);
            for (int32_t t : idx_) mass[size_t(bin_of(t))] += std::exp(double(w[t]) - double(lmax));
            double cum = 0.0;
            int cb = -1;
            for (int b = 0; b < NB; ++b) {
                if (mass[size_t(b)] > 0.0 && cum + mass[size_t(b)] >= target) { cb = b; break; }
                cum += mass[size_t(b)];
            }
            if (cb >= 0) {
                std::vector<int32_t> cross;
                for (int32_t t : idx_)
                    if (bin_of(t) == cb) cross.push_back(t);
                std::sort(cross.begin(), cross.end(), better);
                int32_t cutoff = cross.back();
                for (int32_t t : cross) {
                    cum += std::exp(double(w[t]) - double(lmax));
                    if (cum >= target) { cutoff = t; break; }
                }
                size_t o = 0;
                for (size_t i = 0; i < idx_.size(); ++i) {
                    const int32_t t = idx_[i];
                    const int b = bin_of(t);
                    if (b < cb || (b == cb && (t == cutoff || better(t, cutoff)))) idx_[o++] = t;
                }
                idx_.resize(o);
            }
            // cb < 0: the mass never reached top_p (min_p removed the rest): keep all.
        }
    } else if (use_min_p) {
        keep_min_p();
    }
    if (idx_.empty()) return best;  // cannot happen: the best token always survives
    if (!id_sorted) std::sort(idx_.begin(), idx_.end());

    // 5. Temperature, softmax in double, draw.
    const double inv_t = 1.0 / double(p_.temperature);
    auto weight = [&](int32_t t) { return std::exp((double(w[t]) - double(lmax)) * inv_t); };
    double total = 0.0;
    for (int32_t t : idx_) total += weight(t);
    // The walk recomputes the same weights (no scratch array in the header);
    // the result is bit-identical to the first pass.
    const double u = next_uniform() * total;
    double cum = 0.0;
    int32_t last_pos = best;
    for (int32_t t : idx_) {
        const double e = weight(t);
        if (e <= 0.0) continue;
        cum += e;
        last_pos = t;
        if (u < cum) return t;
    }
    return last_pos;  // rounding: u landed at the very end
}

}  // namespace orcd
