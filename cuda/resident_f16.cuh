// resident_f16.cuh - a resident fp16 copy of the matrices the GEMM paths read (decode
// batches, prompts, the all-rows lm_head), so they stop dequantizing each weight into a
// scratch before every product. Groups that are one GEMM's operand stay adjacent in the
// order weights16() expects: per layer q|k|v, o, gate|up, down; then the lm_head.
// Groups of F16 tensors already adjacent on the device are used in place and not copied.
//
// The lm_head (151936 x 896 for Qwen2.5-0.5B: 272 MB as fp16) is included: a decode batch
// otherwise dequantizes it (read 145 MB of Q8_0, write and read 272 MB of fp16) every step,
// which costs more than reading the fp16 copy once; on a GPU without the room the whole
// copy is skipped (CudaEngineImpl::build), never half of it.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <unordered_map>

#include "engine_weights.cuh"

namespace orcd {

class ResidentF16 {
public:
    // Bytes of the copy for model d (every group counted unless all its tensors are F16).
    static size_t bytes_for(const ModelDesc& d);
    // Dequantizes w's groups into buf (bytes_for bytes, stream-ordered) and records where
    // each tensor's fp16 rows start.
    void build(const DeviceWeights& w, __half* buf, size_t bytes, cudaStream_t stream);
    // The fp16 rows of the tensor whose device data is `data` (the next tensors of its group
    // follow), or null when it has none.
    const __half* find(const uint8_t* data) const {
        auto it = at_.find(data);
        return it == at_.end() ? nullptr : it->second;
    }
    void clear() { at_.clear(); }

private:
    std::unordered_map<const uint8_t*, const __half*> at_;
};

}  // namespace orcd
