// engine_memory.cu - CudaEngineImpl's setup: the model checked, the scratch planned,
// the memory check before any allocation, the allocations, the weight upload (DeviceWeights)
// and the fused decoder's plan and arguments; and their release.
//
// Device memory: the weights buffer, the K and V pools (fp16 [layer][pool position][n_head_kv *
// head_dim]; cpp/kv_pool.h says how the slots share them) and one scratch buffer carved into the slices below. Prompts run in chunks of
// up to kPromptChunk tokens, so the activations hold max(chunk, n_slots) rows. When
// CudaOptions::resident_f16 is on and the GPU has the room (everything else, then
// kResidentHeadroom left free), a resident fp16 copy of the matrices (resident_f16.cuh).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "cuda_engine.cuh"
#include "family_kernels.cuh"
#include "kernels.cuh"

namespace orcd {
namespace {

constexpr int kPromptChunk = 512;
constexpr size_t kAlign = 256;
constexpr size_t kCublasWorkspace = size_t(32) << 20;
constexpr size_t kReserve = size_t(64) << 20;      // CUDA context growth and cuBLAS internals
constexpr size_t kW16MaxElems = size_t(16) << 20;  // fp16 scratch cap: lm_head is dequantized in chunks
constexpr int kLogitRowsMin = 16;
// Free memory the resident fp16 copy must leave: other processes and the CUDA context's growth.
constexpr size_t kResidentHeadroom = size_t(1) << 30;
// An automatic KV pool stays within this share of the free memory (with the rest of the engine).
constexpr double kAutoKvShare = 0.9;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::string fmt_bytes(size_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%zu bytes (%.1f MiB)", b, double(b) / (1024.0 * 1024.0));
    return buf;
}

}  // namespace

CudaEngineImpl::CudaEngineImpl(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots, const ProgressFn& progress,
                               int device, size_t kv_memory)
    : file_(std::move(file)), n_ctx_(n_ctx), n_slots_(n_slots), dev_(device), opt_(options_from_env()),
      kv_memory_(kv_memory) {
    try {
        build(progress);
    } catch (...) {
        release();
        throw;
    }
}

void CudaEngineImpl::release() noexcept {
    if (dev_ >= 0) cudaSetDevice(dev_);
    if (stream_) cudaStreamSynchronize(stream_);
    dec_.release();
    if (blas_) cublasDestroy(blas_);
    blas_ = nullptr;
    if (upload_done_) cudaEventDestroy(upload_done_);
    upload_done_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
    batch_graphs_.clear();
    resident_.clear();
    for (void* p : {static_cast<void*>(wbuf_), static_cast<void*>(sbuf_), static_cast<void*>(kc_),
                    static_cast<void*>(vc_), static_cast<void*>(res_buf_), static_cast<void*>(d_slot_off_)})
        if (p) cudaFree(p);
    wbuf_ = sbuf_ = nullptr;
    res_buf_ = nullptr;
    kc_ = vc_ = nullptr;
    d_slot_off_ = nullptr;
    if (pinned_slot_off_) cudaFreeHost(pinned_slot_off_);
    pinned_slot_off_ = nullptr;
    if (pinned_ids_) cudaFreeHost(pinned_ids_);
    if (pinned_logits_) cudaFreeHost(pinned_logits_);
    if (samp_pinned_) cudaFreeHost(samp_pinned_);
    pinned_ids_ = nullptr;
    pinned_logits_ = nullptr;
    samp_pinned_ = nullptr;
    if (pinned_router_) cudaFreeHost(pinned_router_);
    if (pinned_moe_) cudaFreeHost(pinned_moe_);
    pinned_router_ = nullptr;
    pinned_moe_ = nullptr;
    router_ = moe_in_ = moe_out_ = nullptr;  // views of the scratch
    d_moe_ = nullptr;
    rope_freq_ = nullptr;
}

void CudaEngineImpl::build(const ProgressFn& progress) {
    if (n_ctx_ < 1) throw Error("CudaEngine: n_ctx must be >= 1, got " + std::to_string(n_ctx_));
    if (n_slots_ < 1) throw Error("CudaEngine: n_slots must be >= 1, got " + std::to_string(n_slots_));
    if (!file_) throw Error("CudaEngine: no model file");
    d_ = describe_model(*file_);
    E_ = d_.n_embd;
    hd_ = d_.head_dim;
    QD_ = d_.n_head * hd_;
    KD_ = d_.n_head_kv * hd_;
    F_ = std::max(d_.n_ff, d_.n_ff_exp);  // gpt-oss: g_ / u_ hold an expert's rows
    V_ = d_.n_vocab;
    const std::string where = "CudaEngine(" + file_->path() + ")";
    check_cuda_family(d_, where);  // features of other families the generic step lacks: refused by name
    family_ops_ = d_.qk_norm || d_.post_norms || d_.activation != Activation::Silu || d_.embd_scale != 1.f ||
                  d_.attn_scale != 0.f || d_.n_expert > 0 || d_.attn_sinks || d_.attn_out_bias ||
                  d_.rope_scaling != RopeScaling::None;
    for (const LayerDesc& L : d_.layers) family_ops_ = family_ops_ || L.rope_base != d_.rope_base;
    if (hd_ < 2 || hd_ % 2 != 0 || hd_ > cu::kAttnMaxHeadDim)
        throw Error(where + ": head_dim " + std::to_string(hd_) + " is not supported (even, at most " +
                    std::to_string(cu::kAttnMaxHeadDim) + ")");
    if (d_.n_head_kv < 1 || d_.n_head % d_.n_head_kv != 0)
        throw Error(where + ": n_head " + std::to_string(d_.n_head) + " is not a multiple of n_head_kv " +
                    std::to_string(d_.n_head_kv));
    weights_.plan(d_, where);

    // ---- scratch plan
    C_ = std::min(kPromptChunk, n_ctx_);
    R_ = std::max(C_, n_slots_);
    L_ = std::max(kLogitRowsMin, n_slots_);
    size_t max_layer_w = 0;
    for (const LayerDesc& L : d_.layers)
        for (const TensorInfo* t : {L.wq, L.wk, L.wv, L.wqkv, L.wo, L.w_gate, L.w_up, L.w_gate_up, L.w_down})
            if (t) max_layer_w = std::max(max_layer_w, size_t(t->n_elements()));
    for (const LayerDesc& L : d_.layers)  // gpt-oss: one expert at a time, and the router
        for (const ExpertTensor* x : {&L.gate_exps, &L.up_exps, &L.down_exps})
            if (x->w) max_layer_w = std::max({max_layer_w, size_t(x->n_in * x->n_out),
                                              size_t(L.router ? L.router->n_elements() : 0)});
    w16_elems_ = std::max({max_layer_w, std::min(size_t(d_.output->n_elements()), kW16MaxElems), size_t(E_),
                           size_t(QD_ + 2 * KD_) * E_, size_t(2) * F_ * E_});
    // Device properties first (this creates the context), then the memory check.
    info_ = device_info(dev_);
    if (opt_.vram_limit) info_.free_mem = std::min(info_.free_mem, opt_.vram_limit);  // plan as on a smaller GPU
    size_t part_rows = 0;
    for (int nq = 1; nq <= R_; ++nq)
        part_rows = std::max(part_rows,
                             cu::attn_partials(nq, d_.n_head, cu::attn_plan(nq, n_ctx_, d_.n_head, info_.sm_count)));
    dec_.plan(d_, info_, n_ctx_);
    dec_.set_options(opt_);

    part_rows_ = part_rows;
    const size_t fR = size_t(R_);
    const SampleLayout slay = sample_layout(n_slots_, V_);
    samp_bytes_ = slay.bytes;
    auto slice = [](auto** p, size_t bytes) { return ScratchSlice{reinterpret_cast<void**>(p), bytes}; };
    std::vector<ScratchSlice> slices = {
        slice(&x_, fR * E_ * 4),
        slice(&h_, fR * E_ * 4),
        slice(&qkv_, fR * (QD_ + 2 * KD_) * 4),  // q_, k_, v_ of the mat-vec path inside
        slice(&att_, fR * QD_ * 4),
        slice(&gu_, fR * 2 * F_ * 4),            // g_, u_ of the mat-vec path inside
        slice(&logits_, size_t(L_) * V_ * 4),
        slice(&part_o_, part_rows * hd_ * 4),
        slice(&part_ml_, part_rows * sizeof(float2)),
        slice(&act16_, fR * std::max({E_, F_, QD_}) * 2),
        slice(&w16_, w16_elems_ * 2),
        slice(&d_ids_, fR * 3 * 4),
        slice(&samp_dev_, samp_bytes_),
        {&blas_ws_, kCublasWorkspace},
    };
    const size_t moe_k = size_t(d_.n_expert_used) * fR;  // routed (row, expert) pairs of a pass at most
    if (d_.n_expert > 0) {
        slices.push_back(slice(&router_, fR * d_.n_expert * 4));
        slices.push_back(slice(&moe_in_, fR * E_ * 4));
        slices.push_back(slice(&moe_out_, fR * E_ * 4));
        slices.push_back(slice(&d_moe_, moe_k * 8));  // rows (int32), then weights (float)
    }
    if (d_.rope_scaling == RopeScaling::Yarn) slices.push_back(slice(&rope_freq_, size_t(d_.n_layer) * (hd_ / 2) * 8));
    dec_.add_scratch(slices);
    size_t sbytes = 0;
    for (const ScratchSlice& s : slices) sbytes += align_up(s.bytes);
    const size_t wbytes = weights_.bytes();

    // ---- the KV pool: kv_memory_ bytes; or (0, auto) every slot's n_ctx positions where they
    // fit in kAutoKvShare of the free memory beside everything else, else as many as fit there,
    // never fewer than one sequence of n_ctx (the memory check below reports a GPU without
    // that). The resident fp16 copy comes after it: on a GPU short of memory, the sequences
    // served at once matter more than the prompt path's speed.
    const size_t pos_bytes = size_t(d_.n_layer) * KD_ * 2 * sizeof(__half);  // K and V
    size_t budget = kv_memory_;
    if (budget == 0) {
        const size_t worst = size_t(kv_pool_positions(where, n_slots_, n_ctx_, 0, pos_bytes)) * pos_bytes;
        const size_t one = size_t(kv_pool_positions(where, 1, n_ctx_, 0, pos_bytes)) * pos_bytes;
        const size_t others = wbytes + sbytes + kReserve;
        const size_t share = size_t(double(info_.free_mem) * kAutoKvShare);
        budget = std::max(one, std::min(worst, share > others ? share - others : 0));
    }
    const int64_t kv_positions = kv_pool_positions(where, n_slots_, n_ctx_, budget, pos_bytes);
    kv_ = KvPool(n_slots_, kv_positions, kKvUnit);
    layer_stride_ = size_t(kv_positions) * KD_;
    const size_t kv_bytes = size_t(d_.n_layer) * layer_stride_ * sizeof(__half);  // one pool (K or V)
    mem_.weights = wbytes;
    mem_.kv = 2 * kv_bytes;
    mem_.scratch = sbytes;

    // ---- enough memory? (nothing allocated yet)
    const size_t need = mem_.total() + kReserve;
    if (need > info_.free_mem)
        throw CudaError("not enough GPU memory: need " + std::to_string(need) + " bytes, " +
                        std::to_string(info_.free_mem) + " free on " + info_.name + " (weights " +
                        fmt_bytes(mem_.weights) + ", KV pool " + fmt_bytes(mem_.kv) + " for " +
                        std::to_string(kv_positions) + " positions (n_ctx=" + std::to_string(n_ctx_) +
                        ", n_slots=" + std::to_string(n_slots_) + "), scratch " +
                        fmt_bytes(mem_.scratch) + ", reserve " + fmt_bytes(kReserve) + ")");
    // the resident fp16 copy only where it leaves kResidentHeadroom free
    size_t res_bytes = opt_.resident_f16 ? ResidentF16::bytes_for(d_) : 0;
    if (res_bytes && need + res_bytes + kResidentHeadroom > info_.free_mem) {
        res_note_ = "resident fp16 weights off: they need " + fmt_bytes(res_bytes) + ", " +
                    fmt_bytes(info_.free_mem - need) + " free after the rest";
        res_bytes = 0;
    }

    // ---- allocate
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), where);
    CUDA_CHECK(cudaEventCreateWithFlags(&upload_done_, cudaEventDisableTiming), where);
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&wbuf_), wbytes), where + ": weights, " + fmt_bytes(wbytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&kc_), kv_bytes), where + ": K cache, " + fmt_bytes(kv_bytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&vc_), kv_bytes), where + ": V cache, " + fmt_bytes(kv_bytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&sbuf_), sbytes), where + ": scratch, " + fmt_bytes(sbytes));
    if (res_bytes) {
        CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&res_buf_), res_bytes),
                   where + ": resident fp16 weights, " + fmt_bytes(res_bytes));
        mem_.resident_f16 = res_bytes;
    }
    CUDA_CHECK(cudaMemsetAsync(kc_, 0, kv_bytes, stream_), where + ": K cache");
    CUDA_CHECK(cudaMemsetAsync(vc_, 0, kv_bytes, stream_), where + ": V cache");
    // the slot table: no slot holds a range yet (every engine method reserves before it writes)
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_slot_off_), size_t(n_slots_) * sizeof(int64_t)),
               where + ": KV slot table");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_slot_off_), size_t(n_slots_) * sizeof(int64_t)),
               where + ": pinned KV slot table");
    std::memset(pinned_slot_off_, 0, size_t(n_slots_) * sizeof(int64_t));
    CUDA_CHECK(cudaMemcpyAsync(d_slot_off_, pinned_slot_off_, size_t(n_slots_) * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream_),
               where + ": KV slot table");
    {
        size_t off = 0;
        for (const ScratchSlice& s : slices) {
            *s.dst = sbuf_ + off;
            off += align_up(s.bytes);
        }
    }
    q_ = qkv_;
    k_ = q_ + fR * QD_;
    v_ = k_ + fR * KD_;
    g_ = gu_;
    u_ = gu_ + fR * F_;
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_ids_), fR * 3 * 4), where + ": pinned ids");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_logits_), size_t(L_) * V_ * 4),
               where + ": pinned logits");
    std::memset(pinned_ids_, 0, fR * 3 * 4);
    // pinned: the staged rows, windows, tokens and states (not the sampler's workspace)
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&samp_pinned_), slay.work), where + ": pinned sampling rows");
    if (d_.n_expert > 0) {
        CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_router_), fR * d_.n_expert * 4),
                   where + ": pinned router logits");
        CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_moe_), moe_k * 8), where + ": pinned expert rows");
    }
    if (rope_freq_) {  // YaRN's frequencies per layer (its RoPE base), as the CPU engine computes them
        std::vector<double> f(size_t(d_.n_layer) * (hd_ / 2));
        for (int l = 0; l < d_.n_layer; ++l)
            cpu_ops::rope_inv_freq_yarn(hd_, double(d_.layers[size_t(l)].rope_base), d_.rope_factor,
                                        d_.rope_n_ctx_orig, d_.yarn_beta_fast, d_.yarn_beta_slow,
                                        f.data() + size_t(l) * (hd_ / 2));
        CUDA_CHECK(cudaMemcpy(rope_freq_, f.data(), f.size() * 8, cudaMemcpyHostToDevice), where + ": YaRN frequencies");
    }
    CUBLAS_CHECK(cublasCreate(&blas_), where);
    CUBLAS_CHECK(cublasSetStream(blas_, stream_), where);
    CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_, kCublasWorkspace), where);

    // ---- upload, then the fused decoder's arguments
    weights_.upload(d_, wbuf_, progress, where);
    if (res_buf_) resident_.build(weights_, res_buf_, res_bytes, stream_);
    DecodeBuffers db;
    db.x = x_;
    db.q = q_;
    db.att = att_;
    db.act = g_;
    db.logits = logits_;
    db.kc = kc_;
    db.vc = vc_;
    db.layer_stride = layer_stride_;
    db.slot_off = d_slot_off_;
    dec_.build(weights_, db, stream_);
    sync("CudaEngine setup");
}

}  // namespace orcd
