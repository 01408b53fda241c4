// family.h - what the per-family describers (cpp/families/*.cpp) share: the
// checked readers of metadata and tensors, and the one entry point per family.
//
// describe_model (cpp/model.cpp) reads what every family has (sizes, heads,
// RoPE base, epsilon, embedding, output) and then calls the family's function,
// which fills the family fields of ModelDesc and every layer's tensors.
#pragma once
#include <cstdint>
#include <string>

#include "../model.h"

namespace orcd {
namespace family {

struct Checker {
    const GGUFFile& f;

    // An integer key in [lo, hi]; throws naming the key.
    int hparam(const std::string& key, int64_t lo, int64_t hi) const;
    // A float key when present, else dflt; must be finite and > 0 when positive is set.
    float fparam(const std::string& key, float dflt, bool positive = true) const;
    // A tensor with exactly the given ne (ne1 == 0: 1-D) and a type we can compute with;
    // want_f32: a norm weight or bias (F32/F16/BF16).
    const TensorInfo* tensor(const std::string& name, int64_t ne0, int64_t ne1, bool want_f32 = false) const;
    // A 3-D tensor (experts) with exactly the given ne and a type we can compute with.
    const TensorInfo* tensor3(const std::string& name, int64_t ne0, int64_t ne1, int64_t ne2) const;
    // The tensor when the file has it (checked as tensor()), else null.
    const TensorInfo* optional(const std::string& name, int64_t ne0, int64_t ne1, bool want_f32 = false) const;
    // Throws "<path>: <arch> ... <what>" when the file has metadata key `key`.
    void refuse_key(const std::string& key, const std::string& why) const;
};

// Each reads d.arch's tensors; d already holds the common hyperparameters.
void describe_qwen2(const Checker& c, ModelDesc& d);
void describe_llama(const Checker& c, ModelDesc& d);
void describe_phi3(const Checker& c, ModelDesc& d);
void describe_gemma3(const Checker& c, ModelDesc& d);
void describe_gptoss(const Checker& c, ModelDesc& d);

// "qwen2, llama, phi3, gemma3, gpt-oss": for error messages.
const char* supported_architectures();

// The tensors every family names the same way: attn_norm, attn_output, ffn_norm, ffn_down,
// and (unless fused) attn_q/k/v and ffn_gate/up.
void common_layer(const Checker& c, const ModelDesc& d, int l, LayerDesc& L);

}  // namespace family
}  // namespace orcd
