// families.cpp - one small function per model family: which tensors a layer
// has and how the ops run (the ModelDesc family fields).
//
// Sources for each family's shape: the published HF transformers model
// definitions and the tensor names / metadata keys llama.cpp's converter
// writes (gguf-py's constants).
#include <cmath>
#include <vector>

#include "../error.h"
#include "family.h"

namespace orcd {
namespace family {

const char* supported_architectures() { return "qwen2, llama, phi3, gemma3"; }

namespace {
std::string blk(int l) { return "blk." + std::to_string(l) + "."; }
}  // namespace

void common_layer(const Checker& c, const ModelDesc& d, int l, LayerDesc& L) {
    const std::string p = blk(l);
    const int q_dim = d.n_head * d.head_dim, kv_dim = d.n_head_kv * d.head_dim;
    L.attn_norm = c.tensor(p + "attn_norm.weight", d.n_embd, 0, true);
    if (!d.fused_qkv) {
        L.wq = c.tensor(p + "attn_q.weight", d.n_embd, q_dim);
        L.wk = c.tensor(p + "attn_k.weight", d.n_embd, kv_dim);
        L.wv = c.tensor(p + "attn_v.weight", d.n_embd, kv_dim);
    }
    L.wo = c.tensor(p + "attn_output.weight", q_dim, d.n_embd);
    L.ffn_norm = c.tensor(p + "ffn_norm.weight", d.n_embd, 0, true);
    if (!d.fused_gate_up) {
        L.w_gate = c.tensor(p + "ffn_gate.weight", d.n_embd, d.n_ff);
        L.w_up = c.tensor(p + "ffn_up.weight", d.n_embd, d.n_ff);
    }
    L.w_down = c.tensor(p + "ffn_down.weight", d.n_ff, d.n_embd);
    L.rope_base = d.rope_base;
}

// Qwen2: Q/K/V biases, NEOX RoPE, SiLU.
void describe_qwen2(const Checker& c, ModelDesc& d) {
    d.qkv_bias = true;
    const int q_dim = d.n_head * d.head_dim, kv_dim = d.n_head_kv * d.head_dim;
    for (int l = 0; l < d.n_layer; ++l) {
        LayerDesc& L = d.layers[l];
        common_layer(c, d, l, L);
        const std::string p = blk(l);
        L.bq = c.tensor(p + "attn_q.bias", q_dim, 0, true);
        L.bk = c.tensor(p + "attn_k.bias", kv_dim, 0, true);
        L.bv = c.tensor(p + "attn_v.bias", kv_dim, 0, true);
    }
}

// Llama (and SmolLM2): no biases; llama.cpp's converter permutes the Q/K rows of
// each head so the "normal" pairing (x[2i], x[2i+1]) equals HF's rotate_half.
void describe_llama(const Checker& c, ModelDesc& d) {
    d.rope_style = RopeStyle::Normal;
    d.qkv_bias = false;
    c.refuse_key(d.arch + ".rope.scaling.type", "RoPE scaling (Llama 3.1 style rope_freqs / linear / yarn)");
    if (c.f.find_tensor("rope_freqs.weight"))
        throw Error(c.f.path() + ": llama: tensor 'rope_freqs.weight' (Llama 3.1 RoPE frequency factors) "
                    "is not supported yet");
    if (c.f.find_tensor("blk.0.ffn_gate_inp.weight"))
        throw Error(c.f.path() + ": llama: mixture-of-experts layers (tensor 'blk.0.ffn_gate_inp.weight') "
                    "are not supported");
    for (int l = 0; l < d.n_layer; ++l) common_layer(c, d, l, d.layers[l]);
}

// Phi-3: one fused q|k|v matrix, ffn_up holding gate|up, NEOX RoPE, no biases.
void describe_phi3(const Checker& c, ModelDesc& d) {
    d.fused_qkv = true;
    d.fused_gate_up = true;
    d.qkv_bias = false;
    for (const char* t : {"rope_factors_long.weight", "rope_factors_short.weight"})
        if (c.f.find_tensor(t))
            throw Error(c.f.path() + ": phi3: LongRoPE (tensor '" + t +
                        "', the 128k-context Phi-3 variants) is not supported yet");
    c.refuse_key(d.arch + ".rope.scaling.attn_factor", "LongRoPE attention factor (the 128k-context variants)");
    if (const Value* v = c.f.find(d.arch + ".rope.scaling.type"); v && v->type == VT::STRING &&
                                                                  std::string(v->str) != "none")
        throw Error(c.f.path() + ": phi3: metadata '" + d.arch + ".rope.scaling.type' = '" + std::string(v->str) +
                    "' is not supported (only none)");
    int window = 0;
    if (c.f.find(d.arch + ".attention.sliding_window"))
        window = c.hparam(d.arch + ".attention.sliding_window", 0, 1 << 24);
    d.sliding_window = window > 0;
    const int qkv = (d.n_head + 2 * d.n_head_kv) * d.head_dim;
    for (int l = 0; l < d.n_layer; ++l) {
        LayerDesc& L = d.layers[l];
        common_layer(c, d, l, L);
        const std::string p = blk(l);
        L.wqkv = c.tensor(p + "attn_qkv.weight", d.n_embd, qkv);
        L.w_gate_up = c.tensor(p + "ffn_up.weight", d.n_embd, 2 * d.n_ff);
        L.sliding_window = window;
    }
}

// Gemma 3: embedding x sqrt(n_embd); per-head Q/K RMSNorm; post-attention and
// post-FFN norms; GELU(tanh) gate; sliding-window layers with their own RoPE
// base, every sliding_window_pattern-th layer global. The converter stores the
// norm weights as 1 + w (HF Gemma3RMSNorm multiplies by 1 + w), so the plain
// x * w of every family applies.
void describe_gemma3(const Checker& c, ModelDesc& d) {
    d.activation = Activation::GeluTanh;
    d.qkv_bias = false;
    d.qk_norm = true;
    d.post_norms = true;
    d.embd_scale = std::sqrt((float)d.n_embd);
    const std::string a = d.arch + ".";
    c.refuse_key(a + "rope.scaling.type", "RoPE scaling (the 4B+ Gemma 3 models' linear factor)");
    // HF: query_pre_attn_scalar (= head_dim for the small models); llama.cpp's graph uses
    // 1/sqrt(head_dim) for them.
    const float qpas = c.fparam(a + "attention.query_pre_attn_scalar", (float)d.head_dim);
    d.attn_scale = 1.0f / std::sqrt(qpas);
    d.logit_softcap = c.fparam(a + "final_logit_softcapping", 0.f, false);
    if (d.logit_softcap < 0) throw Error(c.f.path() + ": '" + a + "final_logit_softcapping' must be >= 0");
    if (c.f.find(a + "attn_logit_softcapping"))
        throw Error(c.f.path() + ": gemma3: metadata '" + a + "attn_logit_softcapping' (attention soft-capping) "
                    "is not supported");
    const int window = c.f.find(a + "attention.sliding_window") ? c.hparam(a + "attention.sliding_window", 1, 1 << 24)
                                                                 : 0;
    // attention.sliding_window_pattern: an integer n (every n-th layer, l % n == n - 1, is
    // global: HF's sliding_window_pattern, 6 when absent as llama.cpp assumes for gemma3) or
    // one bool per layer (true: sliding). Global layers attend to everything with the file's
    // RoPE base; local ones use the window and rope.freq_base_swa (10000 when absent).
    std::vector<bool> local(d.n_layer);
    const std::string pk = a + "attention.sliding_window_pattern";
    const Value* pv = c.f.find(pk);
    if (pv && pv->type == VT::ARRAY) {
        if (pv->elem != VT::BOOL || pv->count != (uint64_t)d.n_layer)
            throw Error(c.f.path() + ": metadata '" + pk + "' must be an integer or " + std::to_string(d.n_layer) +
                        " bools (one per layer), got an array of " + std::to_string(pv->count) + " " +
                        vt_name(pv->elem));
        for (int l = 0; l < d.n_layer; ++l) local[l] = pv->raw[l] != 0;
    } else {
        const int pattern = pv ? c.hparam(pk, 1, 1 << 16) : 6;
        for (int l = 0; l < d.n_layer; ++l) local[l] = l % pattern != pattern - 1;
    }
    const float local_base = c.fparam(a + "rope.freq_base_swa", 10000.f);
    for (int l = 0; l < d.n_layer; ++l) {
        LayerDesc& L = d.layers[l];
        common_layer(c, d, l, L);
        const std::string p = blk(l);
        L.q_norm = c.tensor(p + "attn_q_norm.weight", d.head_dim, 0, true);
        L.k_norm = c.tensor(p + "attn_k_norm.weight", d.head_dim, 0, true);
        L.post_attn_norm = c.tensor(p + "post_attention_norm.weight", d.n_embd, 0, true);
        L.post_ffn_norm = c.tensor(p + "post_ffw_norm.weight", d.n_embd, 0, true);
        const bool global = window == 0 || !local[l];
        L.sliding_window = global ? 0 : window;
        L.rope_base = global ? d.rope_base : local_base;
        if (L.sliding_window) d.sliding_window = true;
    }
}

}  // namespace family
}  // namespace orcd
