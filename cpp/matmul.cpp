// matmul.cpp - CPU products y = x · Wᵀ on GGUF weights in their stored type.
//
// Numeric scheme
// --------------
// Float weights (F32, F16, BF16): the weight elements are converted to
// float32 (exactly) and multiplied with the float32 activations; sums are
// float32 with 8-lane partial sums (fused multiply-add).
//
// Quantized weights with an integer kernel: the activation rows are first
// quantized once per call to 8-bit integers (the weights stay as stored):
//   * 32-element types (Q4_0, Q5_0, Q8_0): per block of 32 activations,
//     dx = amax/127, qx = round_half_even(x * 127/amax) in [-127, 127]
//     (the Q8_0 scheme). The block also stores c = -off * sum(qx), where off
//     is the bias a kernel adds to the weight codes to make them unsigned
//     (8 for Q4_0, 16 for Q5_0, 128 for Q8_0 with AVX512-VNNI; 0 otherwise).
//     Block product: d_w * dx * (sum(u_w * qx) + c), the integer sum exact in
//     int32, with u_w = q_w + off the unsigned code and q_w the signed value.
//   * K-quants (Q4_K, Q5_K, Q6_K, 256-element super-blocks): one dx per 256
//     activations (the Q8_K scheme), plus integer sums of qx per 32 (Q4_K,
//     Q5_K: for the sub-block minimums) or per 16 (Q6_K: for its -32 bias).
//     Super-block product, all sums in int32:
//       Q4_K/Q5_K: d*dx * sum_s sc_s * sum(q*qx)_s  -  dmin*dx * sum_s m_s * sum(qx)_s
//       Q6_K:      d*dx * sum_g sc_g * (sum(q*qx)_g - 32 * sum(qx)_g)
//   The only rounding beyond float summation is the activation quantization:
//   each |x - dx*qx| <= dx/2 = amax_block/254, so |y - y_exact| is bounded by
//   sum_blocks amax_block/254 * sum_block |w|. On real activations this is a
//   0.2-1% relative error per product (the tests check the bound per output).
//   Per-block scales multiply the int32 block sums in float32; partial sums
//   are float32 (8 lanes) and reduced horizontally at the end of a row.
//
// Other types that quants.h can dequantize (Q4_1, Q5_1, Q2_K, Q3_K, ...):
// a few weight rows at a time are dequantized into a thread-local float
// scratch and multiplied with the float activations like F32 weights.
// The whole matrix is never expanded.
//
// Code paths
// ----------
// ORCD_MM_VNNI (AVX512F/BW/VL + AVX512-VNNI): vpdpbusd / vpdpwssd and mask
//   registers, on 256-bit vectors (Zen 4 splits 512-bit integer ops into two
//   256-bit halves, so ymm gives the same throughput with less shuffling).
// ORCD_MM_AVX2 (AVX2 + FMA + F16C): vpmaddubsw / vpmaddwd; Q8_0 uses the
//   sign trick since u8*s8 pair sums of 255*127 would saturate.
// scalar: portable C++ with the same activation quantization and the same
//   integer block sums; only the float summation order differs.
//
// Work split: for m > 1 the activation rows are processed in tiles of up to
// 4 (a weight block is unpacked once per tile); output rows are handed out
// in chunks from an atomic counter to the pool's threads, so a thread slowed
// down by other load does not hold the others up.
#include "matmul.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "error.h"
#include "quants.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ORCD_MM_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ORCD_MM_VNNI 1
#endif
#endif

namespace orcd {
namespace {

constexpr int kMR = 4;  // activation rows per tile

std::atomic<bool> g_force_scalar{false};

// ------------------------------------------------------------------ helpers
inline uint16_t rd16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
inline uint32_t rd32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return fp16_to_fp32(h);
#endif
}
inline float b2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// 64-byte aligned growable buffer.
struct AlignedBuf {
    uint8_t* p = nullptr;
    size_t cap = 0;
    ~AlignedBuf() { std::free(p); }
    uint8_t* get(size_t n) {
        if (n > cap) {
            std::free(p);
            cap = (n + 4095) & ~(size_t)4095;
            p = static_cast<uint8_t*>(std::aligned_alloc(64, cap));
            if (!p) throw std::bad_alloc();
        }
        return p;
    }
};

// -------------------------------------------------------- quantized activations
// Row layouts (row i at base + i*stride, 64-byte aligned):
//   32-blocks: q[nb*32] int8 | d[nb] float | c[nb] int32
//   K-blocks:  q[nb*256] int8 | s[nb*16] int16 (sums per 16, or per 32 in the
//              first 8 slots) | d[nb] float
struct Act {
    const uint8_t* base = nullptr;
    size_t stride = 0;
    int64_t nb = 0;
    const int8_t* q(int64_t i) const { return reinterpret_cast<const int8_t*>(base + i * stride); }
    const float* d32(int64_t i) const { return reinterpret_cast<const float*>(base + i * stride + nb * 32); }
    const int32_t* c32(int64_t i) const { return reinterpret_cast<const int32_t*>(base + i * stride + nb * 36); }
    const int16_t* sK(int64_t i) const { return reinterpret_cast<const int16_t*>(base + i * stride + nb * 256); }
    const float* dK(int64_t i) const { return reinterpret_cast<const float*>(base + i * stride + nb * 288); }
};

inline size_t act_stride32(int64_t nb) { return ((size_t)nb * 40 + 63) & ~(size_t)63; }
inline size_t act_strideK(int64_t nb) { return ((size_t)nb * 292 + 63) & ~(size_t)63; }

// Scale of a block with largest magnitude amax; identical in every path.
inline void act_scale(float amax, float& d, float& id) {
    d = amax / 127.0f;
    id = amax != 0.0f ? 127.0f / amax : 0.0f;
}

// Quantizes n (multiple of 32) values; returns sum of the codes. Scalar.
inline int32_t quant_block_scalar(const float* x, int n, float id, int8_t* q) {
    int32_t s = 0;
    for (int j = 0; j < n; ++j) {
        int v = (int)std::nearbyint(x[j] * id);  // round half to even (default mode)
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[j] = (int8_t)v;
        s += v;
    }
    return s;
}

inline float amax_scalar(const float* x, int n) {
    float a = 0.0f;
    for (int j = 0; j < n; ++j) a = std::max(a, std::fabs(x[j]));
    return a;
}

#if ORCD_MM_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline float hsum128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
inline float amax_simd(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// 32 values -> 32 codes; returns the sums of codes 0..15 and 16..31.
inline void quant32_simd(const float* x, float id, int8_t* q, int32_t& s0, int32_t& s1) {
    const __m256 mul = _mm256_set1_ps(id);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 0), mul));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), mul));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), mul));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), mul));
    i0 = _mm256_max_epi32(_mm256_min_epi32(i0, lim), nlim);
    i1 = _mm256_max_epi32(_mm256_min_epi32(i1, lim), nlim);
    i2 = _mm256_max_epi32(_mm256_min_epi32(i2, lim), nlim);
    i3 = _mm256_max_epi32(_mm256_min_epi32(i3, lim), nlim);
    s0 = hsum_i32(_mm256_add_epi32(i0, i1));
    s1 = hsum_i32(_mm256_add_epi32(i2, i3));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
}
#endif

// One activation row -> 32-blocks with c = -off * sum.
void quant_row32(const float* x, int64_t nb, uint8_t* row, int32_t off, bool scalar) {
    int8_t* q = reinterpret_cast<int8_t*>(row);
    float* d = reinterpret_cast<float*>(row + nb * 32);
    int32_t* c = reinterpret_cast<int32_t*>(row + nb * 36);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * 32;
        float id;
        int32_t s;
#if ORCD_MM_AVX2
        if (!scalar) {
            act_scale(amax_simd(xb, 32), d[b], id);
            int32_t s0, s1;
            quant32_simd(xb, id, q + b * 32, s0, s1);
            s = s0 + s1;
        } else
#endif
        {
            act_scale(amax_scalar(xb, 32), d[b], id);
            s = quant_block_scalar(xb, 32, id, q + b * 32);
        }
        c[b] = -off * s;
    }
}

// One activation row -> 256-blocks with sums per `gran` (16 or 32) codes.
void quant_rowK(const float* x, int64_t nb, uint8_t* row, int gran, bool scalar) {
    int8_t* q = reinterpret_cast<int8_t*>(row);
    int16_t* sums = reinterpret_cast<int16_t*>(row + nb * 256);
    float* d = reinterpret_cast<float*>(row + nb * 288);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * 256;
        int8_t* qb = q + b * 256;
        int16_t* sb = sums + b * 16;
        float id;
        int32_t s16[16];
#if ORCD_MM_AVX2
        if (!scalar) {
            act_scale(amax_simd(xb, 256), d[b], id);
            for (int j = 0; j < 8; ++j) quant32_simd(xb + 32 * j, id, qb + 32 * j, s16[2 * j], s16[2 * j + 1]);
        } else
#endif
        {
            act_scale(amax_scalar(xb, 256), d[b], id);
            for (int j = 0; j < 16; ++j) s16[j] = quant_block_scalar(xb + 16 * j, 16, id, qb + 16 * j);
        }
        if (gran == 16) {
            for (int j = 0; j < 16; ++j) sb[j] = (int16_t)s16[j];
        } else {
            for (int j = 0; j < 8; ++j) sb[j] = (int16_t)(s16[2 * j] + s16[2 * j + 1]);
            for (int j = 8; j < 16; ++j) sb[j] = 0;
        }
    }
}

// ------------------------------------------------------------ block layouts
// Bytes per block and field offsets (ggml-common.h):
//   Q4_0 (18): d f16 | qs[16]            x[j] = (qs[j]&15)-8, x[j+16] = (qs[j]>>4)-8
//   Q5_0 (22): d f16 | qh u32 | qs[16]   high bit j of element j from qh
//   Q8_0 (34): d f16 | qs[32] int8
//   Q4_K (144): d, dmin f16 | scales[12] (6-bit sc, m) | qs[128]
//   Q5_K (176): d, dmin f16 | scales[12] | qh[32] | qs[128]
//   Q6_K (210): ql[128] | qh[64] | scales[16] int8 | d f16

// Decodes the 8 6-bit scales and 8 6-bit mins of Q4_K / Q5_K.
inline void k4_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for (int j = 4; j < 8; ++j) {
        sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// ------------------------------------------------------------ scalar kernels
// One weight row against MR activation rows; out[i] = dot with act row i0+i.
template <int MR>
void s_q32(uint32_t type, const uint8_t* w, const Act& a, int64_t i0, float* out) {
    for (int i = 0; i < MR; ++i) {
        const int8_t* xq = a.q(i0 + i);
        const float* xd = a.d32(i0 + i);
        const int32_t* xc = a.c32(i0 + i);
        float sum = 0.0f;
        for (int64_t b = 0; b < a.nb; ++b) {
            const int8_t* x = xq + b * 32;
            int32_t isum = 0;
            float dw;
            if (type == T_Q4_0) {
                const uint8_t* B = w + b * 18;
                dw = h2f(rd16(B));
                for (int j = 0; j < 16; ++j) {
                    isum += (B[2 + j] & 15) * x[j];  // unsigned codes, bias in c
                    isum += (B[2 + j] >> 4) * x[j + 16];
                }
                isum += xc[b];
            } else if (type == T_Q5_0) {
                const uint8_t* B = w + b * 22;
                dw = h2f(rd16(B));
                uint32_t qh = rd32(B + 2);
                for (int j = 0; j < 16; ++j) {
                    isum += ((B[6 + j] & 15) | (((qh >> j) & 1) << 4)) * x[j];
                    isum += ((B[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * x[j + 16];
                }
                isum += xc[b];
            } else {  // Q8_0, signed codes, c = 0
                const uint8_t* B = w + b * 34;
                dw = h2f(rd16(B));
                const int8_t* qs = reinterpret_cast<const int8_t*>(B + 2);
                for (int j = 0; j < 32; ++j) isum += qs[j] * x[j];
            }
            sum += dw * xd[b] * (float)isum;
        }
        out[i] = sum;
    }
}

template <int MR>
void s_qk(uint32_t type, const uint8_t* w, const Act& a, int64_t i0, float* out) {
    for (int i = 0; i < MR; ++i) {
        const int8_t* xq = a.q(i0 + i);
        const int16_t* xs = a.sK(i0 + i);
        const float* xd = a.dK(i0 + i);
        float sum = 0.0f;
        for (int64_t b = 0; b < a.nb; ++b) {
            const int8_t* x = xq + b * 256;
            const int16_t* s = xs + b * 16;
            if (type == T_Q6_K) {
                const uint8_t* B = w + b * 210;
                const uint8_t* ql = B;
                const uint8_t* qh = B + 128;
                const int8_t* sc = reinterpret_cast<const int8_t*>(B + 192);
                float d = h2f(rd16(B + 208));
                int32_t isum = 0;
                for (int h = 0; h < 2; ++h) {
                    int32_t g[8] = {0};  // per 16 within this half
                    for (int l = 0; l < 32; ++l) {
                        const int xo = 128 * h + l, hi = l / 16;
                        int q0 = (ql[64 * h + l] & 15) | ((qh[32 * h + l] & 3) << 4);
                        int q1 = (ql[64 * h + l + 32] & 15) | (((qh[32 * h + l] >> 2) & 3) << 4);
                        int q2 = (ql[64 * h + l] >> 4) | (((qh[32 * h + l] >> 4) & 3) << 4);
                        int q3 = (ql[64 * h + l + 32] >> 4) | (((qh[32 * h + l] >> 6) & 3) << 4);
                        g[0 + hi] += q0 * x[xo];
                        g[2 + hi] += q1 * x[xo + 32];
                        g[4 + hi] += q2 * x[xo + 64];
                        g[6 + hi] += q3 * x[xo + 96];
                    }
                    for (int k = 0; k < 8; ++k) isum += sc[8 * h + k] * (g[k] - 32 * s[8 * h + k]);
                }
                sum += d * xd[b] * (float)isum;
            } else {  // Q4_K / Q5_K
                const bool q5 = type == T_Q5_K;
                const uint8_t* B = w + b * (q5 ? 176 : 144);
                float d = h2f(rd16(B)), dmin = h2f(rd16(B + 2));
                uint8_t sc[8], mn[8];
                k4_scales(B + 4, sc, mn);
                const uint8_t* qh = B + 16;
                const uint8_t* qs = B + (q5 ? 48 : 16);
                int32_t isum = 0, msum = 0;
                for (int j = 0; j < 4; ++j) {
                    int32_t lo = 0, hi = 0;
                    for (int l = 0; l < 32; ++l) {
                        int vl = qs[32 * j + l] & 15, vh = qs[32 * j + l] >> 4;
                        if (q5) {
                            vl |= ((qh[l] >> (2 * j)) & 1) << 4;
                            vh |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                        }
                        lo += vl * x[64 * j + l];
                        hi += vh * x[64 * j + 32 + l];
                    }
                    isum += sc[2 * j] * lo + sc[2 * j + 1] * hi;
                }
                for (int k = 0; k < 8; ++k) msum += mn[k] * s[k];
                sum += d * xd[b] * (float)isum - dmin * xd[b] * (float)msum;
            }
        }
        out[i] = sum;
    }
}

// Float weights: MR activation rows x NR weight rows; out[i*NR + j].
template <uint32_t T>
inline float wget(const uint8_t* w, int64_t k) {
    if constexpr (T == T_F32) {
        float f;
        std::memcpy(&f, w + 4 * k, 4);
        return f;
    } else if constexpr (T == T_F16) {
        return h2f(rd16(w + 2 * k));
    } else {
        return b2f(rd16(w + 2 * k));
    }
}

template <uint32_t T, int MR, int NR>
void s_float(const uint8_t* w, size_t wstride, const float* x, size_t ldx, int64_t n, float* out) {
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float s = 0.0f;
            const uint8_t* wr = w + j * wstride;
            const float* xr = x + i * ldx;
            for (int64_t k = 0; k < n; ++k) s += xr[k] * wget<T>(wr, k);
            out[i * NR + j] = s;
        }
}

// ------------------------------------------------------------- SIMD kernels
#if ORCD_MM_AVX2

// sum of u8*s8 products in groups of 4 added to acc (u <= 127 on AVX2).
inline __m256i dp_u8s8(__m256i acc, __m256i u, __m256i s) {
#if ORCD_MM_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
// int16 pair products added to acc.
inline __m256i dp_s16(__m256i acc, __m256i a, __m256i b) {
#if ORCD_MM_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// 16 packed nibbles -> 32 bytes: low nibbles then high nibbles.
inline __m256i nibbles32(const uint8_t* p) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(15));
}

// 32 bits -> 0x10 in the bytes whose bit is set.
inline __m256i bits_to_0x10(uint32_t bits) {
#if ORCD_MM_VNNI
    return _mm256_maskz_mov_epi8(_cvtu32_mask32(bits), _mm256_set1_epi8(0x10));
#else
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    bytes = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(bytes, _mm256_set1_epi8(0x10));
#endif
}

inline __m256i zext_i32(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

// Q4_0 / Q5_0 / Q8_0 against MR activation rows.
template <uint32_t T, int MR>
void v_q32(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    constexpr int64_t BB = T == T_Q4_0 ? 18 : (T == T_Q5_0 ? 22 : 34);
    const int8_t* xq[MR];
    const float* xd[MR];
    const int32_t* xc[MR];
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xd[i] = a.d32(i0 + i);
        xc[i] = a.c32(i0 + i);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* B = w + b * BB;
        const __m256 dw = _mm256_set1_ps(h2f(rd16(B)));
        if constexpr (T == T_Q8_0) {
            const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + 2));
#if ORCD_MM_VNNI
            const __m256i u = _mm256_xor_si256(wq, _mm256_set1_epi8((char)0x80));  // q + 128
            for (int i = 0; i < MR; ++i) {
                __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq[i] + 32 * b));
                __m256i p = _mm256_dpbusd_epi32(zext_i32(xc[i][b]), u, x);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(xd[i][b])), acc[i]);
            }
#else
            const __m256i u = _mm256_sign_epi8(wq, wq);  // |q|
            for (int i = 0; i < MR; ++i) {
                __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq[i] + 32 * b));
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, wq)), _mm256_set1_epi16(1));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(xd[i][b])), acc[i]);
            }
#endif
        } else {
            __m256i u;
            if constexpr (T == T_Q4_0) {
                u = nibbles32(B + 2);
            } else {
                u = _mm256_or_si256(nibbles32(B + 6), bits_to_0x10(rd32(B + 2)));
            }
            for (int i = 0; i < MR; ++i) {
                __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq[i] + 32 * b));
                __m256i p = dp_u8s8(zext_i32(xc[i][b]), u, x);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(xd[i][b])), acc[i]);
            }
        }
    }
    for (int i = 0; i < MR; ++i) out[i] = hsum(acc[i]);
}

// Q4_K / Q5_K against MR activation rows (sums per 32 in the act blocks).
template <bool Q5, int MR>
void v_q45k(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    constexpr int64_t BB = Q5 ? 176 : 144;
    const int8_t* xq[MR];
    const int16_t* xs[MR];
    const float* xd[MR];
    __m256 acc[MR];
    __m128 accm[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xs[i] = a.sK(i0 + i);
        xd[i] = a.dK(i0 + i);
        acc[i] = _mm256_setzero_ps();
        accm[i] = _mm_setzero_ps();
    }
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* B = w + b * BB;
        const float d = h2f(rd16(B)), dmin = h2f(rd16(B + 2));
        uint32_t ut[4];
        std::memcpy(ut, B + 4, 12);
        // llama.cpp's unpacking of the 6-bit scales/mins into 8+8 bytes
        ut[3] = ((ut[2] >> 4) & 0x0f0f0f0f) | (((ut[1] >> 6) & 0x03030303) << 4);
        const uint32_t uaux = ut[1] & 0x3f3f3f3f;
        ut[1] = (ut[2] & 0x0f0f0f0f) | (((ut[0] >> 6) & 0x03030303) << 4);
        ut[2] = uaux;
        ut[0] &= 0x3f3f3f3f;
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_setr_epi32((int)ut[0], (int)ut[1], (int)ut[2], (int)ut[3]));
        const __m128i mins = _mm256_extracti128_si256(sm, 1);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
        __m256i hb;
        if constexpr (Q5) hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + 16));
        const uint8_t* qs = B + (Q5 ? 48 : 16);
        __m256i ia[MR], ib[MR];
        for (int i = 0; i < MR; ++i) ia[i] = ib[i] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if constexpr (Q5) {
#if ORCD_MM_VNNI
                const __m256i c16 = _mm256_set1_epi8(16);
                lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(hb, _mm256_set1_epi8((char)(1 << (2 * j)))), lo, c16);
                hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(hb, _mm256_set1_epi8((char)(2 << (2 * j)))), hi, c16);
#else
                const __m256i bl = _mm256_set1_epi8((char)(1 << (2 * j))), bh = _mm256_set1_epi8((char)(2 << (2 * j)));
                const __m256i c16 = _mm256_set1_epi8(16);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bl), bl), c16));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bh), bh), c16));
#endif
            }
            // int16 scale of sub-block 2j in every lane, then of 2j+1
            const __m256i s0 = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 1) << 8 | (4 * j))));
            const __m256i s1 = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * j + 3) << 8 | (4 * j + 2))));
            for (int i = 0; i < MR; ++i) {
                const int8_t* x = xq[i] + 256 * b + 64 * j;
                __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(x));
                __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 32));
                ia[i] = dp_s16(ia[i], _mm256_maddubs_epi16(lo, x0), s0);
                ib[i] = dp_s16(ib[i], _mm256_maddubs_epi16(hi, x1), s1);
            }
        }
        for (int i = 0; i < MR; ++i) {
            const float dx = xd[i][b];
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia[i], ib[i])), _mm256_set1_ps(d * dx), acc[i]);
            __m128i mp = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs[i] + 16 * b)));
            accm[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(mp), _mm_set1_ps(dmin * dx), accm[i]);
        }
    }
    for (int i = 0; i < MR; ++i) out[i] = hsum(acc[i]) - hsum128(accm[i]);
}

// Q6_K against MR activation rows (sums per 16 in the act blocks).
template <int MR>
void v_q6k(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    const int8_t* xq[MR];
    const int16_t* xs[MR];
    const float* xd[MR];
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xs[i] = a.sK(i0 + i);
        xd[i] = a.dK(i0 + i);
        acc[i] = _mm256_setzero_ps();
    }
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* B = w + b * 210;
        const float d = h2f(rd16(B + 208));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + 192)));
        const __m256i scl = _mm256_permute2x128_si256(sc16, sc16, 0x00);  // sc0..7 in both lanes
        const __m256i sch = _mm256_permute2x128_si256(sc16, sc16, 0x11);  // sc8..15 in both lanes
        __m256i ia[MR], ib[MR];
        for (int i = 0; i < MR; ++i) {
            // offset term: sum_g sc_g * sum(qx)_g, subtracted 32 times below
            __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + 16 * b)));
            ia[i] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
            ib[i] = _mm256_setzero_si256();
        }
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = B + 64 * h;
            const __m256i qlA = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
            const __m256i qlB = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
            const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + 128 + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(qlA, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            q[1] = _mm256_or_si256(_mm256_and_si256(qlB, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), m4), _mm256_and_si256(qh, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            const __m256i sv = h == 0 ? scl : sch;
            __m256i s[4];
            for (int k = 0; k < 4; ++k) {
                // lanes 0-7: sc[8h+2k], lanes 8-15: sc[8h+2k+1] (int16 within each 128-bit lane)
                const int lo = 4 * k, hi = 4 * k + 2;
                const __m256i ctl = _mm256_setr_epi8(lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo,
                                                     lo + 1, lo, lo + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi,
                                                     hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1);
                s[k] = _mm256_shuffle_epi8(sv, ctl);
            }
            for (int i = 0; i < MR; ++i) {
                const int8_t* x = xq[i] + 256 * b + 128 * h;
                for (int k = 0; k < 4; ++k) {
                    __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 32 * k));
                    if (k & 1)
                        ib[i] = dp_s16(ib[i], _mm256_maddubs_epi16(q[k], xv), s[k]);
                    else
                        ia[i] = dp_s16(ia[i], _mm256_maddubs_epi16(q[k], xv), s[k]);
                }
            }
        }
        for (int i = 0; i < MR; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia[i], ib[i])), _mm256_set1_ps(d * xd[i][b]), acc[i]);
    }
    for (int i = 0; i < MR; ++i) out[i] = hsum(acc[i]);
}

// Float weights, 8 at a time; out[i*NR + j].
template <uint32_t T>
inline __m256 wload8(const uint8_t* w, int64_t k) {
    if constexpr (T == T_F32) {
        return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + k);
    } else if constexpr (T == T_F16) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * k)));
    } else {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * k)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
}

template <uint32_t T, int MR, int NR>
void v_float(const uint8_t* w, size_t wstride, const float* x, size_t ldx, int64_t n, float* out) {
    // With few accumulators, unroll by 2 along k to hide the FMA latency.
    constexpr int U = MR * NR >= 6 ? 1 : 2;
    __m256 acc[U][MR][NR];
    for (int u = 0; u < U; ++u)
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= n; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
            __m256 wv[NR];
            for (int j = 0; j < NR; ++j) wv[j] = wload8<T>(w + j * wstride, k + 8 * u);
            for (int i = 0; i < MR; ++i) {
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8 * u);
                for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[u][i][j]);
            }
        }
    }
    for (; k + 8 <= n; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = wload8<T>(w + j * wstride, k);
        for (int i = 0; i < MR; ++i) {
            __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NR; ++j) acc[0][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[0][i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            __m256 s = acc[0][i][j];
            for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][i][j]);
            float r = hsum(s);
            for (int64_t kk = k; kk < n; ++kk) r += x[i * ldx + kk] * wget<T>(w + j * wstride, kk);
            out[i * NR + j] = r;
        }
}
#endif  // ORCD_MM_AVX2

// ------------------------------------------------------------ kernel tables
using QFn = void (*)(const uint8_t* w, const Act& a, int64_t i0, float* out);
using FFn = void (*)(const uint8_t* w, size_t wstride, const float* x, size_t ldx, int64_t n, float* out);

enum class Kind { Float, Q32, QK, Fallback };

struct Kernel {
    Kind kind = Kind::Fallback;
    int32_t param = 0;  // Q32: weight code bias `off`; QK: act sum granularity
    QFn q[kMR] = {};    // Q32/QK: [MR-1]
    FFn f[kMR][2] = {}; // Float/Fallback: [MR-1][NR-1]
};

#define ORCD_FLOAT_TABLE(KERN, T)                                                           \
    {                                                                                      \
        {KERN<T, 1, 1>, KERN<T, 1, 2>}, {KERN<T, 2, 1>, KERN<T, 2, 2>}, {KERN<T, 3, 1>, KERN<T, 3, 2>}, \
        {KERN<T, 4, 1>, KERN<T, 4, 2>},                                                   \
    }

template <uint32_t T, int MR>
void s_q32_t(const uint8_t* w, const Act& a, int64_t i0, float* out) { s_q32<MR>(T, w, a, i0, out); }
template <uint32_t T, int MR>
void s_qk_t(const uint8_t* w, const Act& a, int64_t i0, float* out) { s_qk<MR>(T, w, a, i0, out); }

template <uint32_t T, bool Scalar>
Kernel make_kernel() {
    Kernel k;
    auto setf = [&](auto tag) {
        constexpr uint32_t TT = decltype(tag)::value;
#if ORCD_MM_AVX2
        if (!Scalar) {
            FFn t[kMR][2] = ORCD_FLOAT_TABLE(v_float, TT);
            std::memcpy(k.f, t, sizeof(t));
            return;
        }
#endif
        FFn t[kMR][2] = ORCD_FLOAT_TABLE(s_float, TT);
        std::memcpy(k.f, t, sizeof(t));
    };
    if constexpr (T == T_F32 || T == T_F16 || T == T_BF16) {
        k.kind = Kind::Float;
        setf(std::integral_constant<uint32_t, T>{});
    } else if constexpr (T == T_Q4_0 || T == T_Q5_0 || T == T_Q8_0) {
        k.kind = Kind::Q32;
        k.param = T == T_Q4_0 ? 8 : (T == T_Q5_0 ? 16 : 0);
#if ORCD_MM_AVX2
        if (!Scalar) {
#if ORCD_MM_VNNI
            if (T == T_Q8_0) k.param = 128;
#endif
            QFn t[kMR] = {v_q32<T, 1>, v_q32<T, 2>, v_q32<T, 3>, v_q32<T, 4>};
            std::memcpy(k.q, t, sizeof(t));
            return k;
        }
#endif
        QFn t[kMR] = {s_q32_t<T, 1>, s_q32_t<T, 2>, s_q32_t<T, 3>, s_q32_t<T, 4>};
        std::memcpy(k.q, t, sizeof(t));
    } else if constexpr (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) {
        k.kind = Kind::QK;
        k.param = T == T_Q6_K ? 16 : 32;
#if ORCD_MM_AVX2
        if (!Scalar) {
            if constexpr (T == T_Q6_K) {
                QFn t[kMR] = {v_q6k<1>, v_q6k<2>, v_q6k<3>, v_q6k<4>};
                std::memcpy(k.q, t, sizeof(t));
            } else {
                constexpr bool Q5 = T == T_Q5_K;
                QFn t[kMR] = {v_q45k<Q5, 1>, v_q45k<Q5, 2>, v_q45k<Q5, 3>, v_q45k<Q5, 4>};
                std::memcpy(k.q, t, sizeof(t));
            }
            return k;
        }
#endif
        QFn t[kMR] = {s_qk_t<T, 1>, s_qk_t<T, 2>, s_qk_t<T, 3>, s_qk_t<T, 4>};
        std::memcpy(k.q, t, sizeof(t));
    } else {
        k.kind = Kind::Fallback;
        setf(std::integral_constant<uint32_t, T_F32>{});
    }
    return k;
}

template <bool Scalar>
const Kernel* kernel_for(uint32_t type) {
    static const Kernel kF32 = make_kernel<T_F32, Scalar>(), kF16 = make_kernel<T_F16, Scalar>(),
                        kBF16 = make_kernel<T_BF16, Scalar>(), kQ40 = make_kernel<T_Q4_0, Scalar>(),
                        kQ50 = make_kernel<T_Q5_0, Scalar>(), kQ80 = make_kernel<T_Q8_0, Scalar>(),
                        kQ4K = make_kernel<T_Q4_K, Scalar>(), kQ5K = make_kernel<T_Q5_K, Scalar>(),
                        kQ6K = make_kernel<T_Q6_K, Scalar>(), kFb = make_kernel<T_Q4_1, Scalar>();
    switch (type) {
        case T_F32: return &kF32;
        case T_F16: return &kF16;
        case T_BF16: return &kBF16;
        case T_Q4_0: return &kQ40;
        case T_Q5_0: return &kQ50;
        case T_Q8_0: return &kQ80;
        case T_Q4_K: return &kQ4K;
        case T_Q5_K: return &kQ5K;
        case T_Q6_K: return &kQ6K;
        default: return can_dequantize(type) ? &kFb : nullptr;
    }
}

bool use_scalar() {
#if ORCD_MM_AVX2
    return g_force_scalar.load(std::memory_order_relaxed);
#else
    return true;
#endif
}


// ------------------------------------------------------------------ driver
// Rows of W per cache block when several activation tiles reuse them.
int64_t rows_per_block(size_t row_bytes) {
    const size_t budget = 192 * 1024;
    return std::max<int64_t>(2, (int64_t)(budget / std::max<size_t>(row_bytes, 1)) & ~(int64_t)1);
}

void band_quant(const Kernel& K, const WeightView& w, const Act& a, int64_t m, int64_t r0, int64_t r1, float* y) {
    const int64_t RB = rows_per_block(w.row_bytes);
    float out[kMR];
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t re = std::min(r1, rb + RB);
        for (int64_t i0 = 0; i0 < m; i0 += kMR) {
            const int mr = (int)std::min<int64_t>(kMR, m - i0);
            const QFn fn = K.q[mr - 1];
            for (int64_t r = rb; r < re; ++r) {
                fn(w.data + r * w.row_bytes, a, i0, out);
                for (int i = 0; i < mr; ++i) y[(i0 + i) * w.n_out + r] = out[i];
            }
        }
    }
}

// Rows [r0, r1) of float weights; wrow0 points at row r0.
void band_float(const Kernel& K, const uint8_t* wrow0, size_t row_bytes, int64_t n_in, int64_t n_out, const float* x,
                int64_t m, int64_t r0, int64_t r1, float* y) {
    float out[kMR * 2];
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
        const int mr = (int)std::min<int64_t>(kMR, m - i0);
        for (int64_t r = r0; r < r1; r += 2) {
            const int nr = (int)std::min<int64_t>(2, r1 - r);
            K.f[mr - 1][nr - 1](wrow0 + (r - r0) * row_bytes, row_bytes, x + i0 * n_in, (size_t)n_in, n_in, out);
            for (int i = 0; i < mr; ++i)
                for (int j = 0; j < nr; ++j) y[(i0 + i) * n_out + r + j] = out[i * nr + j];
        }
    }
}

void check_view(const WeightView& w) {
    const TypeInfo* ti = type_info(w.type);
    if (!ti || !matmul_supports(w.type))
        throw Error(std::string("matmul: weight type ") + type_name(w.type) + " has no CPU matmul kernel");
    if (w.n_in <= 0 || w.n_out < 0 || w.n_in % ti->block_size != 0)
        throw Error("matmul: n_in " + std::to_string(w.n_in) + " is not a positive multiple of the " +
                    ti->name + " block size " + std::to_string(ti->block_size));
    if (w.row_bytes != (size_t)(w.n_in / ti->block_size * ti->block_bytes))
        throw Error("matmul: row_bytes " + std::to_string(w.row_bytes) + " does not match n_in " +
                    std::to_string(w.n_in) + " of type " + ti->name);
    if (!w.data && w.n_out > 0) throw Error("matmul: weight data is null");
}

}  // namespace

// ------------------------------------------------------------------ public API
bool matmul_has_kernel(uint32_t type) {
    switch (type) {
        case T_F32: case T_F16: case T_BF16: case T_Q4_0: case T_Q5_0: case T_Q8_0:
        case T_Q4_K: case T_Q5_K: case T_Q6_K:
            return true;
        default:
            return false;
    }
}

bool matmul_supports(uint32_t type) { return matmul_has_kernel(type) || can_dequantize(type); }

const char* matmul_kernel_name() {
    if (use_scalar()) return "scalar";
#if ORCD_MM_VNNI
    return "avx512vnni";
#else
    return "avx2";
#endif
}

void matmul_force_scalar(bool on) { g_force_scalar.store(on); }

WeightView make_weight_view(uint32_t type, const void* data, int64_t n_in, int64_t n_out) {
    const TypeInfo* ti = type_info(type);
    if (!ti || !matmul_supports(type))
        throw Error(std::string("matmul: weight type ") + type_name(type) + " has no CPU matmul kernel");
    if (n_in <= 0 || n_in % ti->block_size != 0)
        throw Error("matmul: n_in " + std::to_string(n_in) + " is not a positive multiple of the " + ti->name +
                    " block size " + std::to_string(ti->block_size));
    if (n_out < 0) throw Error("matmul: n_out " + std::to_string(n_out) + " is negative");
    WeightView w;
    w.type = type;
    w.data = static_cast<const uint8_t*>(data);
    w.n_in = n_in;
    w.n_out = n_out;
    w.row_bytes = (size_t)(n_in / ti->block_size * ti->block_bytes);
    return w;
}

WeightView weight_view(const TensorInfo& t) {
    if (t.n_dims != 2 || t.ne[2] != 1 || t.ne[3] != 1)
        throw Error("tensor '" + t.name + "' " + t.shape_str() + ": matmul needs a 2-D weight");
    if (!matmul_supports(t.type))
        throw Error("tensor '" + t.name + "': type " + type_name(t.type) + " has no CPU matmul kernel");
    const TypeInfo* ti = type_info(t.type);
    if (t.ne[0] % ti->block_size != 0)
        throw Error("tensor '" + t.name + "' " + t.shape_str() + ": ne[0] is not a multiple of the " + ti->name +
                    " block size");
    WeightView w = make_weight_view(t.type, t.data, t.ne[0], t.ne[1]);
    return w;
}

void weight_row(const WeightView& w, int64_t row, float* dst) {
    check_view(w);
    if (row < 0 || row >= w.n_out)
        throw Error("weight_row: row " + std::to_string(row) + " out of range [0, " + std::to_string(w.n_out) + ")");
    const uint8_t* p = w.data + row * w.row_bytes;
    switch (w.type) {
        case T_F32: std::memcpy(dst, p, w.n_in * sizeof(float)); return;
        case T_F16: for (int64_t k = 0; k < w.n_in; ++k) dst[k] = h2f(rd16(p + 2 * k)); return;
        case T_BF16: for (int64_t k = 0; k < w.n_in; ++k) dst[k] = b2f(rd16(p + 2 * k)); return;
        default: dequantize_row(w.type, p, dst, w.n_in);
    }
}

void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool) {
    check_view(w);
    if (m < 0) throw Error("matmul: m " + std::to_string(m) + " is negative");
    if (m == 0 || w.n_out == 0) return;
    const bool scalar = use_scalar();
    const Kernel& K = scalar ? *kernel_for<true>(w.type) : *kernel_for<false>(w.type);
    const int nt = pool.size();

    // Activation quantization (once per call), on the calling thread for
    // small m, else spread over the pool.
    thread_local AlignedBuf abuf;
    Act act;
    if (K.kind == Kind::Q32 || K.kind == Kind::QK) {
        const bool k256 = K.kind == Kind::QK;
        act.nb = w.n_in / (k256 ? 256 : 32);
        act.stride = k256 ? act_strideK(act.nb) : act_stride32(act.nb);
        uint8_t* base = abuf.get(act.stride * (size_t)m);
        act.base = base;
        auto quant = [&](int64_t i0, int64_t i1, int) {
            for (int64_t i = i0; i < i1; ++i) {
                if (k256)
                    quant_rowK(x + i * w.n_in, act.nb, base + i * act.stride, K.param, scalar);
                else
                    quant_row32(x + i * w.n_in, act.nb, base + i * act.stride, K.param, scalar);
            }
        };
        if (m * w.n_in < 32768 || nt == 1)
            quant(0, m, 0);
        else
            pool.parallel_for(m, quant);
    }

    // Output rows in chunks, handed out dynamically.
    int64_t chunk = std::max<int64_t>(2, w.n_out / ((int64_t)nt * 6));
    if (m > 1 && K.kind != Kind::Float && K.kind != Kind::Fallback)
        chunk = std::max<int64_t>(chunk, std::min<int64_t>(rows_per_block(w.row_bytes), w.n_out / nt));
    chunk = (chunk + 1) & ~(int64_t)1;
    const int64_t n_chunks = (w.n_out + chunk - 1) / chunk;
    std::atomic<int64_t> next{0};

    auto run = [&](int64_t, int64_t, int) {
        for (;;) {
            const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
            if (c >= n_chunks) break;
            const int64_t r0 = c * chunk, r1 = std::min(w.n_out, r0 + chunk);
            switch (K.kind) {
                case Kind::Q32:
                case Kind::QK:
                    band_quant(K, w, act, m, r0, r1, y);
                    break;
                case Kind::Float:
                    band_float(K, w.data + r0 * w.row_bytes, w.row_bytes, w.n_in, w.n_out, x, m, r0, r1, y);
                    break;
                case Kind::Fallback: {
                    // Dequantize a few rows into thread-local scratch, multiply as F32.
                    thread_local std::vector<float> scratch;
                    const int64_t RB = std::max<int64_t>(2, std::min<int64_t>(64, (64 * 1024) / (w.n_in * 4)));
                    scratch.resize((size_t)(RB * w.n_in));
                    for (int64_t rb = r0; rb < r1; rb += RB) {
                        const int64_t re = std::min(r1, rb + RB);
                        for (int64_t r = rb; r < re; ++r)
                            dequantize_row(w.type, w.data + r * w.row_bytes, scratch.data() + (r - rb) * w.n_in, w.n_in);
                        band_float(K, reinterpret_cast<const uint8_t*>(scratch.data()),
                                   (size_t)w.n_in * 4, w.n_in, w.n_out, x, m, rb, re, y);
                    }
                    break;
                }
            }
        }
    };
    if (nt == 1 || n_chunks == 1)
        run(0, 1, 0);
    else
        pool.parallel_for(std::min<int64_t>(nt, n_chunks), run);
}

}  // namespace orcd
