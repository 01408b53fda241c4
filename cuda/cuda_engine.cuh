// cuda_engine.cuh - CudaEngineImpl, the CUDA engine (private to cuda/): setup and memory
// in engine_memory.cu, the forward step and the public methods in cuda_engine.cu; the
// fused single-sequence step is a FusedDecoder (fused_decoder.cuh).
#pragma once
#include <initializer_list>
#include <memory>
#include <string>

#include "batch_graph.cuh"
#include "cuda_common.cuh"
#include "engine_weights.cuh"
#include "fused_decoder.cuh"
#include "logprob_kernels.cuh"
#include "resident_f16.cuh"
#include "sample.cuh"

namespace orcd {

// What a step does with the final hidden states: nothing, the last row's logits to the
// host, or every row's logits to the host (decode batches: batch_step, logits left in logits_).
enum class Logits { None, Last, All };

// Byte offsets of the device-sampling buffers (the same layout on the device and in
// pinned memory): n_slots SampleRows, n_slots penalty windows, tokens, generator states
// (rows and windows go up in one copy, tokens and states come back in one), then the
// sampler's workspace (device only).
struct SampleLayout {
    size_t rows = 0, hist = 0, tokens = 0, states = 0, mask_rows = 0, masks = 0, work = 0, bytes = 0;
};
inline SampleLayout sample_layout(int n_slots, int n_vocab) {
    auto up = [](size_t b) { return (b + 255) & ~size_t(255); };
    SampleLayout l;
    l.hist = up(sizeof(cu::SampleRow) * size_t(n_slots));
    l.tokens = l.hist + up(size_t(n_slots) * kDevicePenaltyWindowMax * 4);
    l.states = l.tokens + up(size_t(n_slots) * 4);
    // structured output: the masked rows' indices, then their masks (uploaded only in steps that have one)
    l.mask_rows = l.states + up(size_t(n_slots) * 8);
    l.masks = l.mask_rows + up(size_t(n_slots) * 4);
    // everything before `work` is staged in the pinned host buffer (allocated with `work` bytes); the
    // sampler's workspace after it lives on the device only
    l.work = l.masks + up(size_t(n_slots) * size_t(token_mask_words(n_vocab)) * 4);
    l.bytes = l.work + up(cu::sample_workspace_bytes(n_slots, n_vocab));
    return l;
}

class CudaEngineImpl final : public CudaEngine {
public:
    CudaEngineImpl(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots, const ProgressFn& progress, int device,
                   size_t kv_memory);
    ~CudaEngineImpl() override { release(); }

    const ModelDesc& desc() const override { return d_; }
    int n_ctx() const override { return n_ctx_; }
    int n_slots() const override { return n_slots_; }
    bool kv_reserve(int slot, int n_positions) override;
    void kv_release(int slot) override;
    KvPoolStats kv_stats() const override { return kv_.stats(); }
    int64_t kv_reserved(int slot) const override;
    CudaMemoryUse memory_use() const override { return mem_; }
    const DeviceInfo& device() const override { return info_; }
    int max_prompt_chunk() const override { return C_; }
    CudaOptions options() const override { return opt_; }
    void set_options(const CudaOptions& o) override;
    CudaPaths paths() const override;

    void forward(int slot, const int32_t* tokens, int n, int pos0, float* logits, bool all_logits,
                 Trace* trace) override;
    bool decode_batch_sample(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                             DeviceSampleRow* rows, int32_t* out_tokens) override;
    void decode_batch(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos,
                      float* logits) override;
    void forward_rows(int n, const int32_t* slots, const int32_t* tokens, const int32_t* pos, int k,
                      const int32_t* out_rows, float* logits) override;
    void decode_greedy(int slot, int32_t first_token, int pos, int n_steps, int32_t* out_tokens) override;
    bool decode_sample_steps(int slot, int32_t token, int pos, int n_steps, DeviceSampleRow& row,
                             int32_t* out_tokens) override;
    DecodeProfile profile_decode(int slot, int32_t token, int pos, int n_steps) override;

private:
    // decode_batch_sample's structured-output rows: their masks uploaded and applied to logits_
    void upload_and_apply_masks(int n, const DeviceSampleRow* rows, const SampleLayout& lay);
    // engine_memory.cu
    void build(const ProgressFn& progress);  // checks, plans and allocates everything, uploads the weights
    void release() noexcept;

    // cuda_engine.cu
    bool fast_on() const { return opt_.fast_decode && dec_.available(); }
    void fast_forward_one(int slot, int32_t token, int pos, float* logits);
    void check_greedy_args(const char* who, int slot, int32_t token, int pos, int n_steps) const;
    // Runs nr rows whose ids/positions/slots are in pinned_ids_ [0,R) [R,2R) [2R,3R).
    void step(int nr, bool matvec, int kv_max, Logits mode, float* logits, Trace* trace, int trace_row0);
    void upload_ids();  // pinned_ids_ -> d_ids_, then upload_done_
    // The kernels of a step after the upload: embedding and layers of nr rows over a cache
    // plan of kv_max positions (trace: the residual stream after each to the host).
    void body(int nr, bool matvec, int kv_max, Trace* trace, int trace_row0);
    void device_logits(int nr, bool matvec);  // every row's logits into logits_
    // A decode step of n sequences staged in pinned_ids_ rows [0, n): padded to the row and
    // cache buckets (batch_graph.cuh), replayed from a graph when batch graphs are on; every
    // row's logits in logits_ after it (rows >= n: copies of row n-1).
    void batch_step(int n, bool matvec, int kv_max);
    // (gpt-oss's experts are routed on the host, between a layer's launches: no graphs)
    bool batch_graphs_on() const { return opt_.batch_graphs && batch_graphs_ok_ && d_.n_expert == 0; }
    // gpt-oss's mixture-of-experts FFN of nr rows of h_ (normed), added to x_
    void moe_ffn(const DevLayer& L, int nr, bool matvec);
    bool resident_on() const { return opt_.resident_f16 && res_buf_ != nullptr; }
    void linear(const DevWeight& w, const float* x, int rows, float* y, int ldy, const float* bias, bool acc,
                bool matvec);
    // fp16 weights of ws (adjacent in memory) for one GEMM: in place when they are F16, else dequantized
    const __half* weights16(std::initializer_list<const DevWeight*> ws);
    void sync(const char* what) { CUDA_CHECK(cudaStreamSynchronize(stream_), what); }

    std::shared_ptr<GGUFFile> file_;
    ModelDesc d_;
    int n_ctx_, n_slots_, dev_;
    DeviceInfo info_;
    CudaMemoryUse mem_;
    CudaOptions opt_;
    int E_ = 0, QD_ = 0, KD_ = 0, F_ = 0, V_ = 0, hd_ = 0;  // n_embd, n_head*hd, n_head_kv*hd, n_ff, n_vocab, head_dim
    int C_ = 0, R_ = 0, L_ = 0;  // prompt chunk, activation rows, logit rows per copy
    size_t w16_elems_ = 0;
    // KV memory: K and V pools of kv_.stats().capacity positions per layer ([layer][position][KD_]
    // fp16, layer_stride_ elements apart); slot s's position 0 is d_slot_off_[s] elements into a layer.
    size_t kv_memory_ = 0;  // the budget asked for (0: auto)
    size_t layer_stride_ = 0;
    KvPool kv_;
    int64_t* d_slot_off_ = nullptr;       // device, n_slots
    int64_t* pinned_slot_off_ = nullptr;  // its staging

    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    cudaEvent_t upload_done_ = nullptr;
    uint8_t* wbuf_ = nullptr;  // weights
    __half* res_buf_ = nullptr;  // the resident fp16 copy (null: none)
    ResidentF16 resident_;
    std::string res_note_;       // why there is no resident copy ("" when there is or it was not asked for)
    BatchGraphCache batch_graphs_;
    bool batch_graphs_ok_ = true;
    // the model needs the generic step's family ops (gemma3: Q/K and post norms, GELU, scales,
    // per-layer RoPE bases), which only its unfused branch runs
    bool family_ops_ = false;
    bool packed_rows_ = false;   // body() runs a forward_rows chunk: attention per run of one slot
    std::string batch_note_;     // why batch graphs stopped
    uint8_t* sbuf_ = nullptr;  // scratch
    __half *kc_ = nullptr, *vc_ = nullptr;
    int32_t* pinned_ids_ = nullptr;
    float* pinned_logits_ = nullptr;
    // device sampling: per slot a SampleRow, a penalty window of history, the token and the
    // generator state out, then the sampler's workspace (samp_bytes_ in all); pinned staging
    // in the same layout up to the workspace
    uint8_t* samp_dev_ = nullptr;
    uint8_t* samp_pinned_ = nullptr;
    size_t samp_bytes_ = 0;

    // views of the scratch (q_/k_/v_ inside qkv_, g_/u_ inside gu_)
    float *x_ = nullptr, *h_ = nullptr, *qkv_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr;
    float *att_ = nullptr, *gu_ = nullptr, *g_ = nullptr, *u_ = nullptr, *logits_ = nullptr, *part_o_ = nullptr;
    size_t part_rows_ = 0;  // rows of part_o_ / part_ml_ (attention partials)
    float2* part_ml_ = nullptr;
    __half *act16_ = nullptr, *w16_ = nullptr;
    // gpt-oss (null otherwise): the router's logits, an expert's gathered rows and its output
    // (device); the routed rows and weights, grouped by expert (device, and pinned staging); YaRN's
    // per-layer frequencies (device, head_dim/2 doubles a layer)
    float *router_ = nullptr, *moe_in_ = nullptr, *moe_out_ = nullptr;
    uint8_t* d_moe_ = nullptr;
    uint8_t* pinned_moe_ = nullptr;
    float* pinned_router_ = nullptr;
    double* rope_freq_ = nullptr;
    int32_t* d_ids_ = nullptr;
    void* blas_ws_ = nullptr;

    DeviceWeights weights_;
    FusedDecoder dec_;
    // decode_batch_sample's rows asking for logprobs (cuda/logprob_kernels.cuh); idle otherwise
    cu::LogprobRows logprob_rows_;
};

}  // namespace orcd
