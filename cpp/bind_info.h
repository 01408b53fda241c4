// bind_info.h - the model description as a Python dict, shared by the CPU
// (cpp/bindings.cpp) and CUDA (cuda/bindings_cuda.cpp) engine bindings so
// both report the same keys.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "engine.h"

namespace orcd {

inline nanobind::dict engine_info_dict(const Engine& e, const char* backend) {
    const ModelDesc& d = e.desc();
    nanobind::dict r;
    r["backend"] = backend;
    r["arch"] = d.arch;
    r["name"] = d.name;
    r["n_layer"] = d.n_layer;
    r["n_embd"] = d.n_embd;
    r["n_ff"] = d.n_ff;
    r["n_head"] = d.n_head;
    r["n_head_kv"] = d.n_head_kv;
    r["head_dim"] = d.head_dim;
    r["n_ctx_train"] = d.n_ctx_train;
    r["n_vocab"] = d.n_vocab;
    r["rope_base"] = d.rope_base;
    r["rms_eps"] = d.rms_eps;
    r["tied_output"] = d.tied_output;
    r["rope_style"] = rope_style_name(d.rope_style);
    r["activation"] = activation_name(d.activation);
    r["qkv_bias"] = d.qkv_bias;
    r["fused_qkv"] = d.fused_qkv;
    r["fused_gate_up"] = d.fused_gate_up;
    r["qk_norm"] = d.qk_norm;
    r["post_norms"] = d.post_norms;
    r["embd_scale"] = d.embd_scale;
    r["attn_scale"] = d.score_scale();
    r["logit_softcap"] = d.logit_softcap;
    r["attn_out_bias"] = d.attn_out_bias;
    r["attn_sinks"] = d.attn_sinks;
    r["rope_scaling"] = rope_scaling_name(d.rope_scaling);
    r["rope_factor"] = d.rope_factor;
    r["rope_n_ctx_orig"] = d.rope_n_ctx_orig;
    r["yarn_mscale"] = d.yarn_mscale;
    r["n_expert"] = d.n_expert;
    r["n_expert_used"] = d.n_expert_used;
    r["n_ff_exp"] = d.n_ff_exp;
    nanobind::list windows, bases;
    for (const LayerDesc& L : d.layers) {
        windows.append(L.sliding_window);
        bases.append(L.rope_base);
    }
    r["sliding_window"] = windows;  // per layer, 0 = full attention
    r["layer_rope_base"] = bases;
    r["n_ctx"] = e.n_ctx();
    r["n_slots"] = e.n_slots();
    const KvPoolStats kv = e.kv_stats();
    r["kv_pool_positions"] = kv.capacity;
    r["kv_pool_reserved"] = kv.reserved;
    r["kv_pool_largest_free"] = kv.largest_free;
    r["kv_pool_unit"] = kv.unit;
    return r;
}

}  // namespace orcd
