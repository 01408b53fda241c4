// model.h - the model description: hyperparameters and weight tensors of a
// GGUF decoder, read from metadata and checked tensor by tensor.
//
// describe_model() is the one place that decides what a model file means;
// the CPU and CUDA engines both build from the ModelDesc it returns. A model
// family (qwen2, llama, phi3, gemma3) is data here: which RoPE pairing, which
// tensors exist (biases, fused projections, Q/K norms, post-norms), which FFN
// activation, per-layer RoPE base and attention window, embedding scale and
// logit soft-capping. One small function per family fills them
// (cpp/families/*.cpp); the engines read the fields, never the family name.
#pragma once
#include <string>
#include <vector>

#include "gguf.h"

namespace orcd {

// How RoPE pairs the elements of a head.
enum class RopeStyle {
    Neox,    // (x[i], x[i + head_dim/2]), i < head_dim/2: qwen2, phi3, gemma3
    Normal,  // (x[2i], x[2i + 1]): llama (llama.cpp's converter permutes Q/K rows to match)
};

// The gate of the feed-forward block: down(act(gate(x)) * up(x)).
enum class Activation {
    Silu,      // x / (1 + exp(-x))
    GeluTanh,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
};

const char* rope_style_name(RopeStyle s);
const char* activation_name(Activation a);

struct LayerDesc {
    const TensorInfo* attn_norm = nullptr;  // [n_embd] F32: RMSNorm weight before attention
    // Q/K/V: three matrices, or one fused wqkv (rows q | k | v) with wq/wk/wv null.
    const TensorInfo* wq = nullptr;         // [n_embd, n_head*head_dim]
    const TensorInfo* wk = nullptr;         // [n_embd, n_head_kv*head_dim]
    const TensorInfo* wv = nullptr;         // [n_embd, n_head_kv*head_dim]
    const TensorInfo* wqkv = nullptr;       // [n_embd, (n_head + 2*n_head_kv)*head_dim] (phi3)
    const TensorInfo* bq = nullptr;         // [n_head*head_dim] F32 bias, or null (no biases)
    const TensorInfo* bk = nullptr;         // [n_head_kv*head_dim] or null
    const TensorInfo* bv = nullptr;         // [n_head_kv*head_dim] or null
    const TensorInfo* q_norm = nullptr;     // [head_dim] per-head RMSNorm of q before RoPE (gemma3), or null
    const TensorInfo* k_norm = nullptr;     // [head_dim] per-head RMSNorm of k before RoPE, or null
    const TensorInfo* wo = nullptr;         // [n_head*head_dim, n_embd]: attention output projection
    const TensorInfo* post_attn_norm = nullptr;  // [n_embd] RMSNorm of the attention output (gemma3), or null
    const TensorInfo* ffn_norm = nullptr;   // [n_embd] F32: RMSNorm weight before the FFN
    // gate/up: two matrices, or one fused w_gate_up (rows gate | up) with w_gate/w_up null.
    const TensorInfo* w_gate = nullptr;     // [n_embd, n_ff]
    const TensorInfo* w_up = nullptr;       // [n_embd, n_ff]
    const TensorInfo* w_gate_up = nullptr;  // [n_embd, 2*n_ff] (phi3)
    const TensorInfo* w_down = nullptr;     // [n_ff, n_embd]
    const TensorInfo* post_ffn_norm = nullptr;   // [n_embd] RMSNorm of the FFN output (gemma3), or null
    float rope_base = 10000.f;  // this layer's RoPE base (gemma3: local layers differ from global ones)
    int sliding_window = 0;     // > 0: a query at p sees keys (p - window, p] only; 0: every earlier key
};

struct ModelDesc {
    std::string arch;        // general.architecture ("qwen2", "llama", "phi3", "gemma3")
    std::string name;        // general.name, if present
    int n_layer = 0;         // {arch}.block_count
    int n_embd = 0;          // {arch}.embedding_length
    int n_ff = 0;            // {arch}.feed_forward_length
    int n_head = 0;          // {arch}.attention.head_count
    int n_head_kv = 0;       // {arch}.attention.head_count_kv (GQA groups)
    int head_dim = 0;        // n_embd / n_head, or attention.key_length where the family allows it
    int n_ctx_train = 0;     // {arch}.context_length
    int n_vocab = 0;         // rows of token_embd (the padded vocab, e.g. 151936)
    float rope_base = 10000.f;  // {arch}.rope.freq_base (1e6 for Qwen2.5); layers may override
    float rms_eps = 1e-6f;   // {arch}.attention.layer_norm_rms_epsilon
    const TensorInfo* tok_embd = nullptr;     // [n_embd, n_vocab]
    const TensorInfo* output_norm = nullptr;  // [n_embd] F32
    const TensorInfo* output = nullptr;       // [n_embd, n_vocab]; == tok_embd when tied
    bool tied_output = false;                 // output.weight absent: lm_head reuses tok_embd
    std::vector<LayerDesc> layers;

    // ---- the family's shape (defaults: qwen2)
    RopeStyle rope_style = RopeStyle::Neox;
    Activation activation = Activation::Silu;
    bool qkv_bias = true;        // every layer has bq, bk, bv
    bool fused_qkv = false;      // every layer has wqkv instead of wq, wk, wv
    bool fused_gate_up = false;  // every layer has w_gate_up instead of w_gate, w_up
    bool qk_norm = false;        // every layer has q_norm, k_norm
    bool post_norms = false;     // every layer has post_attn_norm, post_ffn_norm
    float embd_scale = 1.f;      // the embedding rows are multiplied by this (gemma3: sqrt(n_embd))
    float attn_scale = 0.f;      // attention score scale; 0: 1/sqrt(head_dim)
    float logit_softcap = 0.f;   // > 0: logits = c * tanh(logits / c)
    bool sliding_window = false; // some layer has sliding_window > 0

    float score_scale() const;   // attn_scale, or 1/sqrt(head_dim) when 0
    // True when the model is the shape of the original engines: qwen2's tensors and ops
    // (NEOX, biases, separate projections, SiLU, no extra norms, no scales, one RoPE base,
    // full attention). The CUDA fused decoder handles only this shape.
    bool is_qwen2_shape() const;
};

// Reads and validates the description; throws orcd::Error naming the file and
// the missing/misshapen tensor or metadata key, or the unsupported architecture.
ModelDesc describe_model(const GGUFFile& f);

}  // namespace orcd
