// family_kernels.cu - CUDA additions for the model families (family_kernels.cuh).
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "family_kernels.cuh"
#include "kernels.cuh"

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

}  // namespace

void rope_normal(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base,
                 cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    const std::string who = what ? what : "?";
    if (head_dim % 2 != 0) throw Error("rope_normal: odd head_dim for " + who);
    rope_normal_kernel<<<n_tok, 128, 0, st>>>(x, ld, n_heads, head_dim, pos, std::log2(double(base)));
    CUDA_LAUNCH_CHECK("rope_normal_kernel (" + who + ")");
}

void rope(const ModelDesc& d, float* x, int ld, int n_tok, int n_heads, const int32_t* pos, cudaStream_t st,
          const char* what) {
    if (d.rope_style == RopeStyle::Normal)
        rope_normal(x, ld, n_tok, n_heads, d.head_dim, pos, d.rope_base, st, what);
    else
        rope_neox(x, ld, n_tok, n_heads, d.head_dim, pos, d.rope_base, st, what);
}

}  // namespace cu

namespace {

// The family features the CUDA engine's generic step does not run yet.
std::vector<std::string> missing_cuda_features(const ModelDesc& d) {
    std::vector<std::string> m;
    if (d.qk_norm) m.push_back("per-head Q/K norms");
    if (d.post_norms) m.push_back("post-attention/post-FFN norms");
    if (d.activation != Activation::Silu) m.push_back(std::string(activation_name(d.activation)) + " FFN");
    if (d.embd_scale != 1.f) m.push_back("embedding scale");
    if (d.attn_scale != 0.f && d.attn_scale != 1.0f / std::sqrt(float(d.head_dim))) m.push_back("attention scale");
    if (d.logit_softcap > 0) m.push_back("logit soft-capping");
    if (d.n_expert > 0) m.push_back("mixture-of-experts FFN");
    if (d.attn_sinks) m.push_back("attention sinks");
    if (d.attn_out_bias) m.push_back("attention output bias");
    if (d.rope_scaling != RopeScaling::None) m.push_back(std::string(rope_scaling_name(d.rope_scaling)) + " RoPE scaling");
    if (d.head_dim * d.n_head != d.n_embd) m.push_back("head_dim * n_head != n_embd");
    for (const LayerDesc& L : d.layers)
        if (L.rope_base != d.rope_base) {
            m.push_back("per-layer RoPE bases");
            break;
        }
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
    // qwen2's and llama's layer (either RoPE pairing: dec_qkv_kernel's rope_normal; biases or none)
    if (d.is_plain_decoder_shape()) return "";
    std::vector<std::string> m = missing_cuda_features(d);
    if (d.fused_qkv) m.push_back("fused attn_qkv");
    if (d.fused_gate_up) m.push_back("fused gate|up in ffn_up");
    if (d.sliding_window) m.push_back("sliding-window attention");
    return "it handles the plain decoder layer only (qwen2, llama); " + d.arch + " has " + join(m) +
           " (the generic step runs it)";
}

}  // namespace orcd
