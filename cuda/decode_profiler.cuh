// decode_profiler.cuh - GPU time of the fused decode step by kernel kind.
#pragma once
#include <cstdint>

#include "cuda_api.h"
#include "fused_decoder.cuh"

namespace orcd {

// n_steps greedy steps of `dec` from (token, pos) of `slot` (arguments checked by the
// caller; the stream idle), each step timed several ways (DecodeProfile's fields):
// - kernel: the step captured into a graph with an event after each kernel, no PDL;
// - graph_step: FusedDecoder::run, as the engine runs a step;
// - noop_step(_nopdl): a graph of empty kernels of the same launch shapes, with the
//   decoder's PDL setting and without;
// - marginal: graph_step minus a graph (decoder's PDL) with that kind's kernels empty:
//   what the kind costs in the pipeline (the emptied kernels' outputs are stale).
// The steps overwrite the slot's cache from pos on.
DecodeProfile profile_decode_step(FusedDecoder& dec, int slot, int32_t token, int pos, int n_steps);

}  // namespace orcd
