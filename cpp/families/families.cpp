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

const char* supported_architectures() { return "qwen2, llama, phi3, gemma3, gpt-oss"; }

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

namespace {
// One expert tensor (3-D) and its bias (2-D, one row per expert), both checked.
ExpertTensor experts(const Checker& c, const std::string& name, int64_t n_in, int64_t n_out, int n_expert) {
    ExpertTensor x;
    x.w = c.tensor3(name + ".weight", n_in, n_out, n_expert);
    x.b = c.tensor(name + ".bias", n_out, n_expert, true);
    x.n_in = n_in;
    x.n_out = n_out;
    x.expert_bytes = size_t(n_out) * x.w->row_bytes();
    return x;
}

// YaRN RoPE scaling of gpt-oss (rope.scaling.*), as llama.cpp reads it: the type must be
// yarn (or none); factor, original_context_length (default: context_length), the ramp's
// yarn_beta_fast / yarn_beta_slow (32 / 1) and attn_factor (1) come from the file.
void gptoss_rope_scaling(const Checker& c, ModelDesc& d) {
    const std::string k = d.arch + ".rope.scaling.";
    const Value* tv = c.f.find(k + "type");
    const std::string type = tv ? tv->as_string(k + "type") : "none";
    if (type == "none") return;
    if (type != "yarn")
        throw Error(c.f.path() + ": gpt-oss: metadata '" + k + "type' = '" + type +
                    "' is not supported (orcd implements 'yarn' and 'none' for gpt-oss)");
    for (const char* key : {"yarn_log_multiplier", "yarn_ext_factor", "yarn_attn_factor"})
        c.refuse_key(k + key, std::string("YaRN parameter '") + key + "'");
    d.rope_scaling = RopeScaling::Yarn;
    if (!c.f.find(k + "factor")) throw Error(c.f.path() + ": gpt-oss: YaRN needs metadata '" + k + "factor'");
    d.rope_factor = c.fparam(k + "factor", 1.f);
    if (d.rope_factor < 1.f)
        throw Error(c.f.path() + ": metadata '" + k + "factor' = " + std::to_string(d.rope_factor) +
                    " must be >= 1 (YaRN extends the context)");
    d.rope_n_ctx_orig = c.f.find(k + "original_context_length")
                            ? c.hparam(k + "original_context_length", 1, 1 << 24)
                            : d.n_ctx_train;
    d.yarn_beta_fast = c.fparam(k + "yarn_beta_fast", 32.f);
    d.yarn_beta_slow = c.fparam(k + "yarn_beta_slow", 1.f);
    // ggml's rope_yarn multiplies cos and sin by attn_factor * (1 + 0.1 ln(1/freq_scale)),
    // freq_scale = 1/factor (HF: attention_scaling = 0.1 ln(factor) + 1, the same number).
    d.yarn_mscale = c.fparam(k + "attn_factor", 1.f) * (1.f + 0.1f * std::log(d.rope_factor));
}
}  // namespace

// GPT-OSS (llama.cpp's LLM_ARCH_OPENAI_MOE, HF GptOssForCausalLM): biases on Q/K/V and the
// output projection, a learned sink logit per head in every softmax, NEOX RoPE with YaRN,
// sliding-window attention on every other layer (layer l is local when
// l % pattern < pattern - 1; pattern 2 when the file has no attention.sliding_window_pattern:
// layers 0, 2, 4, ... as llama.cpp's set_swa_pattern(2) and HF's layer_types), and a
// mixture-of-experts FFN behind 'post_attention_norm' (the pre-FFN norm): router with bias,
// top-k by logit, softmax over the k picked, experts with biases and swiglu_oai.
void describe_gptoss(const Checker& c, ModelDesc& d) {
    const std::string a = d.arch + ".";
    d.qkv_bias = true;
    d.attn_out_bias = true;
    d.attn_sinks = true;
    d.activation = Activation::SwigluOai;
    gptoss_rope_scaling(c, d);
    d.n_expert = c.hparam(a + "expert_count", 1, 1 << 12);
    d.n_expert_used = c.hparam(a + "expert_used_count", 1, d.n_expert);
    d.n_ff_exp = c.hparam(a + "expert_feed_forward_length", 1, 1 << 18);
    const int window = c.hparam(a + "attention.sliding_window", 1, 1 << 24);
    const int pattern = c.f.find(a + "attention.sliding_window_pattern")
                            ? c.hparam(a + "attention.sliding_window_pattern", 1, 1 << 16)
                            : 2;
    const float local_base = c.fparam(a + "rope.freq_base_swa", d.rope_base);
    if (c.f.find_tensor("blk.0.ffn_gate_up_exps.weight"))
        throw Error(c.f.path() + ": gpt-oss: fused experts (tensor 'blk.0.ffn_gate_up_exps.weight') are not "
                    "supported yet; convert with separate ffn_gate_exps / ffn_up_exps");
    const int q_dim = d.n_head * d.head_dim, kv_dim = d.n_head_kv * d.head_dim;
    const int E = d.n_embd, F = d.n_ff_exp, X = d.n_expert;
    for (int l = 0; l < d.n_layer; ++l) {
        LayerDesc& L = d.layers[l];
        const std::string p = blk(l);
        L.attn_norm = c.tensor(p + "attn_norm.weight", E, 0, true);
        L.wq = c.tensor(p + "attn_q.weight", E, q_dim);
        L.wk = c.tensor(p + "attn_k.weight", E, kv_dim);
        L.wv = c.tensor(p + "attn_v.weight", E, kv_dim);
        L.bq = c.tensor(p + "attn_q.bias", q_dim, 0, true);
        L.bk = c.tensor(p + "attn_k.bias", kv_dim, 0, true);
        L.bv = c.tensor(p + "attn_v.bias", kv_dim, 0, true);
        L.wo = c.tensor(p + "attn_output.weight", q_dim, E);
        L.bo = c.tensor(p + "attn_output.bias", E, 0, true);
        L.attn_sinks = c.tensor(p + "attn_sinks.weight", d.n_head, 0, true);
        L.ffn_norm = c.tensor(p + "post_attention_norm.weight", E, 0, true);
        L.router = c.tensor(p + "ffn_gate_inp.weight", E, X);
        L.router_b = c.tensor(p + "ffn_gate_inp.bias", X, 0, true);
        L.gate_exps = experts(c, p + "ffn_gate_exps", E, F, X);
        L.up_exps = experts(c, p + "ffn_up_exps", E, F, X);
        L.down_exps = experts(c, p + "ffn_down_exps", F, E, X);
        const bool local = l % pattern < pattern - 1;
        L.sliding_window = local ? window : 0;
        L.rope_base = local ? local_base : d.rope_base;
        if (local) d.sliding_window = true;
    }
}

}  // namespace family
}  // namespace orcd
