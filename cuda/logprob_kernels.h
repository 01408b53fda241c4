// logprob_kernels.h - the test entry of the logprob kernel (cuda/logprob_kernels.cu),
// plain C++ for the bindings: tests/test_cuda_logprobs.py compares it with the CPU
// reference (cpp/logprobs.h, orcd._orcd.logprobs) on the same logits.
#pragma once
#include <cstdint>
#include <vector>

#include "logprobs.h"

namespace orcd {
namespace cuda_test {

// logits: host [n_rows, n_vocab]; chosen[r]: the token whose logprob row r reports;
// n_top in [0, kMaxTopLogprobs]. Uploads, runs the kernel, downloads.
std::vector<Logprobs> logprob_rows(const float* logits, int n_rows, int n_vocab, const int32_t* chosen, int n_top);

}  // namespace cuda_test
}  // namespace orcd
