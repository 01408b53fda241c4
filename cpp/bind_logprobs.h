// bind_logprobs.h - one position's logprobs (cpp/logprobs.h) as Python sees them everywhere
// (step loop events, decode_sample, orcd._orcd.logprobs, the CUDA kernel's test entry):
// (logprob of the token, [(token id, logprob), ...] best first).
#pragma once
#include <nanobind/nanobind.h>

#include "logprobs.h"

namespace orcd {

inline nanobind::tuple logprobs_to_py(const Logprobs& lp) {
    nanobind::list top;
    for (const TokenLogprob& t : lp.top) top.append(nanobind::make_tuple(t.token, t.logprob));
    return nanobind::make_tuple(lp.logprob, top);
}

}  // namespace orcd
