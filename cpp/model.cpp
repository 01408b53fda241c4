// model.cpp - describe_model(): from GGUF metadata and tensors to a ModelDesc.
//
// Every tensor the forward pass touches is checked here for presence, shape
// (in ne order) and a type the kernels support, so the engines never meet a
// surprise mid-generation. The hyperparameters are checked against each other
// and against the tensors; where the file states the per-head size a second
// time (attention.key_length / value_length, rope.dimension_count) it must
// agree with embedding_length / head_count. A head_count edit that keeps
// n_head x head_dim (7 x 128 instead of 14 x 64) leaves every shape intact and
// is only caught when one of those keys is present.
// The vocabulary: tokenizer.ggml.tokens may list fewer tokens than
// token_embd has rows (Qwen pads the embedding), never more, and every
// special token id the tokenizer names must have a row.

#include "model.h"

#include <cmath>

#include "error.h"
#include "families/family.h"
#include "quants.h"

namespace orcd {

namespace {

// The token list and special token ids against the embedding's n_rows rows.
void check_vocabulary(const GGUFFile& f, int64_t n_rows) {
    int64_t n_tokens = n_rows;
    if (const Value* t = f.find("tokenizer.ggml.tokens")) {
        if (t->type != VT::ARRAY || t->elem != VT::STRING)
            throw Error(f.path() + ": metadata 'tokenizer.ggml.tokens' is " + vt_name(t->type) +
                        (t->type == VT::ARRAY ? std::string(" of ") + vt_name(t->elem) : std::string()) +
                        ", expected an array of strings");
        if ((int64_t)t->count > n_rows)
            throw Error(f.path() + ": metadata 'tokenizer.ggml.tokens' lists " + std::to_string(t->count) +
                        " tokens but tensor 'token_embd.weight' has only " + std::to_string(n_rows) +
                        " rows: token ids from " + std::to_string(n_rows) + " on could not be embedded");
        n_tokens = (int64_t)t->count;
    }
    const std::string prefix = "tokenizer.ggml.", suffix = "_token_id";
    for (const auto& [key, v] : f.metadata()) {
        if (key.size() <= prefix.size() + suffix.size() || key.compare(0, prefix.size(), prefix) != 0 ||
            key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0)
            continue;
        const int64_t id = v.as_int(key);
        if (id >= n_tokens)
            throw Error(f.path() + ": metadata '" + key + "' = " + std::to_string(id) + " is not a token id: " +
                        (n_tokens < n_rows ? "'tokenizer.ggml.tokens' lists " + std::to_string(n_tokens) + " tokens"
                                           : "'token_embd.weight' has " + std::to_string(n_rows) + " rows"));
    }
}

}  // namespace

namespace family {

int Checker::hparam(const std::string& key, int64_t lo, int64_t hi) const {
    int64_t v = f.get(key).as_int(key);
    if (v < lo || v > hi)
        throw Error(f.path() + ": metadata '" + key + "' = " + std::to_string(v) + " is out of range [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return (int)v;
}

float Checker::fparam(const std::string& key, float dflt, bool positive) const {
    const Value* v = f.find(key);
    if (!v) return dflt;
    const float x = (float)v->as_float(key);
    if (!std::isfinite(x) || (positive && !(x > 0)))
        throw Error(f.path() + ": metadata '" + key + "' = " + std::to_string(x) + " must be " +
                    (positive ? "positive" : "finite"));
    return x;
}

const TensorInfo* Checker::tensor(const std::string& name, int64_t ne0, int64_t ne1, bool want_f32) const {
    const TensorInfo* t = f.find_tensor(name);
    if (!t) throw Error(f.path() + ": missing tensor '" + name + "'");
    bool ok = ne1 == 0 ? (t->n_dims == 1 && t->ne[0] == ne0)
                       : (t->n_dims == 2 && t->ne[0] == ne0 && t->ne[1] == ne1);
    if (!ok) {
        std::string want = ne1 == 0 ? "[" + std::to_string(ne0) + "]"
                                    : "[" + std::to_string(ne0) + ", " + std::to_string(ne1) + "]";
        throw Error(f.path() + ": tensor '" + name + "' has shape " + t->shape_str() + ", expected " + want);
    }
    if (want_f32 && t->type != T_F32 && t->type != T_F16 && t->type != T_BF16)
        throw Error(f.path() + ": tensor '" + name + "' has type " + type_name(t->type) +
                    ", expected F32 (norm weights and biases are kept in float)");
    if (!can_dequantize(t->type))
        throw Error(f.path() + ": tensor '" + name + "' has type " + type_name(t->type) +
                    ", which orcd cannot compute with yet");
    return t;
}

const TensorInfo* Checker::tensor3(const std::string& name, int64_t ne0, int64_t ne1, int64_t ne2) const {
    const TensorInfo* t = f.find_tensor(name);
    if (!t) throw Error(f.path() + ": missing tensor '" + name + "'");
    if (t->n_dims != 3 || t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != ne2)
        throw Error(f.path() + ": tensor '" + name + "' has shape " + t->shape_str() + ", expected [" +
                    std::to_string(ne0) + ", " + std::to_string(ne1) + ", " + std::to_string(ne2) + "]");
    if (!can_dequantize(t->type))
        throw Error(f.path() + ": tensor '" + name + "' has type " + type_name(t->type) +
                    ", which orcd cannot compute with yet");
    return t;
}

const TensorInfo* Checker::optional(const std::string& name, int64_t ne0, int64_t ne1, bool want_f32) const {
    return f.find_tensor(name) ? tensor(name, ne0, ne1, want_f32) : nullptr;
}

void Checker::refuse_key(const std::string& key, const std::string& why) const {
    const Value* v = f.find(key);
    if (!v) return;
    if (v->type == VT::STRING && (std::string(v->str) == "none" || std::string(v->str).empty())) return;
    throw Error(f.path() + ": metadata '" + key + "': " + why + " is not supported yet");
}

}  // namespace family

const char* rope_style_name(RopeStyle s) { return s == RopeStyle::Neox ? "neox" : "normal"; }
const char* activation_name(Activation a) {
    switch (a) {
        case Activation::Silu: return "silu";
        case Activation::GeluTanh: return "gelu_tanh";
        case Activation::SwigluOai: return "swiglu_oai";
    }
    return "?";
}
const char* rope_scaling_name(RopeScaling s) { return s == RopeScaling::Yarn ? "yarn" : "none"; }

float ModelDesc::score_scale() const { return attn_scale > 0 ? attn_scale : 1.0f / std::sqrt((float)head_dim); }

ModelDesc describe_model(const GGUFFile& f) {
    ModelDesc d;
    d.arch = f.get("general.architecture").as_string("general.architecture");
    void (*describe_family)(const family::Checker&, ModelDesc&) = nullptr;
    if (d.arch == "qwen2") describe_family = family::describe_qwen2;
    else if (d.arch == "llama") describe_family = family::describe_llama;
    else if (d.arch == "phi3") describe_family = family::describe_phi3;
    else if (d.arch == "gemma3") describe_family = family::describe_gemma3;
    else if (d.arch == "gpt-oss") describe_family = family::describe_gptoss;
    else
        throw Error(f.path() + ": unsupported architecture '" + d.arch + "' (orcd supports: " +
                    family::supported_architectures() + ")");
    if (const Value* n = f.find("general.name"); n && n->type == VT::STRING) d.name = std::string(n->str);

    family::Checker c{f};
    const std::string a = d.arch + ".";
    d.n_layer = c.hparam(a + "block_count", 1, 1024);
    d.n_embd = c.hparam(a + "embedding_length", 1, 1 << 16);
    d.n_ff = c.hparam(a + "feed_forward_length", 1, 1 << 18);
    d.n_head = c.hparam(a + "attention.head_count", 1, 1024);
    d.n_head_kv = f.find(a + "attention.head_count_kv") ? c.hparam(a + "attention.head_count_kv", 1, d.n_head)
                                                         : d.n_head;
    d.n_ctx_train = f.find(a + "context_length") ? c.hparam(a + "context_length", 1, 1 << 24) : 4096;
    if (d.n_head % d.n_head_kv != 0)
        throw Error(f.path() + ": head_count " + std::to_string(d.n_head) + " is not a multiple of head_count_kv " +
                    std::to_string(d.n_head_kv));
    // Gemma 3 and gpt-oss state their head size (key_length) apart from n_embd / n_head
    // (gemma3-270m: 640 / 4 vs 256; gpt-oss-20b: 2880 / 64 vs 64); for the other families
    // the keys, when present, must agree with n_embd / n_head.
    const bool free_head_dim = d.arch == "gemma3" || d.arch == "gpt-oss";
    if (free_head_dim && f.find(a + "attention.key_length")) {
        d.head_dim = c.hparam(a + "attention.key_length", 2, 1024);
    } else {
        if (d.n_embd % d.n_head != 0)
            throw Error(f.path() + ": embedding_length " + std::to_string(d.n_embd) +
                        " is not divisible by head_count " + std::to_string(d.n_head));
        d.head_dim = d.n_embd / d.n_head;
    }
    if (d.head_dim % 2 != 0)
        throw Error(f.path() + ": head dimension " + std::to_string(d.head_dim) + " is odd; RoPE needs pairs");
    for (const char* k : {"attention.key_length", "attention.value_length", "rope.dimension_count"}) {
        const std::string key = a + k;
        if (!f.find(key)) continue;
        const int64_t v = f.get(key).as_int(key);
        if (v != d.head_dim)
            throw Error(f.path() + ": metadata '" + key + "' = " + std::to_string(v) +
                        " disagrees with the head dimension " +
                        (free_head_dim ? "attention.key_length = " + std::to_string(d.head_dim)
                                       : "embedding_length / head_count = " + std::to_string(d.n_embd) + " / " +
                                             std::to_string(d.n_head) + " = " + std::to_string(d.head_dim)) +
                        " (orcd uses full-width heads and RoPE)");
    }
    // Context-extension RoPE scaling (linear, yarn, ...) changes every angle: refuse it
    // rather than run the model at the wrong positions; "none" (or no key) is plain RoPE.
    // gpt-oss reads its YaRN keys itself (describe_gptoss) and refuses other types there.
    const bool family_rope_scaling = d.arch == "gpt-oss";
    if (const Value* v = family_rope_scaling ? nullptr : f.find(a + "rope.scaling.type")) {
        const std::string st = v->as_string(a + "rope.scaling.type");
        if (st != "none")
            throw Error(f.path() + ": metadata '" + a + "rope.scaling.type' = '" + st +
                        "' is not supported (orcd implements plain RoPE only: 'none' or no key)");
    }
    if (const Value* v = f.find(a + "rope.scale_linear")) {
        const double sl = v->as_float(a + "rope.scale_linear");
        if (sl != 1.0)
            throw Error(f.path() + ": metadata '" + a + "rope.scale_linear' = " + std::to_string(sl) +
                        " is not supported (orcd implements plain RoPE only: 1 or no key)");
    }
    d.rope_base = c.fparam(a + "rope.freq_base", 10000.f);
    d.rms_eps = c.fparam(a + "attention.layer_norm_rms_epsilon", 1e-6f);

    const TensorInfo* emb = f.find_tensor("token_embd.weight");
    if (!emb) throw Error(f.path() + ": missing tensor 'token_embd.weight'");
    if (emb->n_dims != 2 || emb->ne[0] != d.n_embd)
        throw Error(f.path() + ": tensor 'token_embd.weight' has shape " + emb->shape_str() + ", expected [" +
                    std::to_string(d.n_embd) + ", n_vocab]");
    if (emb->ne[1] > (1 << 24)) throw Error(f.path() + ": vocabulary of " + std::to_string(emb->ne[1]) + " rows is too large");
    d.n_vocab = (int)emb->ne[1];
    d.tok_embd = c.tensor("token_embd.weight", d.n_embd, d.n_vocab);
    d.output_norm = c.tensor("output_norm.weight", d.n_embd, 0, true);
    if (f.find_tensor("output.weight")) {
        d.output = c.tensor("output.weight", d.n_embd, d.n_vocab);
    } else {
        d.output = d.tok_embd;
        d.tied_output = true;
    }

    check_vocabulary(f, d.n_vocab);

    d.layers.resize(d.n_layer);
    describe_family(c, d);
    return d;
}

}  // namespace orcd
