// decode.cuh - the fused single-sequence decode step (decode_kernels.cu).
//
// One decode step of one sequence is 5 kernels per layer plus one for the
// lm_head, all of fixed shape, reading the token, position and slot from a
// device-side DecState so the whole step can be captured once into a CUDA
// graph and replayed (cuda_engine.cu):
//
//   dec_qkv     x -> rmsnorm -> q, k, v rows (+bias) -> RoPE(q, k) -> q out, K/V into the fp16 cache
//               (layer 0: x is the token's embedding row, written to the residual stream by block 0)
//   dec_qk_norm gemma3 only: q and k left unroped by dec_qkv (qk_raw) -> per-head rmsnorm -> RoPE
//               -> q out, k into the cache. gemma3's post-norms: a block's output waits in its own
//               buffer and the next kernel that loads the residual stream adds it normed (DecPend)
//   dec_attn    attention over the slot's cache, in the variant the engine picks per step from
//               the cache length (FusedDecoder::attn_variant): one block per KV head (short
//               caches: no merge); a thread-block cluster of up to 16 splits per KV head merging
//               in distributed shared memory (sm_90), or 2-4 such clusters whose partials the
//               next kernel (attn_output) merges as it loads them; or up to kDecMaxSplits splits
//               merged by the last block to finish (no clusters). Tiles on tensor cores (fp16
//               hi+lo operands) where G <= 16 and head_dim is 64 or 128, else on CUDA cores
//   dec_proj    RESID: x += att·Woᵀ          (no norm)
//   dec_proj    GLU:   a = silu(h·Wgᵀ)·(h·Wuᵀ), h = rmsnorm(x)
//   dec_proj    RESID: x += a·Wdᵀ
//   dec_proj    LOGITS: logits = rmsnorm(x)·Woutᵀ (a persistent kernel; each warp streams its
//               own 1-2 row batches through a private ring of staging buffers), optional
//               argmax: the last block writes the token into DecState (and out_tokens[step])
//               and advances pos and step.
//
// Each kernel has instances specialised on the weight type (the generic one switches
// per row), and dec_proj / dec_qkv also on the mode and on layer 0's embedding input, so
// an instance holds only code it runs: a kernel's code is fetched cold at every launch
// (docs/perf_log.md runs 8, 17 and 18).
//
// Every kernel first copies its weight rows into shared memory with cp.async (weights never
// change), then waits for the previous kernel
// (griddepcontrol.wait: with programmatic dependent launch on Hopper the
// copy overlaps the previous kernel) and releases its successor (pdl_early: at its start
// instead, before the copy's wait), then prepares its activation vector in
// shared memory: float32 (padded so a lane per 32-element chunk reads without
// bank conflicts) and, for Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K weights, int8 codes per
// 32-element chunk with a float scale d (llama.cpp's q8_1 idea) in two planes,
// x ~ d*(q1 + q2/256), so those rows are dotted with __dp4a at the accuracy of
// 16-bit codes (the CPU engine's activations); eight threads quantise a chunk. A warp
// computes one row (two at once where it can), a lane one 32-element chunk at a time.
// Other types go through deq8 in float32.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace orcd {
namespace cu {

constexpr int kDecThreads = 256;    // every decode kernel: 8 warps
constexpr int kDecTK = 32;          // keys per attention tile
constexpr int kDecAttnBufs = 4;     // attention tiles in flight (cp.async ring of K/V buffers)
constexpr int kDecLmStages = 4;     // lm_head staging buffers per warp (batches in flight)
constexpr int kDecAttnCluster = 8;  // splits per KV head of the cluster attention (Hopper; the portable cluster size)
constexpr int kDecAttnClusterMax = 16;  // ... at most (16: a non-portable cluster size, H100/H200)
constexpr int kDecAttnMaxClusters = 16;  // clusters per KV head at most (their partials merged by attn_output;
                                         // attn_variant keeps clusters x cluster size <= kDecMaxSplits: 8
                                         // clusters of 16 did not fit the GPU at once, docs/perf_log.md run 36)
constexpr int kDecMaxSplits = 64;   // attention blocks per KV head (upper bound; idle ones exit)
constexpr int kDecMergeChunk = 32;  // the global merge stages this many splits' partials at a time
constexpr int kDecMaxGroupDim = 2048;  // (n_head / n_head_kv) * head_dim the attention kernel holds
constexpr int kDecAttnTraceFields = 24;  // dec_attn_kernel's timestamps per block (DecAttnArgs::trace)
// Field kDecAttnTraceClock + i holds the SM's cycle counter at mark i (fields 0..10 the global timer):
// a block's sub-microsecond phases at cycle resolution whatever the timer's (but the counter runs per
// SM, so only differences inside one block mean anything)
constexpr int kDecAttnTraceClock = 11;
// ... and field kDecAttnTraceCycWaited the cycle count when the push merge's first cluster barrier
// wait returned (between marks 9 and 3: the wait apart from the warps' merge)
constexpr int kDecAttnTraceCycWaited = kDecAttnTraceClock + 11;
static_assert(kDecAttnTraceCycWaited < kDecAttnTraceFields, "room for the cycle stamps");
constexpr int kDecClusterGran = 8;  // cluster attention: split lengths are multiples of this many keys (<= kDecTK)

// Device-side state of a decode step. The host writes token/pos/slot/step
// before a run; the greedy lm_head advances it.
struct DecState {
    int32_t token, pos, slot, step;
};
// Completion counters of the "last block merges" kernels; zero between launches.
constexpr int kDecMaxKvHeads = 60;
struct DecSync {
    unsigned lm, pad0, pad1, pad2;
    unsigned attn[kDecMaxKvHeads];  // per KV head
};
struct ArgPart {
    float v;
    int32_t i;
};

// A weight matrix on the device: n_out rows of n_in elements, as the file stores them.
struct DTensor {
    const uint8_t* w;
    uint32_t type;
    int n_in, n_out;
    int row_bytes;
};

enum DecMode : int { DEC_RESID = 0, DEC_GLU = 1, DEC_LOGITS = 2 };

// A residual add left pending by the kernel before (gemma3's post-norms): the input vector is
// x + rmsnorm(o) * w (eps: the model's), and block 0 of the consuming kernel writes it to
// `out` for the layers after. x null: nothing pending.
struct DecPend {
    const float* x;
    const float* o;
    const float* w;
    float* out;
};

struct DecQkvArgs {
    DTensor w[3];             // q, k, v
    const float* bias[3];     // may be null
    float* x;                 // residual stream (n_embd floats): read, or (embed) written by block 0
    DTensor emb;              // embed: token_embd
    int embed;
    const float* norm_w;
    float eps;
    int n_embd;
    int n_head, n_head_kv, head_dim;
    int S, parts;             // rows per half-head part, parts per head
    const float2* rope;       // [n_ctx][head_dim/2] (cos, sin) of pos * base^(-2i/head_dim)
    int rope_normal;          // 1: pair i is rows (2i, 2i+1) of a head (llama), 0: (i, i + head_dim/2) (NEOX)
    float* q_out;             // n_head*head_dim floats (roped, unscaled)
    __half *kc, *vc;          // this layer's [pool position][kv_dim] block
    const int64_t* slot_off;  // device: slot s's position 0 is slot_off[s] elements in
    int kv_dim;
    const DecState* st;
    int need_q8;
    int smem_w;               // bytes of staged weights (16-aligned)
    int pdl_early;            // 1: release the next kernel at the start, 0: right after griddepcontrol.wait
    // qk_raw: gemma3's layer (its own kernel instances): the embedding row times embd_scale;
    // not embed: x = pend.x + rmsnorm(pend.o)*pend.w first (DecPend; block 0 writes it to x);
    // the q and k rows leave unroped, q into q_out and k into k_raw (n_head_kv*head_dim
    // floats), for dec_qk_norm's per-head norm and RoPE (v still goes to the cache)
    int qk_raw;
    float embd_scale;
    float* k_raw;
    DecPend pend;
};

// gemma3's per-head Q/K norm and RoPE between dec_qkv (qk_raw) and the attention: block h
// < n_head takes query head h (q in place), the others KV head h - n_head (k_raw into the
// cache at pos). One block per head, pair i of a head by thread i.
struct DecQkNormArgs {
    float* q;                 // n_head*head_dim floats: raw in, normed and roped out
    const float* k_raw;       // n_head_kv*head_dim floats
    const float *q_norm, *k_norm;  // [head_dim] weights
    float eps;
    int n_head, n_head_kv, head_dim;
    const float2* rope;       // this layer's table, as DecQkvArgs::rope
    int rope_normal;
    __half* kc;               // this layer's K block of the pool
    const int64_t* slot_off;
    int kv_dim;
    const DecState* st;
};

struct DecAttnArgs {
    const float* q;
    const __half *kc, *vc;    // this layer's block of the pool
    const int64_t* slot_off;  // as in the qkv arguments
    int kv_dim;
    int n_head, n_head_kv, head_dim;
    float scale;
    int max_splits;
    int split_keys;           // keys per split at least (a multiple of kDecTK): fewer, longer splits
    int cluster;              // > 0: blocks per thread-block cluster (sm_90), each cluster merging its splits
    int clusters;             // clusters per KV head (cluster > 0): 1 writes out; more write partials to
                              // part_o [clusters][n_head*head_dim] / part_ml [clusters][n_head] (attn_output merges)
    int cluster_mma;          // 1: the cluster's blocks run the tensor-core tile phase (where dec_attn_mma_ok)
    float* part_o;            // [n_head][max_splits][head_dim]
    float2* part_ml;          // [n_head][max_splits]
    float* out;               // n_head*head_dim
    unsigned* counter;        // one per KV head
    const DecState* st;
    int pdl_early;
    int window;               // > 0: only the last `window` keys (a sliding-window layer)
    // The cluster variant on tensor cores (its own kernel instances): > 0 = each block copies the
    // K/V rows of its keys (when they are at most this many) into shared memory with bulk copies
    // before its wait, so the loads overlap the previous kernel and the tiles read shared memory
    int stage;
    // non-null (measuring): kDecAttnTraceFields timestamps per block of the cluster variant,
    // block (x, y) at trace[(y * gridDim.x + x) * kDecAttnTraceFields] (dec_attn_kernel says which)
    unsigned long long* trace;
    // 1: the rows before pos are in L2 already (CudaOptions::kv_prefetch: the previous layer's
    // ffn_down pulled them): the cluster instances without the blocks' own prefetch (host only; last,
    // so the fields the kernels read keep their offsets)
    int no_prefetch;
};

// A layer's cache rows for the previous layer's ffn_down to pull into L2 (CudaOptions::kv_prefetch):
// its attention's kc, vc, slot_off, st and kv_dim (kv_dim * 2 a multiple of 16 bytes)
struct DecKvAhead {
    const __half *k, *v;
    const int64_t* slot_off;
    const DecState* st;
    int kv_dim;
};

struct DecProjArgs {
    DTensor w[2];
    int n_tensors;            // 2 for GLU (gate, up)
    int rows_per_block;
    const float* act;         // input vector, n_in floats
    const float* norm_w;      // rmsnorm of act first when non-null
    float eps;
    int need_q8;
    int mode;                 // DecMode
    float* y;                 // RESID: y[r] += dot; GLU: y[r] = silu(g)*u; LOGITS: logits (may be null)
    int argmax;               // LOGITS: argmax of the row dots
    ArgPart* part;            // one per block
    unsigned* counter;
    DecState* st;             // argmax: token (and advance)
    int32_t* out_tokens;      // advance: out_tokens[step] = token
    int advance;              // advance pos and step after the argmax
    int smem_w;               // staged weight bytes (LOGITS: NW*lm_stages buffers of smem_w/(NW*lm_stages) bytes)
    int pdl_early;
    int lm_grid;              // LOGITS: persistent blocks (each takes every lm_grid-th batch of rows)
    int lm_stages;            // LOGITS: staging buffers per warp (dec_lm_plan)
    int lm_bulk;              // LOGITS on sm_90+: bulk copies fill the warps' rings (options' lm_bulk)
    // RESID after a multi-cluster attention: act holds act_parts partials [act_parts][n_in]
    // (unnormalised) with (max, sum) per head of act_hd elements in act_ml [act_parts][n_in/act_hd];
    // the kernel merges them into its input vector. 0 or 1: act is the vector itself.
    const float2* act_ml;
    int act_parts, act_hd;
    // gemma3: RESID with overwrite writes y[r] = dot (the block output that a post-norm takes
    // before it joins the residual: pend of the next kernel); GLU and LOGITS with pend.x
    // (their own kernel instances) build their input with DecPend first, and GLU's gate is
    // gelu_tanh(g)*u there when gelu
    int overwrite;
    int gelu;
    DecPend pend;
    // RESID, non-null (CudaOptions::kv_prefetch): the next layer's cache rows, which the blocks pull
    // into L2 at their start (a pointer, so the arguments grow by 8 bytes only)
    const DecKvAhead* ahead;
};

constexpr int kDecXfStride = 36;  // floats per 32-element chunk of the float activations (4 of padding)
constexpr int kDecXqStride = 80;  // bytes per chunk of the two int8 code planes (16 of padding)

__host__ __device__ inline size_t dec_align16(size_t n) { return (n + 15) & ~size_t(15); }
// Shared-memory bytes of the activation area for a vector of n floats (n % 32 == 0).
__host__ __device__ inline size_t dec_act_bytes(int n) {
    const size_t nch = size_t(n) / 32;
    return dec_align16(nch * kDecXfStride * 4) + dec_align16(nch * kDecXqStride) + 2 * dec_align16(nch * 4) +
           dec_align16(size_t(kDecThreads / 32) * 4);
}

// The attention's tile phase runs on tensor cores (m16n8k16: G query heads as rows) for these
// shapes; other shapes run on CUDA cores.
__host__ __device__ inline bool dec_attn_mma_ok(int G, int hd) { return G <= 16 && (hd == 64 || hd == 128); }
// The lean instances (dec_attn_kernel's MHD) pack a head's fp16 hi and lo halves into the mma's rows
// g and g + 8, so they take up to 8 query heads per KV head; 9-16 run the generic instances.
__host__ __device__ inline bool dec_attn_lean_ok(int G, int hd) { return G <= 8 && dec_attn_mma_ok(G, hd); }

// True when `type` rows are dotted with int8 activations (dp4a).
bool dec_int8_type(uint32_t type);
// Bytes to stage `rows` rows of a tensor (worst-case alignment slack included).
size_t dec_stage_bytes(int rows, int row_bytes);
// The lm_head's batches: rows per warp batch (2, or 1 for long rows), buffers per warp
// ring (kDecLmStages, fewer for long rows) and their bytes, within `cap` bytes (rows 0:
// a row does not fit).
void dec_lm_plan(size_t row_bytes, size_t cap, int* rows, int* stages, int* smem_w);
// Opt the decode kernels in to `bytes` of dynamic shared memory (once per device).
void dec_set_smem_limit(size_t bytes);

// Launchers: stream-ordered, no host sync; `pdl` launches with programmatic
// stream serialization (the kernels call griddepcontrol.wait before reading
// anything an earlier kernel wrote).
void dec_qkv(const DecQkvArgs& a, cudaStream_t st, bool pdl, const char* what);
void dec_attention(const DecAttnArgs& a, cudaStream_t st, bool pdl, const char* what);
void dec_proj(const DecProjArgs& a, cudaStream_t st, bool pdl, const char* what);
void dec_qk_norm(const DecQkNormArgs& a, cudaStream_t st, bool pdl, const char* what);

// The grid, dynamic shared memory and cluster size (0: none) each launcher uses.
struct DecLaunchShape {
    dim3 grid;
    size_t smem;
    int cluster;
};
DecLaunchShape dec_qkv_shape(const DecQkvArgs& a);
DecLaunchShape dec_attention_shape(const DecAttnArgs& a);
DecLaunchShape dec_proj_shape(const DecProjArgs& a);
DecLaunchShape dec_qk_norm_shape(const DecQkNormArgs& a);
// An empty kernel of that shape with the decode kernels' PDL handshake (pdl_early as
// theirs): what a launch boundary costs alone (the profiler's floor and marginal costs).
void dec_noop(const DecLaunchShape& shape, int pdl_early, cudaStream_t st, bool pdl, const char* what);
size_t dec_attn_smem(int n_head, int n_head_kv, int head_dim);
// ... of the cluster variant's lean instances (tensor cores, the push merge) that stage up to
// `stage` keys a block (DecAttnArgs::stage; 0: no staging)
size_t dec_attn_lean_smem(int n_head, int n_head_kv, int head_dim, int stage);
// The most keys a block can stage within the shared memory a block may have (0: the shape has no
// tensor-core tile phase, so no staging)
int dec_attn_stage_max(int n_head, int n_head_kv, int head_dim);
// The largest cluster (16, else 8) of the cluster attention this GPU can run for the shape
// (stage > 0: of the staging instances with that many keys a block; 0 when none fits).
int dec_attn_max_cluster(int n_head, int n_head_kv, int head_dim, int stage = 0);
inline int dec_proj_blocks(const DecProjArgs& a) {
    return (a.w[0].n_out + a.rows_per_block - 1) / a.rows_per_block;
}
// Dynamic shared memory of a launch: staged rows, norm weights, activations (and
// the residual's old values / the row dots).
inline size_t dec_proj_smem(int smem_w, int n_in) {
    return size_t(smem_w) + dec_align16(size_t(n_in) * 4) + dec_act_bytes(n_in) + 64 * 4;
}
inline size_t dec_proj_smem(const DecProjArgs& a) { return dec_proj_smem(a.smem_w, a.w[0].n_in); }
inline size_t dec_qkv_smem(int smem_w, int n_embd, int S) {
    return size_t(smem_w) + dec_align16(size_t(n_embd) * 4) + dec_act_bytes(n_embd) + dec_align16(size_t(2 * S) * 4);
}
inline size_t dec_qkv_smem(const DecQkvArgs& a) { return dec_qkv_smem(a.smem_w, a.n_embd, a.S); }

}  // namespace cu
}  // namespace orcd
