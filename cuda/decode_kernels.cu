// decode_kernels.cu - the fused decode step of decode.cuh.
//
// Shared-memory layout of dec_qkv / dec_proj (dynamic, 16-byte aligned):
//   [0, smem_w)             staged weight rows (one or two ranges, each 16-aligned)
//   activation area          xf: float32, chunk c of 32 at c*36 floats (4 floats of padding:
//                                a lane per chunk reads float4s without bank conflicts)
//                            xq: two int8 code planes (q1, q2), chunk c at c*80 bytes
//                                (q1 at +0, q2 at +32, 16 bytes of padding)
//                            xd: float scale per chunk, xs: float sum of the chunk's x
//   (dec_qkv) 2*S floats of row dots for the RoPE epilogue
//
// Row dots: a warp per row, lane l takes chunks l, l+32, ...; for the int8
// types the chunk's dot is exact integer arithmetic (two dp4a sums, one per
// code plane: x ~ d*(q1 + q2/256)) times the weight and activation scales,
// float32 for the others. The warp sum uses xor shuffles
// so every lane holds the result.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <cooperative_groups.h>

#include "cuda_common.cuh"
#include "decode.cuh"
#include "warp.cuh"
#include "ggml_types.h"
#include "kernels.cuh"
#include "quant_common.cuh"

namespace orcd {
namespace cu {
namespace {

constexpr int NT = kDecThreads;
constexpr int NW = NT / 32;
constexpr int XF_STRIDE = kDecXfStride;
constexpr int XQ_STRIDE = kDecXqStride;

// ---------------------------------------------------------------- Hopper / Ampere helpers
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The PDL handshake of every decode kernel, after its weight copies are issued: wait for
// the previous kernel, and release the next one right after that (early: before the
// wait, so the successor's weight copy overlaps this kernel's whole run).
__device__ __forceinline__ void pdl_wait_release(int early) {
    if (early) pdl_trigger();
    pdl_wait();
    if (!early) pdl_trigger();
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const size_t g = __cvta_generic_to_global(gmem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
#else
    *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {  // all but the N most recent groups complete
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// cp_async_wait_group with a run-time count (0..4)
__device__ __forceinline__ void cp_async_wait_pending(int n) {
    switch (n) {
    case 0: cp_async_wait_group<0>(); break;
    case 1: cp_async_wait_group<1>(); break;
    case 2: cp_async_wait_group<2>(); break;
    case 3: cp_async_wait_group<3>(); break;
    default: cp_async_wait_group<4>(); break;
    }
}
__device__ __forceinline__ void cp_async_wait_older() { cp_async_wait_group<1>(); }  // all but the most recent group
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait_group<0>(); }

// Bulk copies (Hopper's copy engine, cp.async.bulk): bytes (a multiple of 16, both ends 16-byte
// aligned) from global into this block's shared memory, completing as transactions on an mbarrier.
// One thread arms the barrier with the bytes to expect (mbar_arm: init with one arrival, then that
// arrival with expect_tx) before a block barrier; then any thread may issue copies, and every
// thread that reads the data waits for phase 0 (mbar_wait).
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
#endif
}
// A barrier reused phase after phase (the lm_head's rings): mbar_init once (one arrival a phase),
// then per phase one mbar_expect (the bytes its copies bring) and copies; readers wait for the
// phase's parity (0, 1, 0, ...). Before a buffer that generic loads read is refilled by the copy
// engine, fence_proxy_async orders those reads before the async proxy's writes.
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
// CLUSTER: acquire at cluster scope, pairing with releases from other blocks of the cluster
// (st.async's completions); else at the block's scope (its own bulk copies)
template <bool CLUSTER = false>
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t done = 0;
    do {
        if constexpr (CLUSTER)
            asm volatile(
                "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                " selp.u32 %0, 1, 0, p;\n}"
                : "=r"(done)
                : "r"(smem_addr(bar)), "r"(parity)
                : "memory");
        else
            asm volatile(
                "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                : "=r"(done)
                : "r"(smem_addr(bar)), "r"(parity)
                : "memory");
    } while (!done);
#endif
}
__device__ __forceinline__ void mbar_fence_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// The one-phase use (the staging attention): init, fence, the arrival expecting `bytes`.
__device__ __forceinline__ void mbar_arm(uint64_t* bar, unsigned bytes) {
    mbar_init(bar);
    mbar_fence_init();
    mbar_expect(bar, bytes);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar) { mbar_wait_parity(bar, 0); }
// Thread 0 of the block stores the global timer (ns) in tr[i] and the SM's cycle counter in
// tr[kDecAttnTraceClock + i] (tr null: nothing; measuring only).
__device__ __forceinline__ void trace_mark(unsigned long long* tr, int i) {
    if (tr && threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        tr[i] = t;
        tr[kDecAttnTraceClock + i] = clock64();
    }
}
// ... the cycle counter alone, in field f
__device__ __forceinline__ void trace_cycles(unsigned long long* tr, int f) {
    if (tr && threadIdx.x == 0) tr[f] = clock64();
}


__host__ __device__ __forceinline__ size_t align16(size_t n) { return dec_align16(n); }

// ---------------------------------------------------------------- staging weight rows
// Rows [r0, r1) of w are contiguous bytes; copy them (widened to 16-byte
// boundaries: tensors start 256-aligned and their allocations are padded to
// 256, so the widened range stays inside) into dst, by the NTH threads of the
// block (NT) or of the calling warp (32). Returns the offset of row r0 inside dst
// and the bytes used (16-aligned) in *used.
template <int NTH = NT>
__device__ __forceinline__ int stage_rows(uint8_t* dst, const DTensor& w, int r0, int r1, int* used = nullptr) {
    const size_t a = size_t(r0) * size_t(w.row_bytes), b = size_t(r1) * size_t(w.row_bytes);
    const size_t A = a & ~size_t(15), B = (b + 15) & ~size_t(15);
    const uint8_t* src = w.w + A;
    const int n = int(B - A);
    for (int i = int(threadIdx.x % NTH) * 16; i < n; i += NTH * 16) cp_async16(dst + i, src + i);
    if (used) *used = n;
    return int(a - A);
}

// n floats (n % 4 == 0, 16-byte aligned) into shared memory with cp.async.
__device__ __forceinline__ void stage_floats(float* dst, const float* src, int n) {
    for (int i = threadIdx.x * 4; i < n; i += NT * 4) cp_async16(dst + i, src + i);
}

// ---------------------------------------------------------------- activations
struct Act {
    float* xf;
    int8_t* xq;
    float* xd;   // chunk scale d = max|x| / 127
    float* xs;   // chunk sum of x (float), for the min terms of Q4_1 and Q4_K
    float* red;  // NW floats
};

__device__ __forceinline__ Act carve_act(uint8_t* p, int n) {
    const int nch = n / 32;
    Act a;
    a.xf = reinterpret_cast<float*>(p);
    p += align16(size_t(nch) * XF_STRIDE * 4);
    a.xq = reinterpret_cast<int8_t*>(p);
    p += align16(size_t(nch) * XQ_STRIDE);
    a.xd = reinterpret_cast<float*>(p);
    p += align16(size_t(nch) * 4);
    a.xs = reinterpret_cast<float*>(p);
    p += align16(size_t(nch) * 4);
    a.red = reinterpret_cast<float*>(p);
    return a;
}
__device__ __forceinline__ int xf_idx(int e) { return (e >> 5) * XF_STRIDE + (e & 31); }

// xf holds the raw vector. The rmsnorm (when norm_w; the block's sum of squares
// first) is written back to xf, then the two int8 code planes of each 32-element
// chunk (when need_q8): with id = 127/max|x| and d = max|x|/127,
// q1 = rint(x*id), q2 = rint((x - q1*d)*id*256) clamped to +-127, so
// x ~ d*(q1 + q2/256) (no FMA contraction: the tests mirror it in NumPy).
// Eight threads per chunk, a float4 each (the chunk's max and sum by xor
// shuffles inside aligned groups of 8 lanes): the whole vector in n/(4*NT)
// rounds, which keeps this short latency-bound phase short. Ends with a barrier.
// NORM: the rmsnorm (1), none (0), norm_w says (-1); Q8: the codes are needed (1), not
// (0), need_q8 says (-1). Both are fixed per kernel instance where they can be: a
// kernel's code is fetched cold at every launch, so code it never runs still costs
// (the T_ANY note below).
template <int NORM, int Q8>
__device__ void finish_act(const Act& a, int n, const float* norm_w, float eps, int need_q8, float ss_part) {
    float scale = 1.f;
    const bool norm = NORM > 0 || (NORM < 0 && norm_w);
    if (norm) {
        const float ss = block_sum<NT>(ss_part, a.red);  // its barriers also publish xf
        scale = 1.0f / sqrtf(ss / float(n) + eps);
    } else {
        __syncthreads();
        if (Q8 == 0 || (Q8 < 0 && !need_q8)) return;
    }
    const int nq = n / 4;  // float4s; 8 per chunk
    for (int base = 0; base < nq; base += NT) {  // the same trip count in every warp: all lanes shuffle
        const int i = base + int(threadIdx.x);
        const bool ok = i < nq;
        const int c = i >> 3, k = i & 7;
        float4* x4 = reinterpret_cast<float4*>(a.xf + c * XF_STRIDE) + k;
        float4 q = ok ? *x4 : make_float4(0.f, 0.f, 0.f, 0.f);
        if (norm && ok) {
            const float4 w = reinterpret_cast<const float4*>(norm_w)[i];  // norm_w: staged in shared memory
            q = make_float4((q.x * scale) * w.x, (q.y * scale) * w.y, (q.z * scale) * w.z, (q.w * scale) * w.w);
            *x4 = q;
        }
        if (Q8 == 0 || (Q8 < 0 && !need_q8)) continue;
        float amax = fmaxf(fmaxf(fabsf(q.x), fabsf(q.y)), fmaxf(fabsf(q.z), fabsf(q.w)));
        float sum = (q.x + q.y) + (q.z + q.w);
#pragma unroll
        for (int off = 1; off < 8; off <<= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            sum += __shfl_xor_sync(0xffffffffu, sum, off);
        }
        const float d = amax / 127.0f;
        const float id = amax > 0.f ? 127.0f / amax : 0.f;
        const float xs4[4] = {q.x, q.y, q.z, q.w};
        uint32_t w1 = 0u, w2 = 0u;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float x = xs4[j];
            const int q1 = __float2int_rn(__fmul_rn(x, id));
            const float r = __fsub_rn(x, __fmul_rn(float(q1), d));
            const int q2 = min(127, max(-127, __float2int_rn(__fmul_rn(__fmul_rn(r, id), 256.0f))));
            w1 |= (uint32_t(q1) & 0xFFu) << (8 * j);
            w2 |= (uint32_t(q2) & 0xFFu) << (8 * j);
        }
        if (ok) {
            uint32_t* qw = reinterpret_cast<uint32_t*>(a.xq + c * XQ_STRIDE);
            qw[k] = w1;
            qw[8 + k] = w2;
            if (k == 0) {
                a.xd[c] = d;
                a.xs[c] = sum;
            }
        }
    }
    __syncthreads();
}

// Raw vector of n floats (n % 32 == 0, src 16-byte aligned) from global memory,
// written by an earlier kernel (read through L2): up to 8 float4 loads per
// thread in flight before the first use. Returns the thread's sum of squares.
__device__ __forceinline__ float load_act(const Act& a, const float* __restrict__ src, int n) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    const int n4 = n / 4;
    float ss = 0.f;
    for (int base = 0; base < n4; base += NT * 8) {
        float4 v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int i = base + threadIdx.x + k * NT;
            if (i < n4) v[k] = __ldcg(s4 + i);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int i = base + threadIdx.x + k * NT;
            if (i < n4) {
                const int e = 4 * i;
                *reinterpret_cast<float4*>(a.xf + (e >> 5) * XF_STRIDE + (e & 31)) = v[k];
                ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
            }
        }
    }
    return ss;
}

// The input vector with a pending residual add (DecPend, gemma3's post-norms): x + rmsnorm(o)*w,
// o's rmsnorm as the generic step's rmsnorm_rows ((o*scale)*w); block 0 of the calling kernel
// (`write`) also stores it to pd.out for the kernels after. Returns the thread's sum of squares
// of the result, as load_act. Only gemma3's kernel instances hold it (a call or a branch to it
// in the plain instances cost qwen2's step 14%: docs/perf_log.md run 58).
__device__ __forceinline__ float load_act_pend(const Act& a, const DecPend& pd, int n, float eps, bool write) {
    const float4* x4 = reinterpret_cast<const float4*>(pd.x);
    const float4* o4 = reinterpret_cast<const float4*>(pd.o);
    const float4* w4 = reinterpret_cast<const float4*>(pd.w);
    const int n4 = n / 4;
    float sso = 0.f;
    for (int i = threadIdx.x; i < n4; i += NT) {
        const float4 v = __ldcg(o4 + i);
        sso += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float sc = 1.0f / sqrtf(block_sum<NT>(sso, a.red) / float(n) + eps);
    float ss = 0.f;
    for (int i = threadIdx.x; i < n4; i += NT) {
        const float4 o = __ldcg(o4 + i), x = __ldcg(x4 + i), w = __ldg(w4 + i);
        const float4 r = make_float4(x.x + (o.x * sc) * w.x, x.y + (o.y * sc) * w.y, x.z + (o.z * sc) * w.z,
                                     x.w + (o.w * sc) * w.w);
        const int e = 4 * i;
        *reinterpret_cast<float4*>(a.xf + (e >> 5) * XF_STRIDE + (e & 31)) = r;
        if (write) reinterpret_cast<float4*>(pd.out)[i] = r;
        ss += r.x * r.x + r.y * r.y + r.z * r.z + r.w * r.w;
    }
    return ss;
}

// The input vector merged from `parts` partials of a multi-cluster attention (DecProjArgs'
// act_parts): element e = sum_c w_c src[c*n + e] / sum_c w_c l_c over the partials' (m_c, l_c)
// = ml[c*(n/hd) + e/hd], w_c = exp(m_c - max m); a part without keys has m = -inf (weight 0).
// One pass over groups of kGroup partials, every load of a group in flight at once (16
// partials' float4s would not fit the registers), the running sums rescaled when a group
// raises the maximum: with the usual 2-4 partials one round trip to L2, not two.
// Returns the thread's sum of squares, as load_act.
__device__ __forceinline__ float load_act_parts(const Act& a, const float* __restrict__ src, const float2* __restrict__ ml,
                                             int parts, int hd, int n) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    const int n4 = n / 4, heads = n / hd;
    float ss = 0.f;
    constexpr int kGroup = 4;
    for (int i = threadIdx.x; i < n4; i += NT) {
        const int e = 4 * i, h = e / hd;
        float M = -INFINITY, L = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int c0 = 0; c0 < parts; c0 += kGroup) {
            float2 m[kGroup];
            float4 v[kGroup];
#pragma unroll
            for (int c = 0; c < kGroup; ++c)
                if (c0 + c < parts) {
                    m[c] = __ldcg(ml + size_t(c0 + c) * heads + h);
                    v[c] = __ldcg(s4 + size_t(c0 + c) * n4 + i);
                } else {
                    m[c] = make_float2(-INFINITY, 0.f);
                    v[c] = make_float4(0.f, 0.f, 0.f, 0.f);
                }
            float Mg = M;
#pragma unroll
            for (int c = 0; c < kGroup; ++c) Mg = fmaxf(Mg, m[c].x);
            if (Mg == -INFINITY) continue;  // no keys so far: nothing to add
            const float r = expf(M - Mg);   // 0 while M is -inf
            L *= r;
            acc = make_float4(acc.x * r, acc.y * r, acc.z * r, acc.w * r);
#pragma unroll
            for (int c = 0; c < kGroup; ++c) {
                const float w = expf(m[c].x - Mg);  // 0 for a part without keys
                L += w * m[c].y;
                acc.x += w * v[c].x;
                acc.y += w * v[c].y;
                acc.z += w * v[c].z;
                acc.w += w * v[c].w;
            }
            M = Mg;
        }
        const float il = 1.0f / L;
        const float4 r = make_float4(acc.x * il, acc.y * il, acc.z * il, acc.w * il);
        *reinterpret_cast<float4*>(a.xf + (e >> 5) * XF_STRIDE + (e & 31)) = r;
        ss += r.x * r.x + r.y * r.y + r.z * r.z + r.w * r.w;
    }
    return ss;
}

// ---------------------------------------------------------------- chunk dots
// N consecutive 32-bit words from a 2-byte aligned shared-memory address: N+1 aligned
// word loads and a funnel shift each (the same instructions for either alignment, so
// lanes on differently aligned blocks do not diverge): the row dots of Q8_0/Q5_0/Q6_K
// blocks (34, 22, 210 bytes) are bound by these loads.
template <int N>
__device__ __forceinline__ void ld_words_a2(const uint8_t* p, uint32_t (&w)[N]) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* q = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    const uint32_t sh = uint32_t(a & 2u) * 8u;  // 0 or 16
    uint32_t t[N + 1];
#pragma unroll
    for (int k = 0; k <= N; ++k) t[k] = q[k];
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = __funnelshift_r(t[k], t[k + 1], sh);
}
// Bits 0..3 of h to bits 4, 12, 20, 28 (the fifth bit of four Q5 values): the copies
// of h shifted by 4, 11, 18 and 25 do not overlap, so the product has no carries and
// copy i puts bit i at 8i+4.
__device__ __forceinline__ uint32_t spread4_bit4(uint32_t h) { return ((h & 0xFu) * 0x02040810u) & 0x10101010u; }
__device__ __forceinline__ float ldh_s(const uint8_t* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }

// The two int8 code planes of activation chunk c (elements 4k..4k+3 in word k).
struct Codes {
    int q1[8], q2[8];
};
__device__ __forceinline__ Codes load_codes(const Act& a, int c) {
    const int4* p = reinterpret_cast<const int4*>(a.xq + c * XQ_STRIDE);
    const int4 v0 = p[0], v1 = p[1], v2 = p[2], v3 = p[3];
    Codes r;
    r.q1[0] = v0.x; r.q1[1] = v0.y; r.q1[2] = v0.z; r.q1[3] = v0.w;
    r.q1[4] = v1.x; r.q1[5] = v1.y; r.q1[6] = v1.z; r.q1[7] = v1.w;
    r.q2[0] = v2.x; r.q2[1] = v2.y; r.q2[2] = v2.z; r.q2[3] = v2.w;
    r.q2[4] = v3.x; r.q2[5] = v3.y; r.q2[6] = v3.z; r.q2[7] = v3.w;
    return r;
}
// sum over words k0..k1-1 of w·(q1 + q2/256): the weights' int8 values times the
// activation codes, exact in integers, in units of the chunk's scale d.
template <int K0, int K1>
__device__ __forceinline__ float dot_codes(const uint32_t (&w)[8], const Codes& x) {
    int s1 = 0, s2 = 0;
#pragma unroll
    for (int k = K0; k < K1; ++k) {
        s1 = __dp4a(int(w[k]), x.q1[k], s1);
        s2 = __dp4a(int(w[k]), x.q2[k], s2);
    }
    return float(s1) + float(s2) * (1.0f / 256.0f);
}

// 32 elements of chunk c of row rp (in shared memory, 2-byte aligned) · the
// activation chunk c.
template <uint32_t T>
__device__ __forceinline__ float chunk_dot(const uint8_t* rp, int c, int n_in, const Act& a) {
    if constexpr (T == T_Q8_0) {
        const uint8_t* b = rp + size_t(c) * 34;
        uint32_t w[8];
        ld_words_a2<8>(b + 2, w);
        return ldh_s(b) * a.xd[c] * dot_codes<0, 8>(w, load_codes(a, c));
    } else if constexpr (T == T_Q4_0 || T == T_Q5_0) {
        constexpr bool five = T == T_Q5_0;
        const uint8_t* b = rp + size_t(c) * (five ? 22 : 18);
        uint32_t qw[five ? 5 : 4];  // Q5_0: qh then the 16 bytes of nibbles; Q4_0: the nibbles
        ld_words_a2<five ? 5 : 4>(b + 2, qw);
        const uint32_t qh = five ? qw[0] : 0u;
        uint32_t w[8];  // words 0..3: elements 0..15 (low nibbles), 4..7: elements 16..31 (high nibbles)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t v = qw[(five ? 1 : 0) + k];
            uint32_t lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
            if constexpr (five) {
                // value - 16 = nibble - 16*(1 - fifth bit): a nibble whose fifth bit is clear
                // becomes the signed byte nibble | 0xF0 (no per-byte subtraction)
                w[k] = lo | (spread4_bit4(~(qh >> (4 * k))) * 15u);
                w[4 + k] = hi | (spread4_bit4(~(qh >> (16 + 4 * k))) * 15u);
            } else {
                w[k] = __vsub4(lo, 0x08080808u);
                w[4 + k] = __vsub4(hi, 0x08080808u);
            }
        }
        return ldh_s(b) * a.xd[c] * dot_codes<0, 8>(w, load_codes(a, c));
    } else if constexpr (T == T_Q4_1) {
        // value = d*q + m with q in 0..15: the min term uses the chunk's float sum (as Q4_K's).
        // 20-byte blocks: 4-byte aligned in a stage (row bytes and the stage offset are multiples
        // of 4), so the nibbles are four word loads
        const uint8_t* b = rp + size_t(c) * 20;
        const uint32_t* q4 = reinterpret_cast<const uint32_t*>(b + 4);
        uint32_t w[8];  // words 0..3: elements 0..15 (low nibbles), 4..7: elements 16..31 (high nibbles)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t v = q4[k];
            w[k] = v & 0x0F0F0F0Fu;
            w[4 + k] = (v >> 4) & 0x0F0F0F0Fu;
        }
        const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(b));
        return dm.x * a.xd[c] * dot_codes<0, 8>(w, load_codes(a, c)) + dm.y * a.xs[c];
    } else if constexpr (T == T_Q4_K) {
        // value = d*sc*q - dmin*mn with q in 0..15: the min term uses the chunk's float sum
        const uint8_t* b = rp + size_t(c >> 3) * 144;
        const int sub = c & 7, g = sub >> 1, hi = sub & 1;
        int sc, mn;
        k4_scale_min(b + Block<T_Q4_K>::scales, sub, sc, mn);
        // 144-byte blocks in rows staged 16-byte aligned (row bytes a multiple of 16): two
        // 16-byte loads
        const uint4* q4 = reinterpret_cast<const uint4*>(b + 16 + 32 * g);
        const uint4 v0 = q4[0], v1 = q4[1];
        const uint32_t raw[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        uint32_t w[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = (raw[k] >> (4 * hi)) & 0x0F0F0F0Fu;
        const float d = ldh_s(b) * float(sc), m = ldh_s(b + 2) * float(mn);
        return d * a.xd[c] * dot_codes<0, 8>(w, load_codes(a, c)) - m * a.xs[c];
    } else if constexpr (T == T_Q6_K) {
        const uint8_t* b = rp + size_t(c >> 3) * 210;
        const int j = c & 7, h = j >> 2, k = j & 3;
        uint32_t ql[8], qh[8];
        ld_words_a2<8>(b + 64 * h + 32 * (k & 1), ql);
        ld_words_a2<8>(b + 128 + 32 * h, qh);
        const int shift = 4 * (k >> 1);
        const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
        uint32_t w[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            uint32_t v = (ql[m] >> shift) & 0x0F0F0F0Fu;
            v |= ((qh[m] >> (2 * k)) & 0x03030303u) << 4;
            w[m] = __vsub4(v, 0x20202020u);
        }
        const Codes x = load_codes(a, c);
        const float sc0 = float(scales[8 * h + 2 * k]), sc1 = float(scales[8 * h + 2 * k + 1]);
        return ldh_s(b + 208) * a.xd[c] * (sc0 * dot_codes<0, 4>(w, x) + sc1 * dot_codes<4, 8>(w, x));
    } else if constexpr (T == T_F16) {
        const uint4* p = reinterpret_cast<const uint4*>(rp + size_t(c) * 64);
        const float* x = a.xf + c * XF_STRIDE;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint4 raw = p[i];
            const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
            const float4 xa = *reinterpret_cast<const float4*>(x + 8 * i);
            const float4 xb = *reinterpret_cast<const float4*>(x + 8 * i + 4);
            const float2 f0 = __half22float2(h2[0]), f1 = __half22float2(h2[1]);
            const float2 f2 = __half22float2(h2[2]), f3 = __half22float2(h2[3]);
            s += f0.x * xa.x + f0.y * xa.y + f1.x * xa.z + f1.y * xa.w + f2.x * xb.x + f2.y * xb.y + f3.x * xb.z +
                 f3.y * xb.w;
        }
        return s;
    } else {  // any other type through deq8, float32
        const float* x = a.xf + c * XF_STRIDE;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float w[8];
            deq8<T>(rp, int64_t(c) * 4 + i, n_in, w);
            const float4 xa = *reinterpret_cast<const float4*>(x + 8 * i);
            const float4 xb = *reinterpret_cast<const float4*>(x + 8 * i + 4);
            s += w[0] * xa.x + w[1] * xa.y + w[2] * xa.z + w[3] * xa.w + w[4] * xb.x + w[5] * xb.y + w[6] * xb.z +
                 w[7] * xb.w;
        }
        return s;
    }
}

template <uint32_t T>
__device__ __forceinline__ float row_dot_t(const uint8_t* rp, int n_in, const Act& a) {
    const int lane = threadIdx.x % 32, nch = n_in / 32;
    float acc = 0.f;
    for (int c = lane; c < nch; c += 32) acc += chunk_dot<T>(rp, c, n_in, a);
    return warp_sum(acc);
}
// Two rows of the same type at once (their shuffles interleave).
template <uint32_t T>
__device__ __forceinline__ float2 row_dot2_t(const uint8_t* rp0, const uint8_t* rp1, int n_in, const Act& a) {
    const int lane = threadIdx.x % 32, nch = n_in / 32;
    float a0 = 0.f, a1 = 0.f;
    for (int c = lane; c < nch; c += 32) {
        a0 += chunk_dot<T>(rp0, c, n_in, a);
        a1 += chunk_dot<T>(rp1, c, n_in, a);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a0 += __shfl_xor_sync(0xffffffffu, a0, off);
        a1 += __shfl_xor_sync(0xffffffffu, a1, off);
    }
    return make_float2(a0, a1);
}

#define ORCD_DEC_TYPES(X) \
    X(T_F32) X(T_F16) X(T_BF16) X(T_Q4_0) X(T_Q4_1) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) \
    X(T_Q5_K) X(T_Q6_K)

__device__ float row_dot(uint32_t type, const uint8_t* rp, int n_in, const Act& a) {
    switch (type) {
#define ORCD_RD(T) \
    case T: return row_dot_t<T>(rp, n_in, a);
        ORCD_DEC_TYPES(ORCD_RD)
#undef ORCD_RD
    default: return __int_as_float(0x7fc00000);  // unreachable: the host checks the types
    }
}
__device__ float2 row_dot2(uint32_t type, const uint8_t* rp0, const uint8_t* rp1, int n_in, const Act& a) {
    switch (type) {
#define ORCD_RD2(T) \
    case T: return row_dot2_t<T>(rp0, rp1, n_in, a);
        ORCD_DEC_TYPES(ORCD_RD2)
#undef ORCD_RD2
    default: return make_float2(__int_as_float(0x7fc00000), __int_as_float(0x7fc00000));
    }
}

// Kernel instances are specialised on the weight type (T_ANY: the generic
// instance, a switch per row). The specialised code is a fraction of the
// generic one's, so a kernel's cold start fetches far fewer instructions: Nsight
// Compute showed the warps of the 125-440 KB generic kernels stalled on
// instruction fetch for ~40% of their cycles.
constexpr uint32_t T_ANY = 0xFFFFFFFFu;
// Rows of this type are dotted with int8 activation codes (dp4a).
__host__ __device__ constexpr bool int8_row_type(uint32_t t) {
    return t == T_Q4_0 || t == T_Q4_1 || t == T_Q5_0 || t == T_Q8_0 || t == T_Q4_K || t == T_Q6_K;
}
// finish_act's Q8 for an instance whose rows have types a and b.
__host__ __device__ constexpr int q8_of(uint32_t a, uint32_t b) {
    return a == T_ANY || b == T_ANY ? -1 : (int8_row_type(a) || int8_row_type(b) ? 1 : 0);
}
template <uint32_t T>
__device__ __forceinline__ float row_dot_k(uint32_t type, const uint8_t* rp, int n_in, const Act& a) {
    if constexpr (T == T_ANY) return row_dot(type, rp, n_in, a);
    else return row_dot_t<T>(rp, n_in, a);
}
template <uint32_t T>
__device__ __forceinline__ float2 row_dot2_k(uint32_t type, const uint8_t* rp0, const uint8_t* rp1, int n_in,
                                             const Act& a) {
    if constexpr (T == T_ANY) return row_dot2(type, rp0, rp1, n_in, a);
    else return row_dot2_t<T>(rp0, rp1, n_in, a);
}

// The 8 elements 8u..8u+7 of a (global) row of any type.
__device__ void deq8_any(uint32_t type, const uint8_t* row, int64_t u, int64_t n, float (&o)[8]) {
    switch (type) {
    case T_F32: deq8<T_F32>(row, u, n, o); break;
    case T_F16: deq8<T_F16>(row, u, n, o); break;
    case T_BF16: deq8<T_BF16>(row, u, n, o); break;
    case T_Q4_0: deq8<T_Q4_0>(row, u, n, o); break;
    case T_Q4_1: deq8<T_Q4_1>(row, u, n, o); break;
    case T_Q5_0: deq8<T_Q5_0>(row, u, n, o); break;
    case T_Q5_1: deq8<T_Q5_1>(row, u, n, o); break;
    case T_Q8_0: deq8<T_Q8_0>(row, u, n, o); break;
    case T_Q2_K: deq8<T_Q2_K>(row, u, n, o); break;
    case T_Q3_K: deq8<T_Q3_K>(row, u, n, o); break;
    case T_Q4_K: deq8<T_Q4_K>(row, u, n, o); break;
    case T_Q5_K: deq8<T_Q5_K>(row, u, n, o); break;
    case T_Q6_K: deq8<T_Q6_K>(row, u, n, o); break;
    default:
        for (int i = 0; i < 8; ++i) o[i] = __int_as_float(0x7fc00000);
    }
}

__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// Rows [r0, r1) of a residual projection, staged in shared memory (row r0 at `rows`):
// y[r] = yold[r - r0] + row r · the activations, a warp per two rows.
template <uint32_t T>
__device__ __forceinline__ void resid_rows(const DTensor& w, const uint8_t* rows, int r0, int r1, const Act& a,
                                           const float* yold, float* y) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t rb = size_t(w.row_bytes);
    for (int r = r0 + warp; r < r1; r += 2 * NW) {
        const int r2 = r + NW;
        const uint8_t* p0 = rows + size_t(r - r0) * rb;
        float2 d;
        if (r2 < r1) d = row_dot2_k<T>(w.type, p0, rows + size_t(r2 - r0) * rb, w.n_in, a);
        else d = make_float2(row_dot_k<T>(w.type, p0, w.n_in, a), 0.f);
        if (lane == 0) {
            y[r] = yold[r - r0] + d.x;
            if (r2 < r1) y[r2] = yold[r2 - r0] + d.y;
        }
    }
}

// ---------------------------------------------------------------- dec_qkv
// TQK: the type of the q and k rows, TV: of the v rows (T_ANY: any). GEMMA: the embedding
// scale, the pending post-norm add (DecPend) and q/k left raw for dec_qk_norm. EMBED: layer 0,
// whose input is the token's embedding row (of any type: its dequantisation is a
// switch over all types, kept out of the other layers' instances).
template <uint32_t TQK, uint32_t TV, bool EMBED, bool GEMMA>
__global__ void __launch_bounds__(NT, 3) dec_qkv_kernel(const DecQkvArgs p) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int hd = p.head_dim, half = hd / 2;
    const int hb = blockIdx.x / p.parts, part = blockIdx.x % p.parts;
    int tt, hl;
    if (hb < p.n_head) {
        tt = 0;
        hl = hb;
    } else if (hb < p.n_head + p.n_head_kv) {
        tt = 1;
        hl = hb - p.n_head;
    } else {
        tt = 2;
        hl = hb - p.n_head - p.n_head_kv;
    }
    const DTensor w = tt == 0 ? p.w[0] : (tt == 1 ? p.w[1] : p.w[2]);
    const float* bias = tt == 0 ? p.bias[0] : (tt == 1 ? p.bias[1] : p.bias[2]);
    const int i0 = part * p.S;
    const int n = min(p.S, half - i0);
    // Pair i of this head: rows (lo0 + i*step, hi0 + i*step), rotated together by RoPE. NEOX
    // pairs a row with the one half a head on; llama's normal pairing, its neighbour.
    const bool normal = p.rope_normal;
    const int step = normal ? 2 : 1;
    const int lo0 = hl * hd + i0 * step, hi0 = normal ? lo0 + 1 : lo0 + half;

    // Before the wait: everything that does not depend on the previous kernel. The
    // norm weights (group 0) and this block's weight rows (group 1) start copying;
    // the biases and RoPE factors of this thread's pair are read (the state is
    // stable during a step: see dec_attn_kernel).
    float* nw = reinterpret_cast<float*>(smem + p.smem_w);
    stage_floats(nw, p.norm_w, p.n_embd);
    cp_async_commit();
    // NEOX: the two runs of n rows staged one after the other; normal: the 2n interleaved rows at once
    int used0, used1 = 0;
    const int off0 = stage_rows(smem, w, lo0, lo0 + n * step, &used0);
    uint8_t* base1 = normal ? smem : smem + used0;
    const int off1 = normal ? off0 + int(w.row_bytes) : stage_rows(base1, w, hi0, hi0 + n, &used1);
    cp_async_commit();
    const int pos = p.st->pos, slot = p.st->slot;
    float b0 = 0.f, b1 = 0.f;
    float2 cs = make_float2(1.f, 0.f);
    if (threadIdx.x < n) {
        if (bias) {
            b0 = __ldg(bias + lo0 + threadIdx.x * step);
            b1 = __ldg(bias + hi0 + threadIdx.x * step);
        }
        if (tt < 2 && !GEMMA) cs = __ldg(p.rope + size_t(pos) * half + i0 + threadIdx.x);
    }
    pdl_wait_release(p.pdl_early);

    Act a = carve_act(smem + p.smem_w + align16(size_t(p.n_embd) * 4), p.n_embd);
    float* dots =
        reinterpret_cast<float*>(smem + p.smem_w + align16(size_t(p.n_embd) * 4) + dec_act_bytes(p.n_embd));
    float ss = 0.f;
    if constexpr (EMBED) {
        const uint8_t* row = p.emb.w + size_t(p.st->token) * size_t(p.emb.row_bytes);
        const int units = p.n_embd / 8;
        for (int u = threadIdx.x; u < units; u += NT) {
            float v[8];
            deq8_any(p.emb.type, row, u, p.n_embd, v);
            const int e0 = u * 8;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if constexpr (GEMMA) v[i] *= p.embd_scale;
                a.xf[xf_idx(e0 + i)] = v[i];
                ss += v[i] * v[i];
            }
            if (blockIdx.x == 0) {
#pragma unroll
                for (int i = 0; i < 8; ++i) p.x[e0 + i] = v[i];
            }
        }
    } else if constexpr (GEMMA) {
        ss = load_act_pend(a, p.pend, p.n_embd, p.eps, blockIdx.x == 0);
    } else {
        ss = load_act(a, p.x, p.n_embd);
    }
    cp_async_wait_older();  // the norm weights
    finish_act<1, q8_of(TQK, TV)>(a, p.n_embd, nw, p.eps, p.need_q8, ss);
    cp_async_wait_all();
    __syncthreads();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = warp; j < n; j += NW) {  // pair j: rows lo0 + j*step and hi0 + j*step together
        const uint8_t* r0 = smem + off0 + size_t(j * step) * w.row_bytes;
        const uint8_t* r1 = base1 + off1 + size_t(j * step) * w.row_bytes;
        const float2 dt = tt < 2 ? row_dot2_k<TQK>(w.type, r0, r1, p.n_embd, a) : row_dot2_k<TV>(w.type, r0, r1, p.n_embd, a);
        if (lane == 0) {
            dots[j] = dt.x;
            dots[n + j] = dt.y;
        }
    }
    __syncthreads();
    if (threadIdx.x < n) {
        const int j = threadIdx.x, i = i0 + j;
        float x0 = dots[j] + b0, x1 = dots[n + j] + b1;
        if (tt < 2 && !GEMMA) {  // RoPE with the engine's table: (cos, sin) of pos * base^(-2i/hd), from double
            const float y0 = x0 * cs.x - x1 * cs.y;
            const float y1 = x0 * cs.y + x1 * cs.x;
            x0 = y0;
            x1 = y1;
        }
        const int c0 = normal ? 2 * i : i, c1 = normal ? c0 + 1 : i + half;  // the pair's columns in the head
        if (GEMMA && tt == 1) {  // dec_qk_norm norms, ropes and stores it
            p.k_raw[hl * hd + c0] = x0;
            p.k_raw[hl * hd + c1] = x1;
        } else if (tt == 0) {
            p.q_out[hl * hd + c0] = x0;
            p.q_out[hl * hd + c1] = x1;
        } else {
            __half* dst = (tt == 1 ? p.kc : p.vc) + size_t(p.slot_off[slot]) + size_t(pos) * p.kv_dim + hl * hd;
            dst[c0] = __float2half_rn(x0);
            dst[c1] = __float2half_rn(x1);
        }
    }
}

// ---------------------------------------------------------------- dec_qk_norm
// gemma3: block h normalises head h of q (h < n_head, in place) or of k_raw (the KV heads
// after), each with its [head_dim] weight (rmsnorm over the head, (x*scale)*w as the generic
// step's rmsnorm_rows), then RoPE with the layer's table as dec_qkv would have; k goes to
// the cache at pos as fp16.
__global__ void __launch_bounds__(NT) dec_qk_norm_kernel(const DecQkNormArgs p) {
    __shared__ float red[NW];
    const int hd = p.head_dim, half = hd / 2;
    const bool is_q = int(blockIdx.x) < p.n_head;
    const int hl = is_q ? int(blockIdx.x) : int(blockIdx.x) - p.n_head;
    const float* wn = is_q ? p.q_norm : p.k_norm;
    const int pos = p.st->pos, slot = p.st->slot;  // stable during a step (dec_attn_kernel)
    const bool normal = p.rope_normal;
    pdl_wait_release(0);
    const float* src = is_q ? p.q + size_t(hl) * hd : p.k_raw + size_t(hl) * hd;
    float ss = 0.f;
    for (int i = threadIdx.x; i < half; i += NT) {
        const int c0 = normal ? 2 * i : i, c1 = normal ? c0 + 1 : i + half;
        const float x0 = __ldcg(src + c0), x1 = __ldcg(src + c1);
        ss += x0 * x0 + x1 * x1;
    }
    const float sc = 1.0f / sqrtf(block_sum<NT>(ss, red) / float(hd) + p.eps);
    for (int i = threadIdx.x; i < half; i += NT) {  // each pair read and written by one thread
        const int c0 = normal ? 2 * i : i, c1 = normal ? c0 + 1 : i + half;
        const float y0 = (__ldcg(src + c0) * sc) * __ldg(wn + c0), y1 = (__ldcg(src + c1) * sc) * __ldg(wn + c1);
        const float2 cs = __ldg(p.rope + size_t(pos) * half + i);
        const float r0 = y0 * cs.x - y1 * cs.y, r1 = y0 * cs.y + y1 * cs.x;
        if (is_q) {
            p.q[size_t(hl) * hd + c0] = r0;
            p.q[size_t(hl) * hd + c1] = r1;
        } else {
            __half* dst = p.kc + size_t(p.slot_off[slot]) + size_t(pos) * p.kv_dim + size_t(hl) * hd;
            dst[c0] = __float2half_rn(r0);
            dst[c1] = __float2half_rn(r1);
        }
    }
}

// ---------------------------------------------------------------- dec_attn
// Block (split s, KV head kvh): the G = n_head/n_head_kv query heads of kvh
// over keys [s*S, min((s+1)*S, kv_len)), S chosen from kv_len so at most
// max_splits blocks per KV head have work. Tiles of kDecTK keys: the tile's K
// and V rows are copied to shared memory (cp.async, rows padded by 16 bytes
// against bank conflicts), then thread per (head, key) score, a warp per head
// for the online softmax, thread per (head, dim) output. The last block to
// finish merges all splits of all heads.
__host__ __device__ inline int dec_attn_row_stride(int hd) { return hd * 2 + 16; }

// This thread's share of every K/V tile copy: 16-byte piece `piece` of the rows r0,
// r0 + rstep, ... (hd/8 pieces a row, NT/(hd/8) rows a pass). Computed once per kernel,
// so the divisions stay out of the three inlined copies (kernel code is fetched cold).
struct KvPart {
    int piece, r0, rstep;
};
__device__ __forceinline__ KvPart kv_part(int hd) {
    const int pieces = hd / 8;
    return KvPart{int(threadIdx.x) % pieces, int(threadIdx.x) / pieces, NT / pieces};
}
// Copies rows [j0, j1) of a K/V tile (rows of hd halves, kv_dim apart in the cache)
// into shared memory rows of rs bytes: 16-byte cp.async pieces (hd % 8 == 0), the K
// rows as rows 0..n-1 of the pass, the V rows as n..2n-1.
__device__ __forceinline__ void stage_kv(uint8_t* ks, uint8_t* vs, const __half* K, const __half* V, int kv_dim,
                                         int tile, int j0, int j1, int rs, const KvPart& kp) {
    const int n = j1 - j0;
    if (kp.r0 >= kp.rstep) return;  // beyond the last whole row of pieces of a pass
    for (int r = kp.r0; r < 2 * n; r += kp.rstep) {
        const bool v = r >= n;
        const int j = j0 + (v ? r - n : r);
        cp_async16((v ? vs : ks) + j * rs + 16 * kp.piece, (v ? V : K) + size_t(tile + j) * kv_dim + 8 * kp.piece);
    }
}

// Shared-memory bytes of the tile phase: q, scores, (m, l, corr), the K/V tile ring.
__host__ __device__ inline size_t dec_attn_tile_bytes(int G, int hd) {
    return dec_align16(size_t(G * hd + G * kDecTK + 3 * G) * 4) +
           size_t(kDecAttnBufs) * 2 * kDecTK * dec_attn_row_stride(hd);
}

// ---- the tile phase on tensor cores (the global merge's and the cluster variant's)
// Rows of the m16n8k16 products are the G <= 16 query heads of the KV head (rows
// G..15 zero); each warp takes tiles of 16 keys (warp w: tiles w, w + NW, ...) and
// reads K and V in 16-byte pieces, from global memory or (staged) shared memory:
//   S = Q·Kᵀ: the head dimension is summed in a permuted order (thread t of a quad
//     loads dims 32c + 8t .. + 7 of its key; the Q fragments use the same order), so
//     every K load is 16 contiguous bytes and a warp's load covers whole rows;
//   O += P·V: the output dimension of n-tile (64cb + m) of thread group g is
//     64cb + 8g + m... so a thread loads dims 64cb + 8g .. + 7 of its 4 keys and
//     pairs the halves of two keys with __byte_perm.
// Q and P enter as fp16 hi + lo pairs (x = hi + lo to ~2^-22), so the products keep
// float32 accuracy (K and V are fp16 already; mma accumulates in float32).
// Per warp an online softmax (base 2); the block's warps merge in shared memory
// into one partial (acc, m in natural-log units, l) as the CUDA-core phase leaves it.
constexpr int kDecMmaTK = 16;  // keys per warp tile
// floats between rows of the warps' partial outputs (wo_col says why the padding)
__host__ __device__ constexpr int wo_stride(int hd) { return hd + hd / 4; }
// Shared memory of the phase: Q fragments (hi, lo) per lane, the warps' (m, l) and outputs.
__host__ __device__ inline size_t dec_attn_mma_bytes(int G, int hd) {
    return size_t(hd / 16) * 32 * 32 + size_t(NW) * 16 * 8 + size_t(NW) * G * wo_stride(hd) * 4;
}
// The cluster variant's partial (acc, then (m, l)) sits past both tile phases' areas.
__host__ __device__ inline size_t dec_attn_part_off(int G, int hd) {
    const size_t a = dec_attn_tile_bytes(G, hd), b = dec_attn_mma_bytes(G, hd);
    return dec_align16(a > b ? a : b);
}

// The staging instances (DecAttnArgs::stage): past the tile phase's area an mbarrier (16 bytes),
// then `stage` K rows and `stage` V rows of dec_attn_row_stride(hd) bytes (the 16 bytes of
// padding put the tile phase's 16-byte V loads, 4 keys x 2 pieces a quarter warp, on distinct
// banks, and its K loads at most 2-way), then the push merge's buffers.
__host__ __device__ inline size_t dec_attn_stage_off(int G, int hd) { return dec_align16(dec_attn_mma_bytes(G, hd)); }
// The push merge's slice: the outputs a block of the cluster merges, a multiple of 4 (a sender's
// 16-byte stores of four outputs fall in one block's slice, 16-byte aligned)
__host__ __device__ inline int dec_push_slice(int GH, int cs) { return ((GH + cs - 1) / cs + 3) & ~3; }
// The push merge's receive buffers (ClusterPush), past the staged rows: its mbarrier (16 bytes), recv_o
// [cs][slice] floats (cs * slice < G*hd + 4*cs) then recv_ml [cs][G] float2, for clusters of up to
// kDecAttnClusterMax blocks.
__host__ __device__ inline size_t dec_attn_recv_floats(int G, int hd) {
    return size_t(G * hd + 4 * kDecAttnClusterMax);  // a multiple of 4: recv_ml stays 16-byte aligned
}
// The lean instances (MHD) hold only the tile phase's area, the staged rows (STAGE) and these
// buffers: none of the CUDA-core ring, the global merge's area or a local partial, so their blocks
// leave more of an SM's shared memory to the kernels launched beside them.
__host__ __device__ inline size_t dec_attn_recv_off(int G, int hd, int stage) {
    return dec_align16(dec_attn_stage_off(G, hd) + (stage > 0 ? 16 + size_t(2) * stage * dec_attn_row_stride(hd) : 0));
}
__host__ __device__ inline size_t dec_attn_recv_end(int G, int hd, int stage) {
    return dec_attn_recv_off(G, hd, stage) + 16 + dec_attn_recv_floats(G, hd) * 4 + size_t(kDecAttnClusterMax) * G * 8;
}

__device__ __forceinline__ void mma_f16(float* d, const uint4& a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned h2u(__half2 h) { return *reinterpret_cast<unsigned*>(&h); }
// (x, y) as fp16 hi and lo words: x = hi.x + lo.x to about 2^-22 relative
__device__ __forceinline__ void split_half2(float x, float y, unsigned& hi, unsigned& lo) {
    const __half2 h = __floats2half2_rn(x, y);
    const float2 hf = __half22float2(h);
    hi = h2u(h);
    lo = h2u(__floats2half2_rn(x - hf.x, y - hf.y));
}
__device__ __forceinline__ uint4 ld_kv16(const __half* p, bool ok) {
    return ok ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}

// Where output dim d of query row `row` sits in a warp's rows of wo (the warps' partial outputs),
// rows wo_stride(HD) floats apart. One store of the mma layout covers 8 rows (lane group g) x 4
// dims 16 apart (lane t), which in plain rows of HD floats (a multiple of 32) fall on 2 banks:
// 16-way conflicts, 59% of the kernel's shared-memory wavefronts in excess under Nsight Compute.
// Shifted by 2*(row & 7) + d/32 within padded rows, the 32 lanes of a store land on 32 banks, and so
// do a warp's reads of 32 consecutive dims of one row (the merge). The shift only grows with d
// (no wrap-around inside the row), so each thread's stores keep one base address plus constant
// offsets: no per-store index arithmetic in the unrolled store loop.
__device__ __forceinline__ int wo_col(int row, int d) { return d + 2 * (row & 7) + (d >> 5); }

// The lean cluster instances' merge (MHD): each block pushes its partial's outputs straight into
// the shared memory of the block that merges them (rank o / slice takes outputs [rank*slice, ...)):
// recv_o[src*slice + j] and recv_ml[src*G + g] (max in natural-log units, l) of source rank src.
// The stores are st.async, each counting its bytes on the receiving block's mbarrier (bar), which
// expects every sender's bytes: a block waits for what it merges, not for the whole cluster (no
// second cluster barrier, and no GPU-scope fence a release barrier would put before it). No block
// reads another's memory, so none waits for the others before it leaves (the pull merge reads
// remote partials after one barrier and holds every block until a second).
struct ClusterPush {
    float* recv_o;
    float2* recv_ml;
    uint64_t* bar;
    int slice, cs, rank;
};
// The address of p (this block's shared memory) in block `rank` of the cluster (shared::cluster)
__device__ __forceinline__ uint32_t cluster_addr(const void* p, int rank) {
    uint32_t a = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
#endif
    return a;
}
// Stores into another block's shared memory whose bytes complete on its mbarrier `bar` (both
// shared::cluster addresses)
__device__ __forceinline__ void st_async(uint32_t addr, float4 v, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(addr),
                 "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
                 "r"(__float_as_uint(v.w)), "r"(bar)
                 : "memory");
#endif
}
__device__ __forceinline__ void st_async(uint32_t addr, float2 v, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(addr),
                 "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(bar)
                 : "memory");
#endif
}
// The first phase of the cluster barrier, which only says that a block has started (no data to
// publish: relaxed, so no GPU-scope fence before it)
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// Keys [start, end) (start < end) of the slot's KV head: key j's K row at K + (j - key0)*kstride
// halves (the cache: key0 0, kstride kv_dim; SMEM: the block's staged rows, key0 = start, which
// bulk copies fill: bar, when non-null, completes when they have landed); pos: the step's row (the last key); p.q: the G heads'
// query rows (float32, unscaled). Head g's result goes to acc + g*acc_stride (hd floats): acc /
// l when direct, else the unnormalised acc and ml[g*ml_stride] = (max in natural-log units, l).
// tr: the block's trace record (dec_attn_kernel), or null. PUSH (not direct): the partial goes
// to the cluster's merging blocks (ClusterPush) once every block of the cluster has started (the
// kernel's first cluster barrier phase, which this waits for). EARLY (HD 64 from the cache): called
// before the kernel's wait, which it does itself once the warps' first two tiles are in flight.
// PK (G <= 8): a head's fp16 hi and lo halves share one mma: the query's hi in A row g and its lo
// in row g + 8 (S's row g + 8 is the lo product of head g, added to row g), and likewise P's hi
// and lo in the P V product, so a tile takes 16 mma instead of 32 (the same products and float
// sums; without PK the rows are 16 heads, hi and lo each an mma of its own).
template <int HD, bool SMEM, bool PUSH = false, bool EARLY = false, bool PK = false>
__device__ void dec_attn_mma_phase(const DecAttnArgs& p, const __half* K, const __half* V, size_t kstride, int key0,
                                   int start, int end, int pos, int G, int kvh, uint8_t* sm, bool direct, float* acc,
                                   size_t acc_stride, float2* ml, size_t ml_stride, uint64_t* bar,
                                   unsigned long long* tr, const ClusterPush& pu = ClusterPush{}) {
    constexpr int KS = HD / 16, NTO = HD / 8;
    static_assert(HD >= kDecAttnClusterMax, "the push merge sends (m, l) from one thread a rank");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    uint4* qf = reinterpret_cast<uint4*>(sm);                          // [KS][2][32]: hi, lo (PK: [KS][32])
    float* wm = reinterpret_cast<float*>(sm + size_t(KS) * 32 * 32);   // [NW][16]
    float* wl = wm + NW * 16;                                          // [NW][16]
    float* wo = wl + NW * 16;                                          // [NW][G][wo_stride(HD)]
    const float sl2 = p.scale * 1.4426950408889634f;
    // This thread's K and V pieces of a tile: V rows of keys 2t, 2t+1, 2t+8, 2t+9 (dims
    // 64cb + 8g ..), K rows of keys 8j + g (dims 32c + 8t ..); keys from lim on read as zeros.
    // PIPE (head_dim 64: the registers allow it): the next tile's pieces are loaded while
    // this one is computed, so a warp's loads overlap its math instead of waiting on each tile.
    constexpr bool PIPE = HD == 64;
    // (Without PIPE each K piece is loaded where it is used: fewer live registers.)
    auto load_v = [&](int tile, uint4 (&vr)[HD / 64][4], int lim) {
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int key = tile + 2 * t + (r & 1) + 8 * (r >> 1);
                vr[cb][r] = ld_kv16(V + size_t(key - key0) * kstride + 64 * cb + 8 * g, key < lim);
            }
    };
    auto load_k = [&](int tile, int c, int j, int lim) {
        const int key = tile + 8 * j + g;
        return ld_kv16(K + size_t(key - key0) * kstride + 32 * c + 8 * t, key < lim);
    };
    constexpr int KP = PIPE ? HD / 32 : 1;  // K pieces held across iterations (PIPE only)
    // PIPE: the warp's tile (vr, kr_all) and its next one (it + NW: vn, kn), whose loads are in
    // flight while this one is computed
    uint4 vr[HD / 64][4], kr_all[KP][2], vn[HD / 64][4], kn[KP][2];
    // the warp's first two tiles (PIPE: both preloaded; a warp past the last tile has none)
    const int tile0 = start + warp * kDecMmaTK, tile1 = tile0 + NW * kDecMmaTK;
    const bool has_tile = tile0 < end, has_next = tile1 < end;
    auto load_tile = [&](int tile, uint4 (&v)[HD / 64][4], uint4 (&k)[KP][2], int lim) {
        load_v(tile, v, lim);
#pragma unroll
        for (int c = 0; c < KP; ++c)
#pragma unroll
            for (int j = 0; j < 2; ++j) k[c][j] = load_k(tile, c, j, lim);
    };
    auto preload = [&](int lim) {
        load_tile(tile0, vr, kr_all, lim);
        if (has_next) load_tile(tile1, vn, kn, lim);
    };
    // PIPE from the cache: the warp's first two tiles are in flight while the query is prepared
    // (a load's latency is longer than a tile's math: issued only with the first tile's math, the
    // second arrives late, docs/perf_log.md run 68). EARLY: even before the
    // kernel's wait (the previous kernel still running), the rows before pos only (earlier steps
    // wrote them; the state is stable during a step); after the wait the pieces of row pos, which
    // dec_qkv has just written, are loaded again.
    if constexpr (PIPE && !SMEM) {
        if (has_tile) preload(EARLY ? min(end, pos) : end);
    }
    if constexpr (EARLY) {
        static_assert(!EARLY || (PIPE && !SMEM), "EARLY: the preload from the cache");
        pdl_wait_release(p.pdl_early);
        trace_mark(tr, 1);
        // row pos, when in one of the two preloaded tiles (inside the block's keys)
        auto reload_pos = [&](int tile, uint4 (&v)[HD / 64][4], uint4 (&k)[KP][2]) {
            if (pos >= tile && pos < min(end, tile + kDecMmaTK)) {
#pragma unroll
                for (int cb = 0; cb < HD / 64; ++cb)
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        if (tile + 2 * t + (r & 1) + 8 * (r >> 1) == pos)
                            v[cb][r] = ld_kv16(V + size_t(pos - key0) * kstride + 64 * cb + 8 * g, true);
#pragma unroll
                for (int c = 0; c < KP; ++c)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        if (tile + 8 * j + g == pos) k[c][j] = ld_kv16(K + size_t(pos - key0) * kstride + 32 * c + 8 * t, true);
            }
        };
        if (has_tile) reload_pos(tile0, vr, kr_all);
        if (has_next) reload_pos(tile1, vn, kn);
    }
    // Q fragments in the permuted dimension order (k-step 2c: dims 32c+8t + 0..3, 2c+1: + 4..7)
    for (int i = threadIdx.x; i < KS * 32; i += NT) {
        const int ks = i / 32, ln = i % 32, gg = ln >> 2, tt = ln & 3;
        const int d0 = 32 * (ks / 2) + 8 * tt + 4 * (ks & 1);
        float x[2][4];
        if constexpr (PK) {  // head gg's hi in row gg, its lo in row gg + 8
            for (int e = 0; e < 4; ++e) x[0][e] = gg < G ? __ldcg(p.q + size_t(kvh * G + gg) * HD + d0 + e) * sl2 : 0.f;
            uint4 f;
            split_half2(x[0][0], x[0][1], f.x, f.y);  // rows g, g+8: cols 2t, 2t+1
            split_half2(x[0][2], x[0][3], f.z, f.w);  // cols 2t+8, 2t+9
            qf[ks * 32 + ln] = f;
        } else {
            for (int r = 0; r < 2; ++r) {
                const int row = gg + 8 * r;
                for (int e = 0; e < 4; ++e)
                    x[r][e] = row < G ? __ldcg(p.q + size_t(kvh * G + row) * HD + d0 + e) * sl2 : 0.f;
            }
            uint4 hi, lo;
            split_half2(x[0][0], x[0][1], hi.x, lo.x);  // row g, cols 2t, 2t+1
            split_half2(x[1][0], x[1][1], hi.y, lo.y);  // row g+8
            split_half2(x[0][2], x[0][3], hi.z, lo.z);  // row g, cols 2t+8, 2t+9
            split_half2(x[1][2], x[1][3], hi.w, lo.w);  // row g+8
            qf[(ks * 2) * 32 + ln] = hi;
            qf[(ks * 2 + 1) * 32 + ln] = lo;
        }
    }
    __syncthreads();
    if (SMEM && bar) mbar_wait(bar);
    if constexpr (PIPE && SMEM) {  // the staged rows have landed
        if (has_tile) preload(end);
    }
    trace_mark(tr, 2);

    float o[NTO][4];
#pragma unroll
    for (int n = 0; n < NTO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    const int n_tiles = (end - start + kDecMmaTK - 1) / kDecMmaTK;
    for (int it = warp; it < n_tiles; it += NW) {
        const int tile = start + it * kDecMmaTK;
        if (!PIPE) load_v(tile, vr, end);
        // ---- S (16 heads x 16 keys): n-tile j holds keys tile + 8j + (0..7), thread's key tile + 8j + g
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int c = 0; c < HD / 32; ++c) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint4 kr = PIPE ? kr_all[PIPE ? c : 0][j] : load_k(tile, c, j, end);
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // k-step 2c + h: words (x, y) or (z, w)
                    const unsigned b0 = h ? kr.z : kr.x, b1 = h ? kr.w : kr.y;
                    if constexpr (PK) {
                        mma_f16(sc[j], qf[(2 * c + h) * 32 + lane], b0, b1);
                    } else {
                        mma_f16(sc[j], qf[((2 * c + h) * 2) * 32 + lane], b0, b1);
                        mma_f16(sc[j], qf[((2 * c + h) * 2 + 1) * 32 + lane], b0, b1);
                    }
                }
            }
        }
        uint4 pa_hi, pa_lo;  // P's A operand (PK: hi and lo rows in pa_hi; else the hi and lo halves)
        if constexpr (PK) {
            // ---- head g's scores: row g (the query's hi) plus row g + 8 (its lo); online softmax
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = tile + 8 * j + 2 * t + e;
                    sc[j][e] = key < end ? sc[j][e] + sc[j][e + 2] : -INFINITY;
                    mx = fmaxf(mx, sc[j][e]);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[0], mx);  // finite: key `tile` is < end
            const float corr = exp2f(m_run[0] - m_new);
            m_run[0] = m_new;
            l_run[0] *= corr;
#pragma unroll
            for (int n = 0; n < NTO; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[n][e] *= corr;  // rows g and g + 8: both head g's
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    sc[j][e] = exp2f(sc[j][e] - m_new);
                    l_run[0] += sc[j][e];
                }
            // P's hi in A row g, its lo in row g + 8: O's row g + 8 gathers the lo products
            split_half2(sc[0][0], sc[0][1], pa_hi.x, pa_hi.y);  // keys 2t, 2t+1
            split_half2(sc[1][0], sc[1][1], pa_hi.z, pa_hi.w);  // keys 2t+8, 2t+9
        } else {
            // ---- online softmax per row (rows g: elements 0, 1; g+8: 2, 3)
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = tile + 8 * j + 2 * t + (e & 1);
                    if (key >= end) sc[j][e] = -INFINITY;
                    mx[e >> 1] = fmaxf(mx[e >> 1], sc[j][e]);
                }
            float mu[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float m_new = fmaxf(m_run[r], mx[r]);  // finite: key `tile` is < end
                const float corr = exp2f(m_run[r] - m_new);
                m_run[r] = m_new;
                mu[r] = m_new;
                l_run[r] *= corr;
#pragma unroll
                for (int n = 0; n < NTO; ++n) {
                    o[n][2 * r] *= corr;
                    o[n][2 * r + 1] *= corr;
                }
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float pe = exp2f(sc[j][e] - mu[e >> 1]);
                    sc[j][e] = pe;
                    l_run[e >> 1] += pe;
                }
            split_half2(sc[0][0], sc[0][1], pa_hi.x, pa_lo.x);
            split_half2(sc[0][2], sc[0][3], pa_hi.y, pa_lo.y);
            split_half2(sc[1][0], sc[1][1], pa_hi.z, pa_lo.z);
            split_half2(sc[1][2], sc[1][3], pa_hi.w, pa_lo.w);
        }
        // ---- O += P V: n-tile 8cb + m holds output dims 64cb + 8*(column) + m
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb) {
            const unsigned* w0 = reinterpret_cast<const unsigned*>(&vr[cb][0]);
            const unsigned* w1 = reinterpret_cast<const unsigned*>(&vr[cb][1]);
            const unsigned* w2 = reinterpret_cast<const unsigned*>(&vr[cb][2]);
            const unsigned* w3 = reinterpret_cast<const unsigned*>(&vr[cb][3]);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                const unsigned sel = (m & 1) ? 0x7632u : 0x5410u;
                const unsigned b0 = __byte_perm(w0[m >> 1], w1[m >> 1], sel);
                const unsigned b1 = __byte_perm(w2[m >> 1], w3[m >> 1], sel);
                mma_f16(o[8 * cb + m], pa_hi, b0, b1);
                if constexpr (!PK) mma_f16(o[8 * cb + m], pa_lo, b0, b1);
            }
        }
        if (PIPE) {  // the next tile becomes this one; the one after it goes in flight
#pragma unroll
            for (int cb = 0; cb < HD / 64; ++cb)
#pragma unroll
                for (int r = 0; r < 4; ++r) vr[cb][r] = vn[cb][r];
#pragma unroll
            for (int c = 0; c < KP; ++c)
#pragma unroll
                for (int j = 0; j < 2; ++j) kr_all[c][j] = kn[c][j];
            if (it + 2 * NW < n_tiles) load_tile(tile + 2 * NW * kDecMmaTK, vn, kn, end);
        }
    }
    // ---- the warps' partials -> one block partial
    trace_mark(tr, 8);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
    const bool has = warp < n_tiles;
    if (t == 0) {
        wm[warp * 16 + g] = has ? m_run[0] : -INFINITY;
        wm[warp * 16 + g + 8] = has ? m_run[1] : -INFINITY;
        wl[warp * 16 + g] = l_run[0];
        wl[warp * 16 + g + 8] = l_run[1];
    }
    if (has) {
        // Element (n, e) is row g + 8*(e >> 1), dim 16t + c with c = 64*(n/8) + 8*(e & 1) + n%8; as
        // c%64 + 16t < 64, wo_col(row, 16t + c) = wo_col(g, 16t) + c + c/32: one base for the
        // lane plus a constant per element (no index arithmetic per store).
        // (the lane's indices read again from %tid: derived from the loop's copies, the compiler
        // computed the base before the tile loop and spilled inside it)
        unsigned tid;
        asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
        const int lg = (tid & 31) >> 2, lt = tid & 3;
        float* const wo_lane = wo + (size_t(tid / 32) * G + lg) * wo_stride(HD) + wo_col(lg, 16 * lt);
#pragma unroll
        for (int n = 0; n < NTO; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 64 * (n / 8) + 8 * (e & 1) + n % 8;
                if constexpr (PK) {  // head lg: its hi row plus its lo row
                    if (e < 2 && lg < G) wo_lane[c + c / 32] = o[n][e] + o[n][e + 2];
                } else if (lg + 8 * (e >> 1) < G) {
                    wo_lane[8 * (e >> 1) * wo_stride(HD) + c + c / 32] = o[n][e];
                }
            }
    }
    __syncthreads();
    trace_mark(tr, 9);
    if (PUSH && !direct) {
        cluster_wait();  // every block of the cluster has started: its memory may be written
        trace_cycles(tr, kDecAttnTraceCycWaited);
    }
    const int nw = min(NW, n_tiles);
    if (PUSH && !direct && pu.cs > 1) {  // (block-uniform)
        // Four consecutive outputs of one row a thread, sent as one 16-byte st.async (the remote
        // stores, not the sums, are what the loop waits on: 4x fewer of them)
        static_assert(HD / 4 >= kDecAttnClusterMax, "a row's first cs quads send its (m, l), one rank each");
        for (int q = threadIdx.x; q < G * HD / 4; q += NT) {
            const int row = q / (HD / 4), d0 = (q % (HD / 4)) * 4, i0 = row * HD + d0;
            float M = -INFINITY;
            for (int w = 0; w < nw; ++w) M = fmaxf(M, wm[w * 16 + row]);
            float L = 0.f;
            float4 A = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int w = 0; w < nw; ++w) {
                const float f = exp2f(wm[w * 16 + row] - M);
                const float* wr = wo + (size_t(w) * G + row) * wo_stride(HD);
                L += f * wl[w * 16 + row];
                A.x += f * wr[wo_col(row, d0)];
                A.y += f * wr[wo_col(row, d0 + 1)];
                A.z += f * wr[wo_col(row, d0 + 2)];
                A.w += f * wr[wo_col(row, d0 + 3)];
            }
            const int owner = i0 / pu.slice;
            st_async(cluster_addr(pu.recv_o + pu.rank * pu.slice + (i0 - owner * pu.slice), owner), A,
                     cluster_addr(pu.bar, owner));
            if (d0 / 4 < pu.cs)
                st_async(cluster_addr(pu.recv_ml + pu.rank * G + row, d0 / 4), make_float2(M * 0.69314718055994531f, L),
                         cluster_addr(pu.bar, d0 / 4));
        }
        trace_mark(tr, 3);
        return;
    }
    for (int i = threadIdx.x; i < G * HD; i += NT) {
        const int row = i / HD, col = wo_col(row, i % HD);
        float M = -INFINITY;
        for (int w = 0; w < nw; ++w) M = fmaxf(M, wm[w * 16 + row]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < nw; ++w) {
            const float f = exp2f(wm[w * 16 + row] - M);
            L += f * wl[w * 16 + row];
            A += f * wo[(size_t(w) * G + row) * wo_stride(HD) + col];
        }
        if (direct) {
            acc[row * acc_stride + i % HD] = A / L;
        } else if (PUSH) {  // a cluster of one block: its own buffers, plain stores (st.async needs more)
            pu.recv_o[i] = A;
            if (i % HD == 0) pu.recv_ml[row] = make_float2(M * 0.69314718055994531f, L);
        } else {
            acc[row * acc_stride + i % HD] = A;
            if (i % HD == 0) ml[row * ml_stride] = make_float2(M * 0.69314718055994531f, L);
        }
    }
    trace_mark(tr, 3);
}

// The cluster merge's result for output o (of KV head kvh's G*hd): the output when the cluster is
// the KV head's only one (whole), else cluster c's partial (acc, and per head (max, l)) for
// attn_output to merge. A cluster without keys leaves (-inf, 0) and zeros: weight 0 there.
__device__ __forceinline__ void cluster_store(const DecAttnArgs& p, bool whole, int c, int kvh, int G, int hd, int o,
                                              float acc_o, float M, float L) {
    const int GH = G * hd;
    if (whole) {
        p.out[size_t(kvh) * GH + o] = acc_o / L;
    } else {
        p.part_o[size_t(c) * p.n_head * hd + size_t(kvh) * GH + o] = acc_o;
        if (o % hd == 0) p.part_ml[size_t(c) * p.n_head + kvh * G + o / hd] = make_float2(M, L);
    }
}

// The trace record's last fields: the end (6) and the SM (7).
__device__ __forceinline__ void trace_close(unsigned long long* tr, int t) {
    if (tr && t == 0) {
        trace_mark(tr, 6);
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        tr[7] = smid;
    }
}

// NACC: outputs per thread, (n_head/n_head_kv)*head_dim/NT rounded up (instances 1-4 and 8).
// CLUSTER (Hopper): the gridDim.x splits of a KV head form one thread-block cluster
// and merge through distributed shared memory: each block leaves its partial (acc,
// m, l) in its own shared memory, and after a cluster barrier block s merges
// output slice s from all blocks' partials (the MHD instances push instead: ClusterPush).
// No global round trip, no atomics, no last-block tail (docs/perf_log.md has the merge's cost).
// Without CLUSTER the last block of each KV head to finish merges (global
// partials and a counter), which allows up to max_splits splits for long contexts.
// MHD: the instances of the tensor-core tile phase for head_dim MHD alone (64 or 128; the host
// picks them where dec_attn_lean_ok, and for clusters where cluster_mma), which hold none of the
// CUDA-core path's code: a kernel's code is fetched cold at each launch. With CLUSTER they run at
// every depth past direct_keys; without, one block per KV head writes the output (max_splits 1,
// the short caches' variant: every step of a short chat), none of the global merge's code either.
// STAGE (with MHD and CLUSTER): DecAttnArgs::stage, the keys' K/V rows in shared memory.
// p.trace (CLUSTER): the global timer at the block's start (0), after its wait (1), with the query
// ready for the tiles (2: each warp's first two tiles' K/V in flight, loaded before the wait when EARLY), after
// its tiles (8), after the warps' partials are stored (9), with the block's partial merged (3),
// after the cluster barrier (4; MHD: with every pushed partial received), with the cluster merge's
// inputs loaded (10), after its stores (5), at the end (6); and the SM's id (7).
template <int NACC, bool CLUSTER, bool STAGE = false, int MHD = 0, bool NOPF = false>
__global__ void __launch_bounds__(NT, 2) dec_attn_kernel(const DecAttnArgs p) {
    static_assert(!STAGE || (MHD && CLUSTER), "staging goes with the tensor-core cluster instances");
    static_assert(!MHD || MHD == 64 || MHD == 128, "MHD: instances of head_dim 64 or 128");
    constexpr bool kDirectOnly = !CLUSTER && MHD > 0;  // launched with max_splits 1 (dec_attention)
    extern __shared__ __align__(16) uint8_t asmem[];
    __shared__ int is_last;
    constexpr int TK = kDecTK;
    const int G = p.n_head / p.n_head_kv, hd = MHD ? MHD : p.head_dim, GH = G * hd;
    const int rs = dec_attn_row_stride(hd);
    const KvPart kvp = kv_part(hd);
    float* qs = reinterpret_cast<float*>(asmem);  // GH
    float* sc = qs + GH;                          // G*TK
    float* mrun = sc + G * TK;                    // G
    float* lrun = mrun + G;                       // G
    float* corr = lrun + G;                       // G
    // kDecAttnBufs tile buffers, each TK K rows then TK V rows
    uint8_t* kv0 = asmem + align16(size_t(GH + G * TK + 3 * G) * 4);
    auto kbuf = [&](int b) { return kv0 + size_t(b) * 2 * TK * rs; };
    auto vbuf = [&](int b) { return kv0 + size_t(b) * 2 * TK * rs + size_t(TK) * rs; };
    // CLUSTER: this block's partial, read by the other blocks of the cluster
    // (MHD: none: the push merge's buffers hold the partials, the direct instances write the output)
    float* po_c = MHD ? nullptr : reinterpret_cast<float*>(asmem + dec_attn_part_off(G, hd));       // GH
    float2* ml_c = MHD ? nullptr : reinterpret_cast<float2*>(po_c + ((GH + 3) & ~3));             // G
    const int kvh = blockIdx.y, s = blockIdx.x, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32;
    unsigned long long* const tr =
        CLUSTER && p.trace ? p.trace + (size_t(blockIdx.y) * gridDim.x + blockIdx.x) * kDecAttnTraceFields : nullptr;
    trace_mark(tr, 0);
    // The state is stable during a step (the host or the previous step's lm_head wrote
    // it, and both finished before this step's first kernel), so it may be read before
    // the wait; so may the cache rows before pos (written by earlier steps).
    const int pos = p.st->pos, kv_len = pos + 1, slot = p.st->slot;
    // a sliding-window layer sees keys [lo, kv_len) only; the splits share those out
    const int lo = p.window > 0 ? max(0, kv_len - p.window) : 0, n_keys = kv_len - lo;
    // splits of at least sk keys, a multiple of gran (CLUSTER: kDecClusterGran, so short
    // caches spread over all the cluster's blocks: a tile's cost grows with its keys)
    constexpr int cg = kDecClusterGran;
    static_assert(cg >= 1 && cg <= TK, "kDecClusterGran: 1 .. kDecTK keys");
    // The tensor-core phase: long caches without the cluster merge, its splits at least one
    // tile per warp (fewer partials for the merge); in the cluster variant where p.cluster_mma
    // asks for it (the MHD instances: always).
    const bool use_mma = MHD ? true : dec_attn_mma_ok(G, hd) && (!CLUSTER || p.cluster_mma);
    const int sk = CLUSTER ? cg : max(use_mma ? NW * kDecMmaTK : TK, p.split_keys), gran = CLUSTER ? cg : TK;
    int n_act = max(1, min(CLUSTER ? int(gridDim.x) : p.max_splits, (n_keys + sk - 1) / sk));
    const int S = ((n_keys + n_act - 1) / n_act + gran - 1) / gran * gran;
    n_act = (n_keys + S - 1) / S;
    const int start = lo + s * S, end = min(start + S, kv_len);
    const bool active = start < end;
    // one split: it writes the output itself, no merge (the multi-cluster variant always
    // leaves its clusters' partials: attn_output merges them)
    const bool direct = kDirectOnly || (n_act == 1 && (!CLUSTER || p.clusters <= 1));
    // MHD: the push merge (ClusterPush); the cluster barrier's one phase says every block has
    // started and armed its mbarrier (arrive now, wait before the first remote store). The
    // mbarrier expects the bytes of the cluster's blocks with keys (the first n_in): this block's
    // slice of outputs and G (max, l) pairs from each.
    ClusterPush pu{};
    if constexpr (MHD > 0 && CLUSTER) {
        pu.cs = p.cluster;
        pu.rank = s % p.cluster;
        pu.slice = dec_push_slice(GH, p.cluster);
        uint8_t* const recv = asmem + dec_attn_recv_off(G, hd, STAGE ? p.stage : 0);
        pu.bar = reinterpret_cast<uint64_t*>(recv);
        pu.recv_o = reinterpret_cast<float*>(recv + 16);
        pu.recv_ml = reinterpret_cast<float2*>(pu.recv_o + dec_attn_recv_floats(G, hd));
        if (!direct) {
            if (t == 0) {
                // (a cluster of one block stores into its own buffers with plain stores: st.async needs
                // a cluster of more than one block, PTX ISA; its barrier expects nothing)
                const int n_in = pu.cs > 1 ? min(pu.cs, max(0, n_act - s / pu.cs * pu.cs)) : 0;
                const int len = max(0, min(GH, (pu.rank + 1) * pu.slice) - pu.rank * pu.slice);
                mbar_arm(pu.bar, unsigned(n_in * (len * 4 + G * 8)));  // (the init fenced for the cluster)
            }
            cluster_arrive_relaxed();
        }
    }
    const size_t base = size_t(p.slot_off[slot]) + size_t(kvh) * hd;
    const __half* K = p.kc + base;
    const __half* V = p.vc + base;
    // Before the wait: the first kDecAttnBufs tiles' rows before pos (earlier steps
    // wrote them), so their copy overlaps the previous kernel; row pos after it.
    if (active && !use_mma) {
        for (int b = 0; b < kDecAttnBufs; ++b) {
            const int tile = start + b * TK;
            const int pre = max(0, min(min(TK, end - tile), pos - tile));
            if (pre > 0) stage_kv(kbuf(b), vbuf(b), K, V, p.kv_dim, tile, 0, pre, rs, kvp);
        }
        cp_async_commit();
    }
    // STAGE: the block's keys fit its rows (else the tiles read the cache)
    const bool staged = STAGE && active && use_mma && end - start <= p.stage;
    uint64_t* const bar = reinterpret_cast<uint64_t*>(asmem + dec_attn_stage_off(G, hd));
    __half* const ks_st = reinterpret_cast<__half*>(asmem + dec_attn_stage_off(G, hd) + 16);
    __half* const vs_st = ks_st + size_t(p.stage) * (rs / 2);
    const int n_pre = staged ? max(0, min(end, pos) - start) : 0;  // rows before pos, bulk-copied now
    if (n_pre > 0) {  // block-uniform
        if (t == 0) mbar_arm(bar, unsigned(2 * n_pre * hd * 2));
        __syncthreads();
        for (int r = t; r < 2 * n_pre; r += NT) {
            const bool v = r >= n_pre;
            const int j = v ? r - n_pre : r;
            bulk_copy_g2s((v ? vs_st : ks_st) + size_t(j) * (rs / 2), (v ? V : K) + size_t(start + j) * p.kv_dim,
                          unsigned(hd * 2), bar);
        }
    } else if (!NOPF && active && use_mma && !staged) {  // the rows before pos into L2 while the previous kernel runs
        const int nrow = max(0, min(end, pos) - start), lines = hd / 64;  // 128-byte lines per row
        for (int i = t; i < nrow * lines; i += NT) {
            const size_t off = size_t(start + i / lines) * p.kv_dim + (i % lines) * 64;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(K + off));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(V + off));
        }
    }
    // EARLY (the 64-dim lean instances, keys read from the cache): the tile phase waits itself,
    // once its warps' first two tiles are in flight (dec_attn_mma_phase)
    constexpr bool kEarly = MHD == 64;
    const bool early = kEarly && active && use_mma && !staged;  // block-uniform
    if (!early) {
        pdl_wait_release(p.pdl_early);
        trace_mark(tr, 1);
    }
    if (staged && pos >= start && pos < end && t < hd / 4) {  // row pos, which dec_qkv has just written
        const int pieces = hd / 8;
        const bool v = t >= pieces;
        const int pc = v ? t - pieces : t;
        const uint4 x = __ldcg(reinterpret_cast<const uint4*>((v ? V : K) + size_t(pos) * p.kv_dim + 8 * pc));
        *reinterpret_cast<uint4*>((v ? vs_st : ks_st) + size_t(pos - start) * (rs / 2) + 8 * pc) = x;
    }  // (the tile phase's first block barrier publishes it)

    if constexpr (CLUSTER) {
        if (active && use_mma) {  // the partial into this block's shared memory (or the output when direct)
            float* acc = direct ? p.out + size_t(kvh * G) * hd : po_c;
            uint64_t* b = n_pre > 0 ? bar : nullptr;
            const size_t kd = size_t(p.kv_dim), sd = size_t(rs / 2);
            constexpr bool PU = MHD > 0;
            if (STAGE && staged) {
                if (hd == 64) dec_attn_mma_phase<64, true, PU, false, PU>(p, ks_st, vs_st, sd, start, start, end, pos, G, kvh, asmem, direct, acc, size_t(hd), ml_c, 1, b, tr, pu);
                else dec_attn_mma_phase<128, true, PU, false, PU>(p, ks_st, vs_st, sd, start, start, end, pos, G, kvh, asmem, direct, acc, size_t(hd), ml_c, 1, b, tr, pu);
            } else {
                if (hd == 64) dec_attn_mma_phase<64, false, PU, kEarly, PU>(p, K, V, kd, 0, start, end, pos, G, kvh, asmem, direct, acc, size_t(hd), ml_c, 1, nullptr, tr, pu);
                else dec_attn_mma_phase<128, false, PU, false, PU>(p, K, V, kd, 0, start, end, pos, G, kvh, asmem, direct, acc, size_t(hd), ml_c, 1, nullptr, tr, pu);
            }
        } else if (MHD > 0 && !direct) {
            cluster_wait();  // (the phase's first barrier wait, for a block without keys)
        }
    } else {
        if (active && use_mma) {
            const int h0 = kvh * G;
            float* acc = direct ? p.out + size_t(h0) * hd : p.part_o + (size_t(h0) * p.max_splits + s) * hd;
            const size_t acc_stride = direct ? size_t(hd) : size_t(p.max_splits) * hd;
            float2* ml = p.part_ml + size_t(h0) * p.max_splits + s;
            const size_t kd = size_t(p.kv_dim);
            if (hd == 64) dec_attn_mma_phase<64, false, false, kEarly, kDirectOnly>(p, K, V, kd, 0, start, end, pos, G, kvh, asmem, direct, acc, acc_stride, ml, p.max_splits, nullptr, nullptr);
            else dec_attn_mma_phase<128, false, false, false, kDirectOnly>(p, K, V, kd, 0, start, end, pos, G, kvh, asmem, direct, acc, acc_stride, ml, p.max_splits, nullptr, nullptr);
        }
    }
    if (active && !use_mma) {
        const int bp = (pos - start) / TK;  // the tile of row pos, when this split holds it
        if (pos >= start && pos < end && bp < kDecAttnBufs) {
            stage_kv(kbuf(bp), vbuf(bp), K, V, p.kv_dim, start + bp * TK, pos - start - bp * TK,
                     pos - start - bp * TK + 1, rs, kvp);
        }
        cp_async_commit();
#pragma unroll
        for (int k = 0; k < NACC; ++k) {
            const int i = t + k * NT;
            if (i < GH) qs[i] = __ldcg(p.q + size_t(kvh) * GH + i) * p.scale;
        }
        if (t < G) {
            mrun[t] = -INFINITY;
            lrun[t] = 0.f;
        }
        float acc[NACC];
#pragma unroll
        for (int k = 0; k < NACC; ++k) acc[k] = 0.f;
        for (int tile = start, it = 0; tile < end; tile += TK, ++it) {
            const int n = min(TK, end - tile);
            const int b = it % kDecAttnBufs;
            uint8_t* ks = kbuf(b);
            uint8_t* vs = vbuf(b);
            // tile `it` was issued kDecAttnBufs iterations back (one group per iteration)
            if (it == 0) cp_async_wait_all();
            else cp_async_wait_group<kDecAttnBufs - 1>();
            __syncthreads();  // K/V tile, qs, m/l ready
            for (int pi = t; pi < G * TK; pi += NT) {
                const int g = pi / TK, j = pi % TK;
                float dot = -INFINITY;
                if (j < n) {
                    const uint8_t* kr = ks + j * rs;
                    const float* qg = qs + g * hd;
                    dot = 0.f;
                    for (int d = 0; d < hd; d += 8) {
                        const uint4 raw = *reinterpret_cast<const uint4*>(kr + 2 * d);
                        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const float2 f = __half22float2(h2[e]);
                            dot += qg[d + 2 * e] * f.x + qg[d + 2 * e + 1] * f.y;
                        }
                    }
                }
                sc[g * TK + j] = dot;
            }
            __syncthreads();
            for (int g = warp; g < G; g += NW) {
                const float v = sc[g * TK + lane];
                const float m_old = mrun[g];
                const float m_new = fmaxf(m_old, warp_max(v));
                const float pr = lane < n ? expf(v - m_new) : 0.f;
                sc[g * TK + lane] = pr;
                const float ts = warp_sum(pr);
                __syncwarp();  // every lane has read mrun[g] before lane 0 replaces it (racecheck)
                if (lane == 0) {
                    const float c = expf(m_old - m_new);  // 0 on the first tile
                    corr[g] = c;
                    lrun[g] = lrun[g] * c + ts;
                    mrun[g] = m_new;
                }
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < NACC; ++k) {
                const int o = t + k * NT;
                if (o < GH) {
                    const int g = o / hd, d = o % hd;
                    float v = acc[k] * corr[g];
                    const float* pg = sc + g * TK;
                    const __half* vcol = reinterpret_cast<const __half*>(vs) + d;
                    for (int j = 0; j < n; ++j) v += pg[j] * __half2float(vcol[j * (rs / 2)]);
                    acc[k] = v;
                }
            }
            __syncthreads();  // this buffer and sc consumed
            {  // refill the buffer with tile it + kDecAttnBufs
                const int nt = tile + kDecAttnBufs * TK;
                if (nt < end) stage_kv(ks, vs, K, V, p.kv_dim, nt, 0, min(TK, end - nt), rs, kvp);
                cp_async_commit();
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < NACC; ++k) {
            const int o = t + k * NT;
            if (o < GH) {
                const int g = o / hd, d = o % hd;
                const int h = kvh * G + g;
                if (direct) p.out[size_t(h) * hd + d] = acc[k] / lrun[g];
                else if (CLUSTER) po_c[o] = acc[k];
                else p.part_o[(size_t(h) * p.max_splits + s) * hd + d] = acc[k];
            }
        }
        if (!direct && t < G) {
            if (CLUSTER) ml_c[t] = make_float2(mrun[t], lrun[t]);
            else p.part_ml[size_t(kvh * G + t) * p.max_splits + s] = make_float2(mrun[t], lrun[t]);
        }
    }
    if (direct) return;  // n_act is the same in every block: all of them return here or none

    if constexpr (CLUSTER) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        namespace cg = cooperative_groups;
        cg::cluster_group cl = cg::this_cluster();
        // cluster c = blocks [c*cs, (c+1)*cs) of the KV head's splits; its first n_in had keys
        const int cs = p.cluster, rank = s % cs, c = s / cs;
        const int n_in = min(cs, max(0, n_act - c * cs));
        const bool whole = p.clusters <= 1;  // one cluster: the output; else this cluster's partial
        // rank r merges outputs [r*slice, (r+1)*slice) (MHD: the push merge's slice)
        const int slice = MHD > 0 ? dec_push_slice(GH, cs) : (GH + cs - 1) / cs;
        if constexpr (MHD > 0) {  // the pushed partials, in this block's memory once all have arrived
            mbar_wait_parity<true>(pu.bar, 0);
            if (pu.cs == 1) __syncthreads();  // the block's own plain stores (block-uniform)
            trace_mark(tr, 4);
            for (int o = rank * slice + t; o < min(GH, (rank + 1) * slice); o += NT) {
                const int g = o / hd, j = o - rank * slice;
                float M = -INFINITY;
                for (int r = 0; r < n_in; ++r) M = fmaxf(M, pu.recv_ml[r * G + g].x);
                float L = 0.f, acc_o = 0.f;
                for (int r = 0; r < n_in; ++r) {
                    const float2 mv = pu.recv_ml[r * G + g];
                    const float w = expf(mv.x - M);
                    L += w * mv.y;
                    acc_o += w * pu.recv_o[r * slice + j];
                }
                if (o == rank * slice) trace_mark(tr, 10);
                cluster_store(p, whole, c, kvh, G, hd, o, acc_o, M, L);
            }
            trace_mark(tr, 5);
            trace_close(tr, t);
            return;
        }
        cl.sync();  // every split's partial is in its block's shared memory
        trace_mark(tr, 4);
        for (int o = rank * slice + t; o < min(GH, (rank + 1) * slice); o += NT) {
            const int g = o / hd;
            float2 mv[kDecAttnClusterMax];
            float pv[kDecAttnClusterMax];
#pragma unroll
            for (int r = 0; r < kDecAttnClusterMax; ++r) {  // all remote loads in flight at once
                if (r < n_in) {
                    mv[r] = cl.map_shared_rank(ml_c, unsigned(r))[g];
                    pv[r] = cl.map_shared_rank(po_c, unsigned(r))[o];
                }
            }
            float M = -INFINITY;
#pragma unroll
            for (int r = 0; r < kDecAttnClusterMax; ++r)
                if (r < n_in) M = fmaxf(M, mv[r].x);
            float L = 0.f, acc_o = 0.f;
#pragma unroll
            for (int r = 0; r < kDecAttnClusterMax; ++r) {
                if (r < n_in) {
                    const float w = expf(mv[r].x - M);
                    L += w * mv[r].y;
                    acc_o += w * pv[r];
                }
            }
            if (o == rank * slice) trace_mark(tr, 10);
            cluster_store(p, whole, c, kvh, G, hd, o, acc_o, M, L);
        }
        trace_mark(tr, 5);
        cl.sync();  // no block leaves (freeing its shared memory) while others read it
        trace_close(tr, t);
#endif
        return;
    }

    // The last block of this KV head to arrive merges its G heads' splits: the
    // partial results are copied to shared memory kDecMergeChunk splits at a time
    // (cp.async), then per output one pass over them with an online (max, sum).
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = atomicAdd(p.counter + kvh, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    float* po_s = reinterpret_cast<float*>(asmem);                    // [G][nc][hd]
    float Mo[NACC], Lo[NACC], Ao[NACC];
#pragma unroll
    for (int k = 0; k < NACC; ++k) {
        Mo[k] = -INFINITY;
        Lo[k] = Ao[k] = 0.f;
    }
    for (int c0 = 0; c0 < n_act; c0 += kDecMergeChunk) {
        const int nc = min(kDecMergeChunk, n_act - c0);
        float2* ml_s = reinterpret_cast<float2*>(po_s + size_t(G) * nc * hd);  // [G][nc (+1)]
        const int mls = (nc + 1) & ~1;  // float2 row length, 16-byte multiple
        for (int g = 0; g < G; ++g) {
            const int h = kvh * G + g;
            const float* src = p.part_o + (size_t(h) * p.max_splits + c0) * hd;
            for (int i = t * 4; i < nc * hd; i += NT * 4) cp_async16(po_s + size_t(g) * nc * hd + i, src + i);
            for (int i = t; i < nc; i += NT) ml_s[g * mls + i] = __ldcg(p.part_ml + size_t(h) * p.max_splits + c0 + i);
        }
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
#pragma unroll
        for (int k = 0; k < NACC; ++k) {
            const int o = t + k * NT;
            if (o < GH) {
                const int g = o / hd, d = o % hd;
                float M = Mo[k], L = Lo[k], acc = Ao[k];
                for (int sp = 0; sp < nc; ++sp) {
                    const float2 mv = ml_s[g * mls + sp];
                    const float m_new = fmaxf(M, mv.x);
                    const float c = expf(M - m_new);  // 0 at the first split
                    const float w = expf(mv.x - m_new);
                    L = L * c + w * mv.y;
                    acc = acc * c + w * po_s[(size_t(g) * nc + sp) * hd + d];
                    M = m_new;
                }
                Mo[k] = M;
                Lo[k] = L;
                Ao[k] = acc;
            }
        }
        __syncthreads();  // po_s and ml_s are refilled by the next chunk
    }
#pragma unroll
    for (int k = 0; k < NACC; ++k) {
        const int o = t + k * NT;
        if (o < GH) p.out[size_t(kvh) * GH + o] = Ao[k] / Lo[k];
    }
    if (t == 0) p.counter[kvh] = 0u;
}

// ---------------------------------------------------------------- dec_proj
// Block argmax of (best_v, best_i) (lane values of each warp), then the last
// block to arrive reduces all blocks' results and writes the token (and advances
// the state). Every thread of the block calls it.
__device__ void argmax_tail(const DecProjArgs& p, float best_v, int best_i, float* bv, int* bi, int* is_last_p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int& is_last = *is_last_p;
    if (lane == 0) {
        bv[warp] = best_v;
        bi[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float v = bv[0];
        int i = bi[0];
        for (int k = 1; k < NW; ++k)
            if (arg_better(bv[k], bi[k], v, i)) {
                v = bv[k];
                i = bi[k];
            }
        p.part[blockIdx.x].v = v;
        p.part[blockIdx.x].i = i;
        __threadfence();
        is_last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    float v = -INFINITY;
    int i = INT_MAX;
    const int nb = int(gridDim.x);
    for (int b0 = 0; b0 < nb; b0 += NT * 8) {  // 8 loads in flight per thread
        float pv[8];
        int pi[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int b = b0 + threadIdx.x + k * NT;
            pv[k] = b < nb ? __ldcg(&p.part[b].v) : -INFINITY;
            pi[k] = b < nb ? __ldcg(&p.part[b].i) : INT_MAX;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (arg_better(pv[k], pi[k], v, i)) {
                v = pv[k];
                i = pi[k];
            }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        if (arg_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
    __syncthreads();  // bv/bi are reused
    if (lane == 0) {
        bv[warp] = v;
        bi[warp] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < NW; ++k)
            if (arg_better(bv[k], bi[k], v, i)) {
                v = bv[k];
                i = bi[k];
            }
        // rows of NaN never win; all-NaN logits fall back to row 0
        const int tok = i == INT_MAX ? 0 : i;
        DecState* st = p.st;
        st->token = tok;
        if (p.advance) {
            if (p.out_tokens) p.out_tokens[st->step] = tok;
            st->step += 1;
            st->pos += 1;
        }
        *p.counter = 0u;
    }
}

// MODE: DEC_RESID (no norm, one tensor) or DEC_GLU (rmsnorm, gate and up); LOGITS runs
// in dec_lm_kernel. T: the type of the rows (both tensors' in the GLU mode; T_ANY: any).
// The residual mode whose input is a multi-cluster attention's partials (act_parts > 1): its own
// instance, so the plain residual kernels hold no code for it.
constexpr int DEC_RESID_PARTS = 3;
// gemma3's GLU (DecPend's post-norm add first, the GELU gate where the model has it) and lm_head
// (the last FFN output's post-norm add first): their own instances, so the others hold no code
// for either
constexpr int DEC_GLU_PEND = 4, DEC_LOGITS_PEND = 5;
// RESID whose blocks also pull the next layer's cache rows into L2 (DecProjArgs::ahead): its own
// instances, so the others hold none of its code
constexpr int DEC_RESID_AHEAD = 6;

// The next layer's cached rows before pos into L2 (DecProjArgs::ahead), before this kernel's wait:
// the bytes [0, pos * kv_dim * 2) of its K and V blocks shared out over the grid, one bulk prefetch
// each (threads 0 and 32) a block. The state is stable during a step (as dec_attn_kernel reads it).
// (32-bit arithmetic: no 64-bit division routine.)
__device__ __forceinline__ void prefetch_next_kv(const DecKvAhead* a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned units = unsigned(a->st->pos) * unsigned(a->kv_dim / 8);  // 16-byte units of a cache block
    const unsigned share = (units + gridDim.x - 1) / gridDim.x;
    const unsigned lo = min(units, share * blockIdx.x), hi = min(units, lo + share);
    if (hi <= lo) return;
    const __half* base = (threadIdx.x == 0 ? a->k : a->v) + a->slot_off[a->st->slot];
    if ((reinterpret_cast<uintptr_t>(base) & 15) != 0) return;  // the bulk prefetch needs 16-byte alignment
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + size_t(lo) * 8), "r"((hi - lo) * 16u)
                 : "memory");
#endif
}

template <uint32_t T, int MODE>
__global__ void __launch_bounds__(NT, 3) dec_proj_kernel(const DecProjArgs p) {
    static_assert(MODE == DEC_RESID || MODE == DEC_GLU || MODE == DEC_RESID_PARTS || MODE == DEC_GLU_PEND ||
                      MODE == DEC_RESID_AHEAD,
                  "dec_proj_kernel: RESID or GLU");
    constexpr bool GLU = MODE == DEC_GLU || MODE == DEC_GLU_PEND, PARTS = MODE == DEC_RESID_PARTS;
    constexpr bool PEND = MODE == DEC_GLU_PEND;
    extern __shared__ __align__(16) uint8_t smem[];
    const int n_out = p.w[0].n_out, n_in = p.w[0].n_in;
    const int r0 = blockIdx.x * p.rows_per_block;
    const int r1 = min(r0 + p.rows_per_block, n_out);

    // shared memory: [staged rows: smem_w][norm weights: n_in floats][activations][old y: 64 floats]
    float* nw = reinterpret_cast<float*>(smem + p.smem_w);
    if (GLU) stage_floats(nw, p.norm_w, n_in);
    cp_async_commit();
    int used0, used1 = 0;
    const int off0 = stage_rows(smem, p.w[0], r0, r1, &used0);
    uint8_t* base1 = smem + used0;
    int off1 = 0;
    if (GLU) off1 = stage_rows(base1, p.w[1], r0, r1, &used1);
    cp_async_commit();
    if constexpr (MODE == DEC_RESID_AHEAD)
        if ((threadIdx.x & ~32u) == 0) prefetch_next_kv(p.ahead);
    pdl_wait_release(p.pdl_early);

    uint8_t* actp = smem + p.smem_w + align16(size_t(n_in) * 4);
    float* yold = reinterpret_cast<float*>(actp + dec_act_bytes(n_in));
    // RESID: the old values of our rows (complete: written two kernels back), loaded
    // alongside the activations rather than after the row dots
    const bool own_old = !GLU && int(threadIdx.x) < r1 - r0;
    const float yv = own_old && !p.overwrite ? __ldcg(p.y + r0 + threadIdx.x) : 0.f;
    Act a = carve_act(actp, n_in);
    float ss;
    if constexpr (PARTS) ss = load_act_parts(a, p.act, p.act_ml, p.act_parts, p.act_hd, n_in);
    else if constexpr (PEND) ss = load_act_pend(a, p.pend, n_in, p.eps, blockIdx.x == 0);
    else ss = load_act(a, p.act, n_in);
    if (own_old) yold[threadIdx.x] = yv;  // published by finish_act's barriers
    cp_async_wait_older();  // the norm weights
    finish_act<GLU ? 1 : 0, q8_of(T, T)>(a, n_in, nw, p.eps, p.need_q8, ss);
    cp_async_wait_all();
    __syncthreads();

    if constexpr (GLU) {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        const size_t rb0 = size_t(p.w[0].row_bytes), rb1 = size_t(p.w[1].row_bytes);
        const bool same = p.w[0].type == p.w[1].type;
        for (int r = r0 + warp; r < r1; r += NW) {
            const uint8_t* g = smem + off0 + size_t(r - r0) * rb0;
            const uint8_t* u = base1 + off1 + size_t(r - r0) * rb1;
            float2 d;
            if (T != T_ANY || same) d = row_dot2_k<T>(p.w[0].type, g, u, n_in, a);
            else d = make_float2(row_dot(p.w[0].type, g, n_in, a), row_dot(p.w[1].type, u, n_in, a));
            if (lane == 0) {
                if (PEND && p.gelu)  // gelu_tanh(g) * u, as the generic step's geglu_tanh_kernel
                    p.y[r] = 0.5f * d.x * (1.0f + tanhf(0.7978845608028654f * (d.x + 0.044715f * d.x * d.x * d.x))) * d.y;
                else
                    p.y[r] = d.x / (1.0f + expf(-d.x)) * d.y;
            }
        }
    } else {
        resid_rows<T>(p.w[0], smem + off0, r0, r1, a, yold, p.y);
    }
}

// ---------------------------------------------------------------- dec_lm
// The lm_head (LOGITS mode) as a persistent kernel in which every warp streams its
// own rows: warp w of block b takes the batches of rows_per_block rows (1 or 2)
// numbered b*NW + w, + gridDim.x*NW, ..., through a private ring of lm_stages
// staging buffers (smem_w / (NW*lm_stages) bytes each) that only that warp
// fills, waits on and reads, so no block barrier couples the warps once the
// activation prep (once per block) is done (docs/perf_log.md: the lm_head).
// A batch's rows are copied by its warp: BULK (DecProjArgs::lm_bulk picks the instance) on sm_90 and
// later, one bulk copy (the copy engine) issued by lane 0, completing on the ring slot's mbarrier,
// instead of each lane's 16-byte cp.async (fewer instructions beside the row dots: the lm_head
// streams ~145 MB a token for Qwen2.5-0.5B); else stage_rows<32>. Both copy the 16-byte widened range.
template <uint32_t T, bool PEND, bool BULK>
__global__ void __launch_bounds__(NT, 3) dec_lm_kernel(const DecProjArgs p) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float bv[NW];
    __shared__ int bi[NW];
    __shared__ int is_last;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kBulk = BULK;
#else
    constexpr bool kBulk = false;
#endif
    const int NS = p.lm_stages;  // 1 .. kDecLmStages
    const int n_out = p.w[0].n_out, n_in = p.w[0].n_in, rb = p.rows_per_block;
    const int nbatch = (n_out + rb - 1) / rb;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int stage_w = p.smem_w / (NW * NS);
    uint8_t* ring = smem + size_t(warp) * NS * stage_w;
    const size_t rbytes = size_t(p.w[0].row_bytes);
    const int wb0 = blockIdx.x * NW + warp, wstep = gridDim.x * NW;
    float* nw = reinterpret_cast<float*>(smem + p.smem_w);
    if (p.norm_w) stage_floats(nw, p.norm_w, n_in);
    cp_async_commit();  // group: norm weights (every thread)
    // bulk: the ring slots' barriers (declared only in the bulk instances, so the others' shared
    // memory and code stay as they were)
    uint64_t* bars = nullptr;
    if constexpr (kBulk) {
        __shared__ __align__(8) uint64_t ring_bar[NW * kDecLmStages];
        bars = ring_bar + warp * kDecLmStages;
    }
    // bulk: batch b's widened rows into ring slot `slot`, expected on that slot's barrier (lane 0)
    auto bulk_stage = [&](int slot, int b) {
        const int r0 = b * rb, r1 = min(r0 + rb, n_out);
        const size_t a0 = size_t(r0) * rbytes, a1 = size_t(r1) * rbytes;
        const size_t A = a0 & ~size_t(15), B = (a1 + 15) & ~size_t(15);
        mbar_expect(bars + slot, unsigned(B - A));
        bulk_copy_g2s(ring + slot * stage_w, p.w[0].w + A, unsigned(B - A), bars + slot);
    };
    if constexpr (kBulk) {
        if (lane == 0) {
            for (int i = 0; i < NS; ++i) mbar_init(bars + i);
            mbar_fence_init();
            for (int i = 0; i < NS; ++i)
                if (wb0 + i * wstep < nbatch) bulk_stage(i, wb0 + i * wstep);
        }
        __syncwarp();  // the barriers are initialised before any lane waits on them
    } else {
        for (int i = 0; i < NS; ++i) {  // groups: this warp's first NS batches (empty ones keep the count)
            const int b = wb0 + i * wstep;
            if (b < nbatch) stage_rows<32>(ring + i * stage_w, p.w[0], b * rb, min(b * rb + rb, n_out));
            cp_async_commit();
        }
    }
    pdl_wait_release(p.pdl_early);

    uint8_t* actp = smem + p.smem_w + align16(size_t(n_in) * 4);
    Act a = carve_act(actp, n_in);
    float ss;
    if constexpr (PEND) ss = load_act_pend(a, p.pend, n_in, p.eps, false);
    else ss = load_act(a, p.act, n_in);
    if constexpr (kBulk) cp_async_wait_all();  // the norm weights (the rows come on the barriers)
    else cp_async_wait_pending(NS);            // the norm weights
    finish_act<-1, q8_of(T, T)>(a, n_in, p.norm_w ? nw : nullptr, p.eps, p.need_q8, ss);  // ends with a block barrier

    const uint32_t type = p.w[0].type;
    float best_v = -INFINITY;
    int best_i = INT_MAX;
    int slot = 0;
    unsigned parity = 0;  // bulk: bit i, the phase of slot i's barrier that the next wait expects
    for (int b = wb0; b < nbatch; b += wstep) {
        if constexpr (kBulk) {
            mbar_wait_parity(bars + slot, (parity >> slot) & 1u);  // batch b's bytes have landed
            parity ^= 1u << slot;
        } else {
            cp_async_wait_pending(NS - 1);  // this lane's copies of batch b
            __syncwarp();                   // ... and the other lanes'
        }
        const int r0 = b * rb, r1 = min(r0 + rb, n_out);
        const uint8_t* base = ring + slot * stage_w + ((size_t(r0) * rbytes) & 15);
        float2 d;
        if (r1 - r0 == 2) d = row_dot2_k<T>(type, base, base + rbytes, n_in, a);
        else d = make_float2(row_dot_k<T>(type, base, n_in, a), 0.f);
        if (lane == 0 && p.y) {
            p.y[r0] = d.x;
            if (r1 - r0 == 2) p.y[r0 + 1] = d.y;
        }
        if (arg_better(d.x, r0, best_v, best_i)) {
            best_v = d.x;
            best_i = r0;
        }
        if (r1 - r0 == 2 && arg_better(d.y, r0 + 1, best_v, best_i)) {
            best_v = d.y;
            best_i = r0 + 1;
        }
        __syncwarp();  // every lane has read this buffer
        const int bn = b + NS * wstep;
        if constexpr (kBulk) {
            if (lane == 0 && bn < nbatch) {
                fence_proxy_async();  // the lanes' reads of this slot before the copy engine refills it
                bulk_stage(slot, bn);
            }
        } else {
            if (bn < nbatch) stage_rows<32>(ring + slot * stage_w, p.w[0], bn * rb, min(bn * rb + rb, n_out));
            cp_async_commit();  // (possibly empty: keeps the group count uniform)
        }
        slot = slot + 1 == NS ? 0 : slot + 1;
    }
    if constexpr (!kBulk) cp_async_wait_all();
    if (!p.argmax) return;
    argmax_tail(p, best_v, best_i, bv, bi, &is_last);
}

// An empty kernel with the decode kernels' PDL handshake: the launch-boundary floor.
__global__ void __launch_bounds__(NT) dec_noop_kernel(int early) { pdl_wait_release(early); }

std::string ctx(const char* kernel, const char* what) {
    return std::string(kernel) + " for " + (what ? what : "?");
}

// cluster > 0: thread-block clusters of `cluster` blocks along x (Hopper).
template <class Args>
void launch(void (*kernel)(Args), dim3 grid, size_t smem, cudaStream_t st, bool pdl, const Args& a,
            const std::string& what, int cluster = 0) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(NT);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[2];
    int na = 0;
    if (pdl) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na].val.programmaticStreamSerializationAllowed = 1;
        ++na;
    }
    if (cluster > 0) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = unsigned(cluster);
        attr[na].val.clusterDim.y = 1;
        attr[na].val.clusterDim.z = 1;
        ++na;
    }
    cfg.attrs = na ? attr : nullptr;
    cfg.numAttrs = unsigned(na);
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a), what);
    CUDA_LAUNCH_CHECK(what);
}

// ---------------------------------------------------------------- instances
// The specialised instances (decode_kernels.cu's T_ANY note). Weight types with a
// fast row dot get their own; q/k and v of different types get the pairs the
// Q4_K_M / Q5_K_M mixes use; everything else runs the generic instance.
using QkvKernel = void (*)(DecQkvArgs);
using ProjKernel = void (*)(DecProjArgs);
using AttnKernel = void (*)(DecAttnArgs);

#define ORCD_DEC_FAST_TYPES(X) X(T_F16) X(T_Q4_0) X(T_Q4_1) X(T_Q5_0) X(T_Q8_0) X(T_Q4_K) X(T_Q6_K)
#define ORCD_DEC_QKV_PAIRS(X) X(T_Q5_0, T_Q8_0) X(T_Q4_K, T_Q6_K) X(T_Q4_0, T_Q8_0) X(T_Q5_K, T_Q6_K)

template <uint32_t A, uint32_t B>
QkvKernel qkv_inst(bool embed, bool gemma) {
    if (gemma) return embed ? dec_qkv_kernel<A, B, true, true> : dec_qkv_kernel<A, B, false, true>;
    return embed ? dec_qkv_kernel<A, B, true, false> : dec_qkv_kernel<A, B, false, false>;
}
QkvKernel qkv_kernel_for(uint32_t tq, uint32_t tk, uint32_t tv, bool embed, bool gemma) {
    if (tq == tk) {
#define ORCD_SAME(T) \
    if (tq == T && tv == T) return qkv_inst<T, T>(embed, gemma);
        ORCD_DEC_FAST_TYPES(ORCD_SAME)
#undef ORCD_SAME
#define ORCD_PAIR(A, B) \
    if (tq == A && tv == B) return qkv_inst<A, B>(embed, gemma);
        ORCD_DEC_QKV_PAIRS(ORCD_PAIR)
#undef ORCD_PAIR
    }
    return qkv_inst<T_ANY, T_ANY>(embed, gemma);
}
template <uint32_t T>
ProjKernel proj_inst(int mode, bool bulk) {
    if (mode == DEC_LOGITS) return bulk ? dec_lm_kernel<T, false, true> : dec_lm_kernel<T, false, false>;
    if (mode == DEC_LOGITS_PEND) return bulk ? dec_lm_kernel<T, true, true> : dec_lm_kernel<T, true, false>;
    if (mode == DEC_GLU) return dec_proj_kernel<T, DEC_GLU>;
    if (mode == DEC_GLU_PEND) return dec_proj_kernel<T, DEC_GLU_PEND>;
    if (mode == DEC_RESID_AHEAD) return dec_proj_kernel<T, DEC_RESID_AHEAD>;
    return mode == DEC_RESID_PARTS ? dec_proj_kernel<T, DEC_RESID_PARTS> : dec_proj_kernel<T, DEC_RESID>;
}
ProjKernel proj_kernel_for(const DecProjArgs& a) {
    const uint32_t t = a.w[0].type;
    int mode = a.mode == DEC_RESID && a.act_parts > 1 ? DEC_RESID_PARTS : a.mode;
    if (mode == DEC_RESID && a.ahead != nullptr) mode = DEC_RESID_AHEAD;
    if (a.pend.x) mode = mode == DEC_GLU ? DEC_GLU_PEND : DEC_LOGITS_PEND;  // dec_proj checks the mode
    if (a.n_tensors > 1 && a.w[1].type != t) return proj_inst<T_ANY>(mode, a.lm_bulk != 0);
#define ORCD_ONE(T) \
    if (t == T) return proj_inst<T>(mode, a.lm_bulk != 0);
    ORCD_DEC_FAST_TYPES(ORCD_ONE)
#undef ORCD_ONE
    return proj_inst<T_ANY>(mode, a.lm_bulk != 0);
}
template <bool C>
AttnKernel attn_kernel_for(int group_dim) {
    const int nacc = (group_dim + NT - 1) / NT;
    if (nacc <= 1) return dec_attn_kernel<1, C>;
    if (nacc == 2) return dec_attn_kernel<2, C>;
    if (nacc == 3) return dec_attn_kernel<3, C>;
    if (nacc == 4) return dec_attn_kernel<4, C>;
    return dec_attn_kernel<8, C>;
}
// The cluster variant's blocks run the tensor-core tile phase (their own instances per head_dim).
bool cluster_on_mma(int n_head, int n_head_kv, int head_dim, bool cluster_mma) {
    return cluster_mma && dec_attn_lean_ok(n_head / n_head_kv, head_dim);
}
// The one-block-per-KV-head launch (max_splits 1) on the tensor-core phase: its own instances.
bool direct_on_mma(const DecAttnArgs& a) {
    return a.cluster == 0 && a.max_splits == 1 && dec_attn_lean_ok(a.n_head / a.n_head_kv, a.head_dim);
}
AttnKernel direct_kernel_for(int head_dim) {
    return head_dim == 64 ? dec_attn_kernel<1, false, false, 64> : dec_attn_kernel<1, false, false, 128>;
}
// nopf (DecAttnArgs::no_prefetch, unstaged): the instances without the blocks' own L2 prefetch
AttnKernel cluster_kernel_for(int n_head, int n_head_kv, int head_dim, bool cluster_mma, bool stage, bool nopf = false) {
    if (!cluster_on_mma(n_head, n_head_kv, head_dim, cluster_mma)) return attn_kernel_for<true>(n_head / n_head_kv * head_dim);
    if (head_dim == 64)
        return stage ? dec_attn_kernel<1, true, true, 64>
                     : nopf ? dec_attn_kernel<1, true, false, 64, true> : dec_attn_kernel<1, true, false, 64>;
    return stage ? dec_attn_kernel<1, true, true, 128>
                 : nopf ? dec_attn_kernel<1, true, false, 128, true> : dec_attn_kernel<1, true, false, 128>;
}
// every cluster instance (the non-portable size and the staging variant's shared memory apply to them)
std::vector<const void*> cluster_attn_kernels() {
    std::vector<const void*> k;
    for (int g : {NT, 2 * NT, 3 * NT, 4 * NT, 8 * NT}) k.push_back(reinterpret_cast<const void*>(attn_kernel_for<true>(g)));
    for (AttnKernel f : {dec_attn_kernel<1, true, false, 64>, dec_attn_kernel<1, true, true, 64>,
                         dec_attn_kernel<1, true, false, 128>, dec_attn_kernel<1, true, true, 128>,
                         dec_attn_kernel<1, true, false, 64, true>, dec_attn_kernel<1, true, false, 128, true>})
        k.push_back(reinterpret_cast<const void*>(f));
    return k;
}
static_assert(kDecMaxGroupDim <= 8 * NT, "dec_attn_kernel<8> holds the largest group");

std::vector<const void*> all_kernels() {
    std::vector<const void*> k = {reinterpret_cast<const void*>(dec_noop_kernel)};
    auto add = [&](auto f) { k.push_back(reinterpret_cast<const void*>(f)); };
#define ORCD_ADD(T) \
    for (bool e : {false, true}) for (bool g : {false, true}) add(qkv_inst<T, T>(e, g)); \
    for (int m : {int(DEC_RESID), int(DEC_GLU), int(DEC_LOGITS), DEC_RESID_PARTS, DEC_GLU_PEND, DEC_LOGITS_PEND, \
                  DEC_RESID_AHEAD})                                                                             \
        for (bool b : {false, true})                                                                              \
            if (!b || m == DEC_LOGITS || m == DEC_LOGITS_PEND) add(proj_inst<T>(m, b)); /* bulk: lm_head only */
    ORCD_DEC_FAST_TYPES(ORCD_ADD)
    ORCD_ADD(T_ANY)
#undef ORCD_ADD
#define ORCD_ADD_PAIR(A, B) for (bool e : {false, true}) for (bool g : {false, true}) add(qkv_inst<A, B>(e, g));
    ORCD_DEC_QKV_PAIRS(ORCD_ADD_PAIR)
#undef ORCD_ADD_PAIR
    for (int g : {NT, 2 * NT, 3 * NT, 4 * NT, 8 * NT}) add(attn_kernel_for<false>(g));
    for (int hd : {64, 128}) add(direct_kernel_for(hd));
    for (const void* c : cluster_attn_kernels()) k.push_back(c);
    return k;
}

}  // namespace

bool dec_int8_type(uint32_t type) { return int8_row_type(type); }

size_t dec_stage_bytes(int rows, int row_bytes) { return align16(size_t(rows) * size_t(row_bytes) + 32); }

void dec_lm_plan(size_t row_bytes, size_t cap, int* rows, int* stages, int* smem_w) {
    // a ring per warp: kDecLmStages buffers of 2 rows, else of 1 row, else fewer buffers
    auto need = [&](int r, int s) { return size_t(NW) * s * dec_stage_bytes(r, int(row_bytes)); };
    *rows = *stages = *smem_w = 0;
    for (int s = kDecLmStages; s >= 1; --s)
        for (int r = 2; r >= 1; --r)
            if (need(r, s) <= cap) {
                *rows = r;
                *stages = s;
                *smem_w = int(need(r, s));
                return;
            }
}

size_t dec_attn_smem(int n_head, int n_head_kv, int head_dim) {
    const int G = n_head / n_head_kv;
    const size_t tiles = dec_attn_part_off(G, head_dim) + size_t((G * head_dim + 3) & ~3) * 4 + size_t(G) * 8;
    const size_t merge = size_t(G) * kDecMergeChunk * head_dim * 4 + size_t(G) * (kDecMergeChunk + 2) * 8;
    return std::max({tiles, merge, dec_attn_mma_bytes(G, head_dim)});
}

size_t dec_attn_lean_smem(int n_head, int n_head_kv, int head_dim, int stage) {
    return dec_attn_recv_end(n_head / n_head_kv, head_dim, std::max(stage, 0));
}

int dec_attn_stage_max(int n_head, int n_head_kv, int head_dim) {
    if (!dec_attn_lean_ok(n_head / n_head_kv, head_dim)) return 0;
    int dev = 0, cap = 0;
    CUDA_CHECK(cudaGetDevice(&dev), "dec_attn_stage_max");
    CUDA_CHECK(cudaDeviceGetAttribute(&cap, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "dec_attn_stage_max");
    int k = 0;  // in steps of a cluster split's granule
    while (dec_attn_lean_smem(n_head, n_head_kv, head_dim, k + kDecClusterGran) <= size_t(cap)) k += kDecClusterGran;
    return k;
}

void dec_set_smem_limit(size_t bytes) {
    // Only ever raised (per device): engines and tests with smaller needs must not
    // lower the limit under an engine that is still running.
    static std::mutex mu;
    static std::map<int, size_t> set;
    std::lock_guard<std::mutex> lock(mu);
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev), "dec_set_smem_limit");
    size_t& cur = set[dev];
    if (bytes <= cur) return;
    const std::vector<const void*> ks = all_kernels();
    if (cur == 0) {
        // the cluster attention may run 16 blocks a cluster (H100/H200 allow it, not portably)
        // (and its empty stand-in, dec_noop_kernel, in the profiler)
        std::vector<const void*> ck = cluster_attn_kernels();
        ck.push_back(reinterpret_cast<const void*>(dec_noop_kernel));
        for (const void* k : ck)
            CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
                       "decode attention: non-portable cluster size");
    }
    if (cur == 0) {  // one shared-memory carveout for all: consecutive kernels can share an SM
        for (const void* k : ks)
            CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            int(cudaSharedmemCarveoutMaxShared)),
                       "decode kernels carveout");
    }
    // Each kernel's dynamic limit leaves room for its static shared memory: the runtime refuses a
    // limit whose sum with it passes the opt-in maximum, and `bytes` may be that maximum itself (the
    // staging attention's plan fills it). The kernels with static arrays never launch with that much.
    int optin = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "dec_set_smem_limit");
    for (const void* k : ks) {
        cudaFuncAttributes fa{};
        CUDA_CHECK(cudaFuncGetAttributes(&fa, k), "decode kernels' attributes");
        const size_t room = size_t(optin) > fa.sharedSizeBytes ? size_t(optin) - fa.sharedSizeBytes : 0;
        CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(std::min(bytes, room))),
                   "decode kernels shared memory");
    }
    cur = bytes;
}

int dec_attn_max_cluster(int n_head, int n_head_kv, int head_dim, int stage) {
    for (int c : {kDecAttnClusterMax, kDecAttnCluster}) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(unsigned(c), unsigned(n_head_kv));
        cfg.blockDim = dim3(NT);
        // the larger of the two cluster launches' sizes (the generic instance runs where cluster_mma is off)
        cfg.dynamicSmemBytes =
            std::max(dec_attn_smem(n_head, n_head_kv, head_dim), dec_attn_lean_smem(n_head, n_head_kv, head_dim, stage));
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = unsigned(c);
        attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        int n = 0;
        const cudaError_t e = cudaOccupancyMaxActiveClusters(
            &n, cluster_kernel_for(n_head, n_head_kv, head_dim, true, stage > 0), &cfg);
        if (e == cudaSuccess && n > 0) return c;
        cudaGetLastError();  // a size this GPU refuses: try the portable one
    }
    return stage > 0 ? 0 : kDecAttnCluster;
}

DecLaunchShape dec_qkv_shape(const DecQkvArgs& a) {
    return {dim3((a.n_head + 2 * a.n_head_kv) * a.parts), dec_qkv_smem(a), 0};
}

DecLaunchShape dec_attention_shape(const DecAttnArgs& a) {
    const bool lean = a.cluster > 0 && cluster_on_mma(a.n_head, a.n_head_kv, a.head_dim, a.cluster_mma);
    return {dim3(a.cluster > 0 ? a.cluster * std::max(1, a.clusters) : a.max_splits, a.n_head_kv),
            lean                 ? dec_attn_lean_smem(a.n_head, a.n_head_kv, a.head_dim, a.stage)
            : a.cluster > 0      ? dec_attn_smem(a.n_head, a.n_head_kv, a.head_dim)
            : direct_on_mma(a)   ? dec_align16(dec_attn_mma_bytes(a.n_head / a.n_head_kv, a.head_dim))
                                 : dec_attn_smem(a.n_head, a.n_head_kv, a.head_dim),
            a.cluster > 0 ? a.cluster : 0};
}

DecLaunchShape dec_proj_shape(const DecProjArgs& a) {
    const int blocks = a.mode == DEC_LOGITS ? std::max(1, std::min(dec_proj_blocks(a), a.lm_grid)) : dec_proj_blocks(a);
    return {dim3(blocks), dec_proj_smem(a), 0};
}

void dec_noop(const DecLaunchShape& shape, int pdl_early, cudaStream_t st, bool pdl, const char* what) {
    launch(dec_noop_kernel, shape.grid, shape.smem, st, pdl, pdl_early, ctx("dec_noop_kernel", what), shape.cluster);
}

void dec_qkv(const DecQkvArgs& a, cudaStream_t st, bool pdl, const char* what) {
    const DecLaunchShape sh = dec_qkv_shape(a);
    launch(qkv_kernel_for(a.w[0].type, a.w[1].type, a.w[2].type, a.embed != 0, a.qk_raw != 0), sh.grid, sh.smem, st, pdl, a,
           ctx("dec_qkv_kernel", what));
}

void dec_attention(const DecAttnArgs& a, cudaStream_t st, bool pdl, const char* what) {
    if (a.cluster < 0 || a.cluster > kDecAttnClusterMax)
        throw Error(ctx("dec_attention", what) + ": cluster size " + std::to_string(a.cluster) + " outside [0, " +
                    std::to_string(kDecAttnClusterMax) + "]");
    if (a.cluster > 0 && (a.clusters < 1 || a.clusters > kDecAttnMaxClusters ||
                          a.clusters > a.max_splits))
        throw Error(ctx("dec_attention", what) + ": " + std::to_string(a.clusters) + " clusters of " +
                    std::to_string(a.cluster) + " (at most " + std::to_string(kDecAttnMaxClusters) +
                    " clusters and max_splits blocks: the partial buffers' size)");
    if (a.stage < 0) throw Error(ctx("dec_attention", what) + ": stage " + std::to_string(a.stage) + " < 0");
    const DecLaunchShape sh = dec_attention_shape(a);
    const int gd = a.n_head / a.n_head_kv * a.head_dim;
    if (a.cluster)
        launch(cluster_kernel_for(a.n_head, a.n_head_kv, a.head_dim, a.cluster_mma != 0, a.stage > 0, a.no_prefetch != 0),
               sh.grid, sh.smem,
               st, pdl, a, ctx("dec_attn_kernel (cluster)", what), sh.cluster);
    else if (direct_on_mma(a))
        launch(direct_kernel_for(a.head_dim), sh.grid, sh.smem, st, pdl, a, ctx("dec_attn_kernel (direct)", what));
    else launch(attn_kernel_for<false>(gd), sh.grid, sh.smem, st, pdl, a, ctx("dec_attn_kernel", what));
}

DecLaunchShape dec_qk_norm_shape(const DecQkNormArgs& a) { return {dim3(a.n_head + a.n_head_kv), 0, 0}; }

void dec_qk_norm(const DecQkNormArgs& a, cudaStream_t st, bool pdl, const char* what) {
    const DecLaunchShape sh = dec_qk_norm_shape(a);
    launch(dec_qk_norm_kernel, sh.grid, sh.smem, st, pdl, a, ctx("dec_qk_norm_kernel", what));
}

void dec_proj(const DecProjArgs& a, cudaStream_t st, bool pdl, const char* what) {
    if (a.mode == DEC_RESID && a.rows_per_block > 64)
        throw Error(std::string("dec_proj: at most 64 rows per block in the residual mode (") + (what ? what : "?") + ")");
    if (a.pend.x && a.mode != DEC_GLU && a.mode != DEC_LOGITS)
        throw Error(std::string("dec_proj: a pending residual add goes with the GLU or the logits mode (") +
                    (what ? what : "?") + ")");
    if ((a.mode == DEC_RESID && (a.norm_w || a.n_tensors != 1)) || (a.mode == DEC_GLU && (!a.norm_w || a.n_tensors != 2)))
        throw Error(std::string("dec_proj: the residual mode takes one tensor and no norm, the GLU mode two and a norm (") +
                    (what ? what : "?") + ")");
    if (a.act_parts > 1 && (a.mode != DEC_RESID || !a.act_ml || a.act_parts > kDecAttnMaxClusters || a.act_hd <= 0 ||
                            a.w[0].n_in % a.act_hd || a.act_hd % 4))
        throw Error(std::string("dec_proj: merged partial inputs need the residual mode, act_ml, at most ") +
                    std::to_string(kDecAttnMaxClusters) + " parts and a head size dividing n_in (" + (what ? what : "?") + ")");
    const DecLaunchShape sh = dec_proj_shape(a);
    launch(proj_kernel_for(a), sh.grid, sh.smem, st, pdl, a, ctx(a.mode == DEC_LOGITS ? "dec_lm_kernel" : "dec_proj_kernel", what));
}

}  // namespace cu
}  // namespace orcd
