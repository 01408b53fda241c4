// rows_attn.cu - attention for decode-shaped launches: every row is one query with its own
// slot and position (a batch of sequences, one new token each). The twin of the CPU
// engine's attention (cpp/cpu_ops.cpp) through cu::attention, which routes here.
//
// One warp per (row, query head, split). The warp walks its split's keys in tiles of 32:
// lane l scores key tile+l (its K row read as 16-byte pieces, q broadcast from shared memory),
// the warp folds the tile into its running (max, sum, output), then for P·V lane l owns
// head_dim/32 output dimensions and reads the tile's 32 V rows (each row by the whole warp,
// coalesced; rows past the split's end reread its last key and weigh 0, so every load is
// unconditional and the 32 are issued together). The warp writes its unnormalised output and
// (max, sum), the layout attn_combine_kernel merges across splits.
//
// Why this shape: at small batches a decode step has few rows, so the work must spread over
// many short, independent instruction chains. A block serving all heads of a KV head made each
// warp score and accumulate 7 heads in one chain (Nsight Compute on the H200, B=8: 31 us, 16
// blocks, 1% of the SM and memory throughput); the (head, query) block kernel before it walked
// V one scalar load at a time. K/V rows read by the group's heads come from L2 after the first.
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda_common.cuh"
#include "kernels.cuh"
#include "warp.cuh"

namespace orcd {
namespace cu {
namespace {

constexpr int kRowsMaxSplits = 256;  // partial rows per (row, head) at the most
constexpr int kRowsMinSplitLen = 64;  // keys per warp at the least (two tiles)

template <int HD>
__global__ void __launch_bounds__(32)
rows_attn_kernel(const float* __restrict__ q, int ldq, const __half* __restrict__ kc, const __half* __restrict__ vc,
                 const int64_t* __restrict__ slot_off, int kv_dim, const int32_t* __restrict__ slots, const int32_t* __restrict__ pos,
                 int n_head, int group, float scale, int split_len, int n_splits, float* __restrict__ part_o,
                 float2* __restrict__ part_ml, int window) {
    constexpr int DPL = HD / 32;  // output dimensions per lane
    __shared__ float qs[HD];

    const int i = blockIdx.x, h = blockIdx.y, s = blockIdx.z, lane = threadIdx.x;
    const int kv_len = pos[i] + 1;
    // window > 0: keys from pos - window + 1 on (a split wholly before them stays empty)
    const int start = max(s * split_len, window > 0 ? kv_len - window : 0);
    const int end = min(s * split_len + split_len, kv_len);
    const size_t pidx = (size_t(i) * n_head + h) * n_splits + s;

    for (int d = lane; d < HD; d += 32) qs[d] = q[size_t(i) * ldq + size_t(h) * HD + d] * scale;
    __syncwarp();

    float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.f;

    if (start < end) {
        const size_t base = size_t(slot_off[slots[i]]) + size_t(h / group) * HD;
        const __half* K = kc + base;
        const __half* V = vc + base;
        for (int tile = start; tile < end; tile += 32) {
            const int nk = min(32, end - tile);
            const __half* kr = K + size_t(min(tile + lane, end - 1)) * kv_dim;
            float sc = 0.f;
#pragma unroll
            for (int d = 0; d < HD; d += 8) {
                const uint4 raw = __ldg(reinterpret_cast<const uint4*>(kr + d));
                const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(h2[e]);
                    sc += qs[d + 2 * e] * f.x + qs[d + 2 * e + 1] * f.y;
                }
            }
            const float v = lane < nk ? sc : -INFINITY;
            const float m_new = fmaxf(m, warp_max(v));  // finite: lane 0's key is in range
            const float p = lane < nk ? __expf(v - m_new) : 0.f;
            const float corr = __expf(m - m_new);       // 0 while m is -inf
            l = l * corr + warp_sum(p);
            m = m_new;
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[d] *= corr;
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
                const float pk = __shfl_sync(0xffffffffu, p, kk);
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[d] += pk * vf[d];
            }
        }
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) part_o[pidx * HD + lane * DPL + d] = acc[d];
    if (lane == 0) part_ml[pidx] = make_float2(m, l);
}

}  // namespace

bool rows_attention_supported(int head_dim, int group) {
    return (head_dim == 64 || head_dim == 128) && group >= 1;
}

int rows_attention(const float* q, int ldq, const __half* kc, const __half* vc, const int64_t* slot_off, int kv_dim,
                   const int32_t* slots, const int32_t* pos, int n_q, int n_head, int n_head_kv, int head_dim,
                   const AttnPlan& plan, float* part_o, float2* part_ml, cudaStream_t st, const char* what,
                   int window) {
    // Keys the plan covers; splits of at least kRowsMinSplitLen keys, as many as the partial
    // buffers hold (plan.partial_rows; without it, the plan's own splits, which always fit).
    int split_len = plan.split_len, n_splits = plan.n_splits;
    const long long cap = plan.partial_rows > 0 ? (long long)(plan.partial_rows / (size_t(n_q) * size_t(n_head))) : 0;
    if (cap >= 1) {
        const long long cover = (long long)plan.split_len * plan.n_splits;
        long long ns = (cover + kRowsMinSplitLen - 1) / kRowsMinSplitLen;
        ns = std::max<long long>(1, std::min<long long>({ns, cap, (long long)kRowsMaxSplits}));
        const long long len = ((cover + ns - 1) / ns + 31) / 32 * 32;
        split_len = int(len);
        n_splits = int((cover + len - 1) / len);  // <= ns
    }
    const int group = n_head / n_head_kv;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    const dim3 grid(n_q, n_head, n_splits);
    if (head_dim == 64)
        rows_attn_kernel<64><<<grid, 32, 0, st>>>(q, ldq, kc, vc, slot_off, kv_dim, slots, pos, n_head, group,
                                                  scale, split_len, n_splits, part_o, part_ml, window);
    else
        rows_attn_kernel<128><<<grid, 32, 0, st>>>(q, ldq, kc, vc, slot_off, kv_dim, slots, pos, n_head, group,
                                                   scale, split_len, n_splits, part_o, part_ml, window);
    CUDA_LAUNCH_CHECK(std::string("rows_attn_kernel for ") + (what ? what : "?"));
    return n_splits;
}

}  // namespace cu
}  // namespace orcd
