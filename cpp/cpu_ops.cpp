// cpu_ops.cpp - the CPU engine's operations (cpu_ops.h).
#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace orcd {
namespace cpu_ops {

void rmsnorm(const float* x, const float* w, float* out, int n, int d, float eps) {
    for (int t = 0; t < n; ++t) {
        const float* xr = x + (size_t)t * d;
        float* o = out + (size_t)t * d;
        double ss = 0;
        for (int i = 0; i < d; ++i) ss += (double)xr[i] * xr[i];
        float scale = (float)(1.0 / std::sqrt(ss / d + eps));
        for (int i = 0; i < d; ++i) o[i] = xr[i] * scale * w[i];
    }
}

void add_bias(float* y, const float* b, int n, int d) {
    for (int t = 0; t < n; ++t)
        for (int i = 0; i < d; ++i) y[(size_t)t * d + i] += b[i];
}

void rope_inv_freq(int head_dim, double base, double* inv_freq) {
    for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = std::pow(base, -2.0 * i / head_dim);
}

void rope_inv_freq_yarn(int head_dim, double base, double factor, int n_ctx_orig, double beta_fast,
                        double beta_slow, double* inv_freq) {
    // the pair index at which a frequency turns `beta` times over n_ctx_orig positions
    const double pi = 3.14159265358979323846;
    auto corr = [&](double beta) {
        return head_dim * std::log(n_ctx_orig / (beta * 2 * pi)) / (2 * std::log(base));
    };
    const double low = std::max(0.0, std::floor(corr(beta_fast)));
    const double high = std::min(double(head_dim - 1), std::ceil(corr(beta_slow)));
    for (int i = 0; i < head_dim / 2; ++i) {
        const double y = (i - low) / std::max(0.001, high - low);
        const double mix = 1.0 - std::min(1.0, std::max(0.0, y));  // 1: extrapolate (keep), 0: interpolate
        inv_freq[i] = std::pow(base, -2.0 * i / head_dim) * (mix + (1.0 - mix) / factor);
    }
}

void rope_tables(const int32_t* pos, int n, const double* inv_freq, int half, float* cs, float* sn) {
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < half; ++j) {
            double a = (double)pos[i] * inv_freq[j];
            cs[(size_t)i * half + j] = (float)std::cos(a);
            sn[(size_t)i * half + j] = (float)std::sin(a);
        }
}

void rope_neox(float* x, int n_heads, int head_dim, const float* cs, const float* sn) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; ++i) {
            float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = a * sn[i] + b * cs[i];
        }
    }
}

void rope_normal(float* x, int n_heads, int head_dim, const float* cs, const float* sn) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; ++i) {
            float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cs[i] - b * sn[i];
            v[2 * i + 1] = a * sn[i] + b * cs[i];
        }
    }
}

void scale(float* x, int64_t n, float s) {
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

void split_rows(const float* x, int n, int d0, int d1, int d2, float* out0, float* out1, float* out2) {
    const size_t w = (size_t)d0 + d1 + d2;
    for (int t = 0; t < n; ++t) {
        const float* r = x + (size_t)t * w;
        std::memcpy(out0 + (size_t)t * d0, r, (size_t)d0 * sizeof(float));
        std::memcpy(out1 + (size_t)t * d1, r + d0, (size_t)d1 * sizeof(float));
        if (d2) std::memcpy(out2 + (size_t)t * d2, r + d0 + d1, (size_t)d2 * sizeof(float));
    }
}

void kv_append(const KvCache& kv, const float* k, const float* v, int n, const int32_t* slots, const int32_t* pos) {
    const int D = kv.head_dim, kv_dim = kv.kv_dim();
    for (int i = 0; i < n; ++i) {
        float* ks = kv.k + (size_t)slots[i] * kv.slot_stride;
        const float* ki = k + (size_t)i * kv_dim;
        for (int g = 0; g < kv.n_head_kv; ++g) {
            float* kt = ks + (size_t)g * D * kv.n_ctx;
            const float* kg = ki + (size_t)g * D;
            for (int e = 0; e < D; ++e) kt[(size_t)e * kv.n_ctx + pos[i]] = kg[e];
        }
        std::memcpy(kv.v + (size_t)slots[i] * kv.slot_stride + (size_t)pos[i] * kv_dim, v + (size_t)i * kv_dim,
                    kv_dim * sizeof(float));
    }
}

void attention(const float* q, int n, int n_head, const KvCache& kv, const int32_t* slots, const int32_t* pos,
               float* out, ThreadPool& pool) {
    const int D = kv.head_dim, kv_dim = kv.kv_dim(), n_ctx = kv.n_ctx;
    const int q_dim = n_head * D, group = n_head / kv.n_head_kv;
    const float scale = 1.0f / std::sqrt((float)D);
    pool.parallel_for((int64_t)n * n_head, [&](int64_t t0, int64_t t1, int) {
        std::vector<float> sc(n_ctx);
        for (int64_t t = t0; t < t1; ++t) {
            const int i = (int)(t / n_head), h = (int)(t % n_head), kvh = h / group;
            const float* qh = q + (size_t)i * q_dim + (size_t)h * D;
            const int len = pos[i] + 1;  // keys 0..pos[i] of this token's slot
            const float* kt = kv.k + (size_t)slots[i] * kv.slot_stride + (size_t)kvh * D * n_ctx;
            const float* vb = kv.v + (size_t)slots[i] * kv.slot_stride + (size_t)kvh * D;
            // scores: sc[j] = scale * sum_e q[e] * K[j][e], accumulated row by row of Kᵀ
            float* scp = sc.data();
            std::fill(scp, scp + len, 0.f);
            for (int e = 0; e < D; ++e) {
                const float qe = qh[e] * scale;
                const float* kr = kt + (size_t)e * n_ctx;
                for (int j = 0; j < len; ++j) scp[j] += qe * kr[j];
            }
            float mx = -INFINITY;
            for (int j = 0; j < len; ++j) mx = std::max(mx, scp[j]);
            double sum = 0;
            for (int j = 0; j < len; ++j) {
                scp[j] = std::exp(scp[j] - mx);
                sum += scp[j];
            }
            const float inv = (float)(1.0 / sum);
            float* o = out + (size_t)i * q_dim + (size_t)h * D;
            std::fill(o, o + D, 0.f);
            for (int j = 0; j < len; ++j) {
                const float w = scp[j] * inv;
                const float* vj = vb + (size_t)j * kv_dim;
                for (int e = 0; e < D; ++e) o[e] += w * vj[e];
            }
        }
    });
}

void attention_window(const float* q, int n, int n_head, const KvCache& kv, const int32_t* slots,
                      const int32_t* pos, int window, float* out, ThreadPool& pool, const float* sinks) {
    const int D = kv.head_dim, kv_dim = kv.kv_dim(), n_ctx = kv.n_ctx;
    const int q_dim = n_head * D, group = n_head / kv.n_head_kv;
    const float sc_q = 1.0f / std::sqrt((float)D);
    pool.parallel_for((int64_t)n * n_head, [&](int64_t t0, int64_t t1, int) {
        std::vector<float> sc(n_ctx);
        for (int64_t t = t0; t < t1; ++t) {
            const int i = (int)(t / n_head), h = (int)(t % n_head), kvh = h / group;
            const float* qh = q + (size_t)i * q_dim + (size_t)h * D;
            const int lo = window > 0 ? std::max(0, pos[i] - window + 1) : 0, hi = pos[i] + 1;  // keys lo..pos[i]
            const float* kt = kv.k + (size_t)slots[i] * kv.slot_stride + (size_t)kvh * D * n_ctx;
            const float* vb = kv.v + (size_t)slots[i] * kv.slot_stride + (size_t)kvh * D;
            float* scp = sc.data();
            std::fill(scp + lo, scp + hi, 0.f);
            for (int e = 0; e < D; ++e) {
                const float qe = qh[e] * sc_q;
                const float* kr = kt + (size_t)e * n_ctx;
                for (int j = lo; j < hi; ++j) scp[j] += qe * kr[j];
            }
            // a sink takes part in the max and the sum, not in the output
            float mx = sinks ? sinks[h] : -INFINITY;
            for (int j = lo; j < hi; ++j) mx = std::max(mx, scp[j]);
            double sum = sinks ? std::exp((double)sinks[h] - mx) : 0.0;
            for (int j = lo; j < hi; ++j) {
                scp[j] = std::exp(scp[j] - mx);
                sum += scp[j];
            }
            const float inv = (float)(1.0 / sum);
            float* o = out + (size_t)i * q_dim + (size_t)h * D;
            std::fill(o, o + D, 0.f);
            for (int j = lo; j < hi; ++j) {
                const float w = scp[j] * inv;
                const float* vj = vb + (size_t)j * kv_dim;
                for (int e = 0; e < D; ++e) o[e] += w * vj[e];
            }
        }
    });
}

void moe_route(const float* logits, int n, int n_expert, int k, int32_t* ids, float* w) {
    std::vector<int32_t> order(n_expert);
    std::vector<double> e_k(k);
    for (int t = 0; t < n; ++t) {
        const float* l = logits + (size_t)t * n_expert;
        for (int e = 0; e < n_expert; ++e) order[e] = e;
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [l](int32_t a, int32_t b) {
            return l[a] > l[b] || (l[a] == l[b] && a < b);
        });
        int32_t* id = ids + (size_t)t * k;
        float* wt = w + (size_t)t * k;
        const float mx = l[order[0]];
        double sum = 0;
        for (int j = 0; j < k; ++j) {
            id[j] = order[j];
            e_k[j] = std::exp((double)l[order[j]] - mx);
            sum += e_k[j];
        }
        for (int j = 0; j < k; ++j) wt[j] = (float)(e_k[j] / sum);
    }
}

void gather_rows(const float* x, int d, const int32_t* rows, int m, float* out) {
    for (int r = 0; r < m; ++r) std::memcpy(out + (size_t)r * d, x + (size_t)rows[r] * d, (size_t)d * sizeof(float));
}

void scatter_add_rows(float* y, int d, const int32_t* rows, const float* w, int m, const float* src) {
    for (int r = 0; r < m; ++r) {
        float* yr = y + (size_t)rows[r] * d;
        const float* s = src + (size_t)r * d;
        for (int i = 0; i < d; ++i) yr[i] += w[r] * s[i];
    }
}

void swiglu_oai(float* g, const float* u, int64_t n, float alpha, float limit, ThreadPool& pool) {
    pool.parallel_for(n, [&](int64_t e0, int64_t e1, int) {
        for (int64_t e = e0; e < e1; ++e) {
            const float x = std::min(g[e], limit);                  // the gate is clamped from above only
            const float y = std::min(std::max(u[e], -limit), limit);  // up from both sides
            g[e] = x / (1.0f + std::exp(-alpha * x)) * (y + 1.0f);
        }
    }, 1024);
}

void geglu_tanh(float* g, const float* u, int64_t n, ThreadPool& pool) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    pool.parallel_for(n, [&](int64_t e0, int64_t e1, int) {
        for (int64_t e = e0; e < e1; ++e) {
            const float x = g[e];
            g[e] = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x))) * u[e];
        }
    }, 1024);
}

void softcap(float* x, int64_t n, float c) {
    for (int64_t i = 0; i < n; ++i) x[i] = c * std::tanh(x[i] / c);
}

void swiglu(float* g, const float* u, int64_t n, ThreadPool& pool) {
    // ~2.5M exp per layer for a 512-token prompt, so split over the pool
    pool.parallel_for(n, [&](int64_t e0, int64_t e1, int) {
        for (int64_t e = e0; e < e1; ++e) g[e] = g[e] / (1.0f + std::exp(-g[e])) * u[e];
    }, 1024);
}

}  // namespace cpu_ops
}  // namespace orcd
