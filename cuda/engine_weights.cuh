// engine_weights.cuh - the model's tensors on the GPU: checked and laid out before
// anything is allocated, then uploaded into one device buffer.
//
// Matrices stay as the GGUF file stores them (raw blocks copied from the mapping);
// norms and biases are uploaded as float32. q|k|v and gate|up of a layer are adjacent,
// so F16 weights feed one GEMM in place; a tied output matrix is uploaded once.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_api.h"
#include "decode.cuh"
#include "model.h"

namespace orcd {

struct DevWeight {
    uint32_t type = 0;
    const uint8_t* data = nullptr;  // device
    int n_in = 0, n_out = 0;
    size_t row_bytes = 0;
    std::string name;
    size_t bytes() const { return row_bytes * size_t(n_out); }
    int64_t elems() const { return int64_t(n_in) * n_out; }
    cu::DTensor dt() const { return cu::DTensor{data, type, n_in, n_out, int(row_bytes)}; }
};

// One 3-D expert tensor (gpt-oss): `all` holds the experts' rows one expert after the other
// (n_out rows each), bias their [n_expert][n_out] biases (or null).
struct DevExperts {
    DevWeight all;
    int n_out = 0;
    const float* bias = nullptr;
    DevWeight expert(int e) const {
        DevWeight w = all;
        w.data = all.data + size_t(e) * size_t(n_out) * all.row_bytes;
        w.n_out = n_out;
        w.name = all.name + " (expert " + std::to_string(e) + ")";
        return w;
    }
    const float* bias_of(int e) const { return bias ? bias + size_t(e) * size_t(n_out) : nullptr; }
};

struct DevLayer {
    const float *attn_norm = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr, *ffn_norm = nullptr;
    // gemma3 (null elsewhere): per-head Q/K norms [head_dim], the blocks' output norms [n_embd]
    const float *q_norm = nullptr, *k_norm = nullptr, *post_attn_norm = nullptr, *post_ffn_norm = nullptr;
    // gpt-oss (null elsewhere): the attention output's bias [n_embd], a sink logit per head
    const float *bo = nullptr, *sinks = nullptr;
    DevWeight wq, wk, wv, wo, gate, up, down;
    // gpt-oss's mixture of experts (router.data null for a dense FFN)
    DevWeight router;
    const float* router_b = nullptr;
    DevExperts gate_e, up_e, down_e;
};

class DeviceWeights {
public:
    // Checks every tensor of `d` (shape, a type the kernels read) and lays them out;
    // throws Error naming the tensor and `where`. Allocates nothing.
    void plan(const ModelDesc& d, const std::string& where);
    size_t bytes() const { return bytes_; }  // of the device buffer upload() fills
    // Copies the tensors of `d` (the model plan() saw) into `buf` (bytes() bytes of device
    // memory) and sets the views below.
    void upload(const ModelDesc& d, uint8_t* buf, const ProgressFn& progress, const std::string& where);

    DevWeight tok_embd, output;
    const float* output_norm = nullptr;
    std::vector<DevLayer> layers;

private:
    struct Upload {
        const TensorInfo* t;
        bool vec;  // uploaded as float32
        size_t bytes, offset;
    };
    std::vector<Upload> ups_;
    size_t bytes_ = 0;
};

}  // namespace orcd
