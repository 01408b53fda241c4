// sample_kernels.cu - sample_rows: the CPU sampler's chain (cpp/sampler.cpp) on the GPU,
// one 1024-thread block per row. See sample.cuh for what is supported and how the two
// can differ (rounding of sums only).
//
// Per row: sanitise (NaN -> -inf, +inf -> FLT_MAX, -0 -> +0 so equal floats have equal
// keys) -> penalties over the history window -> first maximum (greedy ends here) ->
// either
//   top_k set: the k-th best key by a 4-pass radix select (8 bits a pass), the set
//   gathered into shared memory in id order (ties at the k-th key: lowest ids first,
//   as the CPU's heap keeps them), normaliser z over it, min_p, sort by (logit desc,
//   id asc), top_p cut by a prefix sum, re-sort by id, temperature weights, draw;
// or, with top_k off (top_p == 1 here), the whole vocabulary in id order: per-thread
//   chunk sums of the weights, a block scan, and the thread whose chunk holds u*total
//   walks it.
#include <cfloat>
#include <cmath>

#include "cuda_common.cuh"
#include "sample.cuh"

namespace orcd {
namespace cu {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxCand = 1024;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Order-preserving map of a float (not NaN) to an unsigned key.
__device__ __forceinline__ uint32_t key_of(float v) {
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inclusive scan of v over the block (every thread passes one value); returns this
// thread's inclusive prefix; *total gets the sum. buf: kThreads doubles of shared memory.
__device__ double block_scan(double v, double* buf, double* total) {
    const int t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) {
        const double add = t >= off ? buf[t - off] : 0.0;
        __syncthreads();
        buf[t] += add;
        __syncthreads();
    }
    const double r = buf[t];
    *total = buf[kThreads - 1];
    __syncthreads();
    return r;
}

// Same for ints.
__device__ int block_scan_int(int v, int* buf, int* total) {
    const int t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) {
        const int add = t >= off ? buf[t - off] : 0;
        __syncthreads();
        buf[t] += add;
        __syncthreads();
    }
    const int r = buf[t];
    *total = buf[kThreads - 1];
    __syncthreads();
    return r;
}

// Descending bitonic sort of kMaxCand 64-bit values in shared memory (one per thread).
__device__ void bitonic_sort_desc(uint64_t* s) {
    const int t = threadIdx.x;
    for (int size = 2; size <= kMaxCand; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const int partner = t ^ stride;
            if (partner > t) {
                const bool desc = (t & size) == 0;
                const uint64_t a = s[t], b = s[partner];
                if (desc ? (a < b) : (a > b)) {
                    s[t] = b;
                    s[partner] = a;
                }
            }
            __syncthreads();
        }
    }
}

__global__ void __launch_bounds__(kThreads) sample_rows_kernel(float* logits, int V, const SampleRow* rows,
                                                               int32_t* out_token, uint64_t* out_state) {
    __shared__ double dbuf[kThreads];
    __shared__ int ibuf[kThreads];
    __shared__ uint64_t sbuf[kMaxCand];
    __shared__ int hist[256];
    __shared__ float red_w[kThreads / 32];
    __shared__ int red_i[kThreads / 32];
    __shared__ int s_int[4];

    const int r = blockIdx.x;
    const int t = threadIdx.x;
    const SampleRow& row = rows[r];
    const SamplerParams& p = row.p;
    float* w = logits + size_t(r) * size_t(V);
    const float ninf = -INFINITY;

    // 1. sanitise
    for (int i = t; i < V; i += kThreads) {
        float v = w[i];
        if (isnan(v)) v = ninf;
        else if (v > FLT_MAX) v = FLT_MAX;
        else if (v == 0.0f) v = 0.0f;
        w[i] = v;
    }
    __syncthreads();

    // 2. penalties: each distinct token of the window once, by the thread holding its first occurrence
    const bool rep = p.repetition_penalty != 1.0f;
    const bool pres = p.presence_penalty != 0.0f;
    const bool freq = p.frequency_penalty != 0.0f;
    if ((rep || pres || freq) && row.n_history > 0 && p.penalty_last_n != 0) {
        const int n = p.penalty_last_n < 0 ? row.n_history : min(row.n_history, p.penalty_last_n);
        const int32_t* win = row.history + (row.n_history - n);
        for (int j = t; j < n; j += kThreads) {
            const int32_t tok = win[j];
            bool first = true;
            for (int k = 0; k < j && first; ++k) first = win[k] != tok;
            if (!first) continue;
            int count = 0;
            for (int k = j; k < n; ++k) count += win[k] == tok;
            float v = w[tok];
            if (rep) v = v > 0.0f ? v / p.repetition_penalty : v * p.repetition_penalty;
            v -= float(count) * p.frequency_penalty + p.presence_penalty;
            if (isnan(v)) v = ninf;
            w[tok] = v;
        }
    }
    __syncthreads();

    // 3. first maximum
    float lw = ninf;
    int li = -1;
    for (int i = t; i < V; i += kThreads)
        if (w[i] > lw) { lw = w[i]; li = i; }
    for (int off = 16; off > 0; off >>= 1) {
        const float ow = __shfl_xor_sync(0xffffffffu, lw, off);
        const int oi = __shfl_xor_sync(0xffffffffu, li, off);
        if (ow > lw || (ow == lw && oi >= 0 && (li < 0 || oi < li))) { lw = ow; li = oi; }
    }
    if ((t & 31) == 0) { red_w[t >> 5] = lw; red_i[t >> 5] = li; }
    __syncthreads();
    if (t == 0) {
        float bw = red_w[0];
        int bi = red_i[0];
        for (int k = 1; k < kThreads / 32; ++k)
            if (red_w[k] > bw || (red_w[k] == bw && red_i[k] >= 0 && (bi < 0 || red_i[k] < bi))) {
                bw = red_w[k];
                bi = red_i[k];
            }
        red_w[0] = bw;
        red_i[0] = bi;
    }
    __syncthreads();
    const float lmax = red_w[0];
    const int best = red_i[0];
    if (best < 0 || p.temperature == 0.0f) {
        if (t == 0) {
            out_token[r] = best;
            out_state[r] = row.rng_state;
        }
        return;
    }

    // the draw: the CPU sampler's next_uniform()
    const uint64_t state = row.rng_state + kGolden;
    const double u = double(mix64(state) >> 11) * (1.0 / 9007199254740992.0);
    if (t == 0) out_state[r] = state;
    const double inv_t = 1.0 / double(p.temperature);
    const bool use_min_p = p.min_p > 0.0f;
    const double lmin = use_min_p ? double(lmax) + log(double(p.min_p)) : 0.0;
    const int chunk = (V + kThreads - 1) / kThreads;
    const int c0 = min(V, t * chunk), c1 = min(V, c0 + chunk);

    if (!(p.top_k > 0 && p.top_k < V)) {
        // 4a. the whole vocabulary (top_p == 1): weights in id order, chunk per thread
        double s = 0.0;
        for (int i = c0; i < c1; ++i) {
            if (!(w[i] > ninf) || (use_min_p && double(w[i]) < lmin)) continue;
            s += exp((double(w[i]) - double(lmax)) * inv_t);
        }
        double total;
        const double incl = block_scan(s, dbuf, &total);
        const double target = u * total;
        if (t == 0) s_int[0] = -1;
        __syncthreads();
        const double excl = t > 0 ? dbuf[t - 1] : 0.0;  // the scan's values stay in dbuf
        if (s > 0.0 && target >= excl && target < incl) {
            double cum = excl;
            int pick = -1, last = -1;
            for (int i = c0; i < c1; ++i) {
                if (!(w[i] > ninf) || (use_min_p && double(w[i]) < lmin)) continue;
                const double e = exp((double(w[i]) - double(lmax)) * inv_t);
                if (e <= 0.0) continue;
                cum += e;
                last = i;
                if (target < cum) { pick = i; break; }
            }
            s_int[0] = pick >= 0 ? pick : last;
        }
        __syncthreads();
        if (s_int[0] < 0) {
            // rounding put u*total at the very end: the last positive weight, as the CPU does
            ibuf[t] = s > 0.0 ? t : -1;
            __syncthreads();
            if (t == 0) {
                int lt = -1;
                for (int k = kThreads - 1; k >= 0 && lt < 0; --k) lt = ibuf[k];
                int last = best;
                if (lt >= 0)
                    for (int i = min(V, lt * chunk); i < min(V, lt * chunk + chunk); ++i)
                        if (w[i] > ninf && !(use_min_p && double(w[i]) < lmin) &&
                            exp((double(w[i]) - double(lmax)) * inv_t) > 0.0)
                            last = i;
                s_int[0] = last;
            }
            __syncthreads();
        }
        if (t == 0) out_token[r] = s_int[0];
        return;
    }

    // 4b. the top_k set. Radix select of the k-th largest key.
    const int k = p.top_k;
    uint32_t prefix = 0, mask = 0;
    int want = k, above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (t < 256) hist[t] = 0;
        __syncthreads();
        for (int i = t; i < V; i += kThreads) {
            const uint32_t key = key_of(w[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
        }
        __syncthreads();
        if (t == 0) {
            int cum = 0, b = 255;
            for (; b > 0; --b) {
                if (cum + hist[b] >= want) break;
                cum += hist[b];
            }
            s_int[0] = b;
            s_int[1] = cum;
        }
        __syncthreads();
        const int b = s_int[0];
        want -= s_int[1];
        above += s_int[1];
        prefix |= uint32_t(b) << shift;
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t K = prefix;
    const bool k_finite = K != key_of(ninf);
    const int take_eq = k_finite ? want : 0;  // ties at K: the lowest ids

    // gather in id order: gt entries to [0, above), the first take_eq ties after them
    int n_gt = 0, n_eq = 0;
    for (int i = c0; i < c1; ++i) {
        const uint32_t key = key_of(w[i]);
        n_gt += key > K;
        n_eq += key == K;
    }
    int tot_gt, tot_eq;
    int gt_pos = block_scan_int(n_gt, ibuf, &tot_gt) - n_gt;
    int eq_pos = block_scan_int(n_eq, ibuf, &tot_eq) - n_eq;
    const int C = tot_gt + min(take_eq, tot_eq);
    // sbuf holds candidate ids for now
    for (int i = c0; i < c1; ++i) {
        const uint32_t key = key_of(w[i]);
        if (key > K) {
            sbuf[gt_pos++] = uint64_t(i);
        } else if (key == K && k_finite) {
            if (eq_pos < take_eq) sbuf[tot_gt + eq_pos] = uint64_t(i);
            ++eq_pos;
        }
    }
    __syncthreads();

    // normaliser over the top_k set at temperature 1, then min_p, sorted by (logit desc, id asc)
    const int id = t < C ? int(sbuf[t]) : -1;
    const float wi = id >= 0 ? w[id] : ninf;
    const double e1 = id >= 0 ? exp(double(wi) - double(lmax)) : 0.0;
    double z;
    block_scan(e1, dbuf, &z);
    const bool kept = id >= 0 && !(use_min_p && double(wi) < lmin);
    __syncthreads();
    sbuf[t] = kept ? (uint64_t(key_of(wi)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(id)) : 0ull;
    __syncthreads();
    bitonic_sort_desc(sbuf);
    int M;
    block_scan_int(kept ? 1 : 0, ibuf, &M);
    int keepN = M;
    if (p.top_p < 1.0f) {
        const int sid = t < M ? int(0xFFFFFFFFu - uint32_t(sbuf[t] & 0xFFFFFFFFull)) : -1;
        const double e = sid >= 0 ? exp(double(w[sid]) - double(lmax)) : 0.0;
        double tot;
        const double cum = block_scan(e, dbuf, &tot);
        const double target = double(p.top_p) * z;
        if (t == 0) s_int[2] = M;
        __syncthreads();
        const double prev = t > 0 ? dbuf[t - 1] : 0.0;
        if (t < M && cum >= target && prev < target) s_int[2] = t + 1;
        __syncthreads();
        keepN = s_int[2];
    }
    // the kept prefix, re-sorted by id: the low word (~id) alone sorts descending = ascending id
    const uint64_t low = t < keepN ? (sbuf[t] & 0xFFFFFFFFull) : 0ull;
    __syncthreads();
    sbuf[t] = low;
    __syncthreads();
    bitonic_sort_desc(sbuf);
    const int fid = t < keepN ? int(0xFFFFFFFFu - uint32_t(sbuf[t])) : -1;
    const double e = fid >= 0 ? exp((double(w[fid]) - double(lmax)) * inv_t) : 0.0;
    double total;
    const double cum = block_scan(e, dbuf, &total);
    const double target = u * total;
    if (t == 0) s_int[3] = -1;
    __syncthreads();
    const double prev = t > 0 ? dbuf[t - 1] : 0.0;
    if (fid >= 0 && e > 0.0 && target < cum && target >= prev) s_int[3] = fid;
    __syncthreads();
    if (s_int[3] < 0) {  // rounding: the last positive weight in id order
        ibuf[t] = (fid >= 0 && e > 0.0) ? t : -1;
        __syncthreads();
        if (t == 0) {
            int lt = -1;
            for (int q = kThreads - 1; q >= 0 && lt < 0; --q) lt = ibuf[q];
            s_int[3] = lt >= 0 ? int(0xFFFFFFFFu - uint32_t(sbuf[lt])) : best;
        }
        __syncthreads();
    }
    if (t == 0) out_token[r] = s_int[3];
}

}  // namespace

void launch_sample_rows(float* logits, int n_rows, int n_vocab, const SampleRow* rows, int32_t* out_token,
                        uint64_t* out_state, cudaStream_t stream) {
    if (n_rows <= 0) return;
    sample_rows_kernel<<<n_rows, kThreads, 0, stream>>>(logits, n_vocab, rows, out_token, out_state);
    CUDA_LAUNCH_CHECK("sample_rows");
}

}  // namespace cu
}  // namespace orcd
