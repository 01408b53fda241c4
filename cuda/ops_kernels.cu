// ops_kernels.cu - the non-matmul kernels of the forward pass: RMSNorm,
// NEOX RoPE, KV-cache append, attention (split along the keys, fp32
// softmax), SwiGLU, bias add, conversions and test fills.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cuda_common.cuh"
#include "kernels.cuh"
#include "warp.cuh"

namespace orcd {
namespace cu {
namespace {

// ---------------------------------------------------------------- RMSNorm
// One block per row; the sum of squares in float32.
__global__ void rmsnorm_kernel(const float* __restrict__ x, int n, const float* __restrict__ w, float eps,
                               float* __restrict__ y) {
    __shared__ float buf[32];
    const float* xr = x + size_t(blockIdx.x) * n;
    float* yr = y + size_t(blockIdx.x) * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, buf);
    const float scale = 1.0f / sqrtf(ss / float(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (xr[i] * scale) * w[i];
}

// ---------------------------------------------------------------- RoPE (NEOX)
// Pair (x[i], x[i + hd/2]) of each head is rotated by theta = pos * base^(-2i/hd),
// theta computed in double so long positions keep their precision.
__global__ void rope_neox_kernel(float* __restrict__ x, int ld, int n_heads, int hd, const int32_t* __restrict__ pos,
                                 double log2_base) {
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
        const float x0 = xh[i], x1 = xh[i + half];
        xh[i] = x0 * cs - x1 * sn;
        xh[i + half] = x0 * sn + x1 * cs;
    }
}

// ---------------------------------------------------------------- KV append
__global__ void kv_store_kernel(const float* __restrict__ k, const float* __restrict__ v, int ld, int kv_dim,
                                const int32_t* __restrict__ slots, const int32_t* __restrict__ pos,
                                __half* __restrict__ kc, __half* __restrict__ vc, const int64_t* __restrict__ slot_off) {
    const int t = blockIdx.x;
    const size_t dst = size_t(slot_off[slots[t]]) + size_t(pos[t]) * kv_dim;
    const float* kt = k + size_t(t) * ld;
    const float* vt = v + size_t(t) * ld;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kc[dst + c] = __float2half_rn(kt[c]);
        vc[dst + c] = __float2half_rn(vt[c]);
    }
}

// ---------------------------------------------------------------- attention
// Block (head h, query i, split s) covers keys [s*split_len, min((s+1)*split_len, pos[i]+1)),
// from pos[i] - window + 1 on when window > 0 (a split wholly before that is empty: m = -inf,
// l = 0, which attn_combine skips).
// Tiles of blockDim.x keys: thread t scores key tile+t (q·k in float32, q
// pre-scaled), then the tile's softmax weights are folded into a running
// (max m, sum l, output acc) with the usual rescaling. For the P·V product,
// thread t owns output dimension t % hd for keys t/hd, t/hd + G, ... of the
// tile (G = blockDim.x / hd key groups), reduced over the groups at the end.
// The block writes its unnormalised output and (m, l); attn_combine merges splits.
__global__ void attn_partial_kernel(const float* __restrict__ q, int ldq, const __half* __restrict__ kc,
                                    const __half* __restrict__ vc, const int64_t* __restrict__ slot_off, int kv_dim,
                                    const int32_t* __restrict__ slots, const int32_t* __restrict__ pos, int n_head,
                                    int group, int hd, float scale, int split_len, int n_splits,
                                    float* __restrict__ part_o, float2* __restrict__ part_ml, int window) {
    extern __shared__ float sm[];
    const int NT = blockDim.x;
    float* qs = sm;          // hd
    float* ps = qs + hd;     // NT: the tile's weights
    float* red = ps + NT;    // NT: group reduction of the output
    __shared__ float buf[32];

    const int h = blockIdx.x, i = blockIdx.y, s = blockIdx.z, t = threadIdx.x;
    const int kv_len = pos[i] + 1;
    const int start = max(s * split_len, window > 0 ? kv_len - window : 0);
    const int end = min(s * split_len + split_len, kv_len);
    const size_t pidx = (size_t(i) * n_head + h) * n_splits + s;
    const int kvh = h / group;
    const size_t base = size_t(slot_off[slots[i]]) + size_t(kvh) * hd;
    const __half* K = kc + base;
    const __half* V = vc + base;

    for (int d = t; d < hd; d += NT) qs[d] = q[size_t(i) * ldq + size_t(h) * hd + d] * scale;
    const int G = NT / hd;  // key groups for the P·V product (hd <= NT)
    const int od = t % hd, og = t / hd;
    const bool owner = og < G;
    float m_run = -INFINITY, l_run = 0.f, acc = 0.f;
    __syncthreads();

    for (int tile = start; tile < end; tile += NT) {
        const int j = tile + t;
        float sc = -INFINITY;
        if (j < end) {
            const __half* kr = K + size_t(j) * kv_dim;
            float dot = 0.f;
            if ((hd & 7) == 0) {
                for (int d = 0; d < hd; d += 8) {
                    const uint4 raw = *reinterpret_cast<const uint4*>(kr + d);
                    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 f = __half22float2(h2[e]);
                        dot += qs[d + 2 * e] * f.x + qs[d + 2 * e + 1] * f.y;
                    }
                }
            } else {
                const __half2* k2 = reinterpret_cast<const __half2*>(kr);
                for (int d = 0; d < hd / 2; ++d) {
                    const float2 f = __half22float2(k2[d]);
                    dot += qs[2 * d] * f.x + qs[2 * d + 1] * f.y;
                }
            }
            sc = dot;
        }
        const float m_new = fmaxf(m_run, block_max(sc, buf));
        const float p = j < end ? expf(sc - m_new) : 0.f;
        ps[t] = p;
        const float tile_sum = block_sum(p, buf);  // its barriers also publish ps
        const float corr = expf(m_run - m_new);    // 0 on the first tile (m_run = -inf)
        l_run = l_run * corr + tile_sum;
        acc *= corr;
        m_run = m_new;
        const int nt = min(NT, end - tile);
        if (owner) {
            const __half* vcol = V + od;
            for (int jj = og; jj < nt; jj += G) acc += ps[jj] * __half2float(vcol[size_t(tile + jj) * kv_dim]);
        }
        __syncthreads();  // ps is rewritten by the next tile
    }
    if (owner) red[og * hd + od] = acc;
    __syncthreads();
    if (t < hd) {
        float o = 0.f;
        for (int g = 0; g < G; ++g) o += red[g * hd + t];
        part_o[pidx * hd + t] = o;
    }
    if (t == 0) part_ml[pidx] = make_float2(m_run, l_run);
}

// One block (hd threads) per (head, query): merges the splits' partial results.
__global__ void attn_combine_kernel(const float* __restrict__ part_o, const float2* __restrict__ part_ml, int n_head,
                                    int hd, int n_splits, float* __restrict__ out, int ldo) {
    const int h = blockIdx.x, i = blockIdx.y, d = threadIdx.x;
    const size_t b = (size_t(i) * n_head + h) * n_splits;
    float M = -INFINITY;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_ml[b + s].x);
    float L = 0.f, o = 0.f;
    for (int s = 0; s < n_splits; ++s) {
        const float2 ml = part_ml[b + s];
        if (ml.y > 0.f) {
            const float w = expf(ml.x - M);
            L += w * ml.y;
            o += w * part_o[(b + s) * hd + d];
        }
    }
    out[size_t(i) * ldo + size_t(h) * hd + d] = o / L;
}

// ---------------------------------------------------------------- prompt path, fused
// RMSNorm of rows of n floats straight to fp16 (the GEMM's input).
__global__ void rmsnorm_f16_kernel(const float* __restrict__ x, int n, const float* __restrict__ w, float eps,
                                   __half* __restrict__ y) {
    __shared__ float buf[32];
    const float* xr = x + size_t(blockIdx.x) * n;
    __half* yr = y + size_t(blockIdx.x) * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, buf);
    const float scale = 1.0f / sqrtf(ss / float(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __float2half_rn((xr[i] * scale) * w[i]);
}

// One block per token of the fused q|k|v product (row t at qkv + t*ld: q of
// n_head*hd, k and v of kv_dim each): biases, NEOX RoPE of q (in place) and k,
// k and v appended to the fp16 caches. Every element is touched by one thread.
__global__ void qkv_post_kernel(float* __restrict__ qkv, int ld, int n_head, int n_head_kv, int hd,
                                const float* __restrict__ bq, const float* __restrict__ bk,
                                const float* __restrict__ bv, const int32_t* __restrict__ pos,
                                const int32_t* __restrict__ slots, double log2_base, __half* __restrict__ kc,
                                __half* __restrict__ vc, const int64_t* __restrict__ slot_off) {
    const int t = blockIdx.x;
    const int half = hd / 2, qd = n_head * hd, kd = n_head_kv * hd;
    float* row = qkv + size_t(t) * ld;
    const double p = double(pos[t]);
    const size_t dst = size_t(slot_off[slots[t]]) + size_t(pos[t]) * kd;
    const int n_pairs = (n_head + n_head_kv) * half;
    for (int idx = threadIdx.x; idx < n_pairs + kd; idx += blockDim.x) {
        if (idx < n_pairs) {
            const int h = idx / half, i = idx % half;  // h < n_head: q head, else k head h - n_head
            const bool is_q = h < n_head;
            const int c0 = h * hd + i;                 // column in the q|k part
            const float* b = is_q ? bq : bk;
            const int bc = is_q ? c0 : c0 - qd;
            float x0 = row[c0], x1 = row[c0 + half];
            if (b) {
                x0 += b[bc];
                x1 += b[bc + half];
            }
            const double theta = p * exp2(-2.0 * double(i) / double(hd) * log2_base);
            double s, c;
            sincos(theta, &s, &c);
            const float cs = float(c), sn = float(s);
            const float y0 = x0 * cs - x1 * sn;
            const float y1 = x0 * sn + x1 * cs;
            if (is_q) {
                row[c0] = y0;
                row[c0 + half] = y1;
            } else {
                kc[dst + bc] = __float2half_rn(y0);
                kc[dst + bc + half] = __float2half_rn(y1);
            }
        } else {
            const int c = idx - n_pairs;
            float v = row[qd + kd + c];
            if (bv) v += bv[c];
            vc[dst + c] = __float2half_rn(v);
        }
    }
}

// act[t][i] = fp16(silu(gu[t][i]) * gu[t][n + i]) for the fused gate|up product.
__global__ void swiglu_f16_kernel(const float* __restrict__ gu, int n, int rows, __half* __restrict__ act) {
    const int64_t total = int64_t(rows) * n;
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
        const int64_t t = k / n, i = k % n;
        const float a = gu[t * 2 * n + i];
        act[k] = __float2half_rn(a / (1.0f + expf(-a)) * gu[t * 2 * n + n + i]);
    }
}

// ---------------------------------------------------------------- elementwise
__global__ void swiglu_kernel(float* __restrict__ g, const float* __restrict__ u, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

__global__ void add_bias_kernel(float* __restrict__ y, int n, int ld, const float* __restrict__ b) {
    float* yr = y + size_t(blockIdx.y) * ld;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < n) yr[c] += b[c];
}

__global__ void f32_to_f16_kernel(const float* __restrict__ x, int64_t n, __half* __restrict__ y) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

__global__ void fill_f32_kernel(float* p, int64_t n, float v) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        p[i] = v;
}
__global__ void fill_f16_kernel(__half* p, int64_t n, __half v) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        p[i] = v;
}

__global__ void probe() {}

std::string ctx(const char* kernel, const char* what) {
    return std::string(kernel) + " for " + (what ? what : "?");
}

}  // namespace

int grid_for(int64_t n, int threads) {
    const int64_t b = (n + threads - 1) / threads;
    return int(b < 65535 * 16 ? (b < 1 ? 1 : b) : 65535 * 16);
}

void rmsnorm(const float* x, int rows, int n, const float* w, float eps, float* y, cudaStream_t st, const char* what) {
    if (rows <= 0) return;
    rmsnorm_kernel<<<rows, 256, 0, st>>>(x, n, w, eps, y);
    CUDA_LAUNCH_CHECK(ctx("rmsnorm_kernel", what));
}

void rope_neox(float* x, int ld, int n_tok, int n_heads, int head_dim, const int32_t* pos, float base,
               cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    if (head_dim % 2 != 0) throw Error(std::string("rope_neox: odd head_dim for ") + (what ? what : "?"));
    rope_neox_kernel<<<n_tok, 128, 0, st>>>(x, ld, n_heads, head_dim, pos, std::log2(double(base)));
    CUDA_LAUNCH_CHECK(ctx("rope_neox_kernel", what));
}

void kv_store(const float* k, const float* v, int ld, int n_tok, int kv_dim, const int32_t* slots,
              const int32_t* pos, __half* kc, __half* vc, const int64_t* slot_off, cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    kv_store_kernel<<<n_tok, 256, 0, st>>>(k, v, ld, kv_dim, slots, pos, kc, vc, slot_off);
    CUDA_LAUNCH_CHECK(ctx("kv_store_kernel", what));
}

AttnPlan attn_plan(int n_q, int kv_max, int n_head, int sm_count, bool one_slot) {
    AttnPlan p;
    const int by_len = (kv_max + kAttnTile - 1) / kAttnTile;                // at least one tile per split
    const int blocks = n_q * n_head;
    int want = (2 * sm_count + blocks - 1) / blocks;                         // about two blocks per SM
    int ns = std::min(std::min(want, by_len), kAttnMaxSplits);
    if (ns < 1) ns = 1;
    const int per = (kv_max + ns - 1) / ns;
    p.split_len = ((per + kAttnTile - 1) / kAttnTile) * kAttnTile;
    p.n_splits = (kv_max + p.split_len - 1) / p.split_len;
    if (p.n_splits < 1) p.n_splits = 1;
    if (n_q >= kFlashMinQ) {
        // flash blocks hold kFlashRows (query, head) rows: split the keys until there are
        // about two blocks per SM, each split at least kFlashMinSplitLen keys
        const int fblocks = std::max(1, (n_q * n_head + kFlashRows - 1) / kFlashRows);
        const int fwant = (2 * sm_count + fblocks - 1) / fblocks;
        const int fby_len = (kv_max + kFlashMinSplitLen - 1) / kFlashMinSplitLen;
        const int fs = std::max(1, std::min(std::min(fwant, fby_len), kAttnMaxSplits));
        const int fper = (kv_max + fs - 1) / fs;
        p.flash_len = std::max(64, (fper + 63) / 64 * 64);
        p.flash_splits = std::max(1, (kv_max + p.flash_len - 1) / p.flash_len);
        p.flash = one_slot;
    }
    return p;
}

AttnPlan attn_plan_fixed(int kv_max, int split_len) {
    AttnPlan p;
    p.split_len = split_len;
    p.n_splits = std::max(1, (kv_max + split_len - 1) / split_len);
    return p;
}

void attention(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off, int kv_dim,
               const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv, int head_dim,
               const AttnPlan& plan, float* part_o, float2* part_ml, float* out, int ldo, cudaStream_t st,
               const char* what, int window) {
    if (n_q <= 0) return;
    if (window < 0) throw Error("attention: window must be >= 0 (got " + std::to_string(window) + ")");
    if (head_dim < 2 || head_dim > kAttnMaxHeadDim || head_dim % 2 != 0 || n_head % n_head_kv != 0)
        throw Error("attention: unsupported head_dim " + std::to_string(head_dim) + " / heads " +
                    std::to_string(n_head) + "/" + std::to_string(n_head_kv) + " for " + (what ? what : "?"));
    if (plan.flash && flash_supported(head_dim)) {
        FlashArgs a{};
        a.q = q;
        a.ldq = ldq;
        a.kc = kc;
        a.vc = vc;
        a.slot_off = slot_off;
        a.kv_dim = kv_dim;
        a.slots = slots;
        a.pos = pos;
        a.n_q = n_q;
        a.n_head = n_head;
        a.group = n_head / n_head_kv;
        a.head_dim = head_dim;
        a.scale_log2 = float(1.4426950408889634 / std::sqrt(double(head_dim)));
        a.n_splits = plan.flash_splits;
        a.split_len = plan.flash_len;
        a.part_o = part_o;
        a.part_ml = part_ml;
        a.out = out;
        a.ldo = ldo;
        a.window = window;
        flash_attention(a, n_head_kv, st, what);
        if (plan.flash_splits > 1) {
            attn_combine_kernel<<<dim3(n_head, n_q), head_dim, 0, st>>>(part_o, part_ml, n_head, head_dim,
                                                                        plan.flash_splits, out, ldo);
            CUDA_LAUNCH_CHECK(ctx("attn_combine_kernel (flash)", what));
        }
        return;
    }
    if (rows_attention_supported(head_dim, n_head / n_head_kv)) {  // rows_attn.cu
        const int ns = rows_attention(q, ldq, kc, vc, slot_off, kv_dim, slots, pos, n_q, n_head, n_head_kv,
                                      head_dim, plan, part_o, part_ml, st, what, window);
        attn_combine_kernel<<<dim3(n_head, n_q), head_dim, 0, st>>>(part_o, part_ml, n_head, head_dim, ns, out, ldo);
        CUDA_LAUNCH_CHECK(ctx("attn_combine_kernel (rows)", what));
        return;
    }
    const int nt = head_dim <= 128 ? 128 : 256;
    const size_t smem = size_t(head_dim + 2 * nt) * sizeof(float);
    const float scale = 1.0f / std::sqrt(float(head_dim));
    attn_partial_kernel<<<dim3(n_head, n_q, plan.n_splits), nt, smem, st>>>(
        q, ldq, kc, vc, slot_off, kv_dim, slots, pos, n_head, n_head / n_head_kv, head_dim, scale,
        plan.split_len, plan.n_splits, part_o, part_ml, window);
    CUDA_LAUNCH_CHECK(ctx("attn_partial_kernel", what));
    attn_combine_kernel<<<dim3(n_head, n_q), head_dim, 0, st>>>(part_o, part_ml, n_head, head_dim, plan.n_splits,
                                                                out, ldo);
    CUDA_LAUNCH_CHECK(ctx("attn_combine_kernel", what));
}

void rmsnorm_f16(const float* x, int rows, int n, const float* w, float eps, __half* y, cudaStream_t st,
                 const char* what) {
    if (rows <= 0) return;
    rmsnorm_f16_kernel<<<rows, 256, 0, st>>>(x, n, w, eps, y);
    CUDA_LAUNCH_CHECK(ctx("rmsnorm_f16_kernel", what));
}

void qkv_post(float* qkv, int ld, int n_tok, int n_head, int n_head_kv, int head_dim, const float* bq,
              const float* bk, const float* bv, const int32_t* pos, const int32_t* slots, float base, __half* kc,
              __half* vc, const int64_t* slot_off, cudaStream_t st, const char* what) {
    if (n_tok <= 0) return;
    if (head_dim % 2 != 0) throw Error(std::string("qkv_post: odd head_dim for ") + (what ? what : "?"));
    qkv_post_kernel<<<n_tok, 256, 0, st>>>(qkv, ld, n_head, n_head_kv, head_dim, bq, bk, bv, pos, slots,
                                           std::log2(double(base)), kc, vc, slot_off);
    CUDA_LAUNCH_CHECK(ctx("qkv_post_kernel", what));
}

void swiglu_f16(const float* gu, int n, int rows, __half* act, cudaStream_t st, const char* what) {
    if (rows <= 0 || n <= 0) return;
    swiglu_f16_kernel<<<grid_for(int64_t(rows) * n, 256), 256, 0, st>>>(gu, n, rows, act);
    CUDA_LAUNCH_CHECK(ctx("swiglu_f16_kernel", what));
}

void swiglu(float* g, const float* u, int64_t n, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    swiglu_kernel<<<grid_for(n, 256), 256, 0, st>>>(g, u, n);
    CUDA_LAUNCH_CHECK(ctx("swiglu_kernel", what));
}

void add_bias(float* y, int rows, int n, int ld, const float* b, cudaStream_t st, const char* what) {
    if (rows <= 0 || n <= 0) return;
    add_bias_kernel<<<dim3((n + 255) / 256, rows), 256, 0, st>>>(y, n, ld, b);
    CUDA_LAUNCH_CHECK(ctx("add_bias_kernel", what));
}

void f32_to_f16(const float* x, int64_t n, __half* y, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    f32_to_f16_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, n, y);
    CUDA_LAUNCH_CHECK(ctx("f32_to_f16_kernel", what));
}

void fill_nan(float* p, int64_t n, cudaStream_t st) {
    if (n <= 0) return;
    fill_f32_kernel<<<grid_for(n, 256), 256, 0, st>>>(p, n, std::numeric_limits<float>::quiet_NaN());
    CUDA_LAUNCH_CHECK(std::string("fill_f32_kernel (NaN poison)"));
}

void fill_nan(__half* p, int64_t n, cudaStream_t st) {
    if (n <= 0) return;
    __half_raw r;
    r.x = 0x7e00;  // quiet NaN
    fill_f16_kernel<<<grid_for(n, 256), 256, 0, st>>>(p, n, __half(r));
    CUDA_LAUNCH_CHECK(std::string("fill_f16_kernel (NaN poison)"));
}

cudaError_t probe_kernel() {
    probe<<<1, 1>>>();
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    return cudaDeviceSynchronize();
}

}  // namespace cu
}  // namespace orcd
