// family_kernels.cuh - what the CUDA engine adds for model families other than
// qwen2 (cuda/family_kernels.cu): the llama RoPE pairing, gemma3's ops (per-head norms,
// scales, the GELU gate, the post-norm residual add), and the checks that say which
// ModelDesc family features the CUDA engine runs and which it refuses.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "model.h"

namespace orcd {
namespace cu {

// "Normal" (llama) RoPE in place on x[t][h*head_dim ...] (row stride ld): pairs
// (x[2i], x[2i+1]) rotated by pos[t] * base^(-2i/head_dim), as rope_neox otherwise.
void rope_normal(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base,
                 cudaStream_t st, const char* what);

// RoPE of the model's pairing (d.rope_style) at `base` (the layer's: gemma3's local and
// global layers differ).
void rope(const ModelDesc& d, float base, float* x, int ld, int n_tok, int n_heads, const int32_t* pos,
          cudaStream_t st, const char* what);

// gemma3's ops (each the twin of the cpu_ops function of that name):
// rows of n floats RMS-normalised in place and scaled by w (the per-head Q/K norms: rows =
// tokens x heads, n = head_dim, a warp a row up to 256; the post-norms: n = n_embd, a block a row)
void rmsnorm_rows(float* x, int rows, int n, const float* w, float eps, cudaStream_t st, const char* what);
void scale(float* x, int64_t n, float s, cudaStream_t st, const char* what);   // x *= s
void add(float* x, const float* y, int64_t n, cudaStream_t st, const char* what);  // x += y
void geglu_tanh(float* g, const float* u, int64_t n, cudaStream_t st, const char* what);  // g = gelu_tanh(g) * u

// gpt-oss's ops (each the twin of the cpu_ops function named in its comment):
// RoPE with per-pair frequencies inv_freq[head_dim/2] (device doubles: rope_inv_freq_yarn's) and
// cos/sin scaled by mscale (rope_tables + scale), NEOX or normal pairing
void rope_freqs(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, const double* inv_freq,
                float mscale, bool neox, cudaStream_t st, const char* what);
// attention_window with sinks (sinks[n_head] logits, or null) and window (0: none) over the fp16
// cache as attention() reads it; head_dim <= 256
void attention_sinks(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off,
                     int kv_dim, const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv,
                     int head_dim, int window, const float* sinks, float* out, int ldo, cudaStream_t st,
                     const char* what);
void swiglu_oai(float* g, const float* u, int64_t n, float alpha, float limit, cudaStream_t st, const char* what);
// gather_rows / scatter_add_rows: rows and w in device memory
void gather_rows(const float* x, int d, const int32_t* rows, int m, float* out, cudaStream_t st, const char* what);
void scatter_add_rows(float* y, int d, const int32_t* rows, const float* w, int m, const float* src, cudaStream_t st,
                      const char* what);

}  // namespace cu

// Throws Error (ValueError in Python) "<where>: the CUDA engine does not run <arch> models
// yet: <features>" when the model needs a feature the CUDA engine lacks. It runs qwen2's shape
// plus: the normal RoPE pairing, layers without Q/K/V biases, a tied output.
void check_cuda_family(const ModelDesc& d, const std::string& where);

// Empty when the fused single-sequence decoder can run the model (the plain decoder layer),
// else why not (for its note: "measured, not silent").
std::string fused_decoder_unsupported(const ModelDesc& d);

}  // namespace orcd
