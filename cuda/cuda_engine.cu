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
// Products: decode batches of up to 8 slots (and a single token when the fast
// path is off) use the quantized mat-vec kernel; prompts dequantize the weights
// into a reused fp16 scratch and call cublasGemmEx (linear.cu). Prompts run in
// chunks of up to 512 tokens; each chunk appends its K/V before its attention,
// so causality within and across chunks follows from the per-query key count pos+1.
//
// Fast paths (CudaOptions, all on by default where the GPU allows):
// - fast_decode: a single-sequence step (forward with one token, decode_greedy)
//   runs the fused decode kernels of decode.cuh, 5 per layer + 1, reading
//   token/position/slot from a device DecState;
// - graphs: that step is captured once into a CUDA graph (one for logits out,
//   one for greedy decoding whose lm_head writes the next token on the device)
//   and replayed; decode_greedy replays it n times and copies only token ids;
// - pdl: the fused kernels are launched with programmatic stream serialization
//   so each one's weight copy overlaps its predecessor (Hopper);
// - fused_prompt: per layer of a prompt chunk, rmsnorm -> fp16, one q|k|v GEMM,
//   bias+RoPE+KV-append in one kernel, attention, O GEMM (+residual via beta),
//   rmsnorm -> fp16, one gate|up GEMM, SwiGLU -> fp16, down GEMM (+residual).
//   q|k|v and gate|up are uploaded next to each other, so F16 weights feed
//   cuBLAS in place; the last token's logits use the fused decode lm_head.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_common.cuh"
#include "decode.cuh"
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

constexpr size_t kDecStageCap = size_t(96) << 10;  // staged weight bytes of one fused decode block
constexpr size_t kDecLmCap = size_t(64) << 10;     // ... of one lm_head block (many blocks, streaming)
constexpr int kDecGraphSteps = 8;  // greedy decode steps per graph launch (decode_greedy)
// ORCD_CUDA_PDL_EARLY's default: attn_output releases ffn_gate_up at its start, so the
// largest weight copy (gate and up) overlaps attn_output's whole run (H200: tg128 1,727 ->
// 1,749, tg128@pp512 1,471 -> 1,565; any other kind early was slower)
const char* const kPdlEarlyDefault = "attn_output";
// The decode step's kernel kinds, in launch order within a layer, then the lm_head
// (ORCD_CUDA_PDL_EARLY's names, profile_decode's keys).
constexpr int kDecKinds = 6;
const char* const kDecKindNames[kDecKinds] = {"qkv", "attention", "attn_output", "ffn_gate_up", "ffn_down", "lm_head"};

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

bool env_on(const char* name, bool dflt) {
    const char* v = std::getenv(name);
    if (!v || !*v) return dflt;
    return !(v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F');
}

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
    size_t bytes() const { return row_bytes * size_t(n_out); }
    int64_t elems() const { return int64_t(n_in) * n_out; }
    cu::DTensor dt() const { return cu::DTensor{data, type, n_in, n_out, int(row_bytes)}; }
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
    CudaOptions options() const override { return opt_; }
    void set_options(const CudaOptions& o) override;
    CudaPaths paths() const override;

    void forward(int slot, const int32_t* tokens, int n, int pos0, float* logits, bool all_logits,
                 Trace* trace) override;
    void decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                      float* logits) override;
    void decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) override;
    std::vector<std::pair<std::string, double>> profile_decode(int slot, int32_t token, int pos,
                                                               int n_steps) override;

private:
    void build(const ProgressFn& progress);
    void plan_decode();         // shapes of the fused decode kernels; sets dec_ok_
    void build_decode_args();   // their arguments, once the buffers and weights exist
    // `steps` decode steps as one CUDA graph (graph_slot); false when graphs do not work
    bool capture(bool greedy, int steps, bool cluster);
    cudaGraphExec_t& graph_slot(bool greedy, int steps, bool cluster) {
        return graph_[(greedy ? 1 : 0) + (cluster ? 2 : 0) + (steps > 1 ? 4 : 0)];
    }
    // The stream work of `body` as an instantiated graph (a failed capture is cleaned up).
    cudaGraphExec_t record_graph(const std::function<void()>& body, const char* what);
    // The attention variant of a step whose cache holds kv_len positions.
    bool cluster_for(int kv_len) const { return dec_short_keys_ > 0 && kv_len <= dec_short_keys_; }
    void release() noexcept;
    void drop_graphs() noexcept;
    bool fast_on() const { return opt_.fast_decode && dec_ok_; }
    // `steps` fused decode steps on the stream (greedy: the lm_head writes the next token;
    // cluster: the cluster attention, see cluster_for).
    void launch_decode(bool greedy, int steps, bool cluster);
    // Kernel k (0 .. 5*n_layer) of a step; 5*n_layer is the lm_head. noop: an empty kernel
    // of the same launch shape instead (profile_decode's launch-boundary floor).
    void launch_decode_kernel(int k, bool greedy, bool pdl, bool cluster, bool noop = false);
    void check_greedy_args(const char* who, int slot, int32_t token, int pos, int n_steps) const;
    // The step as a graph launch (captured on first use) or as plain launches.
    // steps: 1, or kDecGraphSteps greedy steps in one graph (decode_greedy); kv_len: the
    // cache length of the last of them (picks the attention variant)
    void run_decode(bool greedy, int kv_len, int steps = 1);
    void fast_forward_one(int slot, int32_t token, int pos, float* logits);
    void lm_head_last(const float* x_row);  // logits_ = output · rmsnorm(x_row), fused kernel
    const __half* weights16(std::initializer_list<const DevWeight*> ws);
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
    cu::DecState* pinned_state_ = nullptr;
    int32_t* pinned_tokens_ = nullptr;

    // fast decode
    CudaOptions opt_;
    bool dec_ok_ = false, pdl_ok_ = false, graphs_ok_ = true;
    std::string dec_note_, dec_base_note_;
    cu::DecState* d_state_ = nullptr;
    cu::DecSync* d_sync_ = nullptr;
    int32_t* d_out_tokens_ = nullptr;
    float* dec_part_o_ = nullptr;
    float2* dec_part_ml_ = nullptr;
    cu::ArgPart* dec_arg_ = nullptr;
    int lm_blocks_ = 0, lm_grid_ = 0;  // lm_head blocks (argmax parts), its persistent grid
    int lm_stages_ = 0;                // lm_head staging buffers per warp
    std::vector<cu::DecQkvArgs> dq_;
    std::vector<cu::DecAttnArgs> da_;
    std::vector<cu::DecProjArgs> dp_o_, dp_gu_, dp_d_;
    cu::DecProjArgs dp_lm_{};
    // [greedy + 2 * cluster attention + 4 * (kDecGraphSteps steps)]
    cudaGraphExec_t graph_[8] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    // Steps whose cache holds at most dec_short_keys_ positions run the cluster attention
    // (cu::DecAttnArgs::cluster; sm_90, 0: never).
    int dec_short_keys_ = 0;
    int pdl_early_ = 0;  // bit per kernel kind (qkv, attention, attn_output, ffn_gate_up, ffn_down, lm_head)
    struct ProjPlan {
        int rb = 0;      // rows per block (0: does not fit)
        int smem_w = 0;  // staged weight bytes
    };
    ProjPlan plan_o_, plan_gu_, plan_d_, plan_lm_;
    int qkv_S_ = 0, qkv_parts_ = 0, qkv_smem_w_ = 0;
    size_t dec_smem_ = 0;
    float *qkv_ = nullptr, *gu_ = nullptr;
    float2* rope_ = nullptr;  // [n_ctx][head_dim/2] (cos, sin) for the fused decode step

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

void CudaEngineImpl::drop_graphs() noexcept {
    for (cudaGraphExec_t& g : graph_) {
        if (g) cudaGraphExecDestroy(g);
        g = nullptr;
    }
}

void CudaEngineImpl::release() noexcept {
    if (dev_ >= 0) cudaSetDevice(dev_);
    if (stream_) cudaStreamSynchronize(stream_);
    drop_graphs();
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
    if (pinned_state_) cudaFreeHost(pinned_state_);
    if (pinned_tokens_) cudaFreeHost(pinned_tokens_);
    pinned_ids_ = nullptr;
    pinned_logits_ = nullptr;
    pinned_state_ = nullptr;
    pinned_tokens_ = nullptr;
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
        // q|k|v and gate|up next to each other: F16 weights then feed one GEMM in place
        add_mat(L.wq, E_, QD_);
        add_mat(L.wk, E_, KD_);
        add_mat(L.wv, E_, KD_);
        add_mat(L.w_gate, E_, F_);
        add_mat(L.w_up, E_, F_);
        add_mat(L.wo, QD_, E_);
        add_mat(L.w_down, F_, E_);
        add_vec(L.attn_norm, E_);
        add_vec(L.bq, QD_);
        add_vec(L.bk, KD_);
        add_vec(L.bv, KD_);
        add_vec(L.ffn_norm, E_);
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
    w16_elems_ = std::max({max_layer_w, std::min(size_t(d_.output->n_elements()), kW16MaxElems), size_t(E_),
                           size_t(QD_ + 2 * KD_) * E_, size_t(2) * F_ * E_});
    int sms = 0;
    // Device properties first (this creates the context), then the memory check.
    info_ = device_info(dev_);
    sms = info_.sm_count;
    size_t part_rows = 0;
    for (int nq = 1; nq <= R_; ++nq)
        part_rows = std::max(part_rows, cu::attn_partials(nq, d_.n_head, cu::attn_plan(nq, n_ctx_, d_.n_head, sms)));

    // ---- fused decode plan (dec_ok_ says whether the model and GPU suit it)
    opt_.fast_decode = env_on("ORCD_CUDA_FAST_DECODE", true);
    opt_.graphs = env_on("ORCD_CUDA_GRAPHS", true);
    opt_.pdl = env_on("ORCD_CUDA_PDL", true);
    {
        const char* v = std::getenv("ORCD_CUDA_PDL_TRIGGER");
        opt_.pdl_trigger = (v && (v[0] == '0' || v[0] == '2')) ? v[0] - '0' : 1;
    }
    {  // ORCD_CUDA_PDL_EARLY: comma-separated kernel kinds that trigger at their start
        const char* v = std::getenv("ORCD_CUDA_PDL_EARLY");
        const std::string e = v ? v : kPdlEarlyDefault;
        pdl_early_ = 0;
        size_t i = 0;
        while (i <= e.size()) {
            const size_t j = std::min(e.find(',', i), e.size());
            const std::string name = e.substr(i, j - i);
            for (int q = 0; q < kDecKinds; ++q)
                if (name == kDecKindNames[q]) pdl_early_ |= 1 << q;
            i = j + 1;
        }
    }
    opt_.fused_prompt = env_on("ORCD_CUDA_FUSED_PROMPT", true);
    pdl_ok_ = info_.cc_major >= 9;
    plan_decode();

    struct Slice {
        void** dst;
        size_t bytes;
    };
    const size_t fR = size_t(R_);
    const int G = d_.n_head / d_.n_head_kv;
    (void)G;
    std::vector<Slice> slices = {
        {reinterpret_cast<void**>(&x_), fR * E_ * 4},
        {reinterpret_cast<void**>(&h_), fR * E_ * 4},
        {reinterpret_cast<void**>(&qkv_), fR * (QD_ + 2 * KD_) * 4},  // q_, k_, v_ of the mat-vec path inside
        {reinterpret_cast<void**>(&att_), fR * QD_ * 4},
        {reinterpret_cast<void**>(&gu_), fR * 2 * F_ * 4},             // g_, u_ of the mat-vec path inside
        {reinterpret_cast<void**>(&logits_), size_t(L_) * V_ * 4},
        {reinterpret_cast<void**>(&part_o_), part_rows * hd_ * 4},
        {reinterpret_cast<void**>(&part_ml_), part_rows * sizeof(float2)},
        {reinterpret_cast<void**>(&act16_), fR * std::max({E_, F_, QD_}) * 2},
        {reinterpret_cast<void**>(&w16_), w16_elems_ * 2},
        {reinterpret_cast<void**>(&d_ids_), fR * 3 * 4},
        {&blas_ws_, kCublasWorkspace},
        {reinterpret_cast<void**>(&d_state_), sizeof(cu::DecState)},
        {reinterpret_cast<void**>(&d_sync_), sizeof(cu::DecSync)},
        {reinterpret_cast<void**>(&d_out_tokens_), size_t(n_ctx_) * 4},
        {reinterpret_cast<void**>(&dec_part_o_), dec_ok_ ? size_t(d_.n_head) * cu::kDecMaxSplits * hd_ * 4 : 0},
        {reinterpret_cast<void**>(&dec_part_ml_), dec_ok_ ? size_t(d_.n_head) * cu::kDecMaxSplits * sizeof(float2) : 0},
        {reinterpret_cast<void**>(&dec_arg_), dec_ok_ ? size_t(lm_blocks_) * sizeof(cu::ArgPart) : 0},
        {reinterpret_cast<void**>(&rope_), dec_ok_ ? size_t(n_ctx_) * (hd_ / 2) * sizeof(float2) : 0},
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
    q_ = qkv_;
    k_ = q_ + fR * QD_;
    v_ = k_ + fR * KD_;
    g_ = gu_;
    u_ = gu_ + fR * F_;
    CUDA_CHECK(cudaMemsetAsync(d_state_, 0, sizeof(cu::DecState), stream_), where + ": decode state");
    CUDA_CHECK(cudaMemsetAsync(d_sync_, 0, sizeof(cu::DecSync), stream_), where + ": decode counters");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_state_), sizeof(cu::DecState)), where + ": pinned state");
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_tokens_), size_t(n_ctx_) * 4), where + ": pinned tokens");
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
    if (dec_ok_) {
        // RoPE table of the fused decode step: the prompt kernels' formula (theta in double)
        const int half = hd_ / 2;
        const double log2_base = std::log2(double(d_.rope_base));
        std::vector<float2> tab(size_t(n_ctx_) * half);
        for (int i = 0; i < half; ++i) {
            const double f = std::exp2(-2.0 * double(i) / double(hd_) * log2_base);
            for (int p = 0; p < n_ctx_; ++p) {
                const double th = double(p) * f;
                tab[size_t(p) * half + i] = make_float2(float(std::cos(th)), float(std::sin(th)));
            }
        }
        CUDA_CHECK(cudaMemcpy(rope_, tab.data(), tab.size() * sizeof(float2), cudaMemcpyHostToDevice),
                   where + ": RoPE table");
        build_decode_args();
    }
    sync("CudaEngine setup");
}

// ---------------------------------------------------------------- fused decode: plan and launch

namespace {
// Rows per block of a fused mat-vec: about one block per SM (rb_max caps it),
// a multiple of 8 (one row per warp and round), shrunk until the staged rows fit `cap`.
struct PP {
    int rb, smem_w;
};
PP plan_proj(int n_out, size_t row_bytes, int nt, int target_blocks, size_t cap, int rb_max) {
    int rb = (n_out + target_blocks - 1) / target_blocks;
    rb = std::max(8, (rb + 7) / 8 * 8);
    rb = std::min(rb, rb_max);
    auto need = [&](int r) { return size_t(nt) * cu::dec_stage_bytes(r, int(row_bytes)); };
    while (rb > 1 && need(rb) > cap) rb = rb > 8 ? rb - 8 : rb - 1;
    if (need(rb) > cap) return {0, 0};
    return {rb, int(need(rb))};
}
}  // namespace

void CudaEngineImpl::plan_decode() {
    dec_ok_ = false;
    auto off = [&](const std::string& why) { dec_note_ = dec_base_note_ = "fast decode unavailable: " + why; };
    const int G = d_.n_head / d_.n_head_kv;
    if (info_.cc_major < 8) return off("compute capability " + std::to_string(info_.cc_major) + "." +
                                       std::to_string(info_.cc_minor) + " < 8.0");
    if (E_ % 32 || QD_ % 32 || F_ % 32) return off("n_embd, n_head*head_dim and n_ff must be multiples of 32");
    if (hd_ % 8) return off("head_dim " + std::to_string(hd_) + " is not a multiple of 8 (16-byte K/V rows)");
    if (G * hd_ > cu::kDecMaxGroupDim) return off("(n_head/n_head_kv)*head_dim > " + std::to_string(cu::kDecMaxGroupDim));
    if (d_.n_head_kv > cu::kDecMaxKvHeads) return off("more than " + std::to_string(cu::kDecMaxKvHeads) + " KV heads");
    size_t rb_qkv = 0, rb_o = 0, rb_gu = 0, rb_d = 0;
    for (const LayerDesc& L : d_.layers) {
        rb_qkv = std::max({rb_qkv, L.wq->row_bytes(), L.wk->row_bytes(), L.wv->row_bytes()});
        rb_o = std::max(rb_o, L.wo->row_bytes());
        rb_gu = std::max({rb_gu, L.w_gate->row_bytes(), L.w_up->row_bytes()});
        rb_d = std::max(rb_d, L.w_down->row_bytes());
    }
    const int sms = std::max(1, info_.sm_count);
    // rows per half-head part of the q/k/v kernel (ORCD_CUDA_DEC_QKV_S: tuning knob)
    qkv_S_ = std::min(8, hd_ / 2);
    if (const char* v = std::getenv("ORCD_CUDA_DEC_QKV_S"))
        qkv_S_ = std::max(1, std::min(hd_ / 2, std::atoi(v)));
    qkv_parts_ = (hd_ / 2 + qkv_S_ - 1) / qkv_S_;
    qkv_smem_w_ = int(2 * cu::dec_stage_bytes(qkv_S_, int(rb_qkv)));
    // blocks per SM the projections aim for (ORCD_CUDA_DEC_GU_SPM / _OD_SPM: tuning knobs)
    auto env_f = [](const char* name, double dflt) {
        const char* v = std::getenv(name);
        const double x = v && *v ? std::atof(v) : 0.0;
        return x > 0 ? x : dflt;
    };
    const int t_gu = std::max(1, int(env_f("ORCD_CUDA_DEC_GU_SPM", 2.0) * sms));
    const int t_od = std::max(1, int(env_f("ORCD_CUDA_DEC_OD_SPM", 1.0) * sms));
    const PP o = plan_proj(E_, rb_o, 1, t_od, kDecStageCap, 64);
    const PP gu = plan_proj(F_, rb_gu, 2, t_gu, kDecStageCap, 64);
    const PP dn = plan_proj(E_, rb_d, 1, t_od, kDecStageCap, 64);
    // lm_head: persistent blocks (3 per SM), each warp streaming batches of 2 rows (1 for
    // long rows) through its own ring of kDecLmStages buffers
    PP lm{0, 0};
    cu::dec_lm_plan(d_.output->row_bytes(), kDecLmCap, &lm.rb, &lm_stages_, &lm.smem_w);
    lm_grid_ = std::max(1, int(env_f("ORCD_CUDA_DEC_LM_SPM", 3.0) * sms));  // persistent lm_head blocks
    // cluster attention up to this many cached positions (ORCD_CUDA_DEC_CLUSTER_KEYS, 0: off)
    const char* ck = std::getenv("ORCD_CUDA_DEC_CLUSTER_KEYS");
    dec_short_keys_ = info_.cc_major < 9 ? 0 : (ck && *ck ? std::max(0, std::atoi(ck)) : 1024);
    if (!o.rb || !gu.rb || !dn.rb || !lm.rb) return off("a weight row does not fit the shared-memory stage");
    plan_o_ = {o.rb, o.smem_w};
    plan_gu_ = {gu.rb, gu.smem_w};
    plan_d_ = {dn.rb, dn.smem_w};
    plan_lm_ = {lm.rb, lm.smem_w};
    lm_blocks_ = std::min((V_ + lm.rb - 1) / lm.rb, lm_grid_);
    dec_smem_ = std::max({cu::dec_qkv_smem(qkv_smem_w_, E_, qkv_S_), cu::dec_proj_smem(o.smem_w, QD_),
                          cu::dec_proj_smem(gu.smem_w, E_), cu::dec_proj_smem(dn.smem_w, F_),
                          cu::dec_proj_smem(lm.smem_w, E_), cu::dec_attn_smem(d_.n_head, d_.n_head_kv, hd_)});
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev_), "CudaEngine plan");
    if (dec_smem_ > size_t(optin))
        return off("needs " + std::to_string(dec_smem_) + " bytes of shared memory per block, the GPU allows " +
                   std::to_string(optin));
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine plan");
    cu::dec_set_smem_limit(std::max(dec_smem_, size_t(48) << 10));
    dec_ok_ = true;
}

void CudaEngineImpl::build_decode_args() {
    const int n_layer = d_.n_layer;
    dq_.assign(size_t(n_layer), cu::DecQkvArgs{});
    da_.assign(size_t(n_layer), cu::DecAttnArgs{});
    dp_o_.assign(size_t(n_layer), cu::DecProjArgs{});
    dp_gu_.assign(size_t(n_layer), cu::DecProjArgs{});
    dp_d_.assign(size_t(n_layer), cu::DecProjArgs{});
    const double log2_base = std::log2(double(d_.rope_base));
    // keys per attention split at least (ORCD_CUDA_DEC_SPLIT_KEYS, a tuning knob; multiple of the tile)
    int split_keys = cu::kDecTK;
    if (const char* v = std::getenv("ORCD_CUDA_DEC_SPLIT_KEYS"))
        split_keys = std::max(cu::kDecTK, std::atoi(v) / cu::kDecTK * cu::kDecTK);
    // cluster attention: split lengths in multiples of this many keys (ORCD_CUDA_DEC_CLUSTER_GRAN)
    int cluster_gran = 8;
    if (const char* v = std::getenv("ORCD_CUDA_DEC_CLUSTER_GRAN"))
        cluster_gran = std::max(1, std::min(cu::kDecTK, std::atoi(v)));
    for (int l = 0; l < n_layer; ++l) {
        const DevLayer& L = layers_[size_t(l)];
        __half* kc = kc_ + size_t(l) * layer_stride_;
        __half* vc = vc_ + size_t(l) * layer_stride_;

        cu::DecQkvArgs& q = dq_[size_t(l)];
        q.w[0] = L.wq.dt();
        q.w[1] = L.wk.dt();
        q.w[2] = L.wv.dt();
        q.bias[0] = L.bq;
        q.bias[1] = L.bk;
        q.bias[2] = L.bv;
        q.x = x_;
        q.x_out = x_;
        q.emb = tok_embd_.dt();
        q.embed = l == 0;
        q.norm_w = L.attn_norm;
        q.eps = d_.rms_eps;
        q.n_embd = E_;
        q.n_head = d_.n_head;
        q.n_head_kv = d_.n_head_kv;
        q.head_dim = hd_;
        q.log2_base = log2_base;
        q.S = qkv_S_;
        q.parts = qkv_parts_;
        q.rope = rope_;
        q.q_out = q_;
        q.kc = kc;
        q.vc = vc;
        q.slot_stride = slot_stride_;
        q.kv_dim = KD_;
        q.st = d_state_;
        q.need_q8 = cu::dec_int8_type(L.wq.type) || cu::dec_int8_type(L.wk.type) || cu::dec_int8_type(L.wv.type);
        q.smem_w = qkv_smem_w_;

        cu::DecAttnArgs& a = da_[size_t(l)];
        a.q = q_;
        a.kc = kc;
        a.vc = vc;
        a.slot_stride = slot_stride_;
        a.kv_dim = KD_;
        a.n_head = d_.n_head;
        a.n_head_kv = d_.n_head_kv;
        a.head_dim = hd_;
        a.scale = 1.0f / std::sqrt(float(hd_));
        a.max_splits = cu::kDecMaxSplits;
        a.split_keys = split_keys;
        a.cluster_gran = cluster_gran;
        a.part_o = dec_part_o_;
        a.part_ml = dec_part_ml_;
        a.out = att_;
        a.counter = d_sync_->attn;
        a.st = d_state_;

        cu::DecProjArgs& o = dp_o_[size_t(l)];
        o.w[0] = L.wo.dt();
        o.n_tensors = 1;
        o.rows_per_block = plan_o_.rb;
        o.act = att_;
        o.need_q8 = cu::dec_int8_type(L.wo.type);
        o.mode = cu::DEC_RESID;
        o.y = x_;
        o.smem_w = plan_o_.smem_w;

        cu::DecProjArgs& g = dp_gu_[size_t(l)];
        g.w[0] = L.gate.dt();
        g.w[1] = L.up.dt();
        g.n_tensors = 2;
        g.rows_per_block = plan_gu_.rb;
        g.act = x_;
        g.norm_w = L.ffn_norm;
        g.eps = d_.rms_eps;
        g.need_q8 = cu::dec_int8_type(L.gate.type) || cu::dec_int8_type(L.up.type);
        g.mode = cu::DEC_GLU;
        g.y = g_;
        g.smem_w = plan_gu_.smem_w;

        cu::DecProjArgs& dn = dp_d_[size_t(l)];
        dn.w[0] = L.down.dt();
        dn.n_tensors = 1;
        dn.rows_per_block = plan_d_.rb;
        dn.act = g_;
        dn.need_q8 = cu::dec_int8_type(L.down.type);
        dn.mode = cu::DEC_RESID;
        dn.y = x_;
        dn.smem_w = plan_d_.smem_w;
    }
    cu::DecProjArgs& m = dp_lm_;
    m = cu::DecProjArgs{};
    m.w[0] = output_.dt();
    m.n_tensors = 1;
    m.rows_per_block = plan_lm_.rb;
    m.act = x_;
    m.norm_w = output_norm_;
    m.eps = d_.rms_eps;
    m.need_q8 = cu::dec_int8_type(output_.type);
    m.mode = cu::DEC_LOGITS;
    m.y = logits_;
    m.part = dec_arg_;
    m.counter = &d_sync_->lm;
    m.st = d_state_;
    m.out_tokens = d_out_tokens_;
    m.smem_w = plan_lm_.smem_w;
    m.lm_grid = lm_grid_;
    m.lm_stages = lm_stages_;
    // (An L2 prefetch of later kernels' weights, ORCD_CUDA_L2_PREFETCH, was measured neutral
    // for Q4_K_M and -13% for F16 (perf_notes runs 6 and 11) and removed in round 3: its code
    // sat in every kernel's prologue.)
}

void CudaEngineImpl::launch_decode_kernel(int k, bool greedy, bool pdl, bool cluster, bool noop) {
    const int trig0 = std::min(2, std::max(0, opt_.pdl_trigger));
    // kinds in pdl_early_ release their successor at their start (its weight copy then
    // overlaps this kernel's whole run), the others after their wait
    const int kind = k == 5 * d_.n_layer ? 5 : k % 5;
    const int trig = (pdl_early_ >> kind) & 1 ? 0 : trig0;
    if (k == 5 * d_.n_layer) {
        cu::DecProjArgs m = dp_lm_;
        m.y = greedy ? nullptr : logits_;
        m.argmax = greedy ? 1 : 0;
        m.advance = greedy ? 1 : 0;
        m.pdl_trigger = trig;
        cu::dec_proj(m, stream_, pdl, "decode lm_head", noop);
        return;
    }
    const size_t l = size_t(k / 5);
    switch (k % 5) {
    case 0: {
        cu::DecQkvArgs a = dq_[l];
        a.pdl_trigger = trig;
        // layer 0 follows a copy or the previous step's lm_head, which advances the state
        // this kernel reads (plain loads, before its wait): no PDL. (Tried: the state read
        // after the wait and PDL between the steps of a multi-step graph: no faster on the
        // H200, and test_decode_graph_equals_direct failed; likely the plain loads hitting
        // a stale L1 line: docs/perf_notes.md run 14.)
        cu::dec_qkv(a, stream_, pdl && l > 0, "decode q/k/v", noop);
        break;
    }
    case 1: {
        cu::DecAttnArgs a = da_[l];
        a.pdl_trigger = trig;
        a.cluster = cluster ? 1 : 0;
        cu::dec_attention(a, stream_, pdl, "decode attention", noop);
        break;
    }
    case 2: {
        cu::DecProjArgs a = dp_o_[l];
        a.pdl_trigger = trig;
        cu::dec_proj(a, stream_, pdl, "decode attn_output", noop);
        break;
    }
    case 3: {
        cu::DecProjArgs a = dp_gu_[l];
        a.pdl_trigger = trig;
        cu::dec_proj(a, stream_, pdl, "decode ffn_gate/ffn_up", noop);
        break;
    }
    default: {
        cu::DecProjArgs a = dp_d_[l];
        a.pdl_trigger = trig;
        cu::dec_proj(a, stream_, pdl, "decode ffn_down", noop);
        break;
    }
    }
}

void CudaEngineImpl::launch_decode(bool greedy, int steps, bool cluster) {
    const bool pdl = opt_.pdl && pdl_ok_;
    for (int s = 0; s < steps; ++s)
        for (int k = 0; k <= 5 * d_.n_layer; ++k) launch_decode_kernel(k, greedy, pdl, cluster);
}

cudaGraphExec_t CudaEngineImpl::record_graph(const std::function<void()>& body, const char* what) {
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

bool CudaEngineImpl::capture(bool greedy, int steps, bool cluster) {
    for (int attempt = 0; attempt < 2; ++attempt) {
        try {
            graph_slot(greedy, steps, cluster) =
                record_graph([&]() { launch_decode(greedy, steps, cluster); }, "decode graph capture");
            return true;
        } catch (const Error& err) {
            cudaGetLastError();
            if (opt_.pdl && pdl_ok_) {
                pdl_ok_ = false;
                drop_graphs();
                dec_note_ += std::string(dec_note_.empty() ? "" : "; ") +
                             "PDL off: graph capture with PDL failed: " + err.what();
                continue;
            }
            graphs_ok_ = false;
            dec_note_ += std::string(dec_note_.empty() ? "" : "; ") + "graphs off: capture failed: " + err.what();
            return false;
        }
    }
    return false;
}

void CudaEngineImpl::run_decode(bool greedy, int kv_len, int steps) {
    const bool cluster = cluster_for(kv_len);
    if (opt_.graphs && graphs_ok_) {
        cudaGraphExec_t& g = graph_slot(greedy, steps, cluster);
        if (g || capture(greedy, steps, cluster)) {
            CUDA_CHECK(cudaGraphLaunch(g, stream_), "decode graph launch");
            return;
        }
    }
    launch_decode(greedy, steps, cluster);
}

void CudaEngineImpl::fast_forward_one(int slot, int32_t token, int pos, float* logits) {
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine forward");
    *pinned_state_ = cu::DecState{token, pos, slot, 0};
    CUDA_CHECK(cudaMemcpyAsync(d_state_, pinned_state_, sizeof(cu::DecState), cudaMemcpyHostToDevice, stream_),
               "decode state upload");
    run_decode(false, pos + 1);
    CUDA_CHECK(cudaMemcpyAsync(pinned_logits_, logits_, size_t(V_) * 4, cudaMemcpyDeviceToHost, stream_),
               "logits copy");
    sync("forward (logits)");
    std::memcpy(logits, pinned_logits_, size_t(V_) * 4);
}

void CudaEngineImpl::lm_head_last(const float* x_row) {
    cu::DecProjArgs m = dp_lm_;
    m.act = x_row;
    m.y = logits_;
    m.argmax = 0;
    m.advance = 0;
    cu::dec_proj(m, stream_, false, "lm_head (last row)");
}

void CudaEngineImpl::set_options(const CudaOptions& o) {
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine set_options");
    sync("set_options");
    drop_graphs();
    opt_ = o;
    pdl_ok_ = info_.cc_major >= 9;
    graphs_ok_ = true;
    dec_note_ = dec_base_note_;
}

CudaPaths CudaEngineImpl::paths() const {
    CudaPaths p;
    p.fast_decode_available = dec_ok_;
    p.pdl_available = info_.cc_major >= 9;
    p.fast_decode = fast_on();
    p.graphs = p.fast_decode && opt_.graphs && graphs_ok_;
    p.pdl = p.fast_decode && opt_.pdl && pdl_ok_;
    p.fused_prompt = opt_.fused_prompt;
    p.note = dec_note_;
    return p;
}

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
    size_t off = 0;
    for (const DevWeight* w : ws) {
        cu::dequantize_f16(w->type, w->data, w->elems(), w16_ + off, stream_, w->name.c_str());
        off += size_t(w->elems());
    }
    return w16_;
}

void CudaEngineImpl::check_greedy_args(const char* who, int slot, int32_t token, int pos, int n_steps) const {
    orcd::check_greedy_args(who, *this, slot, token, pos, n_steps);
}

void CudaEngineImpl::decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) {
    check_greedy_args("decode_greedy", slot, first_token, pos, n_steps);
    if (n_steps == 0) return;
    if (!fast_on()) {
        Engine::decode_greedy(slot, first_token, pos, n_steps, out_tokens);
        return;
    }
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine decode_greedy");
    *pinned_state_ = cu::DecState{first_token, pos, slot, 0};
    CUDA_CHECK(cudaMemcpyAsync(d_state_, pinned_state_, sizeof(cu::DecState), cudaMemcpyHostToDevice, stream_),
               "decode state upload");
    // kDecGraphSteps steps per graph launch while that many remain (the device state
    // carries token and position from step to step), then single steps
    int i = 0;
    if (opt_.graphs && graphs_ok_)
        for (; n_steps - i >= kDecGraphSteps; i += kDecGraphSteps) run_decode(true, pos + i + kDecGraphSteps, kDecGraphSteps);
    for (; i < n_steps; ++i) run_decode(true, pos + i + 1);
    CUDA_CHECK(cudaMemcpyAsync(pinned_tokens_, d_out_tokens_, size_t(n_steps) * 4, cudaMemcpyDeviceToHost, stream_),
               "decoded tokens copy");
    sync("decode_greedy");
    std::memcpy(out_tokens, pinned_tokens_, size_t(n_steps) * 4);
}

std::vector<std::pair<std::string, double>> CudaEngineImpl::profile_decode(int slot, int32_t token, int pos,
                                                                           int n_steps) {
    check_greedy_args("profile_decode", slot, token, pos, n_steps);
    if (!dec_ok_) throw Error("CudaEngine.profile_decode: " + dec_note_);
    if (n_steps < 1) throw Error("CudaEngine.profile_decode: n_steps must be >= 1");
    CUDA_CHECK(cudaSetDevice(dev_), "CudaEngine profile_decode");
    sync("profile_decode");
    const int K = 5 * d_.n_layer + 1;
    std::vector<cudaEvent_t> ev(size_t(K) + 1, nullptr);
    std::vector<double> us(15, 0.0);
    std::vector<cudaGraphExec_t> execs;
    auto put_state = [&]() {
        *pinned_state_ = cu::DecState{token, pos, slot, 0};
        CUDA_CHECK(cudaMemcpyAsync(d_state_, pinned_state_, sizeof(cu::DecState), cudaMemcpyHostToDevice, stream_),
                   "decode state upload");
    };
    // a graph of `body` (captured on the stream)
    auto make_graph = [&](const std::function<void()>& body) {
        execs.push_back(record_graph(body, "profile_decode capture"));
        return execs.back();
    };
    // microseconds per launch of `exec`, n_steps launches from the start state
    auto time_graph = [&](cudaGraphExec_t exec) {
        put_state();
        CUDA_CHECK(cudaGraphLaunch(exec, stream_), "profile_decode");  // warm-up
        put_state();
        CUDA_CHECK(cudaEventRecord(ev[0], stream_), "profile_decode");
        for (int i = 0; i < n_steps; ++i) CUDA_CHECK(cudaGraphLaunch(exec, stream_), "profile_decode");
        CUDA_CHECK(cudaEventRecord(ev[1], stream_), "profile_decode");
        sync("profile_decode");
        float ms = 0.f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]), "profile_decode");
        return 1000.0 * ms / n_steps;
    };
    const bool pdl = opt_.pdl && pdl_ok_;
    auto cleanup = [&]() {
        for (cudaGraphExec_t e : execs) cudaGraphExecDestroy(e);
        for (cudaEvent_t e : ev)
            if (e) cudaEventDestroy(e);
    };
    try {
        for (cudaEvent_t& e : ev) CUDA_CHECK(cudaEventCreate(&e), "profile_decode events");
        // per kernel: the step with an event after each kernel, no PDL (the attention variant of pos)
        const bool cluster = cluster_for(pos + 1);
        cudaGraphExec_t timed = make_graph([&]() {
            // External: inside a capture a plain record only orders streams; this makes event-record nodes
            CUDA_CHECK(cudaEventRecordWithFlags(ev[0], stream_, cudaEventRecordExternal), "profile_decode");
            for (int k = 0; k < K; ++k) {
                launch_decode_kernel(k, true, false, cluster);
                CUDA_CHECK(cudaEventRecordWithFlags(ev[size_t(k) + 1], stream_, cudaEventRecordExternal),
                           "profile_decode");
            }
        });
        put_state();
        CUDA_CHECK(cudaGraphLaunch(timed, stream_), "profile_decode");  // warm-up
        put_state();
        for (int i = 0; i < n_steps; ++i) {
            CUDA_CHECK(cudaGraphLaunch(timed, stream_), "profile_decode");
            sync("profile_decode");
            for (int k = 0; k < K; ++k) {
                float ms = 0.f;
                CUDA_CHECK(cudaEventElapsedTime(&ms, ev[size_t(k)], ev[size_t(k) + 1]), "profile_decode");
                us[k == K - 1 ? 5 : size_t(k % 5)] += 1000.0 * ms / n_steps;
            }
        }
        // the step as the engine runs it
        put_state();
        run_decode(true, pos + 1);  // captures the engine's graph if needed
        sync("profile_decode");
        put_state();
        CUDA_CHECK(cudaEventRecord(ev[0], stream_), "profile_decode");
        for (int i = 0; i < n_steps; ++i) run_decode(true, pos + i + 1);
        CUDA_CHECK(cudaEventRecord(ev[1], stream_), "profile_decode");
        sync("profile_decode");
        float ms = 0.f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]), "profile_decode");
        us[6] = 1000.0 * ms / n_steps;
        // empty kernels of the same shapes: the launch-boundary floor, with and without PDL
        // empty kernels of the kind `noop_kind` (-1: of every kind), the others real
        auto noop_step = [&](bool with_pdl, int noop_kind) {
            return make_graph([&]() {
                for (int k = 0; k < K; ++k) {
                    const int kind = k == K - 1 ? 5 : k % 5;
                    launch_decode_kernel(k, true, with_pdl, cluster, noop_kind < 0 || kind == noop_kind);
                }
            });
        };
        us[7] = time_graph(noop_step(pdl, -1));
        us[8] = time_graph(noop_step(false, -1));
        // marginal cost of each kind in the real pipeline (graph + PDL): the step minus the
        // step with that kind's kernels empty (their outputs are stale: timing only)
        for (int kind = 0; kind < kDecKinds; ++kind) us[size_t(9 + kind)] = us[6] - time_graph(noop_step(pdl, kind));
    } catch (...) {
        cleanup();
        throw;
    }
    cleanup();
    std::vector<std::pair<std::string, double>> out;
    for (int q = 0; q < kDecKinds; ++q) out.emplace_back(kDecKindNames[q], us[size_t(q)]);
    out.emplace_back("graph_step", us[6]);
    out.emplace_back("noop_step", us[7]);
    out.emplace_back("noop_step_nopdl", us[8]);
    for (int q = 0; q < kDecKinds; ++q) out.emplace_back(std::string("marginal_") + kDecKindNames[q], us[size_t(9 + q)]);
    return out;
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
    const bool fused = !mv && opt_.fused_prompt;
    const int QKVW = QD_ + 2 * KD_;
    for (int l = 0; l < d_.n_layer; ++l) {
        const DevLayer& L = layers_[size_t(l)];
        const char* ln = L.wq.name.c_str();
        __half* kc = kc_ + size_t(l) * layer_stride_;
        __half* vc = vc_ + size_t(l) * layer_stride_;
        if (fused) {
            cu::rmsnorm_f16(x_, nr, E_, L.attn_norm, d_.rms_eps, act16_, stream_, "attn_norm");
            cu::gemm_f16(blas_, weights16({&L.wq, &L.wk, &L.wv}), E_, QKVW, act16_, nr, qkv_, QKVW, false, ln);
            cu::qkv_post(qkv_, QKVW, nr, d_.n_head, d_.n_head_kv, hd_, L.bq, L.bk, L.bv, d_pos, d_slot, d_.rope_base,
                         kc, vc, slot_stride_, stream_, ln);
            cu::attention(qkv_, QKVW, kc, vc, slot_stride_, KD_, d_slot, d_pos, nr, d_.n_head, d_.n_head_kv, hd_,
                          plan, part_o_, part_ml_, att_, QD_, stream_, ln);
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
            cu::rope_neox(q_, QD_, nr, d_.n_head, hd_, d_pos, d_.rope_base, stream_, ln);
            cu::rope_neox(k_, KD_, nr, d_.n_head_kv, hd_, d_pos, d_.rope_base, stream_, L.wk.name.c_str());
            cu::kv_store(k_, v_, KD_, nr, KD_, d_slot, d_pos, kc, vc, slot_stride_, stream_, ln);
            cu::attention(q_, QD_, kc, vc, slot_stride_, KD_, d_slot, d_pos, nr, d_.n_head, d_.n_head_kv, hd_, plan,
                          part_o_, part_ml_, att_, QD_, stream_, ln);
            linear(L.wo, att_, nr, x_, E_, nullptr, true, mv);  // residual add
            cu::rmsnorm(x_, nr, E_, L.ffn_norm, d_.rms_eps, h_, stream_, "ffn_norm");
            linear(L.gate, h_, nr, g_, F_, nullptr, false, mv);
            linear(L.up, h_, nr, u_, F_, nullptr, false, mv);
            cu::swiglu(g_, u_, int64_t(nr) * F_, stream_, L.gate.name.c_str());
            linear(L.down, g_, nr, x_, E_, nullptr, true, mv);  // residual add
        }
        if (trace) trace_copy(l + 1);
    }

    if (mode == Logits::Last) {
        if (fast_on()) {
            lm_head_last(x_ + size_t(nr - 1) * E_);
        } else {
            cu::rmsnorm(x_ + size_t(nr - 1) * E_, 1, E_, output_norm_, d_.rms_eps, h_, stream_, "output_norm");
            linear(output_, h_, 1, logits_, V_, nullptr, false, true);
        }
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
    check_forward_args("forward", *this, slot, tokens, n, pos0);
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

void CudaEngineImpl::decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                                  float* logits) {
    check_decode_batch_args(*this, n, slots, tokens, pos);  // so n <= n_slots_ (distinct slots)
    int kv_max = 0;
    for (int i = 0; i < n; ++i) kv_max = std::max(kv_max, pos[i] + 1);
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
