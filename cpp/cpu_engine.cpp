// cpu_engine.cpp - the decoder forward pass on the CPU: the reference backend.
//
// Every family (qwen2, llama, phi3, gemma3, gpt-oss) runs through the same run();
// the ModelDesc fields (model.h) choose the variant of each step: fused or separate
// projections, biases, per-head Q/K norms, RoPE pairing, base and YaRN scaling,
// sliding-window attention, attention sinks, post-norms, the FFN activation or a
// mixture of experts, the embedding scale and logit soft-capping.
//
// Weights stay in the mmap in their GGUF types; matmul() (matmul.h) reads
// the quantized blocks directly. Small vectors (norm weights, biases) are
// converted to float32 once at load. The KV cache is float32.
//
// One routine, run(), evaluates a batch of tokens where every token carries
// its own (slot, position): a prompt is n tokens of one slot at consecutive
// positions, a batched decode step is one token for each of several slots.
// K/V of the whole batch are written to the cache before attention, so token
// i of a prompt sees tokens 0..i of the same prompt through the cache.
// K is cached transposed ([head_dim][n_ctx] per head) so the scores of one
// query are D passes of multiply-add along the positions (auto-vectorized).

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "cpu_ops.h"
#include "engine.h"
#include "error.h"
#include "matmul.h"
#include "quants.h"
#include "threadpool.h"
#include "zeroed_buffer.h"

namespace orcd {

namespace {

// n_threads as the pool takes it, after refusing negative counts (0 = all cores).
int checked_threads(int n_threads) {
    if (n_threads < 0)
        throw Error("n_threads must be >= 0 (0: all cores; got " + std::to_string(n_threads) + ")");
    return n_threads;
}

uint64_t physical_memory_bytes() {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : UINT64_MAX;  // unknown: no bound
}

std::vector<float> to_float(const TensorInfo* t) {
    std::vector<float> v((size_t)t->n_elements());
    dequantize_rows(*t, 0, t->n_rows(), v.data());
    return v;
}

// ============================================================ the engine

class CpuEngine final : public Engine {
public:
    CpuEngine(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots, int n_threads, size_t kv_memory)
        : file_(std::move(file)), d_(describe_model(*file_)), n_ctx_(n_ctx), n_slots_(n_slots),
          pool_(checked_threads(n_threads)) {
        if (n_ctx < 1) throw Error("n_ctx must be >= 1 (got " + std::to_string(n_ctx) + ")");
        if (n_slots < 1) throw Error("n_slots must be >= 1 (got " + std::to_string(n_slots) + ")");
        file_->check_unchanged();
        kv_dim_ = d_.n_head_kv * d_.head_dim;
        q_dim_ = d_.n_head * d_.head_dim;
        // K and V caches: address space for every slot's n_ctx positions, memory committed
        // as positions are written and given back when a slot is released (zeroed_buffer.h);
        // the pool (kv_pool.h) bounds what the slots hold at once. A pool that could never
        // fit in RAM is refused now rather than paging the machine to death once it fills.
        const size_t pos_bytes = size_t(d_.n_layer) * kv_dim_ * 2 * sizeof(float);
        const int64_t positions = kv_pool_positions("CpuEngine", n_slots, n_ctx, kv_memory, pos_bytes);
        kv_ = KvPool(n_slots, positions, kKvUnit);
        const unsigned __int128 need128 = (unsigned __int128)kv_.stats().capacity * pos_bytes;
        const uint64_t need = need128 > UINT64_MAX ? UINT64_MAX : (uint64_t)need128;
        const uint64_t have = physical_memory_bytes();
        if (need > have)
            throw Error("KV cache for n_ctx = " + std::to_string(n_ctx) + " and n_slots = " + std::to_string(n_slots) +
                        " needs " + std::to_string(need) + " bytes (" + std::to_string(need >> 20) +
                        " MiB) but this machine has " + std::to_string(have) + " bytes (" +
                        std::to_string(have >> 20) + " MiB) of memory: lower n_ctx or n_slots, or set kv_memory");
        const size_t cache = size_t(n_slots) * d_.n_layer * n_ctx * kv_dim_;
        try {
            kcache_ = ZeroedBuffer(cache);
            vcache_ = ZeroedBuffer(cache);
        } catch (const std::bad_alloc&) {
            throw Error("KV cache for n_ctx = " + std::to_string(n_ctx) + " and n_slots = " + std::to_string(n_slots) +
                        ": the system refused " + std::to_string(cache * 2 * sizeof(float)) +
                        " bytes of address space: lower n_ctx or n_slots");
        }

        emb_ = weight_view(*d_.tok_embd);
        out_ = weight_view(*d_.output);
        out_norm_ = to_float(d_.output_norm);
        auto opt_float = [](const TensorInfo* t) { return t ? to_float(t) : std::vector<float>(); };
        auto opt_view = [](const TensorInfo* t) { return t ? weight_view(*t) : WeightView{}; };
        layers_.resize(d_.n_layer);
        for (int l = 0; l < d_.n_layer; ++l) {
            const LayerDesc& s = d_.layers[l];
            Layer& L = layers_[l];
            L.attn_norm = to_float(s.attn_norm);
            L.bq = opt_float(s.bq);
            L.bk = opt_float(s.bk);
            L.bv = opt_float(s.bv);
            L.q_norm = opt_float(s.q_norm);
            L.k_norm = opt_float(s.k_norm);
            L.post_attn_norm = opt_float(s.post_attn_norm);
            L.ffn_norm = to_float(s.ffn_norm);
            L.post_ffn_norm = opt_float(s.post_ffn_norm);
            L.wq = opt_view(s.wq);
            L.wk = opt_view(s.wk);
            L.wv = opt_view(s.wv);
            L.wqkv = opt_view(s.wqkv);
            L.wo = weight_view(*s.wo);
            L.gate = opt_view(s.w_gate);
            L.up = opt_view(s.w_up);
            L.gate_up = opt_view(s.w_gate_up);
            L.down = opt_view(s.w_down);
            L.bo = opt_float(s.bo);
            L.sinks = opt_float(s.attn_sinks);
            if (s.router) {  // mixture of experts: one view per expert into the 3-D tensors
                L.router = weight_view(*s.router);
                L.router_b = opt_float(s.router_b);
                auto views = [](const ExpertTensor& x, int n_expert) {
                    std::vector<WeightView> v;
                    for (int e = 0; e < n_expert; ++e)
                        v.push_back(make_weight_view(x.w->type, x.w->data + x.offset(e), x.n_in, x.n_out));
                    return v;
                };
                L.gate_e = views(s.gate_exps, d_.n_expert);
                L.up_e = views(s.up_exps, d_.n_expert);
                L.down_e = views(s.down_exps, d_.n_expert);
                L.gate_b = opt_float(s.gate_exps.b);
                L.up_b = opt_float(s.up_exps.b);
                L.down_b = opt_float(s.down_exps.b);
            }
            // one inv_freq table per distinct RoPE base (gemma3: local and global layers)
            L.rope = -1;
            for (size_t b = 0; b < rope_bases_.size(); ++b)
                if (rope_bases_[b] == s.rope_base) L.rope = (int)b;
            if (L.rope < 0) {
                L.rope = (int)rope_bases_.size();
                rope_bases_.push_back(s.rope_base);
                // inv_freq[i] = base^(-2i/head_dim), in double for accuracy.
                inv_freqs_.emplace_back(d_.head_dim / 2);
                if (d_.rope_scaling == RopeScaling::Yarn)
                    cpu_ops::rope_inv_freq_yarn(d_.head_dim, (double)s.rope_base, d_.rope_factor, d_.rope_n_ctx_orig,
                                                d_.yarn_beta_fast, d_.yarn_beta_slow, inv_freqs_.back().data());
                else
                    cpu_ops::rope_inv_freq(d_.head_dim, (double)s.rope_base, inv_freqs_.back().data());
            }
        }
    }

    const ModelDesc& desc() const override { return d_; }
    int n_ctx() const override { return n_ctx_; }
    int n_slots() const override { return n_slots_; }

    // The pool is an account here: each slot keeps its own n_ctx positions of address
    // space, so a reservation never moves data; release gives the slot's pages back.
    bool kv_reserve(int slot, int n_positions) override {
        check_kv_reserve_args(*this, slot, n_positions);
        return kv_.reserve(slot, n_positions, nullptr);
    }
    void kv_release(int slot) override {
        check_slot("kv_release", *this, slot);
        if (kv_.offset(slot) < 0) return;
        const size_t per_slot = size_t(d_.n_layer) * n_ctx_ * kv_dim_;
        kcache_.discard(size_t(slot) * per_slot, per_slot);
        vcache_.discard(size_t(slot) * per_slot, per_slot);
        kv_.release(slot);
    }
    KvPoolStats kv_stats() const override { return kv_.stats(); }
    int64_t kv_reserved(int slot) const override {
        check_slot("kv_reserved", *this, slot);
        return std::min<int64_t>(kv_.size(slot), n_ctx_);
    }

    void forward(int slot, const int32_t* tokens, int n, int pos0, float* logits, bool all_logits,
                 Trace* trace) override {
        check_forward_args("forward", *this, slot, tokens, n, pos0);
        file_->check_unchanged();  // the weights are read from the mapping: a truncated file would SIGBUS
        engine_args::ensure_kv("forward", *this, slot, int64_t(pos0) + n);
        std::vector<int32_t> slots(n, slot), pos(n);
        for (int i = 0; i < n; ++i) pos[i] = pos0 + i;
        run(tokens, slots.data(), pos.data(), n, logits, all_logits, trace);
    }

    void decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                      float* logits) override {
        check_decode_batch_args(*this, n, slots, tokens, pos);
        file_->check_unchanged();
        for (int i = 0; i < n; ++i) engine_args::ensure_kv("decode_batch", *this, slots[i], int64_t(pos[i]) + 1);
        run(tokens, slots, pos, n, logits, true, nullptr);
    }

private:
    struct Layer {
        // float copies of the small tensors (empty where the family has none)
        std::vector<float> attn_norm, bq, bk, bv, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffn_norm;
        std::vector<float> bo, sinks;                              // gpt-oss: output bias, a sink per head
        WeightView wq, wk, wv, wqkv, wo, gate, up, gate_up, down;  // views into the mmap
        int rope = 0;                                              // index into inv_freqs_
        // mixture of experts: the router and one view per expert (no copies); biases
        // [n_expert][n_out] as floats
        WeightView router;
        std::vector<float> router_b, gate_b, up_b, down_b;
        std::vector<WeightView> gate_e, up_e, down_e;
    };

    // Start of K for slot s, layer l, kv head g: head_dim rows of n_ctx positions.
    size_t kt_at(int s, int l, int g) const {
        return (((size_t)s * d_.n_layer + l) * n_ctx_) * kv_dim_ + (size_t)g * d_.head_dim * n_ctx_;
    }

    // Start of V for slot s, layer l, position p.
    size_t cache_at(int s, int l, int p) const {
        return (((size_t)s * d_.n_layer + l) * n_ctx_ + p) * kv_dim_;
    }

    // Buffers of the mixture-of-experts FFN for a batch of n tokens (an expert sees each token at most once).
    struct MoeScratch {
        std::vector<float> logits, w, xe, ge, ue, de, wr;
        std::vector<int32_t> ids, rows;
        void resize(int n, const ModelDesc& d) {
            logits.resize((size_t)n * d.n_expert);
            ids.resize((size_t)n * d.n_expert_used);
            w.resize((size_t)n * d.n_expert_used);
            rows.resize(n);
            wr.resize(n);
            xe.resize((size_t)n * d.n_embd);
            de.resize((size_t)n * d.n_embd);
            ge.resize((size_t)n * d.n_ff_exp);
            ue.resize((size_t)n * d.n_ff_exp);
        }
    };

    // out = sum over the router's k experts of w_k (down_k(swiglu_oai(gate_k xn + b, up_k xn + b)) + b_down_k)
    // for n rows xn; each expert runs once on the rows routed to it, reading its slice of the
    // 3-D tensors in place.
    void moe_ffn(const Layer& L, const float* xn, int n, float* out, MoeScratch& m) {
        const int E = d_.n_embd, F = d_.n_ff_exp, X = d_.n_expert, K = d_.n_expert_used;
        matmul(L.router, xn, n, m.logits.data(), pool_);
        if (!L.router_b.empty()) cpu_ops::add_bias(m.logits.data(), L.router_b.data(), n, X);
        cpu_ops::moe_route(m.logits.data(), n, X, K, m.ids.data(), m.w.data());
        std::fill(out, out + (size_t)n * E, 0.f);
        for (int e = 0; e < X; ++e) {
            int rows = 0;  // the tokens that picked expert e, and their weights
            for (int t = 0; t < n; ++t)
                for (int j = 0; j < K; ++j)
                    if (m.ids[(size_t)t * K + j] == e) {
                        m.rows[rows] = t;
                        m.wr[rows++] = m.w[(size_t)t * K + j];
                    }
            if (rows == 0) continue;
            cpu_ops::gather_rows(xn, E, m.rows.data(), rows, m.xe.data());
            matmul(L.gate_e[e], m.xe.data(), rows, m.ge.data(), pool_);
            matmul(L.up_e[e], m.xe.data(), rows, m.ue.data(), pool_);
            if (!L.gate_b.empty()) cpu_ops::add_bias(m.ge.data(), &L.gate_b[(size_t)e * F], rows, F);
            if (!L.up_b.empty()) cpu_ops::add_bias(m.ue.data(), &L.up_b[(size_t)e * F], rows, F);
            cpu_ops::swiglu_oai(m.ge.data(), m.ue.data(), (int64_t)rows * F, d_.swiglu_alpha, d_.swiglu_limit, pool_);
            matmul(L.down_e[e], m.ge.data(), rows, m.de.data(), pool_);
            if (!L.down_b.empty()) cpu_ops::add_bias(m.de.data(), &L.down_b[(size_t)e * E], rows, E);
            cpu_ops::scatter_add_rows(out, E, m.rows.data(), m.wr.data(), rows, m.de.data());
        }
    }

    void run(const int32_t* tokens, const int32_t* slots, const int32_t* pos, int n, float* logits, bool all_logits,
             Trace* trace) {
        const int E = d_.n_embd, F = d_.n_ff, D = d_.head_dim, H = d_.n_head, HKV = d_.n_head_kv;

        std::vector<float> x((size_t)n * E), xn((size_t)n * E), q((size_t)n * q_dim_), k((size_t)n * kv_dim_),
            v((size_t)n * kv_dim_), att((size_t)n * q_dim_), o((size_t)n * E), g((size_t)n * F), u((size_t)n * F);
        std::vector<float> fused;  // a fused projection's output before the split
        MoeScratch moe;            // the experts' buffers (gpt-oss)
        if (d_.n_expert > 0) moe.resize(n, d_);
        if (d_.fused_qkv || d_.fused_gate_up)
            fused.resize((size_t)n * std::max(d_.fused_qkv ? q_dim_ + 2 * kv_dim_ : 0, d_.fused_gate_up ? 2 * F : 0));

        // cos/sin of every token's angles per RoPE base, shared by all layers and heads.
        const size_t nb = inv_freqs_.size();
        std::vector<std::vector<float>> cs(nb, std::vector<float>((size_t)n * D / 2)), sn = cs;
        for (size_t b = 0; b < nb; ++b) {
            cpu_ops::rope_tables(pos, n, inv_freqs_[b].data(), D / 2, cs[b].data(), sn[b].data());
            if (d_.yarn_mscale != 1.f) {  // YaRN's magnitude factor on both q and k, as ggml's rope_yarn
                cpu_ops::scale(cs[b].data(), (int64_t)cs[b].size(), d_.yarn_mscale);
                cpu_ops::scale(sn[b].data(), (int64_t)sn[b].size(), d_.yarn_mscale);
            }
        }
        // the attention op scales scores by 1/sqrt(head_dim); another scale is folded into q
        // (exactly 1 when the family keeps the default: no rounding of q for qwen2/llama)
        const float q_scale = d_.attn_scale > 0 ? d_.attn_scale * std::sqrt((float)D) : 1.f;
        int max_pos = 0;
        for (int i = 0; i < n; ++i) max_pos = std::max(max_pos, pos[i]);

        for (int i = 0; i < n; ++i) weight_row(emb_, tokens[i], &x[(size_t)i * E]);
        if (d_.embd_scale != 1.f) cpu_ops::scale(x.data(), (int64_t)x.size(), d_.embd_scale);
        if (trace) {
            trace->n_tokens = n;
            trace->n_embd = E;
            trace->hidden.assign(1, x);
        }

        for (int l = 0; l < d_.n_layer; ++l) {
            Layer& L = layers_[l];
            const LayerDesc& S = d_.layers[l];
            // this layer's cache (kt_at, cache_at: slots equally spaced, the same stride in K and V)
            const cpu_ops::KvCache kv{&kcache_[kt_at(0, l, 0)], &vcache_[cache_at(0, l, 0)],
                                      kt_at(1, l, 0) - kt_at(0, l, 0), n_ctx_, HKV, D};
            // ---- attention block
            cpu_ops::rmsnorm(x.data(), L.attn_norm.data(), xn.data(), n, E, d_.rms_eps);
            if (d_.fused_qkv) {
                matmul(L.wqkv, xn.data(), n, fused.data(), pool_);
                cpu_ops::split_rows(fused.data(), n, q_dim_, kv_dim_, kv_dim_, q.data(), k.data(), v.data());
            } else {
                matmul(L.wq, xn.data(), n, q.data(), pool_);
                matmul(L.wk, xn.data(), n, k.data(), pool_);
                matmul(L.wv, xn.data(), n, v.data(), pool_);
            }
            if (!L.bq.empty()) cpu_ops::add_bias(q.data(), L.bq.data(), n, q_dim_);
            if (!L.bk.empty()) cpu_ops::add_bias(k.data(), L.bk.data(), n, kv_dim_);
            if (!L.bv.empty()) cpu_ops::add_bias(v.data(), L.bv.data(), n, kv_dim_);
            if (!L.q_norm.empty()) {  // per head: rows of head_dim
                cpu_ops::rmsnorm(q.data(), L.q_norm.data(), q.data(), n * H, D, d_.rms_eps);
                cpu_ops::rmsnorm(k.data(), L.k_norm.data(), k.data(), n * HKV, D, d_.rms_eps);
            }
            for (int i = 0; i < n; ++i) {
                const float* c = &cs[L.rope][(size_t)i * D / 2];
                const float* s = &sn[L.rope][(size_t)i * D / 2];
                if (d_.rope_style == RopeStyle::Neox) {
                    cpu_ops::rope_neox(&q[(size_t)i * q_dim_], H, D, c, s);
                    cpu_ops::rope_neox(&k[(size_t)i * kv_dim_], HKV, D, c, s);
                } else {
                    cpu_ops::rope_normal(&q[(size_t)i * q_dim_], H, D, c, s);
                    cpu_ops::rope_normal(&k[(size_t)i * kv_dim_], HKV, D, c, s);
                }
            }
            if (q_scale != 1.f) cpu_ops::scale(q.data(), (int64_t)q.size(), q_scale);
            // the whole batch's K/V go in first: token i sees tokens 0..i of its prompt
            cpu_ops::kv_append(kv, k.data(), v.data(), n, slots, pos);
            // attention_window where the window excludes some key or the layer has sinks (gpt-oss)
            if (!L.sinks.empty() || (S.sliding_window > 0 && max_pos >= S.sliding_window))
                cpu_ops::attention_window(q.data(), n, H, kv, slots, pos, S.sliding_window, att.data(), pool_,
                                          L.sinks.empty() ? nullptr : L.sinks.data());
            else
                cpu_ops::attention(q.data(), n, H, kv, slots, pos, att.data(), pool_);
            matmul(L.wo, att.data(), n, o.data(), pool_);
            if (!L.bo.empty()) cpu_ops::add_bias(o.data(), L.bo.data(), n, E);
            if (!L.post_attn_norm.empty())
                cpu_ops::rmsnorm(o.data(), L.post_attn_norm.data(), o.data(), n, E, d_.rms_eps);
            for (size_t e = 0; e < x.size(); ++e) x[e] += o[e];

            // ---- feed-forward block: down(act(gate(x)) * up(x)), or a mixture of experts
            cpu_ops::rmsnorm(x.data(), L.ffn_norm.data(), xn.data(), n, E, d_.rms_eps);
            if (d_.n_expert > 0) {
                moe_ffn(L, xn.data(), n, o.data(), moe);
            } else {
                if (d_.fused_gate_up) {
                    matmul(L.gate_up, xn.data(), n, fused.data(), pool_);
                    cpu_ops::split_rows(fused.data(), n, F, F, 0, g.data(), u.data(), nullptr);
                } else {
                    matmul(L.gate, xn.data(), n, g.data(), pool_);
                    matmul(L.up, xn.data(), n, u.data(), pool_);
                }
                if (d_.activation == Activation::Silu)
                    cpu_ops::swiglu(g.data(), u.data(), (int64_t)g.size(), pool_);
                else
                    cpu_ops::geglu_tanh(g.data(), u.data(), (int64_t)g.size(), pool_);
                matmul(L.down, g.data(), n, o.data(), pool_);
            }
            if (!L.post_ffn_norm.empty())
                cpu_ops::rmsnorm(o.data(), L.post_ffn_norm.data(), o.data(), n, E, d_.rms_eps);
            for (size_t e = 0; e < x.size(); ++e) x[e] += o[e];
            if (trace) trace->hidden.push_back(x);
        }

        // ---- final norm and lm_head (only the rows whose logits are wanted)
        const int first = all_logits ? 0 : n - 1;
        const int rows = n - first;
        cpu_ops::rmsnorm(&x[(size_t)first * E], out_norm_.data(), xn.data(), rows, E, d_.rms_eps);
        matmul(out_, xn.data(), rows, logits, pool_);
        if (d_.logit_softcap > 0) cpu_ops::softcap(logits, (int64_t)rows * d_.n_vocab, d_.logit_softcap);
    }

    std::shared_ptr<GGUFFile> file_;  // keeps the mapping (weights) alive
    ModelDesc d_;
    int n_ctx_, n_slots_;
    int q_dim_ = 0, kv_dim_ = 0;
    ThreadPool pool_;
    WeightView emb_, out_;
    std::vector<float> out_norm_;
    std::vector<Layer> layers_;
    std::vector<float> rope_bases_;               // the distinct RoPE bases of the layers
    std::vector<std::vector<double>> inv_freqs_;  // inv_freq table of each
    KvPool kv_;            // what each slot holds of the pool (an account: the layout below is per slot)
    ZeroedBuffer kcache_;  // [slot][layer][kv_head][head_dim][pos]: transposed for the score loop
    ZeroedBuffer vcache_;  // [slot][layer][pos][kv_head * head_dim]
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots, int n_threads,
                                        size_t kv_memory) {
    return std::make_unique<CpuEngine>(std::move(file), n_ctx, n_slots, n_threads, kv_memory);
}

}  // namespace orcd
