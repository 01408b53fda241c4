// fused_decoder.cu - FusedDecoder: plan, arguments, launches and graphs of the fused
// decode step (decode.cuh). docs/perf_log.md has the measurements behind each
// constant below.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fused_decoder.cuh"
#include "family_kernels.cuh"

namespace orcd {
namespace {

constexpr size_t kDecStageCap = size_t(96) << 10;  // staged weight bytes of one fused decode block
constexpr size_t kDecLmCap = size_t(64) << 10;     // ... of one lm_head block (many blocks, streaming)
constexpr int kDecQkvRows = 8;          // rows per half-head part of dec_qkv (at most head_dim/2)
constexpr double kDecGateUpPerSm = 2;   // blocks per SM the gate/up projection aims for
constexpr double kDecProjPerSm = 1;     // ... attn_output and ffn_down
constexpr double kDecLmPerSm = 3;       // persistent lm_head blocks per SM
constexpr int kDecProjMaxRows = 64;     // rows per projection block at most (dec_proj's residual mode)
// The kinds that release their successor at their start instead of after their wait:
// attn_output, so the largest weight copy (gate and up) overlaps its whole run.
constexpr unsigned kDecPdlEarly = 1u << int(DecodeKernel::attn_output);

// (options' pdl_early_kinds, a bit per DecodeKernel, replaces kDecPdlEarly when >= 0: for measuring;
// launch_step sets every launch's flag from it, the arguments built once leave it 0)
int pdl_early(DecodeKernel k, int kinds) {
    return int(((kinds >= 0 ? unsigned(kinds) : kDecPdlEarly) >> int(k)) & 1u);
}

// Rows per block of a fused mat-vec: about target_blocks blocks, a multiple of 8 (one row
// per warp and round), shrunk until nt tensors' staged rows fit `cap` (rows 0: they do not).
struct PlannedRows {
    int rows, smem_w;
};
PlannedRows plan_proj(int n_out, size_t row_bytes, int nt, int target_blocks, size_t cap) {
    int rb = (n_out + target_blocks - 1) / target_blocks;
    rb = std::max(8, (rb + 7) / 8 * 8);
    rb = std::min(rb, kDecProjMaxRows);
    auto need = [&](int r) { return size_t(nt) * cu::dec_stage_bytes(r, int(row_bytes)); };
    while (rb > 1 && need(rb) > cap) rb = rb > 8 ? rb - 8 : rb - 1;
    if (need(rb) > cap) return {0, 0};
    return {rb, int(need(rb))};
}

bool is_noop(const StepLaunch& s, DecodeKernel k) { return (s.noop_kinds >> int(k)) & 1u; }

}  // namespace

// ---------------------------------------------------------------- plan

void FusedDecoder::plan(const ModelDesc& d, const DeviceInfo& info, int n_ctx) {
    d_ = d;
    n_ctx_ = n_ctx;
    hopper_ = info.cc_major >= 9;
    pdl_ok_ = hopper_;
    ok_ = false;
    auto off = [&](const std::string& why) { note_ = unavailable_ = "fast decode unavailable: " + why; };
    const int E = d.n_embd, hd = d.head_dim, QD = d.n_head * hd, F = d.n_ff, V = d.n_vocab;
    const int G = d.n_head / d.n_head_kv;
    if (info.cc_major < 8)
        return off("compute capability " + std::to_string(info.cc_major) + "." + std::to_string(info.cc_minor) +
                   " < 8.0");
    if (const std::string why = fused_decoder_unsupported(d); !why.empty()) return off(why);
    if (E % 32 || QD % 32 || F % 32) return off("n_embd, n_head*head_dim and n_ff must be multiples of 32");
    if (hd % 8) return off("head_dim " + std::to_string(hd) + " is not a multiple of 8 (16-byte K/V rows)");
    if (G * hd > cu::kDecMaxGroupDim)
        return off("(n_head/n_head_kv)*head_dim > " + std::to_string(cu::kDecMaxGroupDim));
    if (d.n_head_kv > cu::kDecMaxKvHeads) return off("more than " + std::to_string(cu::kDecMaxKvHeads) + " KV heads");
    size_t rb_qkv = 0, rb_o = 0, rb_gu = 0, rb_d = 0;
    for (const LayerDesc& L : d.layers) {
        rb_qkv = std::max({rb_qkv, L.wq->row_bytes(), L.wk->row_bytes(), L.wv->row_bytes()});
        rb_o = std::max(rb_o, L.wo->row_bytes());
        rb_gu = std::max({rb_gu, L.w_gate->row_bytes(), L.w_up->row_bytes()});
        rb_d = std::max(rb_d, L.w_down->row_bytes());
    }
    const int sms = std::max(1, info.sm_count);
    auto per_sm = [&](double blocks_per_sm) { return std::max(1, int(blocks_per_sm * sms)); };
    qkv_rows_ = std::min(kDecQkvRows, hd / 2);
    qkv_parts_ = (hd / 2 + qkv_rows_ - 1) / qkv_rows_;
    qkv_smem_w_ = int(2 * cu::dec_stage_bytes(qkv_rows_, int(rb_qkv)));
    const PlannedRows o = plan_proj(E, rb_o, 1, per_sm(kDecProjPerSm), kDecStageCap);
    const PlannedRows gu = plan_proj(F, rb_gu, 2, per_sm(kDecGateUpPerSm), kDecStageCap);
    const PlannedRows dn = plan_proj(E, rb_d, 1, per_sm(kDecProjPerSm), kDecStageCap);
    // lm_head: persistent blocks, each warp streaming batches of 2 rows (1 for long rows)
    // through its own ring of kDecLmStages buffers
    PlannedRows lm{0, 0};
    cu::dec_lm_plan(d.output->row_bytes(), kDecLmCap, &lm.rows, &lm_stages_, &lm.smem_w);
    lm_grid_ = per_sm(kDecLmPerSm);
    if (!o.rows || !gu.rows || !dn.rows || !lm.rows) return off("a weight row does not fit the shared-memory stage");
    plan_o_ = {o.rows, o.smem_w};
    plan_gu_ = {gu.rows, gu.smem_w};
    plan_d_ = {dn.rows, dn.smem_w};
    plan_lm_ = {lm.rows, lm.smem_w};
    lm_blocks_ = std::min((V + lm.rows - 1) / lm.rows, lm_grid_);
    const size_t smem = std::max({cu::dec_qkv_smem(qkv_smem_w_, E, qkv_rows_), cu::dec_proj_smem(o.smem_w, QD),
                                  cu::dec_proj_smem(gu.smem_w, E), cu::dec_proj_smem(dn.smem_w, F),
                                  cu::dec_proj_smem(lm.smem_w, E), cu::dec_attn_smem(d.n_head, d.n_head_kv, hd),
                                  cu::dec_attn_lean_smem(d.n_head, d.n_head_kv, hd, 0)});
    // the staging attention's keys a block at most (the rest of a block's opt-in shared memory)
    stage_max_ = hopper_ ? cu::dec_attn_stage_max(d.n_head, d.n_head_kv, hd) : 0;
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, info.device), "CudaEngine plan");
    if (smem > size_t(optin))
        return off("needs " + std::to_string(smem) + " bytes of shared memory per block, the GPU allows " +
                   std::to_string(optin));
    CUDA_CHECK(cudaSetDevice(info.device), "CudaEngine plan");
    cu::dec_set_smem_limit(std::max({smem, size_t(48) << 10, cu::dec_attn_lean_smem(d.n_head, d.n_head_kv, hd, stage_max_)}));
    max_cluster_ = hopper_ ? cu::dec_attn_max_cluster(d.n_head, d.n_head_kv, hd) : 0;
    rope_bases_.clear();
    for (const LayerDesc& L : d.layers)
        if (std::find(rope_bases_.begin(), rope_bases_.end(), L.rope_base) == rope_bases_.end())
            rope_bases_.push_back(L.rope_base);
    ok_ = true;
}

void FusedDecoder::add_scratch(std::vector<ScratchSlice>& slices) {
    const size_t heads = size_t(d_.n_head), hd = size_t(d_.head_dim);
    auto add = [&](auto** p, size_t bytes) { slices.push_back({reinterpret_cast<void**>(p), bytes}); };
    add(&state_, sizeof(cu::DecState));
    add(&sync_, sizeof(cu::DecSync));
    add(&out_tokens_, size_t(n_ctx_) * 4);
    add(&part_o_, ok_ ? heads * cu::kDecMaxSplits * hd * 4 : 0);
    add(&part_ml_, ok_ ? heads * cu::kDecMaxSplits * sizeof(float2) : 0);
    add(&kv_ahead_, ok_ ? size_t(d_.n_layer) * sizeof(cu::DecKvAhead) : 0);
    add(&arg_, ok_ ? size_t(lm_blocks_) * sizeof(cu::ArgPart) : 0);
    add(&rope_, ok_ ? rope_bases_.size() * size_t(n_ctx_) * (hd / 2) * sizeof(float2) : 0);
    const size_t E = size_t(d_.n_embd), post = ok_ && d_.post_norms ? E * 4 : 0;
    add(&x_alt_, post);
    add(&o_attn_, post);
    add(&o_ffn_, post);
    add(&k_raw_, ok_ && d_.qk_norm ? size_t(d_.n_head_kv) * hd * 4 : 0);
}

// ---------------------------------------------------------------- arguments

void FusedDecoder::build(const DeviceWeights& w, const DecodeBuffers& b, cudaStream_t stream) {
    stream_ = stream;
    logits_ = b.logits;
    const char* where = "CudaEngine setup";
    CUDA_CHECK(cudaMemsetAsync(state_, 0, sizeof(cu::DecState), stream_), "CudaEngine setup: decode state");
    CUDA_CHECK(cudaMemsetAsync(sync_, 0, sizeof(cu::DecSync), stream_), "CudaEngine setup: decode counters");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_state_), sizeof(cu::DecState)),
               "CudaEngine setup: pinned state");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_tokens_), size_t(n_ctx_) * 4),
               "CudaEngine setup: pinned tokens");
    if (!ok_) return;

    const int hd = d_.head_dim, half = hd / 2, kv_dim = d_.n_head_kv * hd;
    const size_t table = size_t(n_ctx_) * half;
    for (size_t b = 0; b < rope_bases_.size(); ++b) {  // RoPE tables: the prompt kernels' formula (theta in double)
        const double log2_base = std::log2(double(rope_bases_[b]));
        std::vector<float2> tab(table);
        for (int i = 0; i < half; ++i) {
            const double f = std::exp2(-2.0 * double(i) / double(hd) * log2_base);
            for (int p = 0; p < n_ctx_; ++p) {
                const double th = double(p) * f;
                tab[size_t(p) * half + i] = make_float2(float(std::cos(th)), float(std::sin(th)));
            }
        }
        CUDA_CHECK(cudaMemcpy(rope_ + b * table, tab.data(), tab.size() * sizeof(float2), cudaMemcpyHostToDevice),
                   std::string(where) + ": RoPE table");
    }
    auto rope_of = [&](float base) {
        return rope_ + size_t(std::find(rope_bases_.begin(), rope_bases_.end(), base) - rope_bases_.begin()) * table;
    };
    // gemma3's post-norms: each block's output waits in o_attn_ / o_ffn_ until the next kernel
    // adds it, normed, to the residual stream, which alternates between x (written by dec_qkv's
    // block 0) and x_alt_ (by the gate/up kernel's block 0), so no kernel overwrites the
    // vector its own other blocks are reading
    const bool post = d_.post_norms;
    const size_t layer_stride = b.layer_stride;
    layers_.assign(size_t(d_.n_layer), LayerArgs{});
    for (int l = 0; l < d_.n_layer; ++l) {
        const DevLayer& L = w.layers[size_t(l)];
        LayerArgs& A = layers_[size_t(l)];
        __half* kc = b.kc + size_t(l) * layer_stride;
        __half* vc = b.vc + size_t(l) * layer_stride;

        cu::DecQkvArgs& q = A.qkv;
        q.w[0] = L.wq.dt();
        q.w[1] = L.wk.dt();
        q.w[2] = L.wv.dt();
        q.bias[0] = L.bq;
        q.bias[1] = L.bk;
        q.bias[2] = L.bv;
        q.x = b.x;
        q.emb = w.tok_embd.dt();
        q.embed = l == 0;
        q.norm_w = L.attn_norm;
        q.eps = d_.rms_eps;
        q.n_embd = d_.n_embd;
        q.n_head = d_.n_head;
        q.n_head_kv = d_.n_head_kv;
        q.head_dim = hd;
        q.S = qkv_rows_;
        q.parts = qkv_parts_;
        q.rope = rope_of(d_.layers[size_t(l)].rope_base);
        q.rope_normal = d_.rope_style == RopeStyle::Normal;
        q.embd_scale = d_.embd_scale;
        q.qk_raw = d_.qk_norm ? 1 : 0;
        q.k_raw = k_raw_;
        if (post && l > 0) q.pend = {x_alt_, o_ffn_, w.layers[size_t(l) - 1].post_ffn_norm, b.x};

        cu::DecQkNormArgs& qn = A.qk_norm;
        qn.q = b.q;
        qn.k_raw = k_raw_;
        qn.q_norm = L.q_norm;
        qn.k_norm = L.k_norm;
        qn.eps = d_.rms_eps;
        qn.n_head = d_.n_head;
        qn.n_head_kv = d_.n_head_kv;
        qn.head_dim = hd;
        qn.rope = q.rope;
        qn.rope_normal = q.rope_normal;
        qn.kc = kc;
        qn.slot_off = b.slot_off;
        qn.kv_dim = kv_dim;
        qn.st = state_;
        q.q_out = b.q;
        q.kc = kc;
        q.vc = vc;
        q.slot_off = b.slot_off;
        q.kv_dim = kv_dim;
        q.st = state_;
        q.need_q8 = cu::dec_int8_type(L.wq.type) || cu::dec_int8_type(L.wk.type) || cu::dec_int8_type(L.wv.type);
        q.smem_w = qkv_smem_w_;

        cu::DecAttnArgs& a = A.attention;
        a.q = b.q;
        a.kc = kc;
        a.vc = vc;
        a.slot_off = b.slot_off;
        a.kv_dim = kv_dim;
        a.n_head = d_.n_head;
        a.n_head_kv = d_.n_head_kv;
        a.head_dim = hd;
        a.scale = d_.score_scale();
        a.window = d_.layers[size_t(l)].sliding_window;
        a.max_splits = cu::kDecMaxSplits;
        a.split_keys = opt_.split_keys;
        a.part_o = part_o_;
        a.part_ml = part_ml_;
        a.out = b.att;
        a.counter = sync_->attn;
        a.st = state_;

        cu::DecProjArgs& o = A.attn_output;
        o.w[0] = L.wo.dt();
        o.n_tensors = 1;
        o.rows_per_block = plan_o_.rows_per_block;
        o.act = b.att;
        o.need_q8 = cu::dec_int8_type(L.wo.type);
        o.mode = cu::DEC_RESID;
        o.y = post ? o_attn_ : b.x;
        o.overwrite = post ? 1 : 0;
        o.smem_w = plan_o_.smem_w;

        cu::DecProjArgs& g = A.ffn_gate_up;
        g.w[0] = L.gate.dt();
        g.w[1] = L.up.dt();
        g.n_tensors = 2;
        g.rows_per_block = plan_gu_.rows_per_block;
        g.act = b.x;
        g.norm_w = L.ffn_norm;
        g.eps = d_.rms_eps;
        g.need_q8 = cu::dec_int8_type(L.gate.type) || cu::dec_int8_type(L.up.type);
        g.mode = cu::DEC_GLU;
        g.y = b.act;
        g.gelu = d_.activation == Activation::GeluTanh ? 1 : 0;
        if (post) g.pend = {b.x, o_attn_, L.post_attn_norm, x_alt_};
        g.smem_w = plan_gu_.smem_w;

        cu::DecProjArgs& dn = A.ffn_down;
        dn.w[0] = L.down.dt();
        dn.n_tensors = 1;
        dn.rows_per_block = plan_d_.rows_per_block;
        dn.act = b.act;
        dn.need_q8 = cu::dec_int8_type(L.down.type);
        dn.mode = cu::DEC_RESID;
        dn.y = post ? o_ffn_ : b.x;
        dn.overwrite = post ? 1 : 0;
        dn.smem_w = plan_d_.smem_w;
    }
    cu::DecProjArgs& m = lm_;
    m = cu::DecProjArgs{};
    m.w[0] = w.output.dt();
    m.n_tensors = 1;
    m.rows_per_block = plan_lm_.rows_per_block;
    m.act = b.x;
    m.norm_w = w.output_norm;
    m.eps = d_.rms_eps;
    m.need_q8 = cu::dec_int8_type(w.output.type);
    m.mode = cu::DEC_LOGITS;
    m.y = b.logits;
    m.part = arg_;
    m.counter = &sync_->lm;
    m.st = state_;
    m.out_tokens = out_tokens_;
    m.smem_w = plan_lm_.smem_w;
    m.lm_grid = lm_grid_;
    m.lm_stages = lm_stages_;
    // the step's lm_head adds the last FFN output (lm_head_last's row is complete already)
    if (post) lm_pend_ = {x_alt_, o_ffn_, w.layers.back().post_ffn_norm, nullptr};
    std::vector<cu::DecKvAhead> ahead;  // each layer's cache rows, for options' kv_prefetch
    for (const LayerArgs& A : layers_)
        ahead.push_back({A.attention.kc, A.attention.vc, A.attention.slot_off, A.attention.st, A.attention.kv_dim});
    CUDA_CHECK(cudaMemcpy(kv_ahead_, ahead.data(), ahead.size() * sizeof(cu::DecKvAhead), cudaMemcpyHostToDevice),
               std::string(where) + ": the layers' cache rows");
}

void FusedDecoder::release() noexcept {
    drop_graphs();
    if (pinned_state_) cudaFreeHost(pinned_state_);
    if (pinned_tokens_) cudaFreeHost(pinned_tokens_);
    if (trace_) cudaFree(trace_);
    pinned_state_ = nullptr;
    pinned_tokens_ = nullptr;
    trace_ = nullptr;
}

void FusedDecoder::set_options(const CudaOptions& o) {
    drop_graphs();
    opt_ = o;
    pdl_ok_ = hopper_;
    graphs_ok_ = true;
    note_ = unavailable_;
    for (LayerArgs& A : layers_) A.attention.split_keys = o.split_keys;
    // the staging attention: keys a block (a multiple of the cluster's split granule) and the
    // largest cluster that fits with that much shared memory
    stage_ = stage_cluster_ = 0;
    if (ok_ && o.attn_stage > 0 && stage_max_ > 0) {
        const int k = std::min(o.attn_stage, stage_max_) / cu::kDecClusterGran * cu::kDecClusterGran;
        stage_cluster_ = k > 0 ? cu::dec_attn_max_cluster(d_.n_head, d_.n_head_kv, d_.head_dim, k) : 0;
        if (stage_cluster_ > 0) stage_ = k;
        else add_note("the staging attention does not fit this GPU");
    }
    if (ok_ && o.attn_trace && !trace_) {
        CUDA_CHECK(cudaMalloc(&trace_, trace_bytes()), "decode attention trace");
        CUDA_CHECK(cudaMemset(trace_, 0, trace_bytes()), "decode attention trace");
    }
}

size_t FusedDecoder::trace_bytes() const {
    return size_t(d_.n_layer) * trace_layer_records() * cu::kDecAttnTraceFields * sizeof(unsigned long long);
}

std::vector<unsigned long long> FusedDecoder::attn_trace() const {
    std::vector<unsigned long long> r;
    if (!trace_ || !opt_.attn_trace) return r;
    r.resize(trace_bytes() / sizeof(unsigned long long));
    CUDA_CHECK(cudaMemcpy(r.data(), trace_, trace_bytes(), cudaMemcpyDeviceToHost), "decode attention trace");
    // zeroed again: blocks without keys leave some fields unwritten, which must not show a past step's
    CUDA_CHECK(cudaMemset(trace_, 0, trace_bytes()), "decode attention trace");
    return r;
}

void FusedDecoder::add_note(const std::string& s) { note_ += (note_.empty() ? "" : "; ") + s; }

// ---------------------------------------------------------------- launches

void FusedDecoder::launch_qkv(const cu::DecQkvArgs& a, bool pdl, const StepLaunch& s) const {
    const char* what = "decode q/k/v";
    if (is_noop(s, DecodeKernel::qkv)) cu::dec_noop(cu::dec_qkv_shape(a), a.pdl_early, stream_, pdl, what);
    else cu::dec_qkv(a, stream_, pdl, what);
    if (s.after_each) s.after_each(DecodeKernel::qkv);
}

void FusedDecoder::launch_qk_norm(const cu::DecQkNormArgs& a, const StepLaunch& s) const {
    const char* what = "decode q/k norm";
    if (is_noop(s, DecodeKernel::qkv)) cu::dec_noop(cu::dec_qk_norm_shape(a), 0, stream_, s.pdl, what);
    else cu::dec_qk_norm(a, stream_, s.pdl, what);
    if (s.after_each) s.after_each(DecodeKernel::qkv);
}

void FusedDecoder::launch_attention(const cu::DecAttnArgs& args, const StepLaunch& s) const {
    const char* what = "decode attention";
    cu::DecAttnArgs a = args;
    a.cluster = s.attn_clusters > 0 ? cluster_blocks() : 0;
    a.clusters = std::max(1, s.attn_clusters);
    a.stage = a.cluster > 0 && opt_.cluster_mma ? stage_ : 0;
    if (s.attn_clusters < 0) a.max_splits = 1;  // one block per KV head: no merge
    a.cluster_mma = opt_.cluster_mma ? 1 : 0;
    if (is_noop(s, DecodeKernel::attention)) cu::dec_noop(cu::dec_attention_shape(a), a.pdl_early, stream_, s.pdl, what);
    else cu::dec_attention(a, stream_, s.pdl, what);
    if (s.after_each) s.after_each(DecodeKernel::attention);
}

void FusedDecoder::launch_proj(DecodeKernel kind, const cu::DecProjArgs& a, const StepLaunch& s,
                               const char* what) const {
    if (is_noop(s, kind)) cu::dec_noop(cu::dec_proj_shape(a), a.pdl_early, stream_, s.pdl, what);
    else cu::dec_proj(a, stream_, s.pdl, what);
    if (s.after_each) s.after_each(kind);
}

void FusedDecoder::launch_lm_head(const StepLaunch& s, int early) const {
    cu::DecProjArgs m = lm_;
    m.pdl_early = early;
    m.y = s.greedy ? nullptr : logits_;
    m.pend = lm_pend_;
    m.argmax = s.greedy ? 1 : 0;
    m.advance = s.greedy ? 1 : 0;
    m.lm_bulk = opt_.lm_bulk ? 1 : 0;
    launch_proj(DecodeKernel::lm_head, m, s, "decode lm_head");
}

void FusedDecoder::launch_step(const StepLaunch& s) const {
    // which kernels release their successor early: the options' masks (for measuring), else the
    // built-in choice; steps past the one-block attention may take their own mask
    const int ek = s.attn_clusters >= 0 && opt_.pdl_early_kinds_deep >= 0 ? opt_.pdl_early_kinds_deep
                                                                           : opt_.pdl_early_kinds;
    for (size_t l = 0; l < layers_.size(); ++l) {
        LayerArgs A = layers_[l];
        A.qkv.pdl_early = pdl_early(DecodeKernel::qkv, ek);
        A.attention.pdl_early = pdl_early(DecodeKernel::attention, ek);
        A.attn_output.pdl_early = pdl_early(DecodeKernel::attn_output, ek);
        A.ffn_gate_up.pdl_early = pdl_early(DecodeKernel::ffn_gate_up, ek);
        A.ffn_down.pdl_early = pdl_early(DecodeKernel::ffn_down, ek);
        A.attention.trace = trace_ && opt_.attn_trace && s.attn_clusters > 0
                                ? trace_ + l * trace_layer_records() * cu::kDecAttnTraceFields
                                : nullptr;
        // Layer 0 follows a copy or the previous step's lm_head, which advances the state
        // this kernel reads with plain loads before its wait: no PDL (docs/perf_log.md run 14).
        launch_qkv(A.qkv, s.pdl && l > 0, s);
        if (d_.qk_norm) launch_qk_norm(A.qk_norm, s);
        // options' kv_prefetch: the previous layer's ffn_down pulls this layer's rows into L2 (a layer
        // ahead of the attention, whose blocks then skip their own prefetch: kv_prefetch 1)
        const bool ahead = s.attn_clusters > 0 && opt_.kv_prefetch > 0 && d_.head_dim % 8 == 0;
        A.attention.no_prefetch = ahead && opt_.kv_prefetch == 1 && l > 0 && A.attention.window == 0;
        launch_attention(A.attention, s);
        if (s.attn_clusters > 1) {  // its input: the clusters' partials, merged as it loads them
            A.attn_output.act = part_o_;
            A.attn_output.act_ml = part_ml_;
            A.attn_output.act_parts = s.attn_clusters;
            A.attn_output.act_hd = d_.head_dim;
        }
        if (ahead && l + 1 < layers_.size() && layers_[l + 1].attention.window == 0) A.ffn_down.ahead = kv_ahead_ + l + 1;
        launch_proj(DecodeKernel::attn_output, A.attn_output, s, "decode attn_output");
        launch_proj(DecodeKernel::ffn_gate_up, A.ffn_gate_up, s, "decode ffn_gate/ffn_up");
        launch_proj(DecodeKernel::ffn_down, A.ffn_down, s, "decode ffn_down");
    }
    launch_lm_head(s, pdl_early(DecodeKernel::lm_head, ek));
}

void FusedDecoder::lm_head_last(const float* x_row) {
    cu::DecProjArgs m = lm_;
    m.act = x_row;
    m.y = logits_;
    m.argmax = 0;
    m.advance = 0;
    m.lm_bulk = opt_.lm_bulk ? 1 : 0;
    cu::dec_proj(m, stream_, false, "lm_head (last row)");
}

// ---------------------------------------------------------------- graphs and runs

void FusedDecoder::drop_graphs() noexcept {
    for (cudaGraphExec_t& g : graph_) {
        if (g) cudaGraphExecDestroy(g);
        g = nullptr;
    }
    for (auto& kv : sampled_graphs_)
        if (kv.second) cudaGraphExecDestroy(kv.second);
    sampled_graphs_.clear();
}

cudaGraphExec_t FusedDecoder::record_graph(const std::function<void()>& body, const char* what) {
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), what);
    try {
        body();
    } catch (...) {
        cudaStreamEndCapture(stream_, &graph);
        if (graph) cudaGraphDestroy(graph);
        throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream_, &graph), what);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) throw_cuda("cudaGraphInstantiate", e, what);
    return exec;
}

int FusedDecoder::attn_variant(int kv_len) const {
    // one block per KV head: on tensor cores up to direct_keys; on CUDA cores (gemma3's head_dim
    // 256) one tile, past which the block's tiles run one after another (Gemma 3 270M: tg128
    // 1,629 with up to 512 keys in one block, 1,794 with up to 32: docs/perf_log.md run 58)
    const int direct = cu::dec_attn_mma_ok(d_.n_head / d_.n_head_kv, d_.head_dim) ? opt_.direct_keys
                                                                               : std::min(opt_.direct_keys, cu::kDecTK);
    if (kv_len <= direct) return -1;
    if (!hopper_ || opt_.cluster_keys <= 0 || kv_len > opt_.cluster_keys) return 0;
    // the fewest clusters (a power of two) holding at most cluster_span positions each: with the
    // default span (8,192) one through 8,192 positions, two to 16,384, four past it (tg128 at depth
    // 16,384 runs at 16,385-16,512 positions), where each warp's keys are two 16-key tiles, both
    // loaded before the wait; each depth's winner in docs/perf_log.md runs 75-76
    // (more clusters of fewer blocks, e.g. cluster_size 1-2 and a short span: the partials merged by
    // attn_output instead of in the cluster; at most kDecMaxSplits blocks per KV head in all)
    const int cs = cluster_blocks();
    int want = (kv_len + opt_.cluster_span - 1) / opt_.cluster_span;
    // staging: at least the clusters a block's keys need to fit its rows (past the most clusters
    // a block whose keys do not fit reads the cache: correct, only slower)
    if (stage_ > 0) want = std::max(want, (kv_len + cs * stage_ - 1) / (cs * stage_));
    int c = 1;
    while (c < want && 2 * c <= cu::kDecAttnMaxClusters && 2 * c * cs <= cu::kDecMaxSplits) c *= 2;
    return c;
}

bool FusedDecoder::capture(bool greedy, int steps, int clusters) {
    for (int attempt = 0; attempt < 2; ++attempt) {
        try {
            StepLaunch s;
            s.greedy = greedy;
            s.attn_clusters = clusters;
            s.pdl = pdl_on();
            graph_slot(greedy, steps, clusters) = record_graph(
                [&]() {
                    for (int i = 0; i < steps; ++i) launch_step(s);
                },
                "decode graph capture");
            return true;
        } catch (const Error& err) {
            cudaGetLastError();
            if (pdl_on()) {
                pdl_ok_ = false;
                drop_graphs();
                add_note(std::string("PDL off: graph capture with PDL failed: ") + err.what());
                continue;
            }
            graphs_ok_ = false;
            add_note(std::string("graphs off: capture failed: ") + err.what());
            return false;
        }
    }
    return false;
}

void FusedDecoder::run(bool greedy, int kv_len, int steps) {
    const int clusters = attn_variant(kv_len);
    if (graphs_on()) {
        cudaGraphExec_t& g = graph_slot(greedy, steps, clusters);
        if (g || capture(greedy, steps, clusters)) {
            CUDA_CHECK(cudaGraphLaunch(g, stream_), "decode graph launch");
            return;
        }
    }
    StepLaunch s;
    s.greedy = greedy;
    s.attn_clusters = clusters;
    s.pdl = pdl_on();
    for (int i = 0; i < steps; ++i) launch_step(s);
}

void FusedDecoder::start(int slot, int32_t token, int pos) {
    *pinned_state_ = cu::DecState{token, pos, slot, 0};
    CUDA_CHECK(cudaMemcpyAsync(state_, pinned_state_, sizeof(cu::DecState), cudaMemcpyHostToDevice, stream_),
               "decode state upload");
}

namespace {
__global__ void feed_sampled_kernel(const int32_t* tok, const uint64_t* state_out, uint64_t* row_state,
                                    cu::DecState* s, int32_t* out, int i) {
    const int32_t t = tok[0];
    const int k = i >= 0 ? i : s->step;
    out[k] = t;          // -1 (no finite logit) is reported by the host from here
    s->step = k + 1;
    s->token = t < 0 ? 0 : t;
    s->pos += 1;
    *row_state = state_out[0];
}
}  // namespace

void FusedDecoder::feed_sampled(const int32_t* tok, const uint64_t* state_out, uint64_t* row_state, int i) {
    feed_sampled_kernel<<<1, 1, 0, stream_>>>(tok, state_out, row_state, state_, out_tokens_, i);
    CUDA_LAUNCH_CHECK("feed_sampled_kernel");
}

void FusedDecoder::sampled(int pos, int n_steps, const std::function<void()>& sample, int sample_key,
                           const int32_t* tok, const uint64_t* state_out, uint64_t* row_state) {
    int i = 0;
    if (sample_graphs_on()) {
        // The variant of a block's last cache length serves its earlier steps too (one block
        // up to direct_keys, and the cluster variants take any length), as in greedy().
        for (; n_steps - i >= kGraphSteps; i += kGraphSteps) {
            const int clusters = attn_variant(pos + i + kGraphSteps);
            cudaGraphExec_t& g = sampled_graphs_[std::make_tuple(clusters, sample_key)];
            if (!g) {
                try {
                    StepLaunch s;
                    s.greedy = false;
                    s.attn_clusters = clusters;
                    s.pdl = pdl_on();
                    g = record_graph(
                        [&]() {
                            for (int k = 0; k < kGraphSteps; ++k) {
                                launch_step(s);
                                sample();
                                feed_sampled(tok, state_out, row_state, -1);
                            }
                        },
                        "sampled decode graph capture");
                } catch (const Error& err) {
                    cudaGetLastError();
                    sampled_graphs_.erase(std::make_tuple(clusters, sample_key));
                    opt_.sample_graphs = false;
                    add_note(std::string("sampled-step graphs off: capture failed: ") + err.what());
                    break;
                }
            }
            CUDA_CHECK(cudaGraphLaunch(g, stream_), "sampled decode graph launch");
        }
    }
    for (; i < n_steps; ++i) {
        run(false, pos + i + 1);
        sample();
        feed_sampled(tok, state_out, row_state, -1);
    }
}

void FusedDecoder::copy_tokens(int n, int32_t* out) {
    CUDA_CHECK(cudaMemcpyAsync(pinned_tokens_, out_tokens_, size_t(n) * 4, cudaMemcpyDeviceToHost, stream_),
               "decoded tokens copy");
    CUDA_CHECK(cudaStreamSynchronize(stream_), "decoded tokens copy");
    std::memcpy(out, pinned_tokens_, size_t(n) * 4);
}

void FusedDecoder::greedy(int slot, int32_t token, int pos, int n_steps, int32_t* out) {
    start(slot, token, pos);
    // kGraphSteps steps per graph launch while that many remain (the device state
    // carries token and position from step to step), then single steps
    int i = 0;
    if (graphs_on())
        for (; n_steps - i >= kGraphSteps; i += kGraphSteps) run(true, pos + i + kGraphSteps, kGraphSteps);
    for (; i < n_steps; ++i) run(true, pos + i + 1);
    copy_tokens(n_steps, out);
}

}  // namespace orcd
