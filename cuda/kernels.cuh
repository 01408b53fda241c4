// kernels.cuh - launchers of the CUDA kernels (host functions, compiled by nvcc).
//
// Every launcher checks its launch (cudaGetLastError, no synchronisation) and
// throws orcd::CudaError naming the kernel and `what` (a tensor or buffer).
// All work goes to the given stream; nothing here synchronises with the host,
// so a decode step can be captured into a CUDA graph later.
//
// Layout conventions (see docs/design.md): activations are row-major float32
// [rows][n] with leading dimension `ld` (elements); a weight is n_out rows of
// n_in elements in its GGUF type, row r at w + r*row_bytes; the KV caches are
// fp16 [slot][layer][pos][n_head_kv*head_dim].
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace orcd {
namespace cu {

// Rows the mat-vec kernel takes in one launch (decode of up to 8 sequences).
constexpr int kMatvecMaxRows = 8;
// Threads of one attention block; the split length is a multiple of this.
constexpr int kAttnTile = 256;
constexpr int kAttnMaxHeadDim = 256;
constexpr int kAttnMaxSplits = 64;

// True for every type orcd::can_dequantize accepts (F32, F16, BF16, Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K): dequantize_f16, matvec and get_rows
// all take them.
bool type_supported(uint32_t type);

// Blocks for a grid-stride loop over n elements, `threads` a block (at least 1, capped).
int grid_for(int64_t n, int threads);

// dst[0..n) = src's n elements (from a block boundary; n a multiple of the
// block size for quantized types) rounded to fp16.
void dequantize_f16(uint32_t type, const uint8_t* src, int64_t n, __half* dst, cudaStream_t st,
                    const char* what);

// y[m][r] (+)= sum_k W[r][k] * x[m][k] (+ bias[r]) for m < rows <= kMatvecMaxRows,
// reading W's quantized blocks directly. x rows are `ldx` floats apart (ldx % 4
// == 0 and x 16-byte aligned for quantized types), y rows `ldy`.
void matvec(uint32_t type, const uint8_t* w, size_t row_bytes, int n_in, int n_out, const float* x, int ldx,
            int rows, float* y, int ldy, const float* bias, bool accumulate, cudaStream_t st, const char* what);

// out[i][0..n_in) = row ids[i] of W as float32 (the embedding lookup).
void get_rows(uint32_t type, const uint8_t* w, size_t row_bytes, int n_in, const int32_t* ids, int n_ids,
              float* out, cudaStream_t st, const char* what);

// y[r] = x[r] / sqrt(mean(x[r]²) + eps) * w, rows of n floats (x, y may alias).
void rmsnorm(const float* x, int rows, int n, const float* w, float eps, float* y, cudaStream_t st,
             const char* what);

// NEOX RoPE in place on x[t][h*head_dim ...] (row stride ld), t < n_tok, h < n_heads,
// token t at position pos[t] (device array).
void rope_neox(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base,
               cudaStream_t st, const char* what);

// Appends K and V of n_tok tokens (float32 rows of kv_dim at k + t*ld) as fp16
// to the caches: token t goes to slot slots[t], position pos[t]; kc/vc point at
// the layer's [pool position][kv_dim] block, slot s's position 0 is slot_off[s]
// elements in (a device array: cpp/kv_pool.h says how the slots share the pool).
void kv_store(const float* k, const float* v, int ld, int n_tok, int kv_dim, const int32_t* slots,
              const int32_t* pos, __half* kc, __half* vc, const int64_t* slot_off, cudaStream_t st, const char* what);

// How an attention launch splits the keys: n_splits blocks per (query, head),
// each over split_len consecutive keys (a multiple of kAttnTile). For a launch
// whose queries all sit in one slot (a prompt chunk) and number at least
// kFlashMinQ, `flash` routes head_dim 64/128 to the tensor-core kernel
// (flash_attention), which splits the keys in flash_splits parts of flash_len.
constexpr int kFlashMinQ = 16;
constexpr int kFlashRows = 64;        // (query, head) rows per flash block: 4 warps x 16
constexpr int kFlashMinSplitLen = 512;  // keys per flash split at least (a multiple of 64)
struct AttnPlan {
    int n_splits = 1;
    int split_len = kAttnTile;
    bool flash = false;
    int flash_splits = 1;
    int flash_len = 1 << 30;
    // Rows of the caller's part_o / part_ml (0: unknown). The decode-shaped kernel may split
    // the keys finer than n_splits as long as n_q * n_head * its splits fit in them.
    size_t partial_rows = 0;
};
// one_slot: the caller knows every query of the launch is in the same slot.
AttnPlan attn_plan(int n_q, int kv_max, int n_head, int sm_count, bool one_slot = false);
AttnPlan attn_plan_fixed(int kv_max, int split_len);  // for tests: a given split length, no flash
// Partial results a plan needs (the larger of its two kernels' needs, whichever runs):
// part_o that many * head_dim floats, part_ml that many float2.
inline size_t attn_partials(int n_q, int n_head, const AttnPlan& p) {
    return size_t(n_q) * n_head * size_t(p.n_splits > p.flash_splits ? p.n_splits : p.flash_splits);
}

// Causal GQA attention over the cache: query t (q + t*ldq, n_head heads of
// head_dim) attends to positions [0, pos[t]] of slot slots[t] (window > 0: only the
// last `window` of them, [pos[t] - window + 1, pos[t]], the sliding-window layers of
// phi3 / gemma3 as cpp/cpu_ops.cpp's attention has them); query head h
// reads KV head h / (n_head / n_head_kv). Softmax in float32 with scale
// 1/sqrt(head_dim); out + t*ldo receives n_head*head_dim floats. With plan.flash
// and head_dim 64/128: flash_attention (Q and P rounded to fp16, fp32 accumulation),
// else one block per (head, query, split) on CUDA cores; then attn_combine when split.
void attention(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off, int kv_dim,
               const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv, int head_dim,
               const AttnPlan& plan, float* part_o, float2* part_ml, float* out, int ldo, cudaStream_t st,
               const char* what, int window = 0);

// Decode-shaped attention (rows_attn.cu): one warp per (query, head, split); head_dim 64 or
// 128. Writes the partials of its splits (returned: attn_combine merges that many); splits
// finer than the plan's when plan.partial_rows says the buffers hold them.
bool rows_attention_supported(int head_dim, int group);
int rows_attention(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off, int kv_dim,
                   const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv, int head_dim,
                   const AttnPlan& plan, float* part_o, float2* part_ml, cudaStream_t st, const char* what,
                   int window = 0);

// The tensor-core attention (flash_attn.cu). Every query in one slot (the block reads
// the slot of its first row); head_dim 64 or 128; ldq, ldo even; split_len a multiple
// of 64. n_splits == 1: out receives the normalised result; else part_o / part_ml
// (indexed as attn_combine reads them: ((t*n_head + h)*n_splits + s)) receive each
// split's unnormalised output and (max in natural-log units, sum).
struct FlashArgs {
    const float* q;
    int ldq;
    const __half *kc, *vc;
    const int64_t* slot_off;  // device: each slot's first element in kc / vc
    int kv_dim;
    const int32_t* slots;
    const int32_t* pos;
    int n_q, n_head, group, head_dim;
    float scale_log2;  // log2(e) / sqrt(head_dim)
    int n_splits, split_len;
    float* part_o;
    float2* part_ml;
    float* out;
    int ldo;
    int window;  // > 0: row r sees keys [pos - window + 1, pos] only (a sliding-window layer)
};
bool flash_supported(int head_dim);
void flash_attention(const FlashArgs& a, int n_head_kv, cudaStream_t st, const char* what);

// Prompt path, fused: y16[r] = fp16(rmsnorm(x[r]) * w) for rows of n floats.
void rmsnorm_f16(const float* x, int rows, int n, const float* w, float eps, __half* y16, cudaStream_t st,
                 const char* what);

// Prompt path, fused: row t of qkv (ld floats apart) holds q (n_head*hd), k and
// v (n_head_kv*hd each) of token t: adds the biases (any may be null), applies
// NEOX RoPE at pos[t] to q (in place) and k, and appends k and v (fp16) to
// slot slots[t], position pos[t] of the caches (layout as kv_store).
void qkv_post(float* qkv, int ld, int n_tok, int n_head, int n_head_kv, int head_dim, const float* bq,
              const float* bk, const float* bv, const int32_t* pos, const int32_t* slots, float base, __half* kc,
              __half* vc, const int64_t* slot_off, cudaStream_t st, const char* what);

// Prompt path, fused: act[t][i] = fp16(silu(gu[t][i]) * gu[t][n + i]), gu rows of 2n floats.
void swiglu_f16(const float* gu, int n, int rows, __half* act, cudaStream_t st, const char* what);

// g[i] = silu(g[i]) * u[i].
void swiglu(float* g, const float* u, int64_t n, cudaStream_t st, const char* what);

// y[r][c] += b[c] for rows of n (row stride ld).
void add_bias(float* y, int rows, int n, int ld, const float* b, cudaStream_t st, const char* what);

// y[0..n) = fp16(x[0..n)).
void f32_to_f16(const float* x, int64_t n, __half* y, cudaStream_t st, const char* what);

// Poison fills for tests (NaN).
void fill_nan(float* p, int64_t n, cudaStream_t st);
void fill_nan(__half* p, int64_t n, cudaStream_t st);

// A no-op kernel: cuda_status() launches it to check there is an image for the device.
cudaError_t probe_kernel();

}  // namespace cu
}  // namespace orcd

// ---------------------------------------------------------------- the prompt-path product
#include <cublas_v2.h>

namespace orcd {
namespace cu {

// y[t][r] (+)= sum_k W[r][k] * x[t][k] (+ bias[r]) for t < rows, through cuBLAS:
// x (rows x n_in float32, contiguous) is rounded to fp16 into act16
// (rows*n_in halfs); W is dequantized to fp16 into w16 (w16_elems halfs) in
// chunks of w16_elems / n_in rows (F16 weights are used in place), and each
// chunk is multiplied by cublasGemmEx with fp16 inputs and float32
// accumulation and output. y rows are ldy floats apart.
void gemm_linear(cublasHandle_t blas, cudaStream_t st, uint32_t type, const uint8_t* w, size_t row_bytes, int n_in,
                 int n_out, const float* x, int rows, float* y, int ldy, const float* bias, bool accumulate,
                 __half* act16, __half* w16, size_t w16_elems, const char* what);

// y[t][r] (+)= sum_k A16[r][k] * x16[t][k] for r < n_out, t < rows: fp16 weights
// (row-major n_out x n_in) and activations, float32 accumulation and output
// (y rows ldy floats apart; beta = 1 when accumulate).
void gemm_f16(cublasHandle_t blas, const __half* a16, int n_in, int n_out, const __half* x16, int rows, float* y,
              int ldy, bool accumulate, const char* what);

}  // namespace cu
}  // namespace orcd
