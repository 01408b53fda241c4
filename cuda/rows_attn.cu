// rows_attn.cu - attention for decode-shaped launches: every row is one query with its own
// slot and position (a batch of sequences, one new token each). The twin of the CPU
// engine's attention (cpp/cpu_ops.cpp) through cu::attention, which routes here.
//
// Block (row i, KV head g, split s), 8 warps: the block's query heads are the `group` heads
// that read KV head g, so each K/V row is loaded once for all of them (GQA without copies).
// Warp w takes the split's keys in tiles of 32 (tile w, w+8, ...); in a tile, lane l scores
// key tile+l for every head of the group (its K row read as 16-byte pieces), the warp folds
// the tile into its running (max, sum, output) per head, then for P·V lane l owns head_dim/32
// output dimensions and walks the tile's 32 V rows (each row read by the whole warp, coalesced).
// The 8 warps merge in shared memory and the block writes its unnormalised output and
// (max, sum) per head, the layout attn_combine_kernel merges across splits.
//
// Why not the (head, query) kernel: with one query per slot it walked V one scalar load
// after another (latency-bound) and loaded each K/V row once per query head.
#include <cmath>
#include <string>

#include "cuda_common.cuh"
#include "kernels.cuh"
#include "warp.cuh"

namespace orcd {
namespace cu {
namespace {

constexpr int kRowsWarps = 8;
constexpr int kRowsMaxGroup = 8;

template <int HD>
__global__ void __launch_bounds__(kRowsWarps * 32, 2)
rows_attn_kernel(const float* __restrict__ q, int ldq, const __half* __restrict__ kc, const __half* __restrict__ vc,
                 size_t slot_stride, int kv_dim, const int32_t* __restrict__ slots, const int32_t* __restrict__ pos,
                 int n_head, int group, float scale, int split_len, int n_splits, float* __restrict__ part_o,
                 float2* __restrict__ part_ml) {
    constexpr int DPL = HD / 32;  // output dimensions per lane
    __shared__ float qs[kRowsMaxGroup][HD];
    __shared__ float wm[kRowsWarps][kRowsMaxGroup], wl[kRowsWarps][kRowsMaxGroup];
    __shared__ float wo[kRowsWarps][kRowsMaxGroup][HD];

    const int i = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kv_len = pos[i] + 1;
    const int start = s * split_len;
    const int end = min(start + split_len, kv_len);
    const int h0 = kvh * group;

    for (int e = threadIdx.x; e < group * HD; e += kRowsWarps * 32)
        qs[e / HD][e % HD] = q[size_t(i) * ldq + size_t(h0) * HD + e] * scale;
    __syncthreads();

    const size_t base = size_t(slots[i]) * slot_stride + size_t(kvh) * HD;
    const __half* K = kc + base;
    const __half* V = vc + base;

    float m[kRowsMaxGroup], l[kRowsMaxGroup], acc[kRowsMaxGroup][DPL];
#pragma unroll
    for (int g = 0; g < kRowsMaxGroup; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[g][d] = 0.f;
    }

    for (int tile = start + w * 32; tile < end; tile += kRowsWarps * 32) {
        // lanes past the split's end score its last key (a valid row) and are masked below,
        // so every load is unconditional and the compiler can issue them all at once
        const int j = min(tile + lane, end - 1);
        float sc[kRowsMaxGroup];
#pragma unroll
        for (int g = 0; g < kRowsMaxGroup; ++g) sc[g] = 0.f;
        {
            const __half* kr = K + size_t(j) * kv_dim;
#pragma unroll
            for (int d = 0; d < HD; d += 8) {
                const uint4 raw = __ldg(reinterpret_cast<const uint4*>(kr + d));
                const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
                float kf[8];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(h2[e]);
                    kf[2 * e] = f.x;
                    kf[2 * e + 1] = f.y;
                }
#pragma unroll
                for (int g = 0; g < kRowsMaxGroup; ++g) {
                    if (g < group) {
#pragma unroll
                        for (int e = 0; e < 8; ++e) sc[g] += qs[g][d + e] * kf[e];
                    }
                }
            }
        }
        const int nk = min(32, end - tile);
#pragma unroll
        for (int g = 0; g < kRowsMaxGroup; ++g) {
            if (g >= group) break;
            const float v = lane < nk ? sc[g] : -INFINITY;
            const float m_new = fmaxf(m[g], warp_max(v));  // finite: lane 0's key is in range
            const float p = lane < nk ? __expf(v - m_new) : 0.f;
            const float corr = __expf(m[g] - m_new);       // 0 while m[g] is -inf
            l[g] = l[g] * corr + warp_sum(p);
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[g][d] *= corr;
            m[g] = m_new;
            sc[g] = p;
        }
        // all 32 rows of the tile, fully unrolled: rows past the end reread the last key and
        // weigh 0 (their p is 0), so the 32 V loads are independent and issued together
#pragma unroll
        for (int kk = 0; kk < 32; ++kk) {
            const __half* vr = V + size_t(min(tile + kk, end - 1)) * kv_dim + lane * DPL;
            float vf[DPL];
            if constexpr (DPL == 2) {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(vr));
                vf[0] = f.x;
                vf[1] = f.y;
            } else {
                const uint2 raw = *reinterpret_cast<const uint2*>(vr);
                const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int e = 0; e < DPL / 2; ++e) {
                    const float2 f = __half22float2(h2[e]);
                    vf[2 * e] = f.x;
                    vf[2 * e + 1] = f.y;
                }
            }
#pragma unroll
            for (int g = 0; g < kRowsMaxGroup; ++g) {
                if (g >= group) break;
                const float p = __shfl_sync(0xffffffffu, sc[g], kk);
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[g][d] += p * vf[d];
            }
        }
    }

    // merge the warps: each head's result relative to the largest of the warps' maxima
#pragma unroll
    for (int g = 0; g < kRowsMaxGroup; ++g) {
        if (g >= group) break;
        if (lane == 0) {
            wm[w][g] = m[g];
            wl[w][g] = l[g];
        }
#pragma unroll
        for (int d = 0; d < DPL; ++d) wo[w][g][lane * DPL + d] = acc[g][d];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < group * HD; e += kRowsWarps * 32) {
        const int g = e / HD, d = e % HD;
        float M = -INFINITY;
#pragma unroll
        for (int k = 0; k < kRowsWarps; ++k) M = fmaxf(M, wm[k][g]);
        float L = 0.f, o = 0.f;
        if (M != -INFINITY) {
#pragma unroll
            for (int k = 0; k < kRowsWarps; ++k) {
                const float c = __expf(wm[k][g] - M);
                L += c * wl[k][g];
                o += c * wo[k][g][d];
            }
        }
        const size_t pidx = (size_t(i) * n_head + h0 + g) * n_splits + s;
        part_o[pidx * HD + d] = o;
        if (d == 0) part_ml[pidx] = make_float2(M, L);
    }
}

}  // namespace

bool rows_attention_supported(int head_dim, int group) {
    return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= kRowsMaxGroup;
}

void rows_attention(const float* q, int ldq, const __half* kc, const __half* vc, size_t slot_stride, int kv_dim,
                    const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv, int head_dim,
                    int split_len, int n_splits, float* part_o, float2* part_ml, cudaStream_t st, const char* what) {
    const int group = n_head / n_head_kv;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    const dim3 grid(n_q, n_head_kv, n_splits);
    if (head_dim == 64)
        rows_attn_kernel<64><<<grid, kRowsWarps * 32, 0, st>>>(q, ldq, kc, vc, slot_stride, kv_dim, slots, pos, n_head,
                                                               group, scale, split_len, n_splits, part_o, part_ml);
    else
        rows_attn_kernel<128><<<grid, kRowsWarps * 32, 0, st>>>(q, ldq, kc, vc, slot_stride, kv_dim, slots, pos,
                                                                n_head, group, scale, split_len, n_splits, part_o,
                                                                part_ml);
    CUDA_LAUNCH_CHECK(std::string("rows_attn_kernel for ") + (what ? what : "?"));
}

}  // namespace cu
}  // namespace orcd
