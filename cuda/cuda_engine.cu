// cuda_engine.cu - the CUDA engine: the forward pass of docs/design.md on one GPU, and
// the public methods of CudaEngine (setup and memory: engine_memory.cu).
//
// Per forward step:
//   tokens/positions/slots -> one async copy from pinned memory
//   x = embedding rows (float32 residual stream [rows][n_embd])
//   per layer: h = rmsnorm(x); q,k,v = h·Wᵀ + b; RoPE(q, k); K,V -> fp16 cache;
//              att = softmax(q·Kᵀ/sqrt(hd))·V; x += att·Woᵀ;
//              h = rmsnorm(x); x += (silu(h·Wgᵀ) * h·Wuᵀ)·Wdᵀ
//   logits = rmsnorm(x)·Woutᵀ -> pinned host buffer (the one sync of a decode step)
// Products: decode batches of up to 8 slots (and a single token when the fast
// path is off) use the quantized mat-vec kernel; prompts dequantize the weights
// into a reused fp16 scratch and call cublasGemmEx (linear.cu). Prompts run in
// chunks; each chunk appends its K/V before its attention, so causality within
// and across chunks follows from the per-query key count pos+1.
//
// Fast paths (CudaOptions, all on by default where the GPU allows):
// - fast_decode: a single-sequence step (forward with one token, decode_greedy)
//   runs the fused decoder (fused_decoder.cuh);
// - graphs, pdl: how the fused decoder launches its step;
// - fused_prompt: per layer of a prompt chunk, rmsnorm -> fp16, one q|k|v GEMM,
//   bias+RoPE+KV-append in one kernel, attention, O GEMM (+residual via beta),
//   rmsnorm -> fp16, one gate|up GEMM, SwiGLU -> fp16, down GEMM (+residual).
//   q|k|v and gate|up are uploaded next to each other, so F16 weights feed
//   cuBLAS in place; the last token's logits use the fused decode lm_head.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu_ops.h"
#include "cuda_engine.cuh"
#include "decode_profiler.cuh"
#include "family_kernels.cuh"
#include "kernels.cuh"

namespace orcd {
namespace {

// An ORCD_CUDA_* switch: unset or empty keeps `dflt`; 0, n or f (any case) turns it off.
bool env_on(const char* name, bool dflt) {
    const char* v = std::getenv(name);
    if (!v || !*v) return dflt;
    return !(v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F');
}

// "4G", "4GiB", "512M", "4294967296": bytes (K/M/G/T: powers of 1024). An Error naming the
// variable for anything else.
size_t parse_vram_limit(const char* v) {
    const std::string s(v);
    size_t i = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    std::string unit = s.substr(i);
    for (char& c : unit) c = char(std::toupper(static_cast<unsigned char>(c)));
    if (unit.size() >= 2 && unit.substr(unit.size() - 2) == "IB") unit = unit.substr(0, unit.size() - 2);
    else if (unit.size() == 2 && unit[1] == 'B') unit = unit.substr(0, 1);
    const std::string units = "KMGT";
    if (i == 0 || i > 15 || unit.size() > 1 || (unit.size() == 1 && units.find(unit[0]) == std::string::npos))
        throw Error("ORCD_CUDA_VRAM_LIMIT: '" + s + "' is not a size (bytes, or a number with K, M, G or T, e.g. 4G)");
    size_t n = std::stoull(s.substr(0, i));
    if (unit.size() == 1)
        for (size_t k = 0; k <= units.find(unit[0]); ++k) n *= 1024;
    if (n == 0) throw Error("ORCD_CUDA_VRAM_LIMIT: must be above 0, got '" + s + "'");
    return n;
}

// An integer ORCD_CUDA_* setting in [lo, hi]: unset or empty keeps `dflt`; anything else is an
// Error naming the variable.
int env_int(const char* name, int dflt, int lo, int hi) {
    const char* v = std::getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*end != '\0' || n < lo || n > hi)
        throw Error(std::string(name) + ": '" + v + "' is not an integer in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "]");
    return int(n);
}

}  // namespace

CudaOptions options_from_env() {
    CudaOptions o;
    o.fast_decode = env_on("ORCD_CUDA_FAST_DECODE", o.fast_decode);
    o.graphs = env_on("ORCD_CUDA_GRAPHS", o.graphs);
    o.pdl = env_on("ORCD_CUDA_PDL", o.pdl);
    o.fused_prompt = env_on("ORCD_CUDA_FUSED_PROMPT", o.fused_prompt);
    o.batch_graphs = env_on("ORCD_CUDA_BATCH_GRAPHS", o.batch_graphs);
    o.resident_f16 = env_on("ORCD_CUDA_RESIDENT_F16", o.resident_f16);
    o.sample_split = env_on("ORCD_CUDA_SAMPLE_SPLIT", o.sample_split);
    o.sample_graphs = env_on("ORCD_CUDA_SAMPLE_GRAPHS", o.sample_graphs);
    o.sample_split_full = env_on("ORCD_CUDA_SAMPLE_SPLIT_FULL", o.sample_split_full);
    if (const char* v = std::getenv("ORCD_CUDA_VRAM_LIMIT"); v && *v) o.vram_limit = parse_vram_limit(v);
    // the decode attention's cluster shape at depth (FusedDecoder::attn_variant), for measuring
    o.cluster_size = env_int("ORCD_CUDA_CLUSTER_SIZE", o.cluster_size, 1, cu::kDecAttnClusterMax);
    o.cluster_span = env_int("ORCD_CUDA_CLUSTER_SPAN", o.cluster_span, 1, 1 << 30);
    o.direct_keys = env_int("ORCD_CUDA_DIRECT_KEYS", o.direct_keys, 0, 1 << 30);
    o.pdl_early_kinds = env_int("ORCD_CUDA_PDL_EARLY_KINDS", o.pdl_early_kinds, -1, (1 << kDecodeKernelKinds) - 1);
    o.pdl_early_kinds_deep =
        env_int("ORCD_CUDA_PDL_EARLY_KINDS_DEEP", o.pdl_early_kinds_deep, -1, (1 << kDecodeKernelKinds) - 1);
    o.attn_stage = env_int("ORCD_CUDA_ATTN_STAGE", o.attn_stage, 0, 1 << 20);
    o.lm_bulk = env_on("ORCD_CUDA_LM_BULK", o.lm_bulk);
    o.kv_prefetch = env_int("ORCD_CUDA_KV_PREFETCH", o.kv_prefetch, 0, 2);
    return o;
}

// ---------------------------------------------------------------- options, paths

void CudaEngineImpl::set_options(const CudaOptions& o) {
    if (o.cluster_keys < 0)
        throw Error("CudaEngine.set_options: cluster_keys must be >= 0, got " + std::to_string(o.cluster_keys));
    if (o.split_keys < cu::kDecTK || o.split_keys % cu::kDecTK != 0)
        throw Error("CudaEngine.set_options: split_keys must be a positive multiple of " + std::to_string(cu::kDecTK) +
                    ", got " + std::to_string(o.split_keys));
    if (o.direct_keys < 0)
        throw Error("CudaEngine.set_options: direct_keys must be >= 0, got " + std::to_string(o.direct_keys));
    if (o.attn_stage < 0)
        throw Error("CudaEngine.set_options: attn_stage must be >= 0, got " + std::to_string(o.attn_stage));
    if (o.kv_prefetch < 0 || o.kv_prefetch > 2)
        throw Error("CudaEngine.set_options: kv_prefetch must be 0, 1 or 2, got " + std::to_string(o.kv_prefetch));
    if (o.cluster_span < 1)
        throw Error("CudaEngine.set_options: cluster_span must be >= 1, got " + std::to_string(o.cluster_span));
    for (auto [name, v] : {std::pair<const char*, int>{"pdl_early_kinds", o.pdl_early_kinds},
                           std::pair<const char*, int>{"pdl_early_kinds_deep", o.pdl_early_kinds_deep}})
        if (v < -1 || v >= (1 << kDecodeKernelKinds))
            throw Error(std::string("CudaEngine.set_options: ") + name + " must be -1 or a mask of " +
                        std::to_string(kDecodeKernelKinds) + " bits, got " + std::to_string(v));
    if (o.cluster_size < 1 || o.cluster_size > cu::kDecAttnClusterMax)
        throw Error("CudaEngine.set_options: cluster_size must be in [1, " + std::to_string(cu::kDecAttnClusterMax) +
                    "], got " + std::to_string(o.cluster_size));
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine set_options");
    sync("set_options");
    opt_ = o;
    dec_.set_options(o);
    batch_graphs_.clear();  // they read the weights through the options' paths
    batch_graphs_ok_ = true;
    batch_note_.clear();
}

CudaPaths CudaEngineImpl::paths() const {
    CudaPaths p;
    p.fast_decode_available = dec_.available();
    p.pdl_available = info_.cc_major >= 9;
    p.fast_decode = fast_on();
    p.graphs = p.fast_decode && dec_.graphs_on();
    p.pdl = p.fast_decode && dec_.pdl_on();
    p.fused_prompt = opt_.fused_prompt;
    p.batch_graphs = batch_graphs_on();
    p.batch_graphs_cached = batch_graphs_.size();
    p.resident_f16 = resident_on();
    p.resident_f16_bytes = mem_.resident_f16;
    p.sample_split = opt_.sample_split;
    p.sample_graphs = p.fast_decode && dec_.sample_graphs_on();
    p.sample_split_full = opt_.sample_split && opt_.sample_split_full;
    p.note = dec_.note();
    for (const std::string* n : {&res_note_, &batch_note_})
        if (!n->empty()) p.note += (p.note.empty() ? "" : "; ") + *n;
    return p;
}

// ---------------------------------------------------------------- checks

void CudaEngineImpl::check_greedy_args(const char* who, int slot, int32_t token, int pos, int n_steps) const {
    orcd::check_greedy_args(who, *this, slot, token, pos, n_steps);
}

// ---------------------------------------------------------------- KV memory

bool CudaEngineImpl::kv_reserve(int slot, int n_positions) {
    check_kv_reserve_args(*this, slot, n_positions);
    if (kv_.size(slot) >= n_positions) return true;
    KvPool::Move mv;
    if (!kv_.reserve(slot, n_positions, &mv)) return false;
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine kv_reserve");
    const size_t row = size_t(KD_) * sizeof(__half), pitch = layer_stride_ * sizeof(__half);
    if (mv.n > 0)  // the slot's cached positions to its new range, every layer, K and V
        for (__half* c : {kc_, vc_})
            CUDA_CHECK(cudaMemcpy2DAsync(c + size_t(mv.to) * KD_, pitch, c + size_t(mv.from) * KD_, pitch,
                                         size_t(mv.n) * row, size_t(d_.n_layer), cudaMemcpyDeviceToDevice, stream_),
                       "kv_reserve: moving slot " + std::to_string(slot) + "'s cache");
    // The kernels read slot_off on the device; the stream orders the copy after the steps
    // queued before (they used the old place) and the sync frees the pinned value for reuse.
    pinned_slot_off_[slot] = kv_.offset(slot) * KD_;
    CUDA_CHECK(cudaMemcpyAsync(d_slot_off_ + slot, pinned_slot_off_ + slot, sizeof(int64_t), cudaMemcpyHostToDevice,
                               stream_),
               "kv_reserve: slot table");
    sync("kv_reserve");
    return true;
}

void CudaEngineImpl::kv_release(int slot) {
    check_slot("kv_release", *this, slot);
    kv_.release(slot);  // the table keeps the old offset: no kernel reads a slot without a range
}

int64_t CudaEngineImpl::kv_reserved(int slot) const {
    check_slot("kv_reserved", *this, slot);
    return std::min<int64_t>(kv_.size(slot), n_ctx_);
}

// ---------------------------------------------------------------- the fused single-sequence step

void CudaEngineImpl::fast_forward_one(int slot, int32_t token, int pos, float* logits) {
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine forward");
    dec_.start(slot, token, pos);
    dec_.run(false, pos + 1);
    CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(V_) * 4, cudaMemcpyDeviceToHost, stream_),
               "logits copy");
    sync("forward (logits)");
    std::memcpy(logits, pinned_logits_, size_t(V_) * 4);
}

void CudaEngineImpl::decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) {
    check_greedy_args("decode_greedy", slot, first_token, pos, n_steps);
    if (n_steps == 0) return;
    engine_args::ensure_kv("decode_greedy", *this, slot, int64_t(pos) + n_steps);
    if (!fast_on()) {
        // Without the fused decoder (a family it does not take, or switched off) each step is the
        // batch step of one row (its graph per cache bucket) and the device sampler's first
        // maximum: only the token id comes back, as Model's greedy path gets it
        // (decode_batch_sample), not the 4-byte logits of the whole vocabulary and a host argmax.
        DeviceSampleRow row;
        row.params.temperature = 0.f;
        int32_t t = first_token;
        for (int i = 0; i < n_steps; ++i) {
            const int p = pos + i;
            if (!decode_batch_sample(1, &slot, &t, &p, &row, &out_tokens[i])) {  // (greedy is always supported)
                Engine::decode_greedy(slot, t, p, n_steps - i, out_tokens + i);
                return;
            }
            t = out_tokens[i];
        }
        return;
    }
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine decode_greedy");
    dec_.greedy(slot, first_token, pos, n_steps, out_tokens);
}

bool CudaEngineImpl::decode_sample_steps(int slot, int32_t token, int pos, int n_steps, DeviceSampleRow& row,
                                         int32_t* out_tokens) {
    check_greedy_args("decode_sample_steps", slot, token, pos, n_steps);
    validate(row.params);
    const SamplerParams& p = row.params;
    const bool pen = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    // a mask belongs to one step (it depends on the tokens drawn before it): such rows go step by step
    if (!fast_on() || pen || row.n_logprobs >= 0 || row.mask || !device_sampling_supports(p, V_, 0)) return false;
    if (n_steps == 0) return true;
    engine_args::ensure_kv("decode_sample_steps", *this, slot, int64_t(pos) + n_steps);
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine decode_sample_steps");
    CUDA_CHECK(cudaEventSynchronize(upload_done_), "decode_sample_steps");  // the pinned row is free again
    const SampleLayout lay = sample_layout(n_slots_, V_);
    auto* prow = reinterpret_cast<cu::SampleRow*>(samp_pinned_ + lay.rows);
    auto* drow = reinterpret_cast<cu::SampleRow*>(samp_dev_ + lay.rows);
    auto* dtok = reinterpret_cast<int32_t*>(samp_dev_ + lay.tokens);
    auto* dst = reinterpret_cast<uint64_t*>(samp_dev_ + lay.states);
    prow[0] = cu::SampleRow{p, row.rng_state, nullptr, 0};
    CUDA_CHECK(cudaMemcpyAsync(drow, prow, sizeof(cu::SampleRow), cudaMemcpyHostToDevice, stream_),
               "sampling row upload");
    // each step: the fused step's logits, the draw, the draw fed to the next step (decode_batch_sample's
    // kernels for one row, without the host in between); the sampler's launches depend only on
    // whether this row takes the split path, which names the captured graphs
    dec_.start(slot, token, pos);
    const int sample_key = cu::sample_rows_path(p, V_, opt_.sample_split, opt_.sample_split_full);
    dec_.sampled(
        pos, n_steps,
        [&]() {
            cu::launch_sample_rows(logits_, 1, V_, drow, dtok, dst, stream_, samp_dev_ + lay.work, prow,
                                   opt_.sample_split, opt_.sample_split_full);
        },
        sample_key, dtok, dst, &drow->rng_state);
    CUDA_CHECK(cudaMemcpyAsync(samp_pinned_ + lay.states, dst, sizeof(uint64_t), cudaMemcpyDeviceToHost, stream_),
               "generator state copy");
    CUDA_CHECK(cudaEventRecord(upload_done_, stream_), "decode_sample_steps");
    dec_.copy_tokens(n_steps, out_tokens);  // syncs
    for (int i = 0; i < n_steps; ++i)
        if (out_tokens[i] < 0)
            throw Error("decode_sample_steps: every logit of step " + std::to_string(i) + " is -inf or NaN");
    row.rng_state = *reinterpret_cast<const uint64_t*>(samp_pinned_ + lay.states);
    return true;
}

DecodeProfile CudaEngineImpl::profile_decode(int slot, int32_t token, int pos, int n_steps) {
    check_greedy_args("profile_decode", slot, token, pos, n_steps);
    if (!dec_.available()) throw Error("CudaEngine.profile_decode: " + dec_.note());
    if (n_steps < 1) throw Error("CudaEngine.profile_decode: n_steps must be >= 1");
    engine_args::ensure_kv("profile_decode", *this, slot, int64_t(pos) + n_steps);
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine profile_decode");
    sync("profile_decode");
    return profile_decode_step(dec_, slot, token, pos, n_steps);
}

// ---------------------------------------------------------------- the generic step

const __half* CudaEngineImpl::weights16(std::initializer_list<const DevWeight*> ws) {
    bool in_place = true;
    const uint8_t* expect = nullptr;
    for (const DevWeight* w : ws) {
        if (w->type != T_F16 || (expect && w->data != expect)) {
            in_place = false;
            break;
        }
        expect = w->data + w->bytes();
    }
    if (in_place) return reinterpret_cast<const __half*>((*ws.begin())->data);
    if (resident_on())
        if (const __half* r = resident_.find((*ws.begin())->data)) return r;  // the group follows in order
    size_t off = 0;
    for (const DevWeight* w : ws) {
        cu::dequantize_f16(w->type, w->data, w->elems(), w16_ + off, stream_, w->name.c_str());
        off += size_t(w->elems());
    }
    return w16_;
}

void CudaEngineImpl::linear(const DevWeight& w, const float* x, int rows, float* y, int ldy, const float* bias,
                            bool acc, bool matvec) {
    const __half* r16 = resident_on() ? resident_.find(w.data) : nullptr;
    if (matvec && rows <= cu::kMatvecMaxRows) {
        cu::matvec(w.type, w.data, w.row_bytes, w.n_in, w.n_out, x, w.n_in, rows, y, ldy, bias, acc, stream_,
                   w.name.c_str());
    } else if (r16) {  // gemm_linear's product on the resident fp16 rows, in one GEMM
        cu::f32_to_f16(x, int64_t(rows) * w.n_in, act16_, stream_, w.name.c_str());
        cu::gemm_f16(blas_, r16, w.n_in, w.n_out, act16_, rows, y, ldy, acc, w.name.c_str());
        if (bias) cu::add_bias(y, rows, w.n_out, ldy, bias, stream_, w.name.c_str());
    } else {
        cu::gemm_linear(blas_, stream_, w.type, w.data, w.row_bytes, w.n_in, w.n_out, x, rows, y, ldy, bias, acc,
                        act16_, w16_, w16_elems_, w.name.c_str());
    }
}

void CudaEngineImpl::upload_ids() {
    CUDA_CHECK(cudaMemcpyAsync(d_ids_, pinned_ids_, size_t(R_) * 3 * 4, cudaMemcpyHostToDevice, stream_),
               "token/position upload");
    CUDA_CHECK(cudaEventRecord(upload_done_, stream_), "token/position upload");
}

void CudaEngineImpl::body(int nr, bool mv, int kv_max, Trace* trace, int trace_row0) {
    const int32_t* d_tok = d_ids_;
    const int32_t* d_pos = d_ids_ + R_;
    const int32_t* d_slot = d_ids_ + 2 * R_;
    auto trace_copy = [&](int idx) {
        float* dst = trace->hidden[size_t(idx)].data() + size_t(trace_row0) * E_;
        CUDA_CHECK(cudaMemcpyAsync(dst, x_, size_t(nr) * E_ * 4, cudaMemcpyDeviceToHost, stream_), "trace copy");
    };

    const DevWeight& emb = weights_.tok_embd;
    cu::get_rows(emb.type, emb.data, emb.row_bytes, E_, d_tok, nr, x_, stream_, emb.name.c_str());
    if (d_.embd_scale != 1.f) cu::scale(x_, int64_t(nr) * E_, d_.embd_scale, stream_, "embedding scale");
    if (trace) trace_copy(0);

    bool one_slot = true;  // a prompt chunk: the tensor-core attention may take it
    for (int i = 1; i < nr; ++i) one_slot = one_slot && pinned_ids_[2 * R_ + i] == pinned_ids_[2 * R_];
    cu::AttnPlan plan = cu::attn_plan(nr, kv_max, d_.n_head, info_.sm_count, one_slot);
    plan.partial_rows = part_rows_;  // the decode-shaped attention may split finer within them
    // A pass over the prompt chunks of several slots (forward_rows): when a slot's run of rows is
    // long enough for the tensor-core attention, each run attends on its own with the plan its
    // own forward would use, so a packed prompt's attention is that of the prompt alone.
    struct Run {
        int row, n;
        cu::AttnPlan plan;
    };
    std::vector<Run> runs;
    if (packed_rows_ && !one_slot) {
        bool long_run = false;
        for (int i = 0; i < nr;) {
            int j = i + 1;
            while (j < nr && pinned_ids_[2 * R_ + j] == pinned_ids_[2 * R_ + i]) ++j;
            Run r{i, j - i, cu::attn_plan(j - i, pinned_ids_[R_ + j - 1] + 1, d_.n_head, info_.sm_count, true)};
            r.plan.partial_rows = part_rows_;
            long_run = long_run || r.n >= cu::kFlashMinQ;
            runs.push_back(r);
            i = j;
        }
        if (!long_run) runs.clear();
    }
    // window: the layer's sliding window (0: every earlier key)
    auto attend = [&](const float* q, int ldq, const __half* kc, const __half* vc, const char* ln, int window) {
        if (runs.empty()) {
            cu::attention(q, ldq, kc, vc, d_slot_off_, KD_, d_slot, d_pos, nr, d_.n_head, d_.n_head_kv, hd_, plan,
                          part_o_, part_ml_, att_, QD_, stream_, ln, window);
            return;
        }
        for (const Run& r : runs)
            cu::attention(q + size_t(r.row) * ldq, ldq, kc, vc, d_slot_off_, KD_, d_slot + r.row, d_pos + r.row, r.n,
                          d_.n_head, d_.n_head_kv, hd_, r.plan, part_o_, part_ml_, att_ + size_t(r.row) * QD_, QD_,
                          stream_, ln, window);
    };
    // the fused prompt path runs the plain layer and phi3's; gemma3's extra ops take the other
    const bool fused = !mv && opt_.fused_prompt && !family_ops_;
    // the attention kernels scale scores by 1/sqrt(head_dim); a family's other scale is folded
    // into q (cpu_engine does the same)
    const float q_scale = d_.attn_scale > 0 ? d_.attn_scale * std::sqrt(float(hd_)) : 1.f;
    const int QKVW = QD_ + 2 * KD_;
    for (int l = 0; l < d_.n_layer; ++l) {
        const DevLayer& L = weights_.layers[size_t(l)];
        const int window = d_.layers[size_t(l)].sliding_window;
        const float rope_base = d_.layers[size_t(l)].rope_base;
        const char* ln = L.wq.name.c_str();
        __half* kc = kc_ + size_t(l) * layer_stride_;
        __half* vc = vc_ + size_t(l) * layer_stride_;
        if (fused) {
            cu::rmsnorm_f16(x_, nr, E_, L.attn_norm, d_.rms_eps, act16_, stream_, "attn_norm");
            cu::gemm_f16(blas_, weights16({&L.wq, &L.wk, &L.wv}), E_, QKVW, act16_, nr, qkv_, QKVW, false, ln);
            if (d_.rope_style == RopeStyle::Neox) {
                cu::qkv_post(qkv_, QKVW, nr, d_.n_head, d_.n_head_kv, hd_, L.bq, L.bk, L.bv, d_pos, d_slot,
                             d_.rope_base, kc, vc, d_slot_off_, stream_, ln);
            } else {  // llama: no biases (check_cuda_family), the normal pairing, then the cache
                cu::rope(d_, rope_base, qkv_, QKVW, nr, d_.n_head, d_pos, stream_, ln);
                cu::rope(d_, rope_base, qkv_ + QD_, QKVW, nr, d_.n_head_kv, d_pos, stream_, ln);
                cu::kv_store(qkv_ + QD_, qkv_ + QD_ + KD_, QKVW, nr, KD_, d_slot, d_pos, kc, vc, d_slot_off_,
                             stream_, ln);
            }
            attend(qkv_, QKVW, kc, vc, ln, window);
            cu::f32_to_f16(att_, int64_t(nr) * QD_, act16_, stream_, ln);
            cu::gemm_f16(blas_, weights16({&L.wo}), QD_, E_, act16_, nr, x_, E_, true, L.wo.name.c_str());
            cu::rmsnorm_f16(x_, nr, E_, L.ffn_norm, d_.rms_eps, act16_, stream_, "ffn_norm");
            cu::gemm_f16(blas_, weights16({&L.gate, &L.up}), E_, 2 * F_, act16_, nr, gu_, 2 * F_, false,
                         L.gate.name.c_str());
            cu::swiglu_f16(gu_, F_, nr, act16_, stream_, L.gate.name.c_str());
            cu::gemm_f16(blas_, weights16({&L.down}), F_, E_, act16_, nr, x_, E_, true, L.down.name.c_str());
        } else {
            cu::rmsnorm(x_, nr, E_, L.attn_norm, d_.rms_eps, h_, stream_, "attn_norm");
            linear(L.wq, h_, nr, q_, QD_, L.bq, false, mv);
            linear(L.wk, h_, nr, k_, KD_, L.bk, false, mv);
            linear(L.wv, h_, nr, v_, KD_, L.bv, false, mv);
            if (L.q_norm) {  // gemma3: per head, rows of head_dim
                cu::rmsnorm_rows(q_, nr * d_.n_head, hd_, L.q_norm, d_.rms_eps, stream_, "attn_q_norm");
                cu::rmsnorm_rows(k_, nr * d_.n_head_kv, hd_, L.k_norm, d_.rms_eps, stream_, "attn_k_norm");
            }
            if (rope_freq_) {  // YaRN (gpt-oss): the layer's frequency table and magnitude factor
                const double* f = rope_freq_ + size_t(l) * (hd_ / 2);
                const bool neox = d_.rope_style == RopeStyle::Neox;
                cu::rope_freqs(q_, QD_, nr, d_.n_head, hd_, d_pos, f, d_.yarn_mscale, neox, stream_, ln);
                cu::rope_freqs(k_, KD_, nr, d_.n_head_kv, hd_, d_pos, f, d_.yarn_mscale, neox, stream_,
                               L.wk.name.c_str());
            } else {
                cu::rope(d_, rope_base, q_, QD_, nr, d_.n_head, d_pos, stream_, ln);
                cu::rope(d_, rope_base, k_, KD_, nr, d_.n_head_kv, d_pos, stream_, L.wk.name.c_str());
            }
            if (q_scale != 1.f) cu::scale(q_, int64_t(nr) * QD_, q_scale, stream_, "attention scale");
            cu::kv_store(k_, v_, KD_, nr, KD_, d_slot, d_pos, kc, vc, d_slot_off_, stream_, ln);
            if (L.sinks)  // gpt-oss: a sink logit per head joins each softmax
                cu::attention_sinks(q_, QD_, kc, vc, d_slot_off_, KD_, d_slot, d_pos, nr, d_.n_head, d_.n_head_kv,
                                    hd_, window, L.sinks, att_, QD_, stream_, ln);
            else
                attend(q_, QD_, kc, vc, ln, window);
            // a block's output joins the residual stream directly, or (gemma3) through its
            // own norm first: into h_, normed in place, added
            auto residual = [&](const DevWeight& w, const float* in, const float* bias, const float* post_norm,
                                const char* nn) {
                if (!post_norm) {
                    linear(w, in, nr, x_, E_, bias, true, mv);  // residual add
                    return;
                }
                linear(w, in, nr, h_, E_, bias, false, mv);
                cu::rmsnorm_rows(h_, nr, E_, post_norm, d_.rms_eps, stream_, nn);
                cu::add(x_, h_, int64_t(nr) * E_, stream_, nn);
            };
            residual(L.wo, att_, L.bo, L.post_attn_norm, "post_attention_norm");
            cu::rmsnorm(x_, nr, E_, L.ffn_norm, d_.rms_eps, h_, stream_, "ffn_norm");
            if (L.router.data) {  // gpt-oss
                moe_ffn(L, nr, mv);
                if (trace) trace_copy(l + 1);
                continue;
            }
            linear(L.gate, h_, nr, g_, F_, nullptr, false, mv);
            linear(L.up, h_, nr, u_, F_, nullptr, false, mv);
            if (d_.activation == Activation::GeluTanh)
                cu::geglu_tanh(g_, u_, int64_t(nr) * F_, stream_, L.gate.name.c_str());
            else
                cu::swiglu(g_, u_, int64_t(nr) * F_, stream_, L.gate.name.c_str());
            residual(L.down, g_, nullptr, L.post_ffn_norm, "post_ffw_norm");
        }
        if (trace) trace_copy(l + 1);
    }
}

void CudaEngineImpl::moe_ffn(const DevLayer& L, int nr, bool mv) {
    const int X = d_.n_expert, K = d_.n_expert_used, Fe = d_.n_ff_exp;
    const char* rn = L.router.name.c_str();
    // the router's logits to the host, where the CPU engine's moe_route picks each row's experts;
    // in float32 (the mat-vec, 8 rows a call) whatever the pass: a pick is discrete, so its logits
    // should round as little as the CPU's
    for (int r0 = 0; r0 < nr; r0 += cu::kMatvecMaxRows)
        linear(L.router, h_ + size_t(r0) * E_, std::min(cu::kMatvecMaxRows, nr - r0), router_ + size_t(r0) * X, X,
               L.router_b, false, true);
    CUDA_CHECK(cudaMemcpyAsync(pinned_router_, router_, size_t(nr) * X * 4, cudaMemcpyDeviceToHost, stream_),
               "router logits copy");
    sync("mixture of experts (router)");
    std::vector<int32_t> ids(size_t(nr) * K);
    std::vector<float> w(size_t(nr) * K);
    cpu_ops::moe_route(pinned_router_, nr, X, K, ids.data(), w.data());
    // the (row, weight) pairs grouped by expert: expert e's at [start[e], start[e + 1])
    std::vector<int> start(size_t(X) + 1, 0);
    for (int32_t e : ids) ++start[size_t(e) + 1];
    for (int e = 0; e < X; ++e) start[size_t(e) + 1] += start[size_t(e)];
    const size_t pairs = size_t(nr) * K;
    auto* rows = reinterpret_cast<int32_t*>(pinned_moe_);
    auto* wts = reinterpret_cast<float*>(pinned_moe_ + pairs * 4);
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int r = 0; r < nr; ++r)
        for (int j = 0; j < K; ++j) {
            const int at = fill[size_t(ids[size_t(r) * K + j])]++;
            rows[at] = r;
            wts[at] = w[size_t(r) * K + j];
        }
    CUDA_CHECK(cudaMemcpyAsync(d_moe_, pinned_moe_, pairs * 8, cudaMemcpyHostToDevice, stream_), "expert rows upload");
    const auto* d_rows = reinterpret_cast<const int32_t*>(d_moe_);
    const auto* d_w = reinterpret_cast<const float*>(d_moe_ + pairs * 4);
    for (int e = 0; e < X; ++e) {
        const int m = start[size_t(e) + 1] - start[size_t(e)];
        if (m == 0) continue;
        const int32_t* er = d_rows + start[size_t(e)];
        cu::gather_rows(h_, E_, er, m, moe_in_, stream_, rn);
        linear(L.gate_e.expert(e), moe_in_, m, g_, Fe, L.gate_e.bias_of(e), false, mv);
        linear(L.up_e.expert(e), moe_in_, m, u_, Fe, L.up_e.bias_of(e), false, mv);
        cu::swiglu_oai(g_, u_, int64_t(m) * Fe, d_.swiglu_alpha, d_.swiglu_limit, stream_, rn);
        linear(L.down_e.expert(e), g_, m, moe_out_, E_, L.down_e.bias_of(e), false, mv);
        cu::scatter_add_rows(x_, E_, er, d_w + start[size_t(e)], m, moe_out_, stream_, rn);
    }
}

void CudaEngineImpl::device_logits(int nr, bool mv) {
    cu::rmsnorm(x_, nr, E_, weights_.output_norm, d_.rms_eps, h_, stream_, "output_norm");
    linear(weights_.output, h_, nr, logits_, V_, nullptr, false, mv);
}

void CudaEngineImpl::step(int nr, bool mv, int kv_max, Logits mode, float* logits, Trace* trace, int trace_row0) {
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine step");
    upload_ids();
    body(nr, mv, kv_max, trace, trace_row0);
    if (mode == Logits::Last) {
        if (fast_on()) {
            dec_.lm_head_last(x_ + size_t(nr - 1) * E_);
        } else {
            cu::rmsnorm(x_ + size_t(nr - 1) * E_, 1, E_, weights_.output_norm, d_.rms_eps, h_, stream_, "output_norm");
            linear(weights_.output, h_, 1, logits_, V_, nullptr, false, true);
        }
        CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(V_) * 4, cudaMemcpyDeviceToHost, stream_),
                   "logits copy");
        sync("forward (logits)");
        std::memcpy(logits, pinned_logits_, size_t(V_) * 4);
    } else if (mode == Logits::All) {
        cu::rmsnorm(x_, nr, E_, weights_.output_norm, d_.rms_eps, h_, stream_, "output_norm");
        for (int r0 = 0; r0 < nr; r0 += L_) {
            const int rows = std::min(L_, nr - r0);
            linear(weights_.output, h_ + size_t(r0) * E_, rows, logits_, V_, nullptr, false, mv);
            CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(rows) * V_ * 4, cudaMemcpyDeviceToHost,
                                       stream_),
                       "logits copy");
            sync("forward (logits)");
            std::memcpy(logits + size_t(r0) * V_, pinned_logits_, size_t(rows) * V_ * 4);
        }
    } else if (trace) {
        sync("forward (trace)");
    }
}

void CudaEngineImpl::forward(int slot, const int32_t* tokens, int n, int pos0, float* logits, bool all_logits,
                             Trace* trace) {
    check_forward_args("forward", *this, slot, tokens, n, pos0);
    engine_args::ensure_kv("forward", *this, slot, int64_t(pos0) + n);
    if (n == 1 && !trace && fast_on()) {
        fast_forward_one(slot, tokens[0], pos0, logits);
        return;
    }
    if (trace) {
        trace->n_tokens = n;
        trace->n_embd = E_;
        trace->hidden.assign(size_t(d_.n_layer) + 1, std::vector<float>(size_t(n) * E_));
    }
    for (int t0 = 0; t0 < n; t0 += C_) {
        const int nc = std::min(C_, n - t0);
        CUDA_CHECK(cudaEventSynchronize(upload_done_), "forward");  // the pinned ids are free again
        for (int i = 0; i < nc; ++i) {
            pinned_ids_[i] = tokens[t0 + i];
            pinned_ids_[R_ + i] = pos0 + t0 + i;
            pinned_ids_[2 * R_ + i] = slot;
        }
        const bool last = t0 + nc == n;
        const Logits mode = all_logits ? Logits::All : (last ? Logits::Last : Logits::None);
        step(nc, n == 1, pos0 + t0 + nc, mode, all_logits ? logits + size_t(t0) * V_ : logits, trace, t0);
    }
}

void CudaEngineImpl::forward_rows(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos, int k,
                                  const int32_t* out_rows, float* logits) {
    check_forward_rows_args(*this, n, slots, tokens, pos, k, out_rows);
    {  // every slot's memory first: a full pool leaves nothing evaluated
        std::vector<int64_t> end(size_t(n_slots_), 0);
        for (int i = 0; i < n; ++i) end[size_t(slots[i])] = std::max<int64_t>(end[size_t(slots[i])], pos[i] + 1);
        for (int s = 0; s < n_slots_; ++s)
            if (end[size_t(s)] > 0) engine_args::ensure_kv("forward_rows", *this, s, end[size_t(s)]);
    }
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine forward_rows");
    for (int r0 = 0; r0 < n; r0 += C_) {  // chunks of rows; a slot's later rows see its earlier ones in the cache
        const int nc = std::min(C_, n - r0);
        CUDA_CHECK(cudaEventSynchronize(upload_done_), "forward_rows");  // the pinned ids are free again
        int kv_max = 0;
        for (int i = 0; i < nc; ++i) {
            pinned_ids_[i] = tokens[r0 + i];
            pinned_ids_[R_ + i] = pos[r0 + i];
            pinned_ids_[2 * R_ + i] = slots[r0 + i];
            kv_max = std::max(kv_max, pos[r0 + i] + 1);
        }
        packed_rows_ = true;
        try {
            step(nc, nc <= cu::kMatvecMaxRows, kv_max, Logits::None, nullptr, nullptr, 0);
        } catch (...) {
            packed_rows_ = false;
            throw;
        }
        packed_rows_ = false;
        std::vector<int> mine;  // indices into out_rows of this chunk's rows
        for (int o = 0; o < k; ++o)
            if (out_rows[o] >= r0 && out_rows[o] < r0 + nc) mine.push_back(o);
        for (size_t b = 0; b < mine.size(); b += size_t(L_)) {  // their logits, L_ rows at a time
            const int rows = int(std::min(mine.size() - b, size_t(L_)));
            for (int j = 0; j < rows; ++j)  // the norm gathers the rows into h_
                cu::rmsnorm(x_ + size_t(out_rows[mine[b + j]] - r0) * E_, 1, E_, weights_.output_norm, d_.rms_eps,
                            h_ + size_t(j) * E_, stream_, "output_norm");
            linear(weights_.output, h_, rows, logits_, V_, nullptr, false, rows <= cu::kMatvecMaxRows);
            CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(rows) * V_ * 4, cudaMemcpyDeviceToHost,
                                       stream_),
                       "logits copy");
            sync("forward_rows (logits)");
            for (int j = 0; j < rows; ++j)
                std::memcpy(logits + size_t(mine[b + j]) * V_, pinned_logits_ + size_t(j) * V_, size_t(V_) * 4);
        }
    }
}

void CudaEngineImpl::batch_step(int n, bool mv, int kv_max) {
    // n <= n_slots_ <= min(R_, L_): the bucket fits the id, activation and logit rows
    const int nb = batch_row_bucket(n, mv ? std::min(n_slots_, cu::kMatvecMaxRows) : n_slots_);
    const int kvb = batch_kv_bucket(kv_max, n_ctx_);
    for (int i = n; i < nb; ++i) {
        pinned_ids_[i] = pinned_ids_[n - 1];
        pinned_ids_[R_ + i] = pinned_ids_[R_ + n - 1];
        pinned_ids_[2 * R_ + i] = pinned_ids_[2 * R_ + n - 1];
    }
    upload_ids();
    auto run = [&]() {
        body(nb, mv, kvb, nullptr, 0);
        device_logits(nb, mv);
    };
    if (batch_graphs_on()) {
        const uint64_t key = BatchGraphCache::key(mv, nb, kvb);
        if (cudaGraphExec_t g = batch_graphs_.find(key)) {
            CUDA_CHECK(cudaGraphLaunch(g, stream_), "batch graph launch");
            return;
        }
        if (!batch_graphs_.first_use(key)) {
            cudaGraphExec_t g = nullptr;
            try {
                g = record_stream_graph(stream_, run, "batch graph capture");
            } catch (const Error& e) {
                batch_graphs_ok_ = false;  // run uncaptured from now on
                batch_note_ = std::string("batch graphs off: capture failed: ") + e.what();
            }
            if (g) {
                batch_graphs_.put(key, g, stream_);
                CUDA_CHECK(cudaGraphLaunch(g, stream_), "batch graph launch");
                return;
            }
        }
    }
    run();
}

void CudaEngineImpl::decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                                  float* logits) {
    check_decode_batch_args(*this, n, slots, tokens, pos);  // so n <= n_slots_ (distinct slots)
    for (int i = 0; i < n; ++i) engine_args::ensure_kv("decode_batch", *this, slots[i], int64_t(pos[i]) + 1);
    int kv_max = 0;
    for (int i = 0; i < n; ++i) kv_max = std::max(kv_max, pos[i] + 1);
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine decode_batch");
    CUDA_CHECK(cudaEventSynchronize(upload_done_), "decode_batch");
    for (int i = 0; i < n; ++i) {
        pinned_ids_[i] = tokens[i];
        pinned_ids_[R_ + i] = pos[i];
        pinned_ids_[2 * R_ + i] = slots[i];
    }
    batch_step(n, n <= cu::kMatvecMaxRows, kv_max);
    CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(n) * V_ * 4, cudaMemcpyDeviceToHost, stream_),
               "logits copy");
    sync("decode_batch (logits)");
    std::memcpy(logits, pinned_logits_, size_t(n) * V_ * 4);
}

void CudaEngineImpl::upload_and_apply_masks(int n, const DeviceSampleRow* rows, const SampleLayout& lay) {
    const size_t words = size_t(token_mask_words(V_));
    auto* prows = reinterpret_cast<int32_t*>(samp_pinned_ + lay.mask_rows);
    auto* pmasks = reinterpret_cast<uint32_t*>(samp_pinned_ + lay.masks);
    int m = 0;
    for (int i = 0; i < n; ++i) {
        if (!rows[i].mask) continue;
        prows[m] = i;
        std::memcpy(pmasks + size_t(m) * words, rows[i].mask, words * 4);
        ++m;
    }
    if (m == 0) return;  // unconstrained steps: no copy, no kernel
    CUDA_CHECK(cudaMemcpyAsync(samp_dev_ + lay.mask_rows, samp_pinned_ + lay.mask_rows,
                               lay.masks - lay.mask_rows + size_t(m) * words * 4, cudaMemcpyHostToDevice, stream_),
               "token masks upload");
    cu::launch_apply_token_masks(logits_, V_, m, reinterpret_cast<const int32_t*>(samp_dev_ + lay.mask_rows),
                                 reinterpret_cast<const uint32_t*>(samp_dev_ + lay.masks), stream_);
}

bool CudaEngineImpl::decode_batch_sample(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                                         DeviceSampleRow* rows, int32_t* out_tokens) {
    check_decode_batch_args(*this, n, slots, tokens, pos);  // so n <= n_slots_
    for (int i = 0; i < n; ++i) {
        validate(rows[i].params);
        if (!device_sampling_supports(rows[i].params, V_, rows[i].n_history)) return false;
    }
    for (int i = 0; i < n; ++i) engine_args::ensure_kv("decode_batch_sample", *this, slots[i], int64_t(pos[i]) + 1);
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine decode_batch_sample");
    CUDA_CHECK(cudaEventSynchronize(upload_done_), "decode_batch_sample");  // pinned ids (and rows) free again
    // Stage each row and its penalty window (the last penalty_last_n tokens, or all), packed
    // right after the rows: one upload for both.
    const SampleLayout lay = sample_layout(n_slots_, V_);
    auto* prow = reinterpret_cast<cu::SampleRow*>(samp_pinned_ + lay.rows);
    auto* phist = reinterpret_cast<int32_t*>(samp_pinned_ + lay.hist);
    const auto* dhist = reinterpret_cast<const int32_t*>(samp_dev_ + lay.hist);
    size_t used = 0;
    for (int i = 0; i < n; ++i) {
        const SamplerParams& p = rows[i].params;
        const bool pen = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
        int w = 0;
        if (pen && p.penalty_last_n != 0)
            w = p.penalty_last_n < 0 ? rows[i].n_history : std::min(rows[i].n_history, p.penalty_last_n);
        std::memcpy(phist + used, rows[i].history + (rows[i].n_history - w), size_t(w) * 4);
        prow[i] = cu::SampleRow{p, rows[i].rng_state, dhist + used, w};
        used += size_t(w);
    }
    const size_t up_bytes = used ? lay.hist + used * 4 : sizeof(cu::SampleRow) * size_t(n);
    CUDA_CHECK(cudaMemcpyAsync(samp_dev_ + lay.rows, samp_pinned_ + lay.rows, up_bytes, cudaMemcpyHostToDevice,
                               stream_), "sampling rows upload");
    if (n == 1 && fast_on()) {
        dec_.start(slots[0], tokens[0], pos[0]);  // the fused step: its logits land in logits_
        dec_.run(false, pos[0] + 1);
    } else {
        int kv_max = 0;
        for (int i = 0; i < n; ++i) {
            kv_max = std::max(kv_max, pos[i] + 1);
            pinned_ids_[i] = tokens[i];
            pinned_ids_[R_ + i] = pos[i];
            pinned_ids_[2 * R_ + i] = slots[i];
        }
        // the GEMM path from two rows on: the 8-row mat-vec path took 4.8 ms a step at 8 rows on
        // the H200, more than the GEMM path at 32 (docs/perf_log.md, round 4); one row (a family
        // without the fused decoder) takes the mat-vec path forward() takes for one token
        batch_step(n, n == 1, kv_max);
    }
    auto* dtok = reinterpret_cast<int32_t*>(samp_dev_ + lay.tokens);
    auto* dst = reinterpret_cast<uint64_t*>(samp_dev_ + lay.states);
    // logprobs: the rows asking are copied aside before the sampler changes them (nothing when none asks)
    const bool want_logprobs = logprob_rows_.save(logits_, n, V_, rows, stream_);
    upload_and_apply_masks(n, rows, lay);
    cu::launch_sample_rows(logits_, n, V_, reinterpret_cast<const cu::SampleRow*>(samp_dev_ + lay.rows), dtok, dst,
                           stream_, samp_dev_ + lay.work, prow, opt_.sample_split, opt_.sample_split_full);
    // tokens and states come back in one copy (the states follow the tokens' region)
    CUDA_CHECK(cudaMemcpyAsync(samp_pinned_ + lay.tokens, dtok, lay.states - lay.tokens + size_t(n) * 8,
                               cudaMemcpyDeviceToHost, stream_), "sampled tokens copy");
    CUDA_CHECK(cudaEventRecord(upload_done_, stream_), "decode_batch_sample");
    sync("decode_batch_sample");
    const auto* ptok = reinterpret_cast<const int32_t*>(samp_pinned_ + lay.tokens);
    const auto* pst = reinterpret_cast<const uint64_t*>(samp_pinned_ + lay.states);
    for (int i = 0; i < n; ++i) {
        if (ptok[i] < 0) throw Error("decode_batch_sample: every logit of row " + std::to_string(i) + " is -inf or NaN");
        out_tokens[i] = ptok[i];
        rows[i].rng_state = pst[i];
    }
    if (want_logprobs) logprob_rows_.finish(dtok, V_, rows, stream_);  // from the saved rows and the drawn ids
    return true;
}

std::unique_ptr<CudaEngine> make_cuda_engine(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots,
                                             ProgressFn progress, int device, size_t kv_memory) {
    return std::make_unique<CudaEngineImpl>(std::move(file), n_ctx, n_slots, progress, device, kv_memory);
}

}  // namespace orcd
