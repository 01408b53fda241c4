// cuda_api.h - the CUDA backend as seen from plain C++ (no CUDA headers):
// what cuda/bindings_cuda.cpp and other host code may call.
//
// Errors: orcd::Error for bad input (wrong sizes, unsupported types), and
// orcd::CudaError (also an orcd::Error) for failures of the CUDA runtime or
// cuBLAS, and for "not enough GPU memory". Messages name the call, CUDA's
// error string and the kernel or tensor involved.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine.h"
#include "sampler.h"
#include "error.h"
#include "gguf.h"

namespace orcd {

// A CUDA runtime or cuBLAS call failed, or the GPU lacks memory.
struct CudaError : Error {
    using Error::Error;
};

// "" when a usable GPU is present (driver, device and a kernel image for its
// architecture), else the reason in words.
std::string cuda_status();

struct DeviceInfo {
    int device = 0;
    std::string name;
    int cc_major = 0, cc_minor = 0;
    int sm_count = 0;
    size_t total_mem = 0, free_mem = 0;
    size_t l2_bytes = 0;
    int driver_version = 0, runtime_version = 0;
};
DeviceInfo device_info(int device = 0);  // throws CudaError when there is no usable GPU

// ---------------------------------------------------------------- the engine
struct CudaMemoryUse {
    size_t weights = 0;  // the GGUF tensors as stored, plus the F32 norms/biases
    size_t kv = 0;       // the fp16 K and V pools
    size_t scratch = 0;  // activations, dequantization scratch, attention partials, cuBLAS workspace
    size_t resident_f16 = 0;  // the fp16 copy of the matrices the GEMM paths read (0: none, see CudaOptions)
    size_t total() const { return weights + kv + scratch + resident_f16; }
};

// Switches of the fast paths (each on by default where the GPU allows it) and the test
// hooks of the fused decode attention. A new engine starts from options_from_env().
struct CudaOptions {
    bool fast_decode = true;   // fused decode kernels for single-sequence steps (forward n=1, decode_greedy)
    bool graphs = true;        // the fused decode step captured once into a CUDA graph and replayed
    bool pdl = true;           // programmatic dependent launch between the fused kernels (Hopper)
    bool fused_prompt = true;  // prompt path: fused q|k|v and gate|up GEMMs, fp16 norms, bias+RoPE+KV in one kernel
    bool batch_graphs = true;  // decode steps of several sequences replayed from CUDA graphs per (rows, cache) bucket
    // GEMMs read a resident fp16 copy of the matrices instead of dequantizing them each time.
    // Its memory is taken when the engine is built and free VRAM allows (an engine built with
    // this off never has it); turning it off later only stops its use.
    bool resident_f16 = true;
    bool sample_split = true;  // device sampling of top_k rows: many blocks per row, then a merge
    // decode_sample_steps: 8 sampled steps (the fused step, the sampler, the feed) captured into
    // one CUDA graph and replayed (docs/perf_log.md runs 40, 43: Model.chat +0.8%, bitwise the
    // plain launches' tokens)
    bool sample_graphs = true;
    // with sample_split: rows with top_k off (the whole vocabulary) on many blocks too, the same
    // draws as the one-block kernel (off by default until checked on a GPU: perf_log run 42)
    bool sample_split_full = false;
    // The decode attention's variants (the tests reach each one through these):
    int cluster_keys = 1 << 30;  // caches of up to this many positions: the thread-block cluster merge (Hopper); 0: never
    int split_keys = 32;       // the global merge's splits hold at least this many keys (a positive multiple of 32)
    int cluster_size = 16;     // blocks (splits) per cluster: 1..16 (above 8 where the GPU allows non-portable clusters)
    bool cluster_mma = true;   // the cluster merge's blocks run the tensor-core tile phase (G <= 16, head_dim 64/128)
    // positions per cluster at most: the fewest clusters per KV head (1, 2, 4, ...) that hold them
    // (partials merged by attn_output); 8,192: one through 8,192 positions, four past 16,384, each
    // warp's keys there two 16-key tiles loaded before the wait (docs/perf_log.md runs 74-76)
    int cluster_span = 8192;
    int direct_keys = 512;     // caches of up to this many positions: one attention block per KV head, no merge
    // Which decode kernels release their successor at their start (a bit per DecodeKernel; -1:
    // the built-in choice, attn_output: docs/perf_log.md run 13). For measuring.
    int pdl_early_kinds = -1;
    int pdl_early_kinds_deep = -1;  // ... in steps past the one-block attention (-1: pdl_early_kinds)
    // The cluster attention's blocks copy their keys' K/V rows into shared memory before their wait
    // (bulk copies overlapping the previous kernel), up to this many keys a block (0: off; more
    // clusters per KV head so a block's keys fit; at most what a block's shared memory holds)
    int attn_stage = 0;
    // The lm_head's weight rows by bulk copies (the copy engine; sm_90 and later) instead of each
    // lane's cp.async (docs/perf_log.md runs 71, 74: +0.4-0.7% at every depth)
    bool lm_bulk = true;
    // Steps past the one-block attention: each layer's cached rows before pos pulled into L2 a layer
    // ahead, by the previous layer's ffn_down blocks (one bulk prefetch of K and of V a block,
    // sm_90), 1: and that layer's attention then skips its own prefetch; 2: it prefetches as well;
    // 0: off (the attention's blocks alone prefetch their rows, before their wait). 1 by default:
    // tg128 at depth 4,096 / 16,384 +3.6% / +3.0%, from empty unchanged (docs/perf_log.md run 74)
    int kv_prefetch = 1;
    // Measuring: the cluster attention's blocks store timestamps, profile_decode returns them
    bool attn_trace = false;
    // Plan as if the GPU had at most this many bytes free (0: what it has): the automatic KV
    // pool and the resident fp16 copy size themselves under it, as on a smaller GPU or beside
    // other processes. Read when the engine is built (ORCD_CUDA_VRAM_LIMIT).
    size_t vram_limit = 0;
};

// The defaults with ORCD_CUDA_FAST_DECODE, ORCD_CUDA_GRAPHS, ORCD_CUDA_PDL,
// ORCD_CUDA_FUSED_PROMPT, ORCD_CUDA_BATCH_GRAPHS, ORCD_CUDA_RESIDENT_F16,
// ORCD_CUDA_SAMPLE_SPLIT, ORCD_CUDA_SAMPLE_GRAPHS and ORCD_CUDA_SAMPLE_SPLIT_FULL applied (0, n or f: off; 1, y or t: on), and ORCD_CUDA_VRAM_LIMIT (bytes, or with a
// K/M/G/T suffix of powers of 1024, e.g. 4G or 4GiB). The only place that reads the environment.
CudaOptions options_from_env();

// What the engine actually uses (an option is on only where the GPU and model allow it).
struct CudaPaths {
    bool fast_decode_available = false;  // the model/GPU suit the fused decode kernels
    bool pdl_available = false;          // compute capability >= 9.0
    bool fast_decode = false, graphs = false, pdl = false, fused_prompt = false;
    bool batch_graphs = false, resident_f16 = false, sample_split = false, sample_graphs = false;
    bool sample_split_full = false;
    size_t resident_f16_bytes = 0;       // the resident fp16 copy (allocated, whether in use or not)
    int batch_graphs_cached = 0;         // instantiated batch-step graphs held now
    std::string note;                    // why something is off (empty when all is well)
};

// The fused decode step's kernel kinds: five per layer in this order, then the lm_head.
enum class DecodeKernel : int { qkv, attention, attn_output, ffn_gate_up, ffn_down, lm_head };
constexpr int kDecodeKernelKinds = 6;
const char* decode_kernel_name(DecodeKernel k);  // "qkv", "attention", ... (profile_decode's keys)

// Microseconds per decode step by kernel kind, summed over the layers.
struct DecodeKernelTimes {
    double qkv = 0, attention = 0, attn_output = 0, ffn_gate_up = 0, ffn_down = 0, lm_head = 0;
    double& operator[](DecodeKernel k) { return *field(this, k); }
    double operator[](DecodeKernel k) const { return *field(this, k); }

private:
    template <class T>
    static auto field(T* t, DecodeKernel k) -> decltype(&t->qkv) {
        switch (k) {
        case DecodeKernel::qkv: return &t->qkv;
        case DecodeKernel::attention: return &t->attention;
        case DecodeKernel::attn_output: return &t->attn_output;
        case DecodeKernel::ffn_gate_up: return &t->ffn_gate_up;
        case DecodeKernel::ffn_down: return &t->ffn_down;
        case DecodeKernel::lm_head: break;
        }
        return &t->lm_head;
    }
};

// CudaEngine::profile_decode: microseconds per step.
struct DecodeProfile {
    DecodeKernelTimes kernel;    // each kind's GPU time: the step as a graph with an event after each kernel, no PDL
    double graph_step = 0;       // the step as the engine runs it (graph / PDL per the options)
    double noop_step = 0;        // a graph of empty kernels of the same launch shapes, the options' PDL
    double noop_step_nopdl = 0;  // ... without PDL (the launch-boundary floor)
    DecodeKernelTimes marginal;  // graph_step minus the same graph with that kind's kernels empty
    // With options' attn_trace, after graph_step: the cluster attention's timestamps of the last
    // step (FusedDecoder::attn_trace), its grid.x (0: that step had no cluster attention) and the
    // fields a block's record holds (cu::kDecAttnTraceFields; dec_attn_kernel says which)
    std::vector<unsigned long long> attn_trace;
    int attn_grid_x = 0;
    int attn_trace_fields = 0;
};

class CudaEngine : public Engine {
public:
    virtual CudaMemoryUse memory_use() const = 0;
    virtual const DeviceInfo& device() const = 0;
    virtual int max_prompt_chunk() const = 0;  // tokens a forward processes per pass
    virtual CudaOptions options() const = 0;
    // Drops captured graphs; Error naming the field for cluster_keys < 0 or a bad split_keys.
    virtual void set_options(const CudaOptions& o) = 0;
    virtual CudaPaths paths() const = 0;
    // Times the fused decode step: n_steps greedy steps from (token, pos) of `slot`
    // (they overwrite that slot's cache from pos on).
    virtual DecodeProfile profile_decode(int slot, int32_t token, int pos, int n_steps) = 0;
};

// progress(bytes uploaded, bytes to upload), called after each tensor.
using ProgressFn = std::function<void(uint64_t, uint64_t)>;

// Uploads the model described by describe_model(*file) to GPU `device`.
// Throws CudaError "not enough GPU memory: need X bytes, Y free" before
// allocating anything when the weights, KV cache and scratch do not fit.
// kv_memory: bytes of the K/V pool (cpp/kv_pool.h); 0: every slot's n_ctx positions where
// they fit in 90% of the free memory beside the rest of the engine, else what fits there.
std::unique_ptr<CudaEngine> make_cuda_engine(std::shared_ptr<GGUFFile> file, int n_ctx, int n_slots,
                                             ProgressFn progress = nullptr, int device = 0,
                                             size_t kv_memory = 0);

// ---------------------------------------------------------------- kernels, for tests
// Each runs one kernel on host data (uploaded, output poisoned with NaN before
// the launch, downloaded) so the tests can compare it with a CPU twin.
namespace cuda_test {

// GGUF bytes of n elements of `type` -> fp16 (returned as uint16 bit patterns).
std::vector<uint16_t> dequantize_f16(uint32_t type, const uint8_t* data, size_t nbytes, int64_t n);

// y[m, n_out] = x[m, n_in] · Wᵀ with the quantized mat-vec kernel (m <= 8);
// with `y_init` (m x n_out) the kernel accumulates into it (residual add);
// `bias` (n_out) is added when non-null.
std::vector<float> matvec(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out,
                          const float* x, int m, const float* bias, const float* y_init);

// Same product through the prompt path: W dequantized to an fp16 scratch
// (in chunks of at most `chunk_rows` rows, 0 = all) and cublasGemmEx.
std::vector<float> gemm(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out,
                        const float* x, int m, const float* bias, const float* y_init, int64_t chunk_rows);

// The fused decode mat-vec (dec_proj, LOGITS mode) on one vector: y = W · rmsnorm(x)
// (plain x when norm_w is null), int8 activations for Q4_0/Q5_0/Q8_0/Q4_K/Q6_K;
// *argmax receives the device-side argmax of y. bulk: the instance of DecProjArgs::lm_bulk.
std::vector<float> dec_matvec(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_out,
                              const float* x, const float* norm_w, float eps, int32_t* argmax, bool bulk = false);

// Embedding lookup: rows ids[0..n_ids) of W (n_rows x n_in) as float32.
std::vector<float> get_rows(uint32_t type, const uint8_t* w, size_t nbytes, int64_t n_in, int64_t n_rows,
                            const int32_t* ids, int n_ids);

// y = x / sqrt(mean(x²) + eps) * w, per row of n.
std::vector<float> rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, float eps);
// gemma3's in-place row norm (the per-head Q/K norms, the post-norms) and GELU gate
std::vector<float> rmsnorm_rows(const float* x, int64_t rows, int64_t n, const float* w, float eps);
std::vector<float> geglu_tanh(const float* g, const float* u, int64_t n);

// gpt-oss's kernels (family_kernels.cuh): the clamped gate; RoPE from a frequency table
// (inv_freq[head_dim/2]) with cos/sin times mscale, NEOX or normal pairing; attention with a sink
// logit per head (sinks[n_head] or null) and a window (0: none), k/v stored (fp16) in slot 1 of
// a 3-slot cache as flash_attention's test does
std::vector<float> swiglu_oai(const float* g, const float* u, int64_t n, float alpha, float limit);
std::vector<float> rope_freqs(const float* x, int n_tok, int n_heads, int head_dim, const int32_t* pos,
                              const double* inv_freq, float mscale, bool neox);
std::vector<float> attention_sinks(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                                   int n_head_kv, int head_dim, const int32_t* pos, int window, const float* sinks);

// NEOX RoPE on x[n_tok][n_heads][head_dim], token t at position pos[t].
std::vector<float> rope_neox(const float* x, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base);

// Causal GQA attention through the KV-cache path: k, v [n_kv][n_head_kv][hd]
// are appended (fp16) to a one-slot cache of n_kv positions with the
// KV-store kernel, then query t (q[n_q][n_head][hd]) attends to cache
// positions [0, pos[t]]. split_len = 0 picks the split as the engine does.
std::vector<float> attention(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                             int n_head_kv, int head_dim, const int32_t* pos, int split_len);
// The same through the prompt path's attention: the cache has 3 slots of n_kv positions,
// the keys in slot 1, slots 0 and 2 NaN (a read outside the slot's positions shows).
// routed: cu::attention with the engine's plan for a one-slot launch (the tensor-core
// kernel from kFlashMinQ queries, head_dim 64/128); else flash_attention itself for
// any n_q in split_len-key splits (0: one split) merged by the combine kernel.
std::vector<float> flash_attention(const float* q, int n_q, int n_head, const float* k, const float* v, int n_kv,
                                   int n_head_kv, int head_dim, const int32_t* pos, bool routed, int split_len);

// silu(g) * u, elementwise.
std::vector<float> swiglu(const float* g, const float* u, int64_t n);

// x[rows][n] + b[n].
std::vector<float> add_bias(const float* x, int64_t rows, int64_t n, const float* b);

// ---- the fused prompt kernels and the decode step (named as their CPU twins in
// cpp/cpu_ops.h where there is one). fp16 outputs come back as uint16 bit patterns,
// fp16 caches as float32 (exact); caches are n_slots x n_ctx x kv_dim, NaN where unwritten.

// The KV-store kernel alone: token t's k and v rows (kv_dim floats) to (slots[t], pos[t]) of
// fresh fp16 caches; returns (K cache, V cache).
std::pair<std::vector<float>, std::vector<float>> kv_append(const float* k, const float* v, int n_tok, int kv_dim,
                                                            const int32_t* slots, const int32_t* pos, int n_slots,
                                                            int n_ctx);

// The fused bias + RoPE + KV append of the prompt path on qkv rows [n_tok][q | k | v]
// (biases may be null): returns the rows after the kernel (q roped in place; k, v as
// given) and the caches in *kc, *vc.
std::vector<float> qkv_post(const float* qkv, int n_tok, int n_head, int n_head_kv, int head_dim, const float* bq,
                            const float* bk, const float* bv, const int32_t* pos, const int32_t* slots, float base,
                            int n_slots, int n_ctx, std::vector<float>* kc, std::vector<float>* vc);

// fp16(rmsnorm(x) * w), rows of n.
std::vector<uint16_t> rmsnorm_f16(const float* x, int64_t rows, int64_t n, const float* w, float eps);

// fp16(silu(gu[t][i]) * gu[t][n + i]) for gu rows of 2n floats.
std::vector<uint16_t> swiglu_f16(const float* gu, int rows, int n);

// fp16(x), round to nearest even.
std::vector<uint16_t> f32_to_f16(const float* x, int64_t n);

// y[rows][n_out] (+)= x16[rows][n_in] · a16[n_out][n_in]ᵀ through cublasGemmEx (fp16 in, fp32
// accumulate and out); accumulates into y_init when given.
std::vector<float> gemm_f16(const uint16_t* a16, int n_in, int n_out, const uint16_t* x16, int rows,
                            const float* y_init);

// A weight on the host for the decode kernels: n_out rows of n_in elements of `type`, as GGUF stores them.
struct HostWeight {
    uint32_t type = 0;
    const uint8_t* data = nullptr;
    size_t nbytes = 0;
    int64_t n_in = 0, n_out = 0;
};

struct DecQkvOut {
    std::vector<float> q;       // n_head*head_dim, roped, unscaled
    std::vector<float> kc, vc;  // the caches (n_slots x n_ctx x n_head_kv*head_dim)
    std::vector<float> x;       // the embedding row written to the residual stream (embedding input only)
};

// dec_qkv on one token: rmsnorm(x or the embedding row of `token`) · W{q,k,v}ᵀ + bias (any
// may be null), NEOX RoPE of q and k at `pos` (from the engine's cos/sin table), k and v to
// (slot, pos) of fresh caches. w[0..3) = q, k, v; give x or emb. rows_per_part: the
// kernel's S (rows per half-head part), 0 = the engine's choice.
DecQkvOut dec_qkv(const HostWeight w[3], const float* const bias[3], const float* x, const HostWeight* emb,
                  int32_t token, const float* norm_w, float eps, int n_head, int n_head_kv, int head_dim, float base,
                  int pos, int slot, int n_slots, int n_ctx, int rows_per_part);

// dec_attn on one query q[n_head][head_dim] over k, v [n_kv][n_head_kv][head_dim] (stored as
// fp16 at positions 0..n_kv-1 of one slot, the query at pos n_kv-1): the cluster variant
// (sm_90; splits of multiples of kDecClusterGran keys) or the global merge (up to max_splits
// splits of at least split_keys keys). Runs twice on the same buffers; returns both outputs.
// cluster: the cluster variant's blocks per cluster (0: the global merge); clusters: clusters
// per KV head (more than one: their partials are merged here on the host in float64, as
// attn_output's input does on the device); cluster_mma: its blocks on the tensor-core phase;
// stage (with both): the blocks stage up to that many keys' K/V rows in shared memory first.
std::pair<std::vector<float>, std::vector<float>> dec_attn(const float* q, int n_head, const float* k, const float* v,
                                                           int n_kv, int n_head_kv, int head_dim, int cluster,
                                                           int max_splits, int split_keys, bool cluster_mma = false,
                                                           int clusters = 1, int stage = 0);

// Microseconds per dec_attn launch at n_kv cached positions (zeros; the time does not depend
// on the values), averaged over `iters` rounds of `layers` launches on `layers` separate caches
// (as the layers of a step read theirs: from HBM, not L2) captured in one CUDA graph, no PDL.
// The variant as in dec_attn.
double dec_attn_time(int n_head, int n_head_kv, int head_dim, int n_kv, int cluster, int max_splits, int split_keys,
                     bool cluster_mma, int layers, int iters, int clusters = 1, int stage = 0);

// dec_proj on one vector: mode 0 (RESID) y = y_init + W0 · act; mode 1 (GLU)
// y = silu(W0 · h) * (W1 · h), h = rmsnorm(act) * norm_w. rows_per_block (1..64) rows per block.
std::vector<float> dec_proj(int mode, const HostWeight& w0, const HostWeight* w1, const float* act,
                            const float* norm_w, float eps, const float* y_init, int rows_per_block);


// sample_rows (cuda/sample.cuh) on host logits [n_rows][n_vocab]: row r with params[r],
// generator state states[r] and history histories[r]; returns the tokens and the states
// after the draw. split: the split path for the rows it takes (else the one-block kernel for all).
std::pair<std::vector<int32_t>, std::vector<uint64_t>> sample_rows(const float* logits, int n_rows, int n_vocab,
                                                                   const std::vector<SamplerParams>& params,
                                                                   const std::vector<uint64_t>& states,
                                                                   const std::vector<std::vector<int32_t>>& histories,
                                                                   bool split = true, bool split_full = false);
// apply_token_masks (cuda/sample.cuh) on host logits [n_rows][n_vocab]: row r masked by
// masks[r * token_mask_words(n_vocab) ...] (cpp/sampler.h's layout); returns the masked logits.
std::vector<float> apply_token_masks(const float* logits, int n_rows, int n_vocab, const uint32_t* masks);
// Microseconds per sample_rows launch on those logits (generator states fixed), as the engine
// launches it (the host rows pick the kernels), `iters` launches in one CUDA graph.
double sample_rows_time(const float* logits, int n_rows, int n_vocab, const std::vector<SamplerParams>& params,
                        const std::vector<std::vector<int32_t>>& histories, bool split, int iters,
                        bool split_full = false);

}  // namespace cuda_test
}  // namespace orcd
