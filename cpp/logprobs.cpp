// logprobs.cpp - see logprobs.h for the distribution and the order of the top list.
//
// One pass for the maximum and the top list (insertion into a sorted array of at most
// kMaxTopLogprobs entries: nearly every token fails the first comparison), one pass
// for the sum of exp(l - max). lse = max + log(sum); logprob = l - lse.
#include "logprobs.h"

#include <cmath>
#include <limits>
#include <string>

#include "error.h"

namespace orcd {

namespace {

inline float sanitized(float v) {
    if (std::isnan(v)) return -std::numeric_limits<float>::infinity();
    const float fmax = std::numeric_limits<float>::max();
    return v > fmax ? fmax : v;
}

}  // namespace

void compute_logprobs(const float* logits, int n_vocab, int32_t chosen, int n_top, Logprobs& out) {
    if (n_vocab < 1) throw Error("logprobs: n_vocab must be >= 1 (got " + std::to_string(n_vocab) + ")");
    if (n_top < 0 || n_top > kMaxTopLogprobs)
        throw Error("logprobs: the number of top logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) +
                    "] (got " + std::to_string(n_top) + ")");
    if (chosen < 0 || chosen >= n_vocab)
        throw Error("logprobs: token id " + std::to_string(chosen) + " out of range [0, " + std::to_string(n_vocab) +
                    ")");
    const int k = n_top < n_vocab ? n_top : n_vocab;
    TokenLogprob best[kMaxTopLogprobs];  // sorted: logit descending, id ascending
    int nb = 0;
    float lmax = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n_vocab; ++i) {
        const float v = sanitized(logits[i]);
        if (v > lmax) lmax = v;
        if (k == 0) continue;
        // ids ascend, so an equal value never beats a kept token
        if (nb == k && !(v > best[k - 1].logprob)) continue;
        int j = nb < k ? nb++ : k - 1;
        while (j > 0 && v > best[j - 1].logprob) {
            best[j] = best[j - 1];
            --j;
        }
        best[j] = {int32_t(i), v};
    }
    if (!(lmax > -std::numeric_limits<float>::infinity()))
        throw Error("logprobs: every logit is -inf or NaN");
    double sum = 0.0;
    // exp in float (each term <= 1, relative error ~1e-7), accumulated in double: the double
    // exp costs several times more over a 150k vocabulary
    for (int i = 0; i < n_vocab; ++i) sum += double(std::exp(sanitized(logits[i]) - lmax));
    const double lse = double(lmax) + std::log(sum);
    out.logprob = float(double(sanitized(logits[chosen])) - lse);
    out.top.resize(size_t(nb));
    for (int j = 0; j < nb; ++j) out.top[size_t(j)] = {best[j].token, float(double(best[j].logprob) - lse)};
}

}  // namespace orcd
