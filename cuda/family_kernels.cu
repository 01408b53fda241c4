// family_kernels.cu - CUDA additions for the model families (family_kernels.cuh).
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "family_kernels.cuh"
#include "kernels.cuh"
#include "warp.cuh"

namespace orcd {
namespace cu {
namespace {

// Pair (x[2i], x[2i+1]) of each head rotated by theta = pos * base^(-2i/hd), theta
// in double as rope_neox_kernel does.
__global__ void rope_normal_kernel(float* __restrict__ x, int ld, int n_heads, int hd,
                                   const int32_t* __restrict__ pos, double log2_base) {
    const int t = blockIdx.x;
    const int half = hd / 2;
    const double p = double(pos[t]);
    float* xt = x + size_t(t) * ld;
    for (int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        const double theta = p * exp2(-2.0 * double(i) / double(hd) * log2_base);
        double s, c;
        sincos(theta, &s, &c);
        const float cs = float(c), sn = float(s);
        float* xh = xt + h * hd;
        const float x0 = xh[2 * i], x1 = xh[2 * i + 1];
        xh[2 * i] = x0 * cs - x1 * sn;
        xh[2 * i + 1] = x0 * sn + x1 * cs;
    }
}

// gemma3's per-head Q/K norms: each row of n (<= kMaxNormRow) floats scaled by
// 1/sqrt(mean(x^2) + eps) and w, in place: a warp per row holds its row in registers, so
// the write cannot overtake a read (the float twin: cpu_ops::rmsnorm).
constexpr int kMaxNormRow = 256;
__global__ void rmsnorm_rows_kernel(float* x, int rows, int n, const float* __restrict__ w, float eps) {
    const int row = int((size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
    if (row >= rows) return;
    float* xr = x + size_t(row) * n;
    float v[kMaxNormRow / 32];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxNormRow / 32; ++k) {
        const int i = lane + 32 * k;
        v[k] = i < n ? xr[i] : 0.f;
        ss += v[k] * v[k];
    }
    ss = warp_sum(ss);
    const float s = 1.0f / sqrtf(ss / float(n) + eps);
#pragma unroll
    for (int k = 0; k < kMaxNormRow / 32; ++k) {
        const int i = lane + 32 * k;
        if (i < n) xr[i] = (v[k] * s) * w[i];
    }
}

// The same for wider rows (gemma3's post-norms over n_embd): a block per row, in place; each
// thread rewrites only the elements it read, after the block's sum.
__global__ void rmsnorm_rows_block_kernel(float* x, int n, const float* __restrict__ w, float eps) {
    __shared__ float part[32];
    float* xr = x + size_t(blockIdx.x) * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.f;
    for (int k = 0; k < int(blockDim.x) / 32; ++k) total += part[k];
    const float s = 1.0f / sqrtf(total / float(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = (xr[i] * s) * w[i];
}

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float s) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] *= s;
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] += y[i];
}

// g = gelu_tanh(g) * u, as cpu_ops::geglu_tanh (tanhf against std::tanh: ~1 ulp)
__global__ void geglu_tanh_kernel(float* __restrict__ g, const float* __restrict__ u, int64_t n) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float x = g[i];
        g[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x))) * u[i];
    }
}

// ---- gpt-oss

// RoPE from a table of per-pair frequencies (YaRN's, rope_inv_freq_yarn on the host): pair i of
// each head rotated by pos[t] * inv_freq[i] (angle in double), cos/sin as floats times mscale
// (the CPU's rope_tables, then its scale() of both tables); NEOX pairing (x[i], x[i + hd/2]) or
// the normal one (x[2i], x[2i + 1]).
__global__ void rope_freqs_kernel(float* __restrict__ x, int ld, int n_heads, int hd, const int32_t* __restrict__ pos,
                                  const double* __restrict__ inv_freq, float mscale, int neox) {
    const int t = blockIdx.x, half = hd / 2;
    const double p = double(pos[t]);
    float* xt = x + size_t(t) * ld;
    for (int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        double s, c;
        sincos(p * inv_freq[i], &s, &c);
        const float cs = float(c) * mscale, sn = float(s) * mscale;
        float* xh = xt + h * hd;
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = xh[a], x1 = xh[b];
        xh[a] = x0 * cs - x1 * sn;
        xh[b] = x0 * sn + x1 * cs;
    }
}

// Attention with a sink logit per head and an optional window (cpu_ops::attention_window): block
// (query i, head h) walks keys (pos - window, pos] of its slot in tiles of kSinkTile with an
// online softmax that starts from the sink (running max = sinks[h], running sum = 1: the sink's
// own term, which has no value). Scores scaled by 1/sqrt(head_dim) as every attention kernel.
constexpr int kSinkThreads = 128, kSinkTile = 128;
__global__ void __launch_bounds__(kSinkThreads) attention_sinks_kernel(
    const float* __restrict__ q, int ldq, const __half* __restrict__ kc, const __half* __restrict__ vc,
    const int64_t* __restrict__ slot_off, int kv_dim, const int32_t* __restrict__ slots,
    const int32_t* __restrict__ pos, int n_head, int group, int hd, int window, const float* __restrict__ sinks,
    float* __restrict__ out, int ldo) {
    __shared__ float qs[kAttnMaxHeadDim];
    __shared__ float sc[kSinkTile];
    __shared__ float red[kSinkThreads / 32];
    const int i = blockIdx.x / n_head, h = blockIdx.x % n_head, kvh = h / group, t = threadIdx.x;
    const float scale = rsqrtf(float(hd));
    for (int e = t; e < hd; e += kSinkThreads) qs[e] = q[size_t(i) * ldq + size_t(h) * hd + e] * scale;
    const int p = pos[i], lo = window > 0 ? max(0, p - window + 1) : 0;
    const __half* K = kc + slot_off[slots[i]] + size_t(kvh) * hd;
    const __half* V = vc + slot_off[slots[i]] + size_t(kvh) * hd;
    float m = sinks ? sinks[h] : -INFINITY, l = sinks ? 1.f : 0.f;
    float acc0 = 0.f, acc1 = 0.f;  // output dims t and t + kSinkThreads (hd <= 2 * kSinkThreads)
    __syncthreads();
    for (int k0 = lo; k0 <= p; k0 += kSinkTile) {
        const int n = min(kSinkTile, p + 1 - k0);
        float s = -INFINITY;
        if (t < n) {
            const __half* kr = K + size_t(k0 + t) * kv_dim;
            float dot = 0.f;
            for (int e = 0; e < hd; ++e) dot += qs[e] * __half2float(kr[e]);
            s = dot;
        }
        const float m_new = fmaxf(m, block_max<kSinkThreads>(s, red));
        const float pr = t < n ? expf(s - m_new) : 0.f;
        sc[t] = pr;
        const float tile_sum = block_sum<kSinkThreads>(pr, red);  // its barriers also publish sc
        const float corr = expf(m - m_new);  // 0 when m is -inf (no sink, first tile)
        l = l * corr + tile_sum;
        m = m_new;
        acc0 *= corr;
        acc1 *= corr;
        for (int j = 0; j < n; ++j) {
            const __half* vr = V + size_t(k0 + j) * kv_dim;
            if (t < hd) acc0 += sc[j] * __half2float(vr[t]);
            if (t + kSinkThreads < hd) acc1 += sc[j] * __half2float(vr[t + kSinkThreads]);
        }
        __syncthreads();  // sc consumed before the next tile
    }
    float* o = out + size_t(i) * ldo + size_t(h) * hd;
    if (t < hd) o[t] = acc0 / l;
    if (t + kSinkThreads < hd) o[t + kSinkThreads] = acc1 / l;
}

// cpu_ops::swiglu_oai: g = min(g, limit) * sigmoid(alpha min(g, limit)) * (clamp(u, -limit, limit) + 1)
__global__ void swiglu_oai_kernel(float* __restrict__ g, const float* __restrict__ u, int64_t n, float alpha,
                                  float limit) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float x = fminf(g[i], limit);
        const float y = fminf(fmaxf(u[i], -limit), limit);
        g[i] = x / (1.0f + expf(-alpha * x)) * (y + 1.0f);
    }
}

// out[r] = x[rows[r]] (block r, d floats)
__global__ void gather_rows_kernel(const float* __restrict__ x, int d, const int32_t* __restrict__ rows,
                                   float* __restrict__ out) {
    const float* src = x + size_t(rows[blockIdx.x]) * d;
    float* dst = out + size_t(blockIdx.x) * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) dst[e] = src[e];
}

// y[rows[r]] += w[r] * src[r], one row after the other (a token may appear once per call: an
// expert sees each token at most once, so no two blocks of a launch write one row)
__global__ void scatter_add_rows_kernel(float* __restrict__ y, int d, const int32_t* __restrict__ rows,
                                        const float* __restrict__ w, const float* __restrict__ src) {
    float* dst = y + size_t(rows[blockIdx.x]) * d;
    const float* s = src + size_t(blockIdx.x) * d;
    const float wr = w[blockIdx.x];
    for (int e = threadIdx.x; e < d; e += blockDim.x) dst[e] += wr * s[e];
}

}  // namespace

void rope_freqs(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, const double* inv_freq,
                float mscale, bool neox, cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    rope_freqs_kernel<<<n_tok, 128, 0, st>>>(x, ld, n_heads, head_dim, pos, inv_freq, mscale, neox ? 1 : 0);
    CUDA_LAUNCH_CHECK(std::string("rope_freqs_kernel (") + (what ? what : "?") + ")");
}

void attention_sinks(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off,
                     int kv_dim, const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv,
                     int head_dim, int window, const float* sinks, float* out, int ldo, cudaStream_t st,
                     const char* what) {
    if (n_q <= 0) return;
    const std::string who = what ? what : "?";
    if (head_dim > 2 * kSinkThreads || head_dim > kAttnMaxHeadDim)
        throw Error("attention_sinks: head_dim " + std::to_string(head_dim) + " above " +
                    std::to_string(2 * kSinkThreads) + " (" + who + ")");
    attention_sinks_kernel<<<n_q * n_head, kSinkThreads, 0, st>>>(q, ldq, kc, vc, slot_off, kv_dim, slots, pos,
                                                                  n_head, n_head / n_head_kv, head_dim, window,
                                                                  sinks, out, ldo);
    CUDA_LAUNCH_CHECK("attention_sinks_kernel (" + who + ")");
}

void swiglu_oai(float* g, const float* u, int64_t n, float alpha, float limit, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    swiglu_oai_kernel<<<grid_for(n, 256), 256, 0, st>>>(g, u, n, alpha, limit);
    CUDA_LAUNCH_CHECK(std::string("swiglu_oai_kernel (") + (what ? what : "?") + ")");
}

void gather_rows(const float* x, int d, const int32_t* rows, int m, float* out, cudaStream_t st, const char* what) {
    if (m <= 0) return;
    gather_rows_kernel<<<m, 128, 0, st>>>(x, d, rows, out);
    CUDA_LAUNCH_CHECK(std::string("gather_rows_kernel (") + (what ? what : "?") + ")");
}

void scatter_add_rows(float* y, int d, const int32_t* rows, const float* w, int m, const float* src, cudaStream_t st,
                      const char* what) {
    if (m <= 0) return;
    scatter_add_rows_kernel<<<m, 128, 0, st>>>(y, d, rows, w, src);
    CUDA_LAUNCH_CHECK(std::string("scatter_add_rows_kernel (") + (what ? what : "?") + ")");
}

void rmsnorm_rows(float* x, int rows, int n, const float* w, float eps, cudaStream_t st, const char* what) {
    if (rows <= 0) return;
    const std::string who = what ? what : "?";
    if (n <= 0) throw Error("rmsnorm_rows: rows of " + std::to_string(n) + " for " + who);
    if (n > kMaxNormRow) {
        rmsnorm_rows_block_kernel<<<rows, 256, 0, st>>>(x, n, w, eps);
        CUDA_LAUNCH_CHECK("rmsnorm_rows_block_kernel (" + who + ")");
        return;
    }
    const int warps = 8;
    rmsnorm_rows_kernel<<<(rows + warps - 1) / warps, warps * 32, 0, st>>>(x, rows, n, w, eps);
    CUDA_LAUNCH_CHECK("rmsnorm_rows_kernel (" + who + ")");
}

void scale(float* x, int64_t n, float s, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    scale_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, n, s);
    CUDA_LAUNCH_CHECK(std::string("scale_kernel (") + (what ? what : "?") + ")");
}

void add(float* x, const float* y, int64_t n, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    add_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, y, n);
    CUDA_LAUNCH_CHECK(std::string("add_kernel (") + (what ? what : "?") + ")");
}

void geglu_tanh(float* g, const float* u, int64_t n, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    geglu_tanh_kernel<<<grid_for(n, 256), 256, 0, st>>>(g, u, n);
    CUDA_LAUNCH_CHECK(std::string("geglu_tanh_kernel (") + (what ? what : "?") + ")");
}

void rope_normal(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base,
                 cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    const std::string who = what ? what : "?";
    if (head_dim % 2 != 0) throw Error("rope_normal: odd head_dim for " + who);
    rope_normal_kernel<<<n_tok, 128, 0, st>>>(x, ld, n_heads, head_dim, pos, std::log2(double(base)));
    CUDA_LAUNCH_CHECK("rope_normal_kernel (" + who + ")");
}

void rope(const ModelDesc& d, float base, float* x, int ld, int n_tok, int n_heads, const int32_t* pos,
          cudaStream_t st, const char* what) {
    if (d.rope_style == RopeStyle::Normal)
        rope_normal(x, ld, n_tok, n_heads, d.head_dim, pos, base, st, what);
    else
        rope_neox(x, ld, n_tok, n_heads, d.head_dim, pos, base, st, what);
}

}  // namespace cu

namespace {

// The family features the CUDA engine's generic step does not run yet.
std::vector<std::string> missing_cuda_features(const ModelDesc& d) {
    std::vector<std::string> m;
    if (d.logit_softcap > 0) m.push_back("logit soft-capping");
    if (d.activation == Activation::SwigluOai && d.n_expert == 0) m.push_back("a dense swiglu_oai FFN");
    if (d.rope_scaling != RopeScaling::None && d.rope_scaling != RopeScaling::Yarn)
        m.push_back(std::string(rope_scaling_name(d.rope_scaling)) + " RoPE scaling");
    for (const LayerDesc& L : d.layers)
        if (bool(L.bq) != bool(L.bk) || bool(L.bq) != bool(L.bv)) {
            m.push_back("biases on only some of Q/K/V");
            break;
        }
    return m;
}

std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
}

}  // namespace

void check_cuda_family(const ModelDesc& d, const std::string& where) {
    const std::vector<std::string> m = missing_cuda_features(d);
    if (!m.empty())
        throw Error(where + ": the CUDA engine does not run " + d.arch + " models yet (" + join(m) +
                    "); use device='cpu'");
}

std::string fused_decoder_unsupported(const ModelDesc& d) {
    // qwen2's and llama's layer (either RoPE pairing: dec_qkv_kernel's rope_normal; biases or
    // none) and gemma3's (embedding scale, per-head Q/K norms: dec_qk_norm; post-norms: DecPend;
    // the GELU gate; windows and per-layer RoPE bases: a table per base; n_head * head_dim !=
    // n_embd; its score scale)
    std::vector<std::string> m = missing_cuda_features(d);
    if (d.fused_qkv) m.push_back("fused attn_qkv");
    if (d.fused_gate_up) m.push_back("fused gate|up in ffn_up");
    if (d.activation != Activation::Silu && d.activation != Activation::GeluTanh)
        m.push_back(std::string(activation_name(d.activation)) + " FFN");
    // gemma3's layer is one set of kernel instances (dec_qkv's GEMMA, the GLU and lm_head PEND)
    const bool gemma_layer = d.qk_norm || d.post_norms;
    if (d.qk_norm != d.post_norms) m.push_back("per-head Q/K norms without post-norms or the reverse");
    if (d.activation == Activation::GeluTanh && !gemma_layer) m.push_back("a GELU gate outside gemma3's layer");
    if (d.embd_scale != 1.f && !gemma_layer) m.push_back("an embedding scale outside gemma3's layer");
    if (d.attn_out_bias) m.push_back("an attention output bias");
    if (d.attn_sinks) m.push_back("attention sinks");
    if (d.rope_scaling != RopeScaling::None) m.push_back(std::string(rope_scaling_name(d.rope_scaling)) + " RoPE scaling");
    if (d.n_expert > 0) m.push_back("a mixture of experts");
    if (m.empty()) return "";
    return "it handles the plain decoder layer (qwen2, llama) and gemma3's; " + d.arch + " has " + join(m) +
           " (the generic step runs it)";
}

}  // namespace orcd
