// model.h - the model description: hyperparameters and weight tensors of a
// Qwen2-family GGUF, read from metadata and checked tensor by tensor.
//
// describe_model() is the one place that decides what a model file means;
// the CPU and CUDA engines both build from the ModelDesc it returns.
#pragma once
#include <string>
#include <vector>

#include "gguf.h"

namespace orcd {

struct LayerDesc {
    const TensorInfo* attn_norm;  // [n_embd] F32: RMSNorm weight before attention
    const TensorInfo* wq;         // [n_embd, n_head*head_dim]
    const TensorInfo* bq;         // [n_head*head_dim] F32 bias
    const TensorInfo* wk;         // [n_embd, n_head_kv*head_dim]
    const TensorInfo* bk;         // [n_head_kv*head_dim]
    const TensorInfo* wv;         // [n_embd, n_head_kv*head_dim]
    const TensorInfo* bv;         // [n_head_kv*head_dim]
    const TensorInfo* wo;         // [n_head*head_dim, n_embd]: attention output projection
    const TensorInfo* ffn_norm;   // [n_embd] F32: RMSNorm weight before the FFN
    const TensorInfo* w_gate;     // [n_embd, n_ff]
    const TensorInfo* w_up;       // [n_embd, n_ff]
    const TensorInfo* w_down;     // [n_ff, n_embd]
};

struct ModelDesc {
    std::string arch;        // general.architecture ("qwen2")
    std::string name;        // general.name, if present
    int n_layer = 0;         // {arch}.block_count
    int n_embd = 0;          // {arch}.embedding_length
    int n_ff = 0;            // {arch}.feed_forward_length
    int n_head = 0;          // {arch}.attention.head_count
    int n_head_kv = 0;       // {arch}.attention.head_count_kv (GQA groups)
    int head_dim = 0;        // n_embd / n_head
    int n_ctx_train = 0;     // {arch}.context_length
    int n_vocab = 0;         // rows of token_embd (the padded vocab, e.g. 151936)
    float rope_base = 10000.f;  // {arch}.rope.freq_base (1e6 for Qwen2.5)
    float rms_eps = 1e-6f;   // {arch}.attention.layer_norm_rms_epsilon
    const TensorInfo* tok_embd = nullptr;     // [n_embd, n_vocab]
    const TensorInfo* output_norm = nullptr;  // [n_embd] F32
    const TensorInfo* output = nullptr;       // [n_embd, n_vocab]; == tok_embd when tied
    bool tied_output = false;                 // output.weight absent: lm_head reuses tok_embd
    std::vector<LayerDesc> layers;
};

// Reads and validates the description; throws orcd::Error naming the file and
// the missing/misshapen tensor or metadata key, or the unsupported architecture.
ModelDesc describe_model(const GGUFFile& f);

}  // namespace orcd
