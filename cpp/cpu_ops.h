// cpu_ops.h - the CPU engine's operations, one named function each, in the
// order cpu_engine.cpp's run() calls them:
//
//   rmsnorm -> (matmul q, k, v: matmul.h) -> add_bias -> rope_neox -> kv_append
//   -> attention -> (matmul o, residual) -> rmsnorm -> (matmul gate, up) -> swiglu
//   -> (matmul down, residual)
//
// and the other families' variants of those steps (the ModelDesc fields choose):
// split_rows (fused q|k|v, gate|up), scale (embedding scale, attention scale),
// rmsnorm over rows of head_dim (per-head Q/K norms), rope_normal (llama's
// pairing), attention_window (sliding-window layers), geglu_tanh (gemma3's
// FFN gate), softcap (final logit soft-capping), and gpt-oss's: rope_inv_freq_yarn
// (YaRN frequencies), attention_window's sinks (a sink logit per head, windowed or not), and
// the mixture-of-experts FFN in the order it runs:
//   (matmul router, add_bias) -> moe_route -> per expert: gather_rows ->
//   (matmul gate, up, add_bias) -> swiglu_oai -> (matmul down, add_bias) -> scatter_add_rows
//
// Each name is also the name of the CUDA twin's test entry point
// (orcd._orcd_cuda.<name>, cuda/kernel_tests.cu), and each is bound as
// orcd._orcd.cpu_ops_<name> (cpp/bindings.cpp) so tests/test_cpu_ops.py and
// tests/test_cuda_kernels.py can run one operation on their own data.
// No argument checks here (hot loops); the bindings check shapes and ranges.
#pragma once
#include <cstddef>
#include <cstdint>

#include "threadpool.h"

namespace orcd {
namespace cpu_ops {

// out[t][i] = x[t][i] / sqrt(mean(x[t]²) + eps) * w[i] for n rows of d (sum of squares in double).
void rmsnorm(const float* x, const float* w, float* out, int n, int d, float eps);

// y[t][i] += b[i] for n rows of d.
void add_bias(float* y, const float* b, int n, int d);

// inv_freq[i] = base^(-2i/head_dim), i < head_dim/2, in double (the RoPE frequencies).
void rope_inv_freq(int head_dim, double base, double* inv_freq);

// YaRN's frequencies, as llama.cpp's ggml_rope_yarn_corr_dims and rope_yarn (ext_factor 1):
// with corr(b) = head_dim * ln(n_ctx_orig / (2 pi b)) / (2 ln base), low = max(0,
// floor(corr(beta_fast))), high = min(head_dim - 1, ceil(corr(beta_slow))) and, for pair i,
// mix_i = 1 - clamp((i - low) / max(0.001, high - low), 0, 1):
//   inv_freq[i] = base^(-2i/head_dim) * (mix_i + (1 - mix_i) / factor)
// (high frequencies, i <= low, keep their angle; low ones, i >= high, are divided by factor).
// HF's gpt-oss config sets rope_scaling.truncate = false: transformers then skips the
// floor/ceil of low and high, so its ramp is slightly different (8.09..17.40 instead of
// 8..18 for gpt-oss-20b); GGUF files are run by llama.cpp, whose formulation this follows.
// The magnitude factor (ModelDesc::yarn_mscale) multiplies the cos/sin tables (scale()).
void rope_inv_freq_yarn(int head_dim, double base, double factor, int n_ctx_orig, double beta_fast,
                        double beta_slow, double* inv_freq);

// cs[t][j], sn[t][j] = cos, sin of pos[t] * inv_freq[j] (angle in double), j < half:
// the factors rope_neox takes, shared by all heads and layers of a token.
void rope_tables(const int32_t* pos, int n, const double* inv_freq, int half, float* cs, float* sn);

// Rotates each of n_heads heads of one row x in the NEOX pairing:
// (x[i], x[i + head_dim/2]) by the angle whose cos/sin are cs[i], sn[i].
void rope_neox(float* x, int n_heads, int head_dim, const float* cs, const float* sn);

// Rotates each head in the "normal" (GPT-J / llama) pairing: (x[2i], x[2i+1]) by
// the angle whose cos/sin are cs[i], sn[i], i < head_dim/2.
void rope_normal(float* x, int n_heads, int head_dim, const float* cs, const float* sn);

// x[i] *= s for n elements.
void scale(float* x, int64_t n, float s);

// Copies n rows of (d0 + d1 + d2) floats into rows of d0, d1 and d2 floats (a fused
// projection's output split in its parts; d2 may be 0 with out2 null).
void split_rows(const float* x, int n, int d0, int d1, int d2, float* out0, float* out1, float* out2);

// One layer's float32 KV cache. K is transposed per head so the score loop
// runs along positions: K[slot][kv_head][e][pos] at
// k + slot*slot_stride + (kv_head*head_dim + e)*n_ctx + pos; V is row-major:
// V[slot][pos][kv_head*head_dim + e] at v + slot*slot_stride + pos*kv_dim + ...
struct KvCache {
    float* k;
    float* v;
    size_t slot_stride;  // floats between slots, in both k and v
    int n_ctx;
    int n_head_kv, head_dim;
    int kv_dim() const { return n_head_kv * head_dim; }
};

// Writes K and V of n tokens (rows of kv_dim floats) to the cache: token i
// at position pos[i] of slot slots[i].
void kv_append(const KvCache& kv, const float* k, const float* v, int n, const int32_t* slots, const int32_t* pos);

// Causal GQA attention over the cache: query i (q + i*n_head*head_dim)
// attends to positions [0, pos[i]] of slot slots[i]; query head h reads KV
// head h / (n_head / n_head_kv); scores scaled by 1/sqrt(head_dim), softmax
// with the max subtracted (sum in double). out + i*n_head*head_dim receives
// the n_head heads. One task of the pool per (token, head).
void attention(const float* q, int n, int n_head, const KvCache& kv, const int32_t* slots, const int32_t* pos,
               float* out, ThreadPool& pool);

// attention() for a sliding-window layer and/or one with attention sinks: query i attends to
// positions (pos[i] - window, pos[i]] of its slot only (window 0: every earlier key), scale
// 1/sqrt(head_dim) as attention(). sinks (gpt-oss; null: none): head h's learned logit
// sinks[h] joins the softmax's max and denominator and has no value, so the weights over the
// keys sum to less than 1:
//   w_j = exp(s_j - m) / (sum_j' exp(s_j' - m) + exp(sinks[h] - m)), m = max(max_j s_j, sinks[h]).
// The sink is a logit as it stands (not scaled by 1/sqrt(head_dim)).
void attention_window(const float* q, int n, int n_head, const KvCache& kv, const int32_t* slots,
                      const int32_t* pos, int window, float* out, ThreadPool& pool, const float* sinks = nullptr);

// The router's choice for n tokens (logits: n rows of n_expert, bias already added): the k
// largest logits of each row (ties: the lower expert first), ids[t*k + j] their experts in
// descending order and w[t*k + j] the softmax over those k logits only (llama.cpp's
// SOFTMAX_WEIGHT gating; HF GptOssTopKRouter: topk, then softmax of the top values).
void moe_route(const float* logits, int n, int n_expert, int k, int32_t* ids, float* w);

// out[r] = x[rows[r]] for m rows of d floats (the tokens routed to one expert).
void gather_rows(const float* x, int d, const int32_t* rows, int m, float* out);

// y[rows[r]] += w[r] * src[r] for m rows of d floats (an expert's output, weighted, back to its tokens).
void scatter_add_rows(float* y, int d, const int32_t* rows, const float* w, int m, const float* src);

// gpt-oss's gate: g[i] = min(g[i], limit) * sigmoid(alpha min(g[i], limit)) * (clamp(u[i], -limit, limit) + 1)
// (ggml_swiglu_oai; HF GptOssExperts._apply_gate), split over the pool.
void swiglu_oai(float* g, const float* u, int64_t n, float alpha, float limit, ThreadPool& pool);

// g[i] = gelu_tanh(g[i]) * u[i], gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void geglu_tanh(float* g, const float* u, int64_t n, ThreadPool& pool);

// x[i] = c * tanh(x[i] / c) for n elements (c > 0).
void softcap(float* x, int64_t n, float c);

// g[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i], split over the pool.
void swiglu(float* g, const float* u, int64_t n, ThreadPool& pool);

}  // namespace cpu_ops
}  // namespace orcd
