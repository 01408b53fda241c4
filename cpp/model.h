// model.h - the model description: hyperparameters and weight tensors of a
// GGUF decoder, read from metadata and checked tensor by tensor.
//
// describe_model() is the one place that decides what a model file means;
// the CPU and CUDA engines both build from the ModelDesc it returns. A model
// family (qwen2, llama, phi3, gemma3, gpt-oss) is data here: which RoPE pairing
// and scaling, which tensors exist (biases, fused projections, Q/K norms,
// post-norms, attention sinks, experts), which FFN activation, per-layer RoPE
// base and attention window, embedding scale and logit soft-capping. One small
// function per family fills them (cpp/families/*.cpp); the engines read the
// fields, never the family name.
//
// gpt-oss (GPT-OSS-20B / 120B) runs on the CPU engine and in the CUDA engine's generic
// step (cuda/family_kernels.cu: sinks, YaRN, swiglu_oai; the experts routed on the host).
// What the GPU holds for GPT-OSS-20B:
// the GGUF is ~12-13 GB (the experts in MXFP4, 4.25 bits a weight: ~10 GB for 19B
// expert weights, 32 experts a layer of which 4 run per token), so the weights alone
// need ~13 GB of VRAM unless idle experts stay in host memory. KV per position, all 24 layers full:
// 24 x 8 KV heads x 64 x 2 (K, V) x 2 bytes (fp16) = 48 KiB (this CPU engine keeps
// float32: 96 KiB); the 12 sliding layers need only their 128-position window, so
// a long context costs ~24 KiB per position (12 full layers) plus 12 x 128 x 2 KiB
// = 3 MiB: 131072 positions ~3 GiB of fp16 KV on top of the weights.
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
    Silu,       // x / (1 + exp(-x))
    GeluTanh,   // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    SwigluOai,  // gpt-oss, gate and up together: g = min(gate, limit), u = clamp(up, -limit, limit),
                // g * sigmoid(alpha g) * (u + 1) (ModelDesc::swiglu_alpha / swiglu_limit)
};

// Context-extension RoPE scaling the engines implement (others are refused by name).
enum class RopeScaling {
    None,
    Yarn,  // YaRN as llama.cpp (ggml_rope_yarn_corr_dims, rope_yarn): per-dimension frequencies
           // blended between base^(-2i/d) / factor and base^(-2i/d), cos/sin times yarn_mscale
};

// One 3-D expert tensor, ne = [n_in, n_out, n_expert] (llama.cpp's ffn_*_exps): expert e's
// matrix is n_out rows of n_in elements at byte offset offset(e) of the tensor's data, so an
// engine multiplies by one expert without copying; its bias row is bias[e * n_out ...].
struct ExpertTensor {
    const TensorInfo* w = nullptr;  // [n_in, n_out, n_expert], any matmul type (MXFP4 in the real files)
    const TensorInfo* b = nullptr;  // [n_out, n_expert] F32 bias, or null
    int64_t n_in = 0, n_out = 0;
    size_t expert_bytes = 0;        // bytes of one expert's matrix: n_out rows
    size_t offset(int e) const { return size_t(e) * expert_bytes; }
};

const char* rope_style_name(RopeStyle s);
const char* activation_name(Activation a);
const char* rope_scaling_name(RopeScaling s);

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
    const TensorInfo* bo = nullptr;         // [n_embd] F32 bias of wo (gpt-oss), or null
    const TensorInfo* attn_sinks = nullptr; // [n_head] F32 (gpt-oss): a learned logit per head that joins
                                            // each softmax's denominator (no value), or null
    const TensorInfo* post_attn_norm = nullptr;  // [n_embd] RMSNorm of the attention output (gemma3), or null
    const TensorInfo* ffn_norm = nullptr;   // [n_embd] F32: RMSNorm weight before the FFN (gpt-oss's
                                            // 'post_attention_norm.weight' is this norm, not gemma3's)
    // gate/up: two matrices, or one fused w_gate_up (rows gate | up) with w_gate/w_up null.
    const TensorInfo* w_gate = nullptr;     // [n_embd, n_ff]
    const TensorInfo* w_up = nullptr;       // [n_embd, n_ff]
    const TensorInfo* w_gate_up = nullptr;  // [n_embd, 2*n_ff] (phi3)
    const TensorInfo* w_down = nullptr;     // [n_ff, n_embd]
    const TensorInfo* post_ffn_norm = nullptr;   // [n_embd] RMSNorm of the FFN output (gemma3), or null
    // Mixture of experts (gpt-oss; null / empty otherwise): the router picks n_expert_used
    // experts per token by the largest logits of router x + router_b, weighs them by the softmax
    // of those logits, and the FFN is sum_k w_k (down_k(act(gate_k x, up_k x)) + b_down_k).
    const TensorInfo* router = nullptr;     // [n_embd, n_expert] (ffn_gate_inp.weight)
    const TensorInfo* router_b = nullptr;   // [n_expert] F32, or null
    ExpertTensor gate_exps, up_exps;        // n_embd -> n_ff_exp per expert, with biases
    ExpertTensor down_exps;                 // n_ff_exp -> n_embd per expert
    float rope_base = 10000.f;  // this layer's RoPE base (gemma3: local layers differ from global ones)
    int sliding_window = 0;     // > 0: a query at p sees keys (p - window, p] only; 0: every earlier key
};

struct ModelDesc {
    std::string arch;        // general.architecture ("qwen2", "llama", "phi3", "gemma3", "gpt-oss")
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
    bool attn_out_bias = false;  // every layer has bo
    bool attn_sinks = false;     // every layer has attn_sinks
    // RoPE scaling (gpt-oss: YaRN; rope.scaling.* keys)
    RopeScaling rope_scaling = RopeScaling::None;
    float rope_factor = 1.f;     // rope.scaling.factor: the context extension (32 for gpt-oss)
    int rope_n_ctx_orig = 0;     // rope.scaling.original_context_length (4096 for gpt-oss)
    float yarn_beta_fast = 32.f, yarn_beta_slow = 1.f;  // the ramp's corners (llama.cpp's defaults)
    float yarn_mscale = 1.f;     // cos/sin factor: attn_factor * (1 + 0.1 ln factor)
    // mixture of experts (gpt-oss); n_expert == 0: the dense FFN of the other families
    int n_expert = 0;            // {arch}.expert_count
    int n_expert_used = 0;       // {arch}.expert_used_count (top-k)
    int n_ff_exp = 0;            // {arch}.expert_feed_forward_length
    float swiglu_alpha = 1.702f, swiglu_limit = 7.f;  // Activation::SwigluOai (llama.cpp's constants)

    float score_scale() const;   // attn_scale, or 1/sqrt(head_dim) when 0
};

// Reads and validates the description; throws orcd::Error naming the file and
// the missing/misshapen tensor or metadata key, or the unsupported architecture.
ModelDesc describe_model(const GGUFFile& f);

}  // namespace orcd
