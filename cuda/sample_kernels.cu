// sample_kernels.cu - sample_rows: the CPU sampler's chain (cpp/sampler.cpp) on the GPU.
// See sample.cuh for what is supported, how the two can differ (rounding of sums only) and
// which rows take the split path (sample_slices_kernel + sample_merge_kernel below) instead
// of the one-block kernel (sample_rows_kernel, one 1024-thread block per row).
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

// The chain's first step: NaN -> -inf, +inf -> FLT_MAX, -0 -> +0.
__device__ __forceinline__ float sanitized(float v) {
    if (isnan(v)) v = -INFINITY;
    else if (v > FLT_MAX) v = FLT_MAX;
    else if (v == 0.0f) v = 0.0f;
    return v;
}

// A token's logit after its penalties (it occurs `count` times in the window).
__device__ __forceinline__ float penalized(float v, int count, const SamplerParams& p, bool rep) {
    if (rep) v = v > 0.0f ? v / p.repetition_penalty : v * p.repetition_penalty;
    v -= float(count) * p.frequency_penalty + p.presence_penalty;
    if (isnan(v)) v = -INFINITY;
    return v;
}

__device__ __forceinline__ bool has_penalties(const SampleRow& row) {
    const SamplerParams& p = row.p;
    return (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) &&
           row.n_history > 0 && p.penalty_last_n != 0;
}

// The rows the split path takes: greedy, or a top_k set the merge can hold.
__device__ __host__ __forceinline__ bool split_row(const SamplerParams& p, int V) {
    return p.temperature == 0.0f || (p.top_k > 0 && p.top_k < V && p.top_k <= kMaxCand);
}
// The rows the whole-vocabulary split path takes (when asked for): sampled with top_k off
// (top_p is 1 there: device_sampling_supports).
__device__ __host__ __forceinline__ bool full_row(const SamplerParams& p, int V) {
    return p.temperature != 0.0f && !(p.top_k > 0 && p.top_k < V);
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

// The chain from the gathered top_k set on (both kernels run this same code): sbuf[0, C)
// holds the set's ids, those above the k-th key in id order, then the ties at it (lowest
// ids first). Normaliser z over the set at temperature 1, min_p, sort by (logit desc, id
// asc), top_p cut by a prefix sum, re-sort by id, temperature weights, the draw.
__device__ void draw_top_k(const float* w, int C, float lmax, int best, double u, double inv_t, bool use_min_p,
                           double lmin, const SamplerParams& p, uint64_t* sbuf, double* dbuf, int* ibuf, int* s_int,
                           int32_t* out) {
    const int t = threadIdx.x;
    const float ninf = -INFINITY;
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
    if (t == 0) *out = s_int[3];
}

// What a sampled row's draw needs besides its weights: the CPU sampler's next_uniform() (u,
// and the generator state after it), 1/T, and min_p as a logit threshold under the row's
// maximum lmax (use_min_p off: no threshold). One definition for every kernel that draws.
struct DrawSetup {
    uint64_t state;
    double u, inv_t, lmin;
    bool use_min_p;
};
__device__ __forceinline__ DrawSetup draw_setup(const SampleRow& row, float lmax) {
    DrawSetup d;
    d.state = row.rng_state + kGolden;
    d.u = double(mix64(d.state) >> 11) * (1.0 / 9007199254740992.0);
    d.inv_t = 1.0 / double(row.p.temperature);
    d.use_min_p = row.p.min_p > 0.0f;
    d.lmin = d.use_min_p ? double(lmax) + log(double(row.p.min_p)) : 0.0;
    return d;
}

// The weights of logits [c0, c1) of w in id order (the whole-vocabulary draw's chunk of one
// thread): exp((w - lmax) / T) in double for the finite ones at or above lmin (min_p).
__device__ double chunk_weight_sum(const float* w, int c0, int c1, float lmax, double inv_t, bool use_min_p,
                                   double lmin) {
    double s = 0.0;
    for (int i = c0; i < c1; ++i) {
        if (!(w[i] > -INFINITY) || (use_min_p && double(w[i]) < lmin)) continue;
        s += exp((double(w[i]) - double(lmax)) * inv_t);
    }
    return s;
}

// The whole-vocabulary draw (top_k off, top_p 1) of one row by a block of kThreads: thread t
// holds the weight sum s of its chunk [t*chunk, +chunk) (chunk = ceil(V / kThreads)); a block
// scan of the sums, and the thread whose chunk holds u*total walks it. sample_rows_kernel
// computes the sums itself, sample_full_draw_kernel takes them from sample_full_sums_kernel:
// the same values in the same threads, so the two pick the same token. Returns the token to
// every thread.
__device__ int draw_whole_vocab(const float* w, int V, double s, float lmax, int best, double u, double inv_t,
                                bool use_min_p, double lmin, double* dbuf, int* ibuf, int* s_int) {
    const float ninf = -INFINITY;
    const int t = threadIdx.x;
    const int chunk = (V + kThreads - 1) / kThreads;
    const int c0 = min(V, t * chunk), c1 = min(V, c0 + chunk);
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
    return s_int[0];
}

// skip_split: rows the split path takes return at once; skip_full: so do full_row ones (the
// whole-vocabulary split path takes them).
__global__ void __launch_bounds__(kThreads) sample_rows_kernel(float* logits, int V, const SampleRow* rows,
                                                               int32_t* out_token, uint64_t* out_state,
                                                               bool skip_split, bool skip_full) {
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

    if (skip_split && split_row(p, V)) return;  // sample_slices_kernel + sample_merge_kernel take it
    if (skip_full && full_row(p, V)) return;    // sample_slices_kernel + the two full kernels take it

    // 1. sanitise
    for (int i = t; i < V; i += kThreads) w[i] = sanitized(w[i]);
    __syncthreads();

    // 2. penalties: each distinct token of the window once, by the thread holding its first occurrence
    const bool rep = p.repetition_penalty != 1.0f;
    if (has_penalties(row)) {
        const int n = p.penalty_last_n < 0 ? row.n_history : min(row.n_history, p.penalty_last_n);
        const int32_t* win = row.history + (row.n_history - n);
        for (int j = t; j < n; j += kThreads) {
            const int32_t tok = win[j];
            bool first = true;
            for (int k = 0; k < j && first; ++k) first = win[k] != tok;
            if (!first) continue;
            int count = 0;
            for (int k = j; k < n; ++k) count += win[k] == tok;
            w[tok] = penalized(w[tok], count, p, rep);
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
    const DrawSetup ds = draw_setup(row, lmax);
    if (t == 0) out_state[r] = ds.state;
    const double u = ds.u, inv_t = ds.inv_t, lmin = ds.lmin;
    const bool use_min_p = ds.use_min_p;
    const int chunk = (V + kThreads - 1) / kThreads;
    const int c0 = min(V, t * chunk), c1 = min(V, c0 + chunk);

    if (!(p.top_k > 0 && p.top_k < V)) {
        // 4a. the whole vocabulary (top_p == 1): weights in id order, chunk per thread
        const double s = chunk_weight_sum(w, c0, c1, lmax, inv_t, use_min_p, lmin);
        const int tok = draw_whole_vocab(w, V, s, lmax, best, u, inv_t, use_min_p, lmin, dbuf, ibuf, s_int);
        if (t == 0) out_token[r] = tok;
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

    draw_top_k(w, C, lmax, best, u, inv_t, use_min_p, lmin, p, sbuf, dbuf, ibuf, s_int, out_token + r);
}

// ---------------------------------------------------------------- the split path
// sample_slices_kernel: block (slice b, row r) sanitises and penalises logits [b*kSampleSlice,
// +kSampleSlice) of row r in place, records the slice's first maximum and (top_k rows) its
// own top_k ids in id order. sample_merge_kernel: one block per row takes the first maximum
// over the slices, the k-th key over the candidates (the same as over the row: they hold the
// row's top_k), gathers the set as sample_rows_kernel does and runs draw_top_k.
// Rows with top_k <= kWarpK (64) skip the radix select, the gather and draw_top_k: the slice
// kernel stores its 64 largest composites (below) sorted, the merge folds them and warp 0 runs
// draw_top_k_warp (scripts/model_warp_topk.py models the index arithmetic in NumPy).

constexpr int kSliceThreads = 256;
constexpr int kSlicePer = kSampleSlice / kSliceThreads;  // contiguous logits per thread

struct MaxPart {
    float w;
    int i;  // -1: every logit of the slice is -inf
};

__host__ __device__ inline int n_slices(int V) { return (V + kSampleSlice - 1) / kSampleSlice; }
// Per row of the workspace: n_slices MaxParts, then n_slices candidate lists of kMaxCand ids
// (or, for a full_row row, kThreads chunk sums in double: at least that much room).
__host__ __device__ inline size_t work_row_bytes(int S) {
    const size_t lists = size_t(S) * size_t(kMaxCand) * 4, sums = size_t(kThreads) * sizeof(double);
    return size_t(S) * sizeof(MaxPart) + (lists > sums ? lists : sums);
}

// hist[bin] += 1 for every active lane, one atomic per distinct bin of the warp (the top
// bytes of logits of similar size collide: per-lane atomics on one address serialise).
__device__ __forceinline__ void hist_add(int* hist, uint32_t bin, bool active) {
    const unsigned act = __ballot_sync(0xffffffffu, active);
    if (!active) return;
    const unsigned peers = __match_any_sync(act, bin);
    if (int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32); *total: the sum.
// wbuf: 32 ints of shared memory.
__device__ int block_excl_scan(int v, int* wbuf, int* total) {
    const int t = threadIdx.x, lane = t & 31, wid = t >> 5, nw = int(blockDim.x) >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wbuf[wid] = x;
    __syncthreads();
    if (wid == 0) {
        int s = lane < nw ? wbuf[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < nw) wbuf[lane] = s;
    }
    __syncthreads();
    const int base = wid ? wbuf[wid - 1] : 0;
    *total = wbuf[nw - 1];
    __syncthreads();
    return base + x - v;
}

// Warp 0: the bin b that holds the want-th largest key of hist (bins in descending order,
// counts above it: cum <= want - 1 < cum + hist[b]) -> s_int[0] = b, s_int[1] = cum; the same
// answer as sample_rows_kernel's walk from bin 255 down (bin 0 when no higher bin reaches
// want), with each lane summing 8 bins and a warp scan instead of one thread's 256 steps.
__device__ __forceinline__ void select_bin(const int* hist, int want, int* s_int) {
    const int lane = threadIdx.x & 31;
    int c[8], sum = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c[i] = hist[255 - (8 * lane + i)];
        sum += c[i];
    }
    int incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    const unsigned reach = __ballot_sync(0xffffffffu, incl >= want);
    const int owner = reach ? __ffs(reach) - 1 : 31;
    if (lane == owner) {
        int cum = incl - sum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int b = 255 - (8 * lane + i);
            if (b == 0 || cum + c[i] >= want) {
                s_int[0] = b;
                s_int[1] = cum;
                break;
            }
            cum += c[i];
        }
    }
}

// The want-th largest key over the block's keys (key_at(e, &key): this thread's e-th key,
// false past its end; per: the same for every thread) by a 4-pass radix select, 8 bits a
// pass, as sample_rows_kernel does; *K: the key, *left: how many of the keys equal to K
// are among the want largest.
template <class KeyAt>
__device__ void radix_kth(const KeyAt& key_at, int per, int want, int* hist, int* s_int, uint32_t* K, int* left) {
    const int t = threadIdx.x;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = t; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int e = 0; e < per; ++e) {
            uint32_t key = 0;
            const bool ok = key_at(e, &key);
            hist_add(hist, (key >> shift) & 255u, ok && (key & mask) == prefix);
        }
        __syncthreads();
        if (t < 32) select_bin(hist, want, s_int);
        __syncthreads();
        want -= s_int[1];
        prefix |= uint32_t(s_int[0]) << shift;
        mask |= 255u << shift;
        __syncthreads();
    }
    *K = prefix;
    *left = want;
}

// First maximum of the block: (lw, li) per thread, ties to the lowest id, -1 when none;
// red_w/red_i: one slot per warp. Every thread gets the result.
__device__ void block_first_max(float lw, int li, float* red_w, int* red_i, float* bw_out, int* bi_out) {
    const int t = threadIdx.x, nw = int(blockDim.x) >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const float ow = __shfl_xor_sync(0xffffffffu, lw, off);
        const int oi = __shfl_xor_sync(0xffffffffu, li, off);
        if (ow > lw || (ow == lw && oi >= 0 && (li < 0 || oi < li))) { lw = ow; li = oi; }
    }
    if ((t & 31) == 0) { red_w[t >> 5] = lw; red_i[t >> 5] = li; }
    __syncthreads();
    if (t < 32) {  // the warps' results folded by warp 0 the same way (the rule is a total order)
        lw = t < nw ? red_w[t] : -INFINITY;
        li = t < nw ? red_i[t] : -1;
        for (int off = 16; off > 0; off >>= 1) {
            const float ow = __shfl_xor_sync(0xffffffffu, lw, off);
            const int oi = __shfl_xor_sync(0xffffffffu, li, off);
            if (ow > lw || (ow == lw && oi >= 0 && (li < 0 || oi < li))) { lw = ow; li = oi; }
        }
        __syncwarp();
        if (t == 0) { red_w[0] = lw; red_i[0] = li; }
    }
    __syncthreads();
    *bw_out = red_w[0];
    *bi_out = red_i[0];
}

// ---------------------------------------------------------------- warp top-64 (top_k <= kWarpK)
// Rows with top_k <= kWarpK take warp-level code on both split kernels instead of the radix
// select and the 1024-thread draw: the order (logit desc, id asc) is the order of the 64-bit
// composite comp_of(v, id) = key_of(v) << 32 | ~id, which is distinct per id, so "the top_k
// by (logit desc, id asc)" - the set the CPU's heap keeps, ties at the k-th logit going to
// the lowest ids - is just the k largest composites. A warp holds 64 composites, element
// j = 2 * lane + i in register x[i]; 0 pads (below every real composite: key_of(-inf) > 0).
constexpr int kWarpK = 64;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ uint64_t comp_of(float v, int id) {
    return (uint64_t(key_of(v)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(id));
}
__device__ __forceinline__ int comp_id(uint64_t c) { return int(0xFFFFFFFFu - uint32_t(c & 0xFFFFFFFFull)); }
__device__ __forceinline__ uint32_t comp_key(uint64_t c) { return uint32_t(c >> 32); }
// key_of's inverse: the float the key was made from (bit for bit).
__device__ __forceinline__ float float_of_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// One compare-exchange stage of a bitonic network over the warp's 64 elements: element j
// and j ^ stride, the lower one keeping the larger when the run (j & size) is descending.
__device__ __forceinline__ void bitonic_stage(uint64_t x[2], int size, int stride) {
    const int lane = threadIdx.x & 31;
    if (stride == 1) {  // j = 2 lane and 2 lane + 1: both in this lane
        const bool desc = ((2 * lane) & size) == 0;
        if (desc ? (x[0] < x[1]) : (x[0] > x[1])) {
            const uint64_t a = x[0];
            x[0] = x[1];
            x[1] = a;
        }
        return;
    }
    const bool desc = ((2 * lane) & size) == 0;     // j & size, the same for i = 0, 1 (size >= 4)
    const bool lower = ((2 * lane) & stride) == 0;  // j < j ^ stride
    const bool keep_max = lower == desc;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint64_t o = __shfl_xor_sync(kFull, x[i], stride >> 1);
        x[i] = keep_max ? (x[i] > o ? x[i] : o) : (x[i] < o ? x[i] : o);
    }
}

// Sorts the warp's 64 elements descending.
__device__ __forceinline__ void warp_sort64_desc(uint64_t x[2]) {
#pragma unroll
    for (int size = 2; size <= 64; size <<= 1)
#pragma unroll
        for (int stride = size >> 1; stride > 0; stride >>= 1) bitonic_stage(x, size, stride);
}

// x, y: sorted descending -> x: the 64 largest of both, sorted descending (max(x[j], y[63 - j])
// is a bitonic sequence holding them; a bitonic merge sorts it).
__device__ __forceinline__ void warp_merge64_desc(uint64_t x[2], const uint64_t y[2]) {
    const int lane = threadIdx.x & 31;
    // y[63 - j], j = 2 lane + i: lane 31 - lane, register 1 - i
    const uint64_t r0 = __shfl_sync(kFull, y[1], 31 - lane);
    const uint64_t r1 = __shfl_sync(kFull, y[0], 31 - lane);
    x[0] = x[0] > r0 ? x[0] : r0;
    x[1] = x[1] > r1 ? x[1] : r1;
#pragma unroll
    for (int stride = 32; stride > 0; stride >>= 1) bitonic_stage(x, 64, stride);
}

// Element j of the warp's 64 (every lane gets it).
__device__ __forceinline__ uint64_t warp_elem(const uint64_t x[2], int j) {
    return __shfl_sync(kFull, (j & 1) ? x[1] : x[0], j >> 1);
}

// Inclusive scan over 64 positions t = 32 i + lane (v[i]: position 32 i + lane) with the very
// additions block_scan makes: its Hillis-Steele steps (off = 1 .. 16 in the warp, off = 32 across
// the two registers); positions 64 and up of block_scan hold zeros there, and x + 0.0 == x for the
// non-negative weights summed, so every prefix below 64 and the total (its last position) are
// the same doubles. prev[i]: the inclusive prefix at t - 1 (0 at t = 0).
__device__ __forceinline__ void warp_scan64(const double v[2], double incl[2], double prev[2], double* total) {
    const int lane = threadIdx.x & 31;
    double a[2] = {v[0], v[1]};
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        // position t adds t - o: in the same register from lane - o, or (t = 32 + lane, lane < o)
        // from register 0, lane 32 + lane - o; positions below o add 0.0 as block_scan does
        const double y0 = __shfl_sync(kFull, a[0], (lane - o) & 31);
        const double y1 = __shfl_up_sync(kFull, a[1], o);
        a[0] += lane >= o ? y0 : 0.0;
        a[1] += lane >= o ? y1 : y0;
    }
    a[1] += a[0];  // off = 32: position 32 + lane adds position lane
    incl[0] = a[0];
    incl[1] = a[1];
    const double up0 = __shfl_up_sync(kFull, a[0], 1), up1 = __shfl_up_sync(kFull, a[1], 1);
    const double last0 = __shfl_sync(kFull, a[0], 31);
    prev[0] = lane > 0 ? up0 : 0.0;
    prev[1] = lane > 0 ? up1 : last0;
    *total = __shfl_sync(kFull, a[1], 31);
}

// Rank sort of up to 64 distinct 64-bit values by one warp: s[0, 64) in shared memory holds
// them (~0ull for none); returns for each of this lane's values v[i] (position 32 i + lane)
// how many are smaller. Callers skip the ~0ull entries.
__device__ __forceinline__ void warp_rank64(const uint64_t* s, const uint64_t v[2], int rank[2]) {
    rank[0] = rank[1] = 0;
    // a short loop body, not 64 unrolled copies: this code runs once per row on one warp, so
    // straight-line code is fetched from outside the instruction cache (Nsight Compute: the
    // draw's warp stalled on no_inst most of its time when these loops were unrolled)
#pragma unroll 4
    for (int q = 0; q < 64; ++q) {
        const uint64_t o = s[q];
        rank[0] += o < v[0];
        rank[1] += o < v[1];
    }
}

// The merge's chain on the row's top_k set for k <= kWarpK, by warp 0 alone: top holds the
// row's 64 largest composites sorted descending (x as above). Lays the set out as
// sample_merge_kernel's gather does (the ids above the k-th key in id order, then the ties at it
// in id order; -inf ties dropped) and runs draw_top_k's steps on it with the same sums
// (warp_scan64) and the same sorted orders (the keys are distinct, so any sort gives them).
// Where draw_top_k lets several threads race to write a cut or a pick (only when rounding makes
// a prefix sum smaller than the one before it), this takes the lowest position.
// s: 64 uint64_t of shared memory for this warp.
__device__ void draw_top_k_warp(const uint64_t top[2], int k, float lmax, int best, double u, double inv_t,
                                bool use_min_p, double lmin, const SamplerParams& p, uint64_t* s, int32_t* out) {
    const int lane = threadIdx.x & 31;
    const float ninf = -INFINITY;
    const uint32_t K = comp_key(warp_elem(top, k - 1));
    const bool k_finite = K != key_of(ninf);
    // the layout: order (key == K, id); members: the first k composites, less -inf ones
    uint64_t lay[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int j = 2 * lane + i;
        const uint64_t c = top[i];
        const bool member = j < k && (k_finite || comp_key(c) > K);
        lay[i] = member ? (uint64_t(comp_key(c) == K) << 32) | uint64_t(uint32_t(comp_id(c))) : ~0ull;
        s[j] = lay[i];
    }
    __syncwarp();
    const int C = __popc(__ballot_sync(kFull, lay[0] != ~0ull)) + __popc(__ballot_sync(kFull, lay[1] != ~0ull));
    int rk[2];
    warp_rank64(s, lay, rk);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 2; ++i)
        if (lay[i] != ~0ull) s[rk[i]] = top[i];  // s[0, C): the set's composites in layout order
    __syncwarp();
    int id[2];
    float wv[2];
    double e1[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int t = 32 * i + lane;
        const uint64_t c = t < C ? s[t] : 0ull;
        id[i] = t < C ? comp_id(c) : -1;
        wv[i] = t < C ? float_of_key(comp_key(c)) : ninf;
        e1[i] = id[i] >= 0 ? exp(double(wv[i]) - double(lmax)) : 0.0;
    }
    __syncwarp();
    double inc[2], prv[2], z;
    warp_scan64(e1, inc, prv, &z);
    // min_p, then the kept sorted by (logit desc, id asc): rank among the kept composites
    uint64_t kc[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const bool kept = id[i] >= 0 && !(use_min_p && double(wv[i]) < lmin);
        kc[i] = kept ? comp_of(wv[i], id[i]) : 0ull;
        s[32 * i + lane] = kc[i];
    }
    __syncwarp();
    const int M = __popc(__ballot_sync(kFull, kc[0] != 0ull)) + __popc(__ballot_sync(kFull, kc[1] != 0ull));
    // descending rank: how many kept are larger (a short loop, as in warp_rank64)
    int big[2] = {0, 0};
#pragma unroll 4
    for (int q = 0; q < 64; ++q) {
        const uint64_t o = s[q];
        big[0] += o > kc[0];
        big[1] += o > kc[1];
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 2; ++i)
        if (kc[i] != 0ull) s[big[i]] = kc[i];  // s[0, M): the kept, descending
    __syncwarp();
    uint64_t sorted[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) sorted[i] = 32 * i + lane < M ? s[32 * i + lane] : 0ull;
    __syncwarp();
    int keepN = M;
    if (p.top_p < 1.0f) {
        double e[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            e[i] = 32 * i + lane < M ? exp(double(float_of_key(comp_key(sorted[i]))) - double(lmax)) : 0.0;
        double cum[2], pre[2], tot;
        warp_scan64(e, cum, pre, &tot);
        const double target = double(p.top_p) * z;
        bool hit[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) hit[i] = 32 * i + lane < M && cum[i] >= target && pre[i] < target;
        const unsigned h0 = __ballot_sync(kFull, hit[0]), h1 = __ballot_sync(kFull, hit[1]);
        if (h0) keepN = __ffs(h0);
        else if (h1) keepN = 32 + __ffs(h1);
    }
    // the kept prefix [0, keepN) re-sorted by id: rank by id among it
    uint64_t byid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        byid[i] = 32 * i + lane < keepN ? uint64_t(uint32_t(comp_id(sorted[i]))) : ~0ull;
        s[32 * i + lane] = byid[i];
    }
    __syncwarp();
    int rid[2];
    warp_rank64(s, byid, rid);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 2; ++i)
        if (byid[i] != ~0ull) s[rid[i]] = sorted[i];
    __syncwarp();
    int fid[2];
    double e[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int t = 32 * i + lane;
        const uint64_t c = t < keepN ? s[t] : 0ull;
        fid[i] = t < keepN ? comp_id(c) : -1;
        e[i] = fid[i] >= 0 ? exp((double(float_of_key(comp_key(c))) - double(lmax)) * inv_t) : 0.0;
    }
    double cum[2], pre[2], total;
    warp_scan64(e, cum, pre, &total);
    const double target = u * total;
    bool hit[2], pos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        pos[i] = fid[i] >= 0 && e[i] > 0.0;
        hit[i] = pos[i] && target < cum[i] && target >= pre[i];
    }
    const unsigned h0 = __ballot_sync(kFull, hit[0]), h1 = __ballot_sync(kFull, hit[1]);
    int pick;
    if (h0 || h1) {
        const int t = h0 ? __ffs(h0) - 1 : 32 + __ffs(h1) - 1;
        pick = __shfl_sync(kFull, t < 32 ? fid[0] : fid[1], t & 31);
    } else {  // rounding: the last positive weight in id order
        const unsigned p0 = __ballot_sync(kFull, pos[0]), p1 = __ballot_sync(kFull, pos[1]);
        const int t = p1 ? 32 + 31 - __clz(p1) : (p0 ? 31 - __clz(p0) : -1);
        const int f = __shfl_sync(kFull, t < 32 ? fid[0] : fid[1], t & 31);
        pick = t >= 0 ? f : best;
    }
    if (lane == 0) *out = pick;
}

// full: full_row rows too (their sanitised, penalised logits and slice maxima, for the two
// full kernels below)
__global__ void __launch_bounds__(kSliceThreads) sample_slices_kernel(float* logits, int V, const SampleRow* rows,
                                                                      uint8_t* work, int S, bool full) {
    __shared__ float sv[kSampleSlice];
    __shared__ uint64_t wl[kSliceThreads / 32][64];
    __shared__ int hist[256];
    __shared__ int wbuf[32];
    __shared__ float red_w[kSliceThreads / 32];
    __shared__ int red_i[kSliceThreads / 32];
    __shared__ int s_int[2];

    const int b = blockIdx.x, r = blockIdx.y, t = threadIdx.x;
    const SampleRow& row = rows[r];
    const SamplerParams& p = row.p;
    if (!split_row(p, V) && !(full && full_row(p, V))) return;  // sample_rows_kernel takes it
    float* w = logits + size_t(r) * size_t(V);
    const int s0 = b * kSampleSlice, len = min(kSampleSlice, V - s0);

    // 1. sanitise, 2. penalties (the tokens of this slice), each as sample_rows_kernel
    for (int i = t; i < len; i += kSliceThreads) sv[i] = sanitized(w[s0 + i]);
    __syncthreads();
    if (has_penalties(row)) {
        const bool rep = p.repetition_penalty != 1.0f;
        const int n = p.penalty_last_n < 0 ? row.n_history : min(row.n_history, p.penalty_last_n);
        const int32_t* win = row.history + (row.n_history - n);
        for (int j = t; j < n; j += kSliceThreads) {
            const int32_t tok = win[j];
            if (tok < s0 || tok >= s0 + len) continue;
            bool first = true;
            for (int k = 0; k < j && first; ++k) first = win[k] != tok;
            if (!first) continue;
            int count = 0;
            for (int k = j; k < n; ++k) count += win[k] == tok;
            sv[tok - s0] = penalized(sv[tok - s0], count, p, rep);
        }
        __syncthreads();
    }
    for (int i = t; i < len; i += kSliceThreads) w[s0 + i] = sv[i];  // the merge reads the set's logits here

    // 3. the slice's first maximum
    const int c0 = t * kSlicePer;
    float lw = -INFINITY;
    int li = -1;
    for (int e = 0; e < kSlicePer; ++e) {
        const int i = c0 + e;
        if (i < len && sv[i] > lw) { lw = sv[i]; li = s0 + i; }
    }
    float bw;
    int bi;
    block_first_max(lw, li, red_w, red_i, &bw, &bi);
    auto* part = reinterpret_cast<MaxPart*>(work + size_t(r) * work_row_bytes(S));
    if (t == 0) part[b] = MaxPart{bw, bi};
    if (p.temperature == 0.0f || !split_row(p, V)) return;  // greedy, or a full row: the maxima are all

    int32_t* cand = reinterpret_cast<int32_t*>(part + S) + size_t(b) * kMaxCand;
    if (p.top_k <= kWarpK) {
        // 4w. the slice's 64 largest composites, sorted descending, as 64 uint64_t in its candidate
        // space: each warp folds its kWarpSpan logits in 64 at a time (skipping a batch with none
        // above its k-th so far: those cannot reach the row's top_k), then a tree over the warps
        constexpr int kWarps = kSliceThreads / 32, kWarpSpan = kSampleSlice / kWarps;
        const int lane = t & 31, wid = t >> 5, k = p.top_k;
        uint64_t x[2] = {0ull, 0ull}, thr = 0ull;
        for (int q = 0; q < kWarpSpan; q += 64) {
            const int i0 = wid * kWarpSpan + q + 2 * lane;
            uint64_t y[2];
            y[0] = i0 < len ? comp_of(sv[i0], s0 + i0) : 0ull;
            y[1] = i0 + 1 < len ? comp_of(sv[i0 + 1], s0 + i0 + 1) : 0ull;
            if (!__any_sync(kFull, y[0] > thr || y[1] > thr)) continue;
            warp_sort64_desc(y);
            warp_merge64_desc(x, y);
            thr = warp_elem(x, k - 1);
        }
        wl[wid][2 * lane] = x[0];
        wl[wid][2 * lane + 1] = x[1];
        __syncthreads();
        for (int h = 1; h < kWarps; h <<= 1) {
            if ((wid & (2 * h - 1)) == 0) {
                const uint64_t y[2] = {wl[wid + h][2 * lane], wl[wid + h][2 * lane + 1]};
                warp_merge64_desc(x, y);
                wl[wid][2 * lane] = x[0];
                wl[wid][2 * lane + 1] = x[1];
            }
            __syncthreads();
        }
        if (wid == 0) {
            uint64_t* out = reinterpret_cast<uint64_t*>(cand);
            out[2 * lane] = x[0];
            out[2 * lane + 1] = x[1];
        }
        return;
    }

    // 4. the slice's top_k (ties at the k-th key: lowest ids), in id order
    const int k = min(p.top_k, len);
    if (k == len) {
        for (int i = t; i < len; i += kSliceThreads) cand[i] = s0 + i;
        return;
    }
    uint32_t K;
    int want;
    radix_kth(
        [&](int e, uint32_t* key) {
            const int i = c0 + e;
            if (i >= len) return false;
            *key = key_of(sv[i]);
            return true;
        },
        kSlicePer, k, hist, s_int, &K, &want);
    int n_eq = 0;
    for (int e = 0; e < kSlicePer; ++e) n_eq += c0 + e < len && key_of(sv[c0 + e]) == K;
    int total;
    const int eq0 = block_excl_scan(n_eq, wbuf, &total);
    int n_sel = 0;
    for (int e = 0, er = eq0; e < kSlicePer; ++e) {
        if (c0 + e >= len) break;
        const uint32_t key = key_of(sv[c0 + e]);
        if (key > K) ++n_sel;
        else if (key == K) n_sel += er++ < want;
    }
    int at = block_excl_scan(n_sel, wbuf, &total);
    for (int e = 0, er = eq0; e < kSlicePer; ++e) {
        if (c0 + e >= len) break;
        const uint32_t key = key_of(sv[c0 + e]);
        if (key > K || (key == K && er++ < want)) cand[at++] = s0 + c0 + e;
    }
}

// ---- the whole-vocabulary split path (full_row rows, when asked for): after sample_slices_kernel,
// sample_full_sums_kernel computes sample_rows_kernel's per-thread chunk sums (kThreads chunks of
// ceil(V / kThreads) logits, the same loop) spread over kThreads / kFullSumThreads blocks per
// row, and sample_full_draw_kernel (one block of kThreads per row) runs the same scan and walk
// on them (draw_whole_vocab): the one-block kernel's token and state, bit for bit, with the
// ~150k exponentials of a 151,936-logit row on many SMs instead of one.
constexpr int kFullSumThreads = 128;

// The row's maximum over the slices' first maxima, and its first index (the same rule as
// sample_merge_kernel's, one thread).
__device__ __forceinline__ MaxPart row_max_of(const MaxPart* part, int S) {
    float lw = -INFINITY;
    int li = -1;
    for (int b = 0; b < S; ++b) {
        const MaxPart m = part[b];
        if (m.w > lw || (m.w == lw && m.i >= 0 && (li < 0 || m.i < li))) { lw = m.w; li = m.i; }
    }
    return MaxPart{lw, li};
}

// The chunk sums, kThreads doubles per row, where the row's candidate lists would be.
__device__ __forceinline__ double* full_sums_of(uint8_t* work, int r, int S) {
    return reinterpret_cast<double*>(work + size_t(r) * work_row_bytes(S) + size_t(S) * sizeof(MaxPart));
}

__global__ void __launch_bounds__(kFullSumThreads) sample_full_sums_kernel(const float* logits, int V,
                                                                            const SampleRow* rows, uint8_t* work,
                                                                            int S) {
    __shared__ MaxPart m;
    const int r = blockIdx.y;
    const SamplerParams& p = rows[r].p;
    if (!full_row(p, V)) return;
    if (threadIdx.x == 0) m = row_max_of(reinterpret_cast<const MaxPart*>(work + size_t(r) * work_row_bytes(S)), S);
    __syncthreads();
    if (m.i < 0) return;  // nothing finite: the draw kernel answers -1
    const float* w = logits + size_t(r) * size_t(V);
    const int g = blockIdx.x * kFullSumThreads + threadIdx.x;  // the one-block kernel's thread index
    const int chunk = (V + kThreads - 1) / kThreads;
    const int c0 = min(V, g * chunk), c1 = min(V, c0 + chunk);
    const DrawSetup ds = draw_setup(rows[r], m.w);
    full_sums_of(work, r, S)[g] = chunk_weight_sum(w, c0, c1, m.w, ds.inv_t, ds.use_min_p, ds.lmin);
}

__global__ void __launch_bounds__(kThreads, 1) sample_full_draw_kernel(const float* logits, int V,
                                                                       const SampleRow* rows, uint8_t* work, int S,
                                                                       int32_t* out_token, uint64_t* out_state) {
    __shared__ double dbuf[kThreads];
    __shared__ int ibuf[kThreads];
    __shared__ int s_int[4];
    __shared__ MaxPart m;
    const int r = blockIdx.x, t = threadIdx.x;
    const SampleRow& row = rows[r];
    const SamplerParams& p = row.p;
    if (!full_row(p, V)) return;
    if (t == 0) m = row_max_of(reinterpret_cast<const MaxPart*>(work + size_t(r) * work_row_bytes(S)), S);
    __syncthreads();
    const float lmax = m.w;
    const int best = m.i;
    if (best < 0) {
        if (t == 0) {
            out_token[r] = best;
            out_state[r] = row.rng_state;
        }
        return;
    }
    const DrawSetup ds = draw_setup(row, lmax);  // the draw, as sample_rows_kernel's
    if (t == 0) out_state[r] = ds.state;
    const double s = full_sums_of(work, r, S)[t];
    const int tok = draw_whole_vocab(logits + size_t(r) * size_t(V), V, s, lmax, best, ds.u, ds.inv_t, ds.use_min_p,
                                     ds.lmin, dbuf, ibuf, s_int);
    if (t == 0) out_token[r] = tok;
}

__global__ void __launch_bounds__(kThreads, 1) sample_merge_kernel(const float* logits, int V, const SampleRow* rows,
                                                                const uint8_t* work, int S, int32_t* out_token,
                                                                uint64_t* out_state) {
    __shared__ double dbuf[kThreads];
    __shared__ int ibuf[kThreads];
    __shared__ uint64_t sbuf[kMaxCand];
    __shared__ uint64_t wl[kThreads / 32][64];
    __shared__ int hist[256];
    __shared__ float red_w[kThreads / 32];
    __shared__ int red_i[kThreads / 32];
    __shared__ int s_int[4];

    const int r = blockIdx.x, t = threadIdx.x;
    const SampleRow& row = rows[r];
    const SamplerParams& p = row.p;
    if (!split_row(p, V)) return;
    const float* w = logits + size_t(r) * size_t(V);
    const auto* part = reinterpret_cast<const MaxPart*>(work + size_t(r) * work_row_bytes(S));

    // first maximum over the slices' (every slice's ids are above the previous slice's)
    float lw = -INFINITY;
    int li = -1;
    for (int b = t; b < S; b += kThreads) {
        const MaxPart m = part[b];
        if (m.w > lw || (m.w == lw && m.i >= 0 && (li < 0 || m.i < li))) { lw = m.w; li = m.i; }
    }
    float lmax;
    int best;
    block_first_max(lw, li, red_w, red_i, &lmax, &best);
    if (best < 0 || p.temperature == 0.0f) {
        if (t == 0) {
            out_token[r] = best;
            out_state[r] = row.rng_state;
        }
        return;
    }

    // the draw: the CPU sampler's next_uniform()
    const DrawSetup ds = draw_setup(row, lmax);
    if (t == 0) out_state[r] = ds.state;
    const double u = ds.u, inv_t = ds.inv_t, lmin = ds.lmin;
    const bool use_min_p = ds.use_min_p;

    const int k = p.top_k;
    if (k <= kWarpK) {
        // the 64 largest composites of the row: the slices' sorted lists folded by each warp, then
        // a tree over the warps; warp 0 runs the chain on them
        const int lane = t & 31, wid = t >> 5;
        const uint64_t* lists = reinterpret_cast<const uint64_t*>(part + S);
        uint64_t x[2] = {0ull, 0ull};
        // each warp's lists loaded before they are merged (several a warp: their loads overlap)
        constexpr int kAhead = 8;
        for (int b0 = wid; b0 < S; b0 += kAhead * (kThreads / 32)) {
            uint64_t y[kAhead][2];
#pragma unroll
            for (int a = 0; a < kAhead; ++a) {
                const int b = b0 + a * (kThreads / 32);
                y[a][0] = y[a][1] = 0ull;
                if (b < S) {
                    const uint64_t* l = lists + size_t(b) * (kMaxCand / 2);
                    y[a][0] = l[2 * lane];
                    y[a][1] = l[2 * lane + 1];
                }
            }
#pragma unroll
            for (int a = 0; a < kAhead; ++a)
                if (b0 + a * (kThreads / 32) < S) warp_merge64_desc(x, y[a]);
        }
        wl[wid][2 * lane] = x[0];
        wl[wid][2 * lane + 1] = x[1];
        __syncthreads();
        for (int h = 1; h < kThreads / 32; h <<= 1) {
            if ((wid & (2 * h - 1)) == 0) {
                const uint64_t y[2] = {wl[wid + h][2 * lane], wl[wid + h][2 * lane + 1]};
                warp_merge64_desc(x, y);
                wl[wid][2 * lane] = x[0];
                wl[wid][2 * lane + 1] = x[1];
            }
            __syncthreads();
        }
        if (wid == 0) draw_top_k_warp(x, k, lmax, best, u, inv_t, use_min_p, lmin, p, wl[0], out_token + r);
        return;
    }

    // candidates j = slice j / k, entry j % k (every slice but the last has k); in id order
    const int32_t* cand = reinterpret_cast<const int32_t*>(part + S);
    const int Ct = (S - 1) * k + min(k, V - (S - 1) * kSampleSlice);
    auto cand_id = [&](int j) {
        const int b = j / k;
        return cand[size_t(b) * kMaxCand + size_t(j - b * k)];
    };
    const int chunk = (Ct + kThreads - 1) / kThreads;
    const int c0 = min(Ct, t * chunk), c1 = min(Ct, c0 + chunk);
    uint32_t K;
    int want;
    radix_kth(
        [&](int e, uint32_t* key) {
            const int j = c0 + e;
            if (j >= c1) return false;
            *key = key_of(w[cand_id(j)]);
            return true;
        },
        chunk, k, hist, s_int, &K, &want);
    const bool k_finite = K != key_of(-INFINITY);
    const int take_eq = k_finite ? want : 0;  // ties at K: the lowest ids

    // gather as sample_rows_kernel: entries above K to [0, above), the first take_eq ties after them
    int n_gt = 0, n_eq = 0;
    for (int j = c0; j < c1; ++j) {
        const uint32_t key = key_of(w[cand_id(j)]);
        n_gt += key > K;
        n_eq += key == K;
    }
    int tot_gt, tot_eq;
    int gt_pos = block_scan_int(n_gt, ibuf, &tot_gt) - n_gt;
    int eq_pos = block_scan_int(n_eq, ibuf, &tot_eq) - n_eq;
    const int C = tot_gt + min(take_eq, tot_eq);
    for (int j = c0; j < c1; ++j) {
        const int id = cand_id(j);
        const uint32_t key = key_of(w[id]);
        if (key > K) {
            sbuf[gt_pos++] = uint64_t(id);
        } else if (key == K && k_finite) {
            if (eq_pos < take_eq) sbuf[tot_gt + eq_pos] = uint64_t(id);
            ++eq_pos;
        }
    }
    __syncthreads();
    draw_top_k(w, C, lmax, best, u, inv_t, use_min_p, lmin, p, sbuf, dbuf, ibuf, s_int, out_token + r);
}

// One thread per mask word (32 logits); blockIdx.y: the masked row.
__global__ void apply_token_masks_kernel(float* logits, int V, const int32_t* rows_of, const uint32_t* masks) {
    const int words = (V + 31) / 32, wd = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
    if (wd >= words) return;
    const uint32_t bits = masks[size_t(m) * size_t(words) + size_t(wd)];
    if (bits == 0xFFFFFFFFu) return;
    float* w = logits + size_t(rows_of[m]) * size_t(V);
    const int end = min(V, (wd + 1) * 32);
    for (int t = wd * 32; t < end; ++t)
        if (!((bits >> (t & 31)) & 1u)) w[t] = -INFINITY;
}

}  // namespace

void launch_apply_token_masks(float* logits, int n_vocab, int n_masked, const int32_t* rows_of,
                              const uint32_t* masks, cudaStream_t stream) {
    if (n_masked <= 0) return;
    const int words = token_mask_words(n_vocab), nt = 256;
    apply_token_masks_kernel<<<dim3((words + nt - 1) / nt, n_masked), nt, 0, stream>>>(logits, n_vocab, rows_of,
                                                                                       masks);
    CUDA_LAUNCH_CHECK("apply_token_masks_kernel");
}

size_t sample_workspace_bytes(int n_rows, int n_vocab) {
    return n_rows > 0 && n_vocab > 0 ? size_t(n_rows) * work_row_bytes(n_slices(n_vocab)) : 0;
}

int sample_rows_path(const SamplerParams& p, int n_vocab, bool split, bool split_full) {
    if (split && split_row(p, n_vocab)) return 1;
    if (split && split_full && full_row(p, n_vocab)) return 2;
    return 0;
}

void launch_sample_rows(float* logits, int n_rows, int n_vocab, const SampleRow* rows, int32_t* out_token,
                        uint64_t* out_state, cudaStream_t stream, void* workspace, const SampleRow* host_rows,
                        bool split, bool split_full) {
    if (n_rows <= 0) return;
    split_full = split && split_full;
    bool any_split = split, any_full = split_full, any_other = true;
    if (split && host_rows) {
        any_split = any_full = any_other = false;
        for (int r = 0; r < n_rows; ++r) {
            const int path = sample_rows_path(host_rows[r].p, n_vocab, split, split_full);
            (path == 1 ? any_split : path == 2 ? any_full : any_other) = true;
        }
    }
    const int S = n_slices(n_vocab);
    auto* work = static_cast<uint8_t*>(workspace);
    if (any_split || any_full) {
        sample_slices_kernel<<<dim3(S, n_rows), kSliceThreads, 0, stream>>>(logits, n_vocab, rows, work, S, split_full);
        CUDA_LAUNCH_CHECK("sample_slices_kernel");
    }
    if (any_split) {
        sample_merge_kernel<<<n_rows, kThreads, 0, stream>>>(logits, n_vocab, rows, work, S, out_token, out_state);
        CUDA_LAUNCH_CHECK("sample_merge_kernel");
    }
    if (any_full) {
        sample_full_sums_kernel<<<dim3(kThreads / kFullSumThreads, n_rows), kFullSumThreads, 0, stream>>>(
            logits, n_vocab, rows, work, S);
        CUDA_LAUNCH_CHECK("sample_full_sums_kernel");
        sample_full_draw_kernel<<<n_rows, kThreads, 0, stream>>>(logits, n_vocab, rows, work, S, out_token,
                                                                  out_state);
        CUDA_LAUNCH_CHECK("sample_full_draw_kernel");
    }
    if (any_other) {
        sample_rows_kernel<<<n_rows, kThreads, 0, stream>>>(logits, n_vocab, rows, out_token, out_state, split,
                                                             split_full);
        CUDA_LAUNCH_CHECK("sample_rows");
    }
}

}  // namespace cu
}  // namespace orcd
