// cuda_engine.cu - the CUDA engine: the forward pass of docs/design.md on one GPU.
//
// Weights live in VRAM as the GGUF file stores them (raw blocks copied from
// the mapping); norms and biases as float32. Per forward step:
//   tokens/positions/slots -> one async copy from pinned memory
//   x = embedding rows (float32 residual stream [rows][n_embd])
//   per layer: h = rmsnorm(x); q,k,v = h·Wᵀ + b; RoPE(q, k); K,V -> fp16 cache;
//              att = softmax(q·Kᵀ/sqrt(hd))·V; x += att·Woᵀ;
//              h = rmsnorm(x); x += (silu(h·Wgᵀ) * h·Wuᵀ)·Wdᵀ
//   logits = rmsnorm(x)·Woutᵀ -> pinned host buffer (the one sync of a decode step)
// Products: a single token (and decode batches of up to 8 slots) use the
// quantized mat-vec kernel; prompts dequantize each weight into a reused fp16
// scratch and call cublasGemmEx (linear.cu). Prompts run in chunks of up to
// 512 tokens; each chunk appends its K/V before its attention, so causality
// within and across chunks follows from the per-query key count pos+1.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.cuh"
#include "quants.h"

namespace orcd {
namespace {

constexpr int kPromptChunk = 512;
constexpr size_t kAlign = 256;
constexpr size_t kCublasWorkspace = size_t(32) << 20;
constexpr size_t kReserve = size_t(64) << 20;       // CUDA context growth and cuBLAS internals
constexpr size_t kW16MaxElems = size_t(16) << 20;   // fp16 scratch cap: lm_head is dequantized in chunks
constexpr int kLogitRowsMin = 16;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::string fmt_bytes(size_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%zu bytes (%.1f MiB)", b, double(b) / (1024.0 * 1024.0));
    return buf;
}

struct DevWeight {
    uint32_t type = 0;
    const uint8_t* data = nullptr;  // device
    int n_in = 0, n_out = 0;
    size_t row_bytes = 0;
    std::string name;
};

struct DevLayer {
    const float *attn_norm = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr, *ffn_norm = nullptr;
    DevWeight wq, wk, wv, wo, gate, up, down;
};

enum class Logits { None, Last, All };

class CudaEngineImpl final : public CudaEngine {
public:
    CudaEngineImpl(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots, ProgressFn progress, int device)
        : file_(std::move(file)), n_ctx_(n_ctx), n_slots_(n_slots), dev_(device) {
        try {
            build(progress);
        } catch (...) {
            release();
            throw;
        }
    }
    ~CudaEngineImpl() override { release(); }

    const ModelDesc& desc() const override { return d_; }
    int n_ctx() const override { return n_ctx_; }
    int n_slots() const override { return n_slots_; }
    CudaMemoryUse memory_use() const override { return mem_; }
    const DeviceInfo& device() const override { return info_; }
    int max_prompt_chunk() const override { return C_; }

    void forward(int slot, const int32_t* tokens, int n, int pos0, float* logits, bool all_logits,
                 Trace* trace) override;
    void decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                      float* logits) override;

private:
    void build(const ProgressFn& progress);
    void release() noexcept;
    void check_token(int32_t t) const {
        if (t < 0 || t >= d_.n_vocab)
            throw Error("CudaEngine: token id " + std::to_string(t) + " out of range [0, " +
                        std::to_string(d_.n_vocab) + ")");
    }
    // Runs nr rows whose ids/positions/slots are in pinned_ids_ [0,R) [R,2R) [2R,3R).
    void step(int nr, bool matvec, int kv_max, Logits mode, float* logits, Trace* trace, int trace_row0);
    void linear(const DevWeight& w, const float* x, int rows, float* y, int ldy, const float* bias, bool acc,
                bool matvec);
    void sync(const char* what) { CUDA_CHECK(cudaStreamSynchronize(stream_), what); }

    std::shared_ptr<GGUFFile> file_;
    ModelDesc d_;
    int n_ctx_, n_slots_, dev_;
    DeviceInfo info_;
    CudaMemoryUse mem_;
    int E_ = 0, QD_ = 0, KD_ = 0, F_ = 0, V_ = 0, hd_ = 0;
    int C_ = 0, R_ = 0, L_ = 0;  // prompt chunk, activation rows, logit rows per copy
    size_t w16_elems_ = 0, slot_stride_ = 0, layer_stride_ = 0;

    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    cudaEvent_t upload_done_ = nullptr;
    uint8_t* wbuf_ = nullptr;  // weights
    uint8_t* sbuf_ = nullptr;  // scratch
    __half *kc_ = nullptr, *vc_ = nullptr;
    int32_t* pinned_ids_ = nullptr;
    float* pinned_logits_ = nullptr;

    // scratch views
    float *x_ = nullptr, *h_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *att_ = nullptr;
    float *g_ = nullptr, *u_ = nullptr, *logits_ = nullptr, *part_o_ = nullptr;
    float2* part_ml_ = nullptr;
    __half *act16_ = nullptr, *w16_ = nullptr;
    int32_t* d_ids_ = nullptr;
    void* blas_ws_ = nullptr;

    DevWeight tok_embd_, output_;
    const float* output_norm_ = nullptr;
    std::vector<DevLayer> layers_;
};

void CudaEngineImpl::release() noexcept {
    if (dev_ >= 0) cudaSetDevice(dev_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (blas_) cublasDestroy(blas_);
    blas_ = nullptr;
    if (upload_done_) cudaEventDestroy(upload_done_);
    upload_done_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
    for (void* p : {static_cast<void*>(wbuf_), static_cast<void*>(sbuf_), static_cast<void*>(kc_),
                    static_cast<void*>(vc_)})
        if (p) cudaFree(p);
    wbuf_ = sbuf_ = nullptr;
    kc_ = vc_ = nullptr;
    if (pinned_ids_) cudaFreeHost(pinned_ids_);
    if (pinned_logits_) cudaFreeHost(pinned_logits_);
    pinned_ids_ = nullptr;
    pinned_logits_ = nullptr;
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
    F_ = d_.n_ff;
    V_ = d_.n_vocab;
    const std::string where = "CudaEngine(" + file_->path() + ")";
    if (hd_ < 2 || hd_ % 2 != 0 || hd_ > cu::kAttnMaxHeadDim)
        throw Error(where + ": head_dim " + std::to_string(hd_) + " is not supported (even, at most " +
                    std::to_string(cu::kAttnMaxHeadDim) + ")");
    if (d_.n_head_kv < 1 || d_.n_head % d_.n_head_kv != 0)
        throw Error(where + ": n_head " + std::to_string(d_.n_head) + " is not a multiple of n_head_kv " +
                    std::to_string(d_.n_head_kv));

    // ---- the tensors to upload, and their sizes
    struct Up {
        const TensorInfo* t;
        bool vec;  // uploaded as float32
        size_t bytes, offset;
    };
    std::vector<Up> ups;
    auto add_mat = [&](const TensorInfo* t, int64_t n_in, int64_t n_out) {
        if (!t) throw Error(where + ": missing weight tensor");
        if (t->ne[0] != n_in || t->n_rows() != n_out)
            throw Error(where + ": tensor '" + t->name + "' " + t->shape_str() + " is not [" + std::to_string(n_in) +
                        ", " + std::to_string(n_out) + "]");
        if (!cu::type_supported(t->type))
            throw Error(where + ": tensor '" + t->name + "' has type " + type_name(t->type) +
                        ", which the CUDA backend cannot read");
        for (const Up& u : ups)
            if (u.t == t) return;  // tied output: uploaded once
        ups.push_back({t, false, t->nbytes, 0});
    };
    auto add_vec = [&](const TensorInfo* t, int64_t n) {
        if (!t) throw Error(where + ": missing norm/bias tensor");
        if (t->n_elements() != n)
            throw Error(where + ": tensor '" + t->name + "' " + t->shape_str() + " does not have " +
                        std::to_string(n) + " elements");
        if (!can_dequantize(t->type))
            throw Error(where + ": tensor '" + t->name + "' has type " + type_name(t->type) + ", not dequantizable");
        ups.push_back({t, true, size_t(n) * 4, 0});
    };
    add_mat(d_.tok_embd, E_, V_);
    add_vec(d_.output_norm, E_);
    add_mat(d_.output, E_, V_);
    for (const LayerDesc& L : d_.layers) {
        add_vec(L.attn_norm, E_);
        add_mat(L.wq, E_, QD_);
        add_vec(L.bq, QD_);
        add_mat(L.wk, E_, KD_);
        add_vec(L.bk, KD_);
        add_mat(L.wv, E_, KD_);
        add_vec(L.bv, KD_);
        add_mat(L.wo, QD_, E_);
        add_vec(L.ffn_norm, E_);
        add_mat(L.w_gate, E_, F_);
        add_mat(L.w_up, E_, F_);
        add_mat(L.w_down, F_, E_);
    }
    size_t wbytes = 0;
    for (Up& u : ups) {
        u.offset = wbytes;
        wbytes += align_up(u.bytes);
    }

    // ---- scratch plan
    C_ = std::min(kPromptChunk, n_ctx_);
    R_ = std::max(C_, n_slots_);
    L_ = std::max(kLogitRowsMin, n_slots_);
    size_t max_layer_w = 0;
    for (const LayerDesc& L : d_.layers)
        for (const TensorInfo* t : {L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down})
            max_layer_w = std::max(max_layer_w, size_t(t->n_elements()));
    w16_elems_ = std::max({max_layer_w, std::min(size_t(d_.output->n_elements()), kW16MaxElems), size_t(E_)});
    int sms = 0;
    // Device properties first (this creates the context), then the memory check.
    info_ = device_info(dev_);
    sms = info_.sm_count;
    size_t part_rows = 0;
    for (int nq = 1; nq <= R_; ++nq)
        part_rows = std::max(part_rows, cu::attn_partials(nq, d_.n_head, cu::attn_plan(nq, n_ctx_, d_.n_head, sms)));

    struct Slice {
        void** dst;
        size_t bytes;
    };
    const size_t fR = size_t(R_);
    std::vector<Slice> slices = {
        {reinterpret_cast<void**>(&x_), fR * E_ * 4},
        {reinterpret_cast<void**>(&h_), fR * E_ * 4},
        {reinterpret_cast<void**>(&q_), fR * QD_ * 4},
        {reinterpret_cast<void**>(&k_), fR * KD_ * 4},
        {reinterpret_cast<void**>(&v_), fR * KD_ * 4},
        {reinterpret_cast<void**>(&att_), fR * QD_ * 4},
        {reinterpret_cast<void**>(&g_), fR * F_ * 4},
        {reinterpret_cast<void**>(&u_), fR * F_ * 4},
        {reinterpret_cast<void**>(&logits_), size_t(L_) * V_ * 4},
        {reinterpret_cast<void**>(&part_o_), part_rows * hd_ * 4},
        {reinterpret_cast<void**>(&part_ml_), part_rows * sizeof(float2)},
        {reinterpret_cast<void**>(&act16_), fR * std::max({E_, F_, QD_}) * 2},
        {reinterpret_cast<void**>(&w16_), w16_elems_ * 2},
        {reinterpret_cast<void**>(&d_ids_), fR * 3 * 4},
        {&blas_ws_, kCublasWorkspace},
    };
    size_t sbytes = 0;
    for (const Slice& s : slices) sbytes += align_up(s.bytes);
    slot_stride_ = size_t(d_.n_layer) * n_ctx_ * KD_;
    layer_stride_ = size_t(n_ctx_) * KD_;
    const size_t kv_bytes = size_t(n_slots_) * slot_stride_ * 2;  // one cache (K or V), fp16
    mem_.weights = wbytes;
    mem_.kv = 2 * kv_bytes;
    mem_.scratch = sbytes;

    // ---- enough memory? (nothing allocated yet)
    const size_t need = mem_.total() + kReserve;
    if (need > info_.free_mem)
        throw CudaError("not enough GPU memory: need " + std::to_string(need) + " bytes, " +
                        std::to_string(info_.free_mem) + " free on " + info_.name + " (weights " +
                        fmt_bytes(mem_.weights) + ", KV cache " + fmt_bytes(mem_.kv) + " for n_ctx=" +
                        std::to_string(n_ctx_) + " x n_slots=" + std::to_string(n_slots_) + ", scratch " +
                        fmt_bytes(mem_.scratch) + ", reserve " + fmt_bytes(kReserve) + ")");

    // ---- allocate
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), where);
    CUDA_CHECK(cudaEventCreateWithFlags(&upload_done_, cudaEventDisableTiming), where);
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&wbuf_), wbytes), where + ": weights, " + fmt_bytes(wbytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&kc_), kv_bytes), where + ": K cache, " + fmt_bytes(kv_bytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&vc_), kv_bytes), where + ": V cache, " + fmt_bytes(kv_bytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&sbuf_), sbytes), where + ": scratch, " + fmt_bytes(sbytes));
    CUDA_CHECK(cudaMemsetAsync(kc_, 0, kv_bytes, stream_), where + ": K cache");
    CUDA_CHECK(cudaMemsetAsync(vc_, 0, kv_bytes, stream_), where + ": V cache");
    {
        size_t off = 0;
        for (const Slice& s : slices) {
            *s.dst = sbuf_ + off;
            off += align_up(s.bytes);
        }
    }
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_ids_), fR * 3 * 4), where + ": pinned ids");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_logits_), size_t(L_) * V_ * 4),
               where + ": pinned logits");
    std::memset(pinned_ids_, 0, fR * 3 * 4);
    CUBLAS_CHECK(cublasCreate(&blas_), where);
    CUBLAS_CHECK(cublasSetStream(blas_, stream_), where);
    CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_, kCublasWorkspace), where);

    // ---- upload
    size_t done = 0, total = 0;
    for (const Up& u : ups) total += u.bytes;
    std::vector<float> tmp;
    for (const Up& u : ups) {
        if (!u.t->data) throw Error(where + ": tensor '" + u.t->name + "' has no data (file closed?)");
        uint8_t* dst = wbuf_ + u.offset;
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
        for (const Up& u : ups)
            if (u.t == t) return wbuf_ + u.offset;
        throw Error(where + ": internal: tensor not uploaded");
    };
    auto vec = [&](const TensorInfo* t) { return reinterpret_cast<const float*>(dev_of(t)); };
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
    tok_embd_ = mat(d_.tok_embd);
    output_ = mat(d_.output);
    output_norm_ = vec(d_.output_norm);
    layers_.clear();
    for (const LayerDesc& L : d_.layers) {
        DevLayer D;
        D.attn_norm = vec(L.attn_norm);
        D.bq = vec(L.bq);
        D.bk = vec(L.bk);
        D.bv = vec(L.bv);
        D.ffn_norm = vec(L.ffn_norm);
        D.wq = mat(L.wq);
        D.wk = mat(L.wk);
        D.wv = mat(L.wv);
        D.wo = mat(L.wo);
        D.gate = mat(L.w_gate);
        D.up = mat(L.w_up);
        D.down = mat(L.w_down);
        layers_.push_back(std::move(D));
    }
    sync("CudaEngine setup");
}

void CudaEngineImpl::linear(const DevWeight& w, const float* x, int rows, float* y, int ldy, const float* bias,
                            bool acc, bool matvec) {
    if (matvec && rows <= cu::kMatvecMaxRows)
        cu::matvec(w.type, w.data, w.row_bytes, w.n_in, w.n_out, x, w.n_in, rows, y, ldy, bias, acc, stream_,
                   w.name.c_str());
    else
        cu::gemm_linear(blas_, stream_, w.type, w.data, w.row_bytes, w.n_in, w.n_out, x, rows, y, ldy, bias, acc,
                        act16_, w16_, w16_elems_, w.name.c_str());
}

void CudaEngineImpl::step(int nr, bool mv, int kv_max, Logits mode, float* logits, Trace* trace, int trace_row0) {
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine step");
    const int32_t* d_tok = d_ids_;
    const int32_t* d_pos = d_ids_ + R_;
    const int32_t* d_slot = d_ids_ + 2 * R_;
    CUDA_CHECK(cudaMemcpyAsync(d_ids_, pinned_ids_, size_t(R_) * 3 * 4, cudaMemcpyHostToDevice, stream_),
               "token/position upload");
    CUDA_CHECK(cudaEventRecord(upload_done_, stream_), "token/position upload");

    auto trace_copy = [&](int idx) {
        float* dst = trace->hidden[size_t(idx)].data() + size_t(trace_row0) * E_;
        CUDA_CHECK(cudaMemcpyAsync(dst, x_, size_t(nr) * E_ * 4, cudaMemcpyDeviceToHost, stream_), "trace copy");
    };

    cu::get_rows(tok_embd_.type, tok_embd_.data, tok_embd_.row_bytes, E_, d_tok, nr, x_, stream_,
                 tok_embd_.name.c_str());
    if (trace) trace_copy(0);

    const cu::AttnPlan plan = cu::attn_plan(nr, kv_max, d_.n_head, info_.sm_count);
    for (int l = 0; l < d_.n_layer; ++l) {
        const DevLayer& L = layers_[size_t(l)];
        const char* ln = L.wq.name.c_str();
        cu::rmsnorm(x_, nr, E_, L.attn_norm, d_.rms_eps, h_, stream_, "attn_norm");
        linear(L.wq, h_, nr, q_, QD_, L.bq, false, mv);
        linear(L.wk, h_, nr, k_, KD_, L.bk, false, mv);
        linear(L.wv, h_, nr, v_, KD_, L.bv, false, mv);
        cu::rope_neox(q_, QD_, nr, d_.n_head, hd_, d_pos, d_.rope_base, stream_, ln);
        cu::rope_neox(k_, KD_, nr, d_.n_head_kv, hd_, d_pos, d_.rope_base, stream_, L.wk.name.c_str());
        __half* kc = kc_ + size_t(l) * layer_stride_;
        __half* vc = vc_ + size_t(l) * layer_stride_;
        cu::kv_store(k_, v_, KD_, nr, KD_, d_slot, d_pos, kc, vc, slot_stride_, stream_, ln);
        cu::attention(q_, QD_, kc, vc, slot_stride_, KD_, d_slot, d_pos, nr, d_.n_head, d_.n_head_kv, hd_, plan,
                      part_o_, part_ml_, att_, QD_, stream_, ln);
        linear(L.wo, att_, nr, x_, E_, nullptr, true, mv);  // residual add
        cu::rmsnorm(x_, nr, E_, L.ffn_norm, d_.rms_eps, h_, stream_, "ffn_norm");
        linear(L.gate, h_, nr, g_, F_, nullptr, false, mv);
        linear(L.up, h_, nr, u_, F_, nullptr, false, mv);
        cu::swiglu(g_, u_, int64_t(nr) * F_, stream_, L.gate.name.c_str());
        linear(L.down, g_, nr, x_, E_, nullptr, true, mv);  // residual add
        if (trace) trace_copy(l + 1);
    }

    if (mode == Logits::Last) {
        cu::rmsnorm(x_ + size_t(nr - 1) * E_, 1, E_, output_norm_, d_.rms_eps, h_, stream_, "output_norm");
        linear(output_, h_, 1, logits_, V_, nullptr, false, true);
        CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(V_) * 4, cudaMemcpyDeviceToHost, stream_),
                   "logits copy");
        sync("forward (logits)");
        std::memcpy(logits, pinned_logits_, size_t(V_) * 4);
    } else if (mode == Logits::All) {
        cu::rmsnorm(x_, nr, E_, output_norm_, d_.rms_eps, h_, stream_, "output_norm");
        for (int r0 = 0; r0 < nr; r0 += L_) {
            const int rows = std::min(L_, nr - r0);
            linear(output_, h_ + size_t(r0) * E_, rows, logits_, V_, nullptr, false, mv);
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
    if (slot < 0 || slot >= n_slots_)
        throw Error("CudaEngine.forward: slot " + std::to_string(slot) + " out of range [0, " +
                    std::to_string(n_slots_) + ")");
    if (n < 1) throw Error("CudaEngine.forward: no tokens");
    if (pos0 < 0 || int64_t(pos0) + n > n_ctx_)
        throw Error("CudaEngine.forward: positions " + std::to_string(pos0) + " .. " +
                    std::to_string(int64_t(pos0) + n - 1) + " do not fit n_ctx=" + std::to_string(n_ctx_));
    for (int i = 0; i < n; ++i) check_token(tokens[i]);
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

void CudaEngineImpl::decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                                  float* logits) {
    if (n < 1) throw Error("CudaEngine.decode_batch: no tokens");
    if (n > n_slots_)
        throw Error("CudaEngine.decode_batch: " + std::to_string(n) + " tokens for " + std::to_string(n_slots_) +
                    " slots");
    std::vector<char> seen(size_t(n_slots_), 0);
    int kv_max = 0;
    for (int i = 0; i < n; ++i) {
        if (slots[i] < 0 || slots[i] >= n_slots_)
            throw Error("CudaEngine.decode_batch: slot " + std::to_string(slots[i]) + " out of range [0, " +
                        std::to_string(n_slots_) + ")");
        if (seen[size_t(slots[i])]++)
            throw Error("CudaEngine.decode_batch: slot " + std::to_string(slots[i]) + " appears twice");
        if (pos[i] < 0 || pos[i] >= n_ctx_)
            throw Error("CudaEngine.decode_batch: position " + std::to_string(pos[i]) + " of slot " +
                        std::to_string(slots[i]) + " outside n_ctx=" + std::to_string(n_ctx_));
        check_token(tokens[i]);
        kv_max = std::max(kv_max, pos[i] + 1);
    }
    CUDA_CHECK(cudaEventSynchronize(upload_done_), "decode_batch");
    for (int i = 0; i < n; ++i) {
        pinned_ids_[i] = tokens[i];
        pinned_ids_[R_ + i] = pos[i];
        pinned_ids_[2 * R_ + i] = slots[i];
    }
    step(n, n <= cu::kMatvecMaxRows, kv_max, Logits::All, logits, nullptr, 0);
}

}  // namespace

std::unique_ptr<CudaEngine> make_cuda_engine(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots,
                                             ProgressFn progress, int device) {
    return std::make_unique<CudaEngineImpl>(std::move(file), n_ctx, n_slots, std::move(progress), device);
}

}  // namespace orcd
