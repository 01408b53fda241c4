// engine_weights.cu - DeviceWeights: check, lay out and upload the model's tensors.
#include <vector>

#include "cuda_common.cuh"
#include "engine_weights.cuh"
#include "kernels.cuh"
#include "quants.h"

namespace orcd {
namespace {

constexpr size_t kAlign = 256;  // every tensor starts 256-aligned (the decode kernels' 16-byte widened copies stay inside)

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Rows [r0, r0 + n) of w (a fused tensor's part): rows are whole blocks, so the view starts
// r0 rows in; its name says which part.
DevWeight row_slice(const DevWeight& w, int r0, int n, const char* part) {
    DevWeight s = w;
    s.data = w.data + size_t(r0) * w.row_bytes;
    s.n_out = n;
    s.name = w.name + " (" + part + " rows)";
    return s;
}

}  // namespace

void DeviceWeights::plan(const ModelDesc& d, const std::string& where) {
    ups_.clear();
    const int64_t E = d.n_embd, QD = int64_t(d.n_head) * d.head_dim, KD = int64_t(d.n_head_kv) * d.head_dim;
    const int64_t F = d.n_ff, V = d.n_vocab;
    auto add_mat = [&](const TensorInfo* t, int64_t n_in, int64_t n_out) {
        if (!t) throw Error(where + ": missing weight tensor");
        if (t->ne[0] != n_in || t->n_rows() != n_out)
            throw Error(where + ": tensor '" + t->name + "' " + t->shape_str() + " is not [" + std::to_string(n_in) +
                        ", " + std::to_string(n_out) + "]");
        if (!cu::type_supported(t->type))
            throw Error(where + ": tensor '" + t->name + "' has type " + type_name(t->type) +
                        ", which the CUDA backend cannot read");
        for (const Upload& u : ups_)
            if (u.t == t) return;  // tied output: uploaded once
        ups_.push_back({t, false, t->nbytes, 0});
    };
    auto add_vec = [&](const TensorInfo* t, int64_t n, bool optional = false) {
        if (!t && optional) return;  // a family without biases (llama)
        if (!t) throw Error(where + ": missing norm/bias tensor");
        if (t->n_elements() != n)
            throw Error(where + ": tensor '" + t->name + "' " + t->shape_str() + " does not have " +
                        std::to_string(n) + " elements");
        if (!can_dequantize(t->type))
            throw Error(where + ": tensor '" + t->name + "' has type " + type_name(t->type) + ", not dequantizable");
        ups_.push_back({t, true, size_t(n) * 4, 0});
    };
    add_mat(d.tok_embd, E, V);
    add_vec(d.output_norm, E);
    add_mat(d.output, E, V);
    for (const LayerDesc& L : d.layers) {
        // q|k|v and gate|up next to each other: F16 weights then feed one GEMM in place
        // (a fused attn_qkv / ffn_up of phi3 is that layout already: its rows are sliced below)
        if (L.wqkv) {
            add_mat(L.wqkv, E, QD + 2 * KD);
        } else {
            add_mat(L.wq, E, QD);
            add_mat(L.wk, E, KD);
            add_mat(L.wv, E, KD);
        }
        if (L.router) {  // gpt-oss: the router and every expert's matrices (3-D, read one expert at a time)
            const int64_t X = d.n_expert;
            add_mat(L.router, E, X);
            add_vec(L.router_b, X, true);
            for (const ExpertTensor* x : {&L.gate_exps, &L.up_exps, &L.down_exps}) {
                add_mat(x->w, x->n_in, x->n_out * X);
                add_vec(x->b, x->n_out * X, true);
            }
        } else if (L.w_gate_up) {
            add_mat(L.w_gate_up, E, 2 * F);
        } else {
            add_mat(L.w_gate, E, F);
            add_mat(L.w_up, E, F);
        }
        add_mat(L.wo, QD, E);
        if (!L.router) add_mat(L.w_down, F, E);
        add_vec(L.bo, E, true);
        add_vec(L.attn_sinks, d.n_head, true);
        add_vec(L.attn_norm, E);
        add_vec(L.bq, QD, true);
        add_vec(L.bk, KD, true);
        add_vec(L.bv, KD, true);
        add_vec(L.ffn_norm, E);
        add_vec(L.q_norm, d.head_dim, true);
        add_vec(L.k_norm, d.head_dim, true);
        add_vec(L.post_attn_norm, E, true);
        add_vec(L.post_ffn_norm, E, true);
    }
    bytes_ = 0;
    for (Upload& u : ups_) {
        u.offset = bytes_;
        bytes_ += align_up(u.bytes);
    }
}

void DeviceWeights::upload(const ModelDesc& d, uint8_t* buf, const ProgressFn& progress, const std::string& where) {
    size_t done = 0, total = 0;
    for (const Upload& u : ups_) total += u.bytes;
    std::vector<float> tmp;
    for (const Upload& u : ups_) {
        if (!u.t->data) throw Error(where + ": tensor '" + u.t->name + "' has no data (file closed?)");
        uint8_t* dst = buf + u.offset;
        if (u.vec) {
            tmp.resize(size_t(u.t->n_elements()));
            dequantize_rows(*u.t, 0, u.t->n_rows(), tmp.data());
            CUDA_CHECK(cudaMemcpy(dst, tmp.data(), u.bytes, cudaMemcpyHostToDevice), "upload of '" + u.t->name + "'");
        } else {
            CUDA_CHECK(cudaMemcpy(dst, u.t->data, u.bytes, cudaMemcpyHostToDevice), "upload of '" + u.t->name + "'");
        }
        done += u.bytes;
        if (progress) progress(done, total);
    }
    auto dev_of = [&](const TensorInfo* t) -> uint8_t* {
        for (const Upload& u : ups_)
            if (u.t == t) return buf + u.offset;
        throw Error(where + ": internal: tensor not uploaded");
    };
    auto vec = [&](const TensorInfo* t) { return t ? reinterpret_cast<const float*>(dev_of(t)) : nullptr; };
    auto mat = [&](const TensorInfo* t) {
        DevWeight w;
        w.type = t->type;
        w.data = dev_of(t);
        w.n_in = int(t->ne[0]);
        w.n_out = int(t->n_rows());
        w.row_bytes = t->row_bytes();
        w.name = t->name;
        return w;
    };
    tok_embd = mat(d.tok_embd);
    output = mat(d.output);
    output_norm = vec(d.output_norm);
    layers.clear();
    for (const LayerDesc& L : d.layers) {
        DevLayer D;
        D.attn_norm = vec(L.attn_norm);
        D.bq = vec(L.bq);
        D.bk = vec(L.bk);
        D.bv = vec(L.bv);
        D.ffn_norm = vec(L.ffn_norm);
        D.q_norm = vec(L.q_norm);
        D.k_norm = vec(L.k_norm);
        D.post_attn_norm = vec(L.post_attn_norm);
        D.post_ffn_norm = vec(L.post_ffn_norm);
        if (L.wqkv) {
            const DevWeight all = mat(L.wqkv);
            const int QD = d.n_head * d.head_dim, KD = d.n_head_kv * d.head_dim;
            D.wq = row_slice(all, 0, QD, "q");
            D.wk = row_slice(all, QD, KD, "k");
            D.wv = row_slice(all, QD + KD, KD, "v");
        } else {
            D.wq = mat(L.wq);
            D.wk = mat(L.wk);
            D.wv = mat(L.wv);
        }
        D.wo = mat(L.wo);
        D.bo = vec(L.bo);
        D.sinks = vec(L.attn_sinks);
        if (L.router) {
            D.router = mat(L.router);
            D.router_b = vec(L.router_b);
            auto experts = [&](const ExpertTensor& x, DevExperts& out) {
                out.all = mat(x.w);
                out.n_out = int(x.n_out);
                out.bias = vec(x.b);
            };
            experts(L.gate_exps, D.gate_e);
            experts(L.up_exps, D.up_e);
            experts(L.down_exps, D.down_e);
            layers.push_back(std::move(D));
            continue;
        }
        if (L.w_gate_up) {
            const DevWeight all = mat(L.w_gate_up);
            D.gate = row_slice(all, 0, d.n_ff, "gate");
            D.up = row_slice(all, d.n_ff, d.n_ff, "up");
        } else {
            D.gate = mat(L.w_gate);
            D.up = mat(L.w_up);
        }
        D.down = mat(L.w_down);
        layers.push_back(std::move(D));
    }
}

}  // namespace orcd
