// flash_attn.cu - causal GQA attention of prompt chunks on tensor cores (sm_80+).
//
// Rows: the n_q queries x G = n_head/n_head_kv heads that share one KV head are
// flattened, row r = (query r / G, head kvh*G + r % G), so a block's K/V tile
// serves every head of the group (GQA sharing inside the block, one K/V read per
// block). A block: 4 warps x 16 rows = kFlashRows rows of one KV head, one split
// of the keys (blockIdx.z). Per tile of BK keys (staged in shared memory with
// cp.async, two buffers: the next tile loads while this one is used):
//   S = Q·Kᵀ    mma.sync m16n8k16, fp16 in, fp32 accumulate (Q fragments held in
//               registers for the whole block, converted from float32 once; K
//               fragments with ldmatrix);
//   online softmax per row in fp32 registers (base-2 exponent, scale folded in);
//   O += P·V    P rounded to fp16 as the A operand straight from S's accumulator
//               layout, V fragments with ldmatrix.trans.
// Causality: row r sees keys 0..pos[query r]; keys past the block's largest
// position are neither loaded (zero-filled) nor computed, tiles past a warp's
// largest position are skipped by that warp, the mask is applied only to tiles
// that reach past a warp's smallest position.
// Sliding window (p.window > 0): row r sees keys pos - window + 1 .. pos only; the block
// starts at its rows' earliest window start, a warp skips tiles wholly before all of its
// rows' windows, and the mask also covers the keys before a row's window.
// Preconditions (the caller, cu::attention through AttnPlan::flash, ensures them):
// every query of a launch is in one slot (the block reads the slot of its first
// row); positions 0..pos of that slot are written (finite); head_dim 64 or 128.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type" and "ldmatrix" (groupID = lane / 4, threadID_in_group = lane % 4).
#include <climits>
#include <cmath>
#include <string>

#include "cuda_common.cuh"
#include "kernels.cuh"

namespace orcd {
namespace cu {
namespace {

constexpr int kWarps = kFlashRows / 16;
constexpr int kThreads = kWarps * 32;

template <int HD>
struct FlashTile {
    static constexpr int BK = HD == 64 ? 64 : 32;         // keys per tile (shared memory stays under 48 KB)
    static constexpr int RS = (HD + 8) * 2;               // bytes per staged row: +16 so ldmatrix rows hit distinct banks
    static constexpr int BUF = BK * RS;                   // one K (or V) tile
    static constexpr int SMEM = 4 * BUF;                  // K and V, two buffers each
    static constexpr int PIECES = HD / 8;                 // 16-byte pieces per row
    static_assert((2 * BK * PIECES) % kThreads == 0, "whole copy passes");
};

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (nothing is read then).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
    const unsigned s = smem_u32(smem);
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
// d (16x8 f32) += a (16x16 f16, row) * b (16x8 f16, col)
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower column index
    return *reinterpret_cast<const unsigned*>(&h);
}

template <int HD>
__global__ void __launch_bounds__(kThreads) flash_attn_kernel(const FlashArgs p) {
    using T = FlashTile<HD>;
    constexpr int BK = T::BK, RS = T::RS, NT_S = BK / 8, NT_O = HD / 8, KS = HD / 16;
    extern __shared__ __align__(16) uint8_t fsm[];
    __shared__ int red_max[kWarps], red_min[kWarps];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int G = p.group, kvh = blockIdx.y, s = blockIdx.z;
    const int row_tiles = gridDim.x;
    const int rt = row_tiles - 1 - int(blockIdx.x);  // the longest rows (latest queries) first
    const int n_rows = p.n_q * G;
    const int r0 = rt * kFlashRows;

    // this thread's two rows (g and g + 8 of its warp)
    int qi[2], hh[2], qp[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int r = r0 + warp * 16 + g + 8 * k;
        qi[k] = r / G;
        hh[k] = kvh * G + r % G;
        qp[k] = r < n_rows ? p.pos[qi[k]] : -1;
    }
    // warp / block extent of the positions (smallest over valid rows, largest)
    int wmax = max(qp[0], qp[1]);
    int wmin = min(qp[0] < 0 ? INT_MAX : qp[0], qp[1] < 0 ? INT_MAX : qp[1]);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
        wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
    }
    if (lane == 0) {
        red_max[warp] = wmax;
        red_min[warp] = wmin;
    }
    __syncthreads();
    int bmax = red_max[0], bmin = red_min[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
        bmax = max(bmax, red_max[w]);
        bmin = min(bmin, red_min[w]);
    }

    const int W = p.window;
    const int k_begin = max(s * p.split_len, W > 0 ? bmin - W + 1 : 0);
    const int k_end = min(s * p.split_len + p.split_len, bmax + 1);  // exclusive; <= k_begin: no keys here

    // Q fragments (A operand): rows g / g+8, columns 16*ks + 2*tq (+1) and + 8
    unsigned qa[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            float2 lo = make_float2(0.f, 0.f), hi = lo;
            if (qp[k] >= 0) {
                const float* qr = p.q + size_t(qi[k]) * p.ldq + size_t(hh[k]) * HD + 16 * ks + 2 * tq;
                lo = *reinterpret_cast<const float2*>(qr);
                hi = *reinterpret_cast<const float2*>(qr + 8);
            }
            qa[ks][k] = pack_half2(lo.x, lo.y);
            qa[ks][2 + k] = pack_half2(hi.x, hi.y);
        }

    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    if (k_begin < k_end) {
        const int slot = p.slots[r0 / G];
        const size_t base = size_t(p.slot_off[slot]) + size_t(kvh) * HD;
        const __half* K = p.kc + base;
        const __half* V = p.vc + base;
        auto kbuf = [&](int b) { return fsm + size_t(b) * 2 * T::BUF; };
        auto vbuf = [&](int b) { return fsm + size_t(b) * 2 * T::BUF + T::BUF; };
        // rows of the tile at key k0 beyond the block's last key are zero-filled
        auto issue = [&](int k0, int b) {
            uint8_t* ks_ = kbuf(b);
            uint8_t* vs_ = vbuf(b);
#pragma unroll
            for (int c = threadIdx.x; c < 2 * BK * T::PIECES; c += kThreads) {
                const bool is_v = c >= BK * T::PIECES;
                const int rem = is_v ? c - BK * T::PIECES : c;
                const int row = rem / T::PIECES, piece = rem % T::PIECES;
                const int key = k0 + row;
                const bool ok = key < k_end;
                const __half* src = (is_v ? V : K) + (ok ? size_t(key) * p.kv_dim + piece * 8 : 0);
                cp_async16_zfill((is_v ? vs_ : ks_) + row * RS + piece * 16, src, ok);
            }
        };
        const float sl2 = p.scale_log2;
        issue(k_begin, 0);
        cp_async_commit();
        for (int k0 = k_begin, it = 0; k0 < k_end; k0 += BK, ++it) {
            const int b = it & 1;
            if (k0 + BK < k_end) issue(k0 + BK, b ^ 1);
            cp_async_commit();
            cp_async_wait1();
            __syncthreads();
            // else every row of this warp is past its last key, or (window) the tile is before
            // every row's first key
            if (k0 <= wmax && (W <= 0 || k0 + BK - 1 >= wmin - W + 1)) {
                // ---- S = Q Kᵀ (16 x BK per warp)
                float sc[NT_S][4];
#pragma unroll
                for (int n = 0; n < NT_S; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
                const unsigned kb = smem_u32(kbuf(b));
                const int mi = lane >> 3, mr = lane & 7;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                    for (int n2 = 0; n2 < NT_S / 2; ++n2) {
                        // matrices: (keys +0..7, dims +0..7), (keys +0..7, dims +8..15),
                        //           (keys +8..15, dims +0..7), (keys +8..15, dims +8..15)
                        const int key = 16 * n2 + (mi >> 1) * 8 + mr, dim = 16 * ks + (mi & 1) * 8;
                        unsigned b0, b1, b2, b3;
                        ldsm_x4(kb + key * RS + dim * 2, b0, b1, b2, b3);
                        mma16816(sc[2 * n2], qa[ks], b0, b1);
                        mma16816(sc[2 * n2 + 1], qa[ks], b2, b3);
                    }
                // ---- scale, mask, online softmax (rows g: elements 0,1; g+8: 2,3)
                const bool need_mask = k0 + BK - 1 > wmin || (W > 0 && k0 < wmax - W + 1);
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int n = 0; n < NT_S; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = sc[n][e] * sl2;
                        const int key = k0 + 8 * n + 2 * tq + (e & 1);
                        if (need_mask && (key > qp[e >> 1] || (W > 0 && key <= qp[e >> 1] - W))) x = -INFINITY;
                        sc[n][e] = x;
                        mx[e >> 1] = fmaxf(mx[e >> 1], x);
                    }
                float corr[2], mu[2];
#pragma unroll
                for (int k = 0; k < 2; ++k) {
                    mx[k] = fmaxf(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], 1));
                    mx[k] = fmaxf(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], 2));
                    const float m_new = fmaxf(m_run[k], mx[k]);
                    mu[k] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: exp2 of -inf stays 0
                    corr[k] = exp2f(m_run[k] - mu[k]);
                    m_run[k] = m_new;
                    l_run[k] *= corr[k];
                }
#pragma unroll
                for (int n = 0; n < NT_O; ++n) {
                    o[n][0] *= corr[0];
                    o[n][1] *= corr[0];
                    o[n][2] *= corr[1];
                    o[n][3] *= corr[1];
                }
#pragma unroll
                for (int n = 0; n < NT_S; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float pe = exp2f(sc[n][e] - mu[e >> 1]);
                        sc[n][e] = pe;
                        l_run[e >> 1] += pe;  // this thread's share; the row sum is reduced at the end
                    }
                // ---- O += P V: P's A fragments are S's accumulators of n-tiles 2kk, 2kk+1
                const unsigned vb = smem_u32(vbuf(b));
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    const unsigned pa[4] = {pack_half2(sc[2 * kk][0], sc[2 * kk][1]),
                                            pack_half2(sc[2 * kk][2], sc[2 * kk][3]),
                                            pack_half2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                            pack_half2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
                    for (int d2 = 0; d2 < NT_O / 2; ++d2) {
                        // matrices (transposed): (keys +0..7, dims +0..7), (keys +8..15, dims +0..7),
                        //                        (keys +0..7, dims +8..15), (keys +8..15, dims +8..15)
                        const int key = 16 * kk + (mi & 1) * 8 + mr, dim = 16 * d2 + (mi >> 1) * 8;
                        unsigned b0, b1, b2, b3;
                        ldsm_x4_t(vb + key * RS + dim * 2, b0, b1, b2, b3);
                        mma16816(o[2 * d2], pa, b0, b1);
                        mma16816(o[2 * d2 + 1], pa, b2, b3);
                    }
                }
            }
            __syncthreads();  // buffer b is refilled by the next iteration's copy
        }
    }

    // ---- row sums over the 4 threads of a row, then the output (or this split's partial)
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        l_run[k] += __shfl_xor_sync(0xffffffffu, l_run[k], 1);
        l_run[k] += __shfl_xor_sync(0xffffffffu, l_run[k], 2);
    }
    const bool split = p.n_splits > 1;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        if (qp[k] < 0) continue;
        float* dst;
        float f = 1.f;
        if (split) {
            const size_t pidx = (size_t(qi[k]) * p.n_head + hh[k]) * p.n_splits + s;
            dst = p.part_o + pidx * HD;
            if (tq == 0) p.part_ml[pidx] = make_float2(m_run[k] * 0.69314718055994531f, l_run[k]);  // m in natural-log units
        } else {
            dst = p.out + size_t(qi[k]) * p.ldo + size_t(hh[k]) * HD;
            f = 1.f / l_run[k];
        }
#pragma unroll
        for (int n = 0; n < NT_O; ++n)
            *reinterpret_cast<float2*>(dst + 8 * n + 2 * tq) = make_float2(o[n][2 * k] * f, o[n][2 * k + 1] * f);
    }
}

}  // namespace

bool flash_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

void flash_attention(const FlashArgs& a, int n_head_kv, cudaStream_t st, const char* what) {
    if (a.n_q <= 0) return;
    if (!flash_supported(a.head_dim) || a.group < 1 || a.n_splits < 1 || a.split_len % 64 != 0 ||
        a.ldq % 2 != 0 || a.ldo % 2 != 0)
        throw Error("flash_attention: unsupported shape (head_dim " + std::to_string(a.head_dim) + ", split_len " +
                    std::to_string(a.split_len) + ", ldq " + std::to_string(a.ldq) + ") for " + (what ? what : "?"));
    const int row_tiles = (a.n_q * a.group + kFlashRows - 1) / kFlashRows;
    const dim3 grid(row_tiles, n_head_kv, a.n_splits);
    if (a.head_dim == 64) {
        flash_attn_kernel<64><<<grid, kThreads, FlashTile<64>::SMEM, st>>>(a);
    } else {
        flash_attn_kernel<128><<<grid, kThreads, FlashTile<128>::SMEM, st>>>(a);
    }
    CUDA_LAUNCH_CHECK(std::string("flash_attn_kernel for ") + (what ? what : "?"));
}

}  // namespace cu
}  // namespace orcd
