// cpu_kernels_impl.h - the CPU matmul kernels and driver, compiled once per
// instruction set (cpu_kernels_scalar.cpp, cpu_kernels_avx2.cpp,
// cpu_kernels_avx512.cpp define ORCD_CPU_ISA and include this file; matmul.cpp
// checks the arguments and calls the variant chosen at run time: cpu_kernels.h).
//
// Numeric scheme
// --------------
// Float weights (F32, F16, BF16): the weight elements are converted to
// float32 (exactly) and multiplied with the float32 activations; sums are
// float32 with 8-lane partial sums (fused multiply-add).
//
// Quantized weights with an integer kernel (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K,
// Q6_K): the activation rows are quantized once per call to 16-bit integer
// codes (the weights stay as stored):
//   * per block of B activations (B = 32 for the 32-element weight types,
//     B = 256 for the K-quant super-blocks): dx = amax/QMAX and
//     qx = round_half_even(x * QMAX/amax), |qx| <= QMAX, with QMAX = 32767
//     for B = 32 and 16383 for B = 256 (so int32 sums cannot overflow);
//     K blocks also store dx * (sum of qx) per 32 (for the Q4_K/Q5_K mins).
//   * weight codes are expanded to signed int16 (scaled by the K-quant
//     sub-block scale: q*sc for Q4_K/Q5_K, (q-32)*sc for Q6_K) and multiplied
//     with qx in int32 (vpdpwssd / vpmaddwd): exact.
//       32-blocks: y += (sum q_w*qx) * dx * d_w                 per block
//       Q4_K/Q5_K: y += (sum q*sc*qx) * d*dx - sum_s m_s*dmin * (dx*sum_s(qx))
//       Q6_K:      y += (sum (q-32)*sc*qx) * d*dx                 per super-block
//   The only rounding beyond float32 summation is the activation
//   quantization: |x - dx*qx| <= dx/2 = amax_block/(2*QMAX), so
//   |y - y_exact| <= sum_blocks amax_block/(2*QMAX) * sum_block |w| (the tests
//   check this bound per output); on the real model this is ~1e-4 relative
//   per product. (8-bit activations as in llama.cpp give 0.5-2% per product
//   here and per-layer hidden-state cosines of only ~0.9994 after 24 layers.)
//   Block sums are scaled in float32 and accumulated in float32 partial sums.
//
// Other types that quants.h can dequantize (Q4_1, Q5_1, Q2_K, Q3_K, ...):
// a few weight rows at a time are dequantized into a thread-local float
// scratch and multiplied with the float activations like F32 weights.
// The whole matrix is never expanded.
//
// Kernels
// -------
// Row kernels (every path, any m): one weight row against a tile of up to 4
//   activation rows; the weight block is unpacked once per tile, the int32
//   sums run along the row in 8 lanes and are reduced at the end of the row.
// Packed tiles (the SIMD variants, quantized types, m >= 16): 16 weight rows
//   are unpacked once to int16 and transposed so one zmm (two ymm) holds one
//   input pair of all 16 rows; the micro-kernel broadcasts activation pairs
//   into vpdpwssd for 8 activation rows at a time (AVX2: vpmaddwd + vpaddd,
//   8 output rows by 6 activation rows at a time, within its 16 registers;
//   lanes = output rows, several times the throughput of the row kernels).
//   Same integers, the same float sums per 32 inputs in both variants.
//
// Code paths (one variant per ORCD_CPU_ISA, picked at run time by CPUID or
// ORCD_CPU_KERNEL: matmul.cpp)
// ----------
// ORCD_MM_VNNI, "avx512" (AVX512F/BW/VL + AVX512-VNNI): vpdpwssd and mask registers;
//   256-bit vectors in the row kernels, 512-bit in the packed micro-kernel.
// ORCD_MM_AVX2, "avx2" (AVX2 + FMA + F16C): vpmaddwd + vpaddd; 256-bit packed micro-kernel.
// "scalar": portable C++ (baseline x86-64 or any other CPU) with the same activation quantization and the same
//   integer block sums; only the float summation order differs.
//
// Work split: output rows are handed out in chunks from an atomic counter to
// the pool's threads, so a thread slowed down by other load does not hold the
// others up. A given output is always computed by the same kernel for a given
// m, so results do not depend on the number of threads.
#pragma once  // once per variant file

#ifndef ORCD_CPU_ISA
#error "define ORCD_CPU_ISA (0 scalar, 1 avx2, 2 avx512) before including cpu_kernels_impl.h"
#endif

// GCC 12 warns about the deliberately undefined upper lanes inside its own
// AVX-512 intrinsic headers (false positives).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Every header is included before the target switch below, so the library
// code they define (std::vector, block_formats.h, ...) is compiled for the
// baseline instruction set in every variant: an inline function emitted by
// several of these files is then the same code whichever copy the linker
// keeps, and the baseline parts of the library never run AVX instructions.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "block_formats.h"
#include "cpu_kernels.h"
#include "error.h"
#include "matmul.h"
#include "quants.h"

#if ORCD_CPU_ISA >= 1
#include <immintrin.h>
#define ORCD_MM_AVX2 1
#endif
#if ORCD_CPU_ISA >= 2
#define ORCD_MM_VNNI 1
#endif

// The instruction set of this variant, for the code below only (the build
// compiles this file with the baseline flags; the functions defined from here
// on carry the target attribute).
#if ORCD_CPU_ISA == 2
#define ORCD_CPU_NS cpu_avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#elif ORCD_CPU_ISA == 1
#define ORCD_CPU_NS cpu_avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#else
#define ORCD_CPU_NS cpu_scalar
#endif

namespace orcd {
namespace ORCD_CPU_NS {
namespace {

constexpr int kMR = 4;  // activation rows per tile

// An fp16 block scale as a float operand (block_formats.h's read_fp16le_operand):
// F16C's one instruction in the AVX variants (block_formats.h is compiled for the
// baseline here, so its own F16C path is off).
#if ORCD_MM_AVX2
inline float fp16_operand(const uint8_t* p) { return _cvtsh_ss(read_u16le(p)); }
#else
inline float fp16_operand(const uint8_t* p) { return read_fp16le_operand(p); }
#endif
#if ORCD_MM_AVX2
constexpr bool kScalar = false;
#else
constexpr bool kScalar = true;
#endif

// ------------------------------------------------------------------ helpers
// Block layouts and field readers: block_formats.h.
using LQ4_0 = Block<T_Q4_0>;
using LQ5_0 = Block<T_Q5_0>;
using LQ8_0 = Block<T_Q8_0>;
using LQ6_K = Block<T_Q6_K>;
template <bool Q5>
using LQ45_K = Block<Q5 ? T_Q5_K : T_Q4_K>;

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
// Row layout (row i at base + i*stride, 64-byte aligned), B = 32 or 256:
//   q[nb*B] int16 codes | d[nb] float scales | (B = 256 only) s[nb*8] float
//   dx * (sum of the codes) per 32 (exact sums, < 2^24, times the scale)
struct Act {
    const uint8_t* base = nullptr;
    size_t stride = 0;
    int64_t nb = 0;  // blocks per row
    int64_t B = 32;  // elements per block
    const int16_t* q(int64_t i) const { return reinterpret_cast<const int16_t*>(base + i * stride); }
    const float* d(int64_t i) const { return reinterpret_cast<const float*>(base + i * stride + nb * B * 2); }
    const float* s(int64_t i) const {
        return reinterpret_cast<const float*>(base + i * stride + nb * B * 2 + nb * 4);
    }
};

inline size_t act_stride(int64_t nb, int64_t B) {
    size_t n = (size_t)(nb * B * 2 + nb * 4 + (B == 256 ? nb * 32 : 0));
    return (n + 63) & ~(size_t)63;
}

// Largest code: 32767 for 32-blocks; 16383 for the K-quant super-blocks so
// that the int32 super-block sums cannot overflow (worst case Q6_K:
// 32 products per lane * |(q-32)*sc| <= 4096 * 16383 < 2^31).
inline int act_qmax(int64_t B) { return B == 256 ? 16383 : 32767; }

// Scale of a block with largest magnitude amax; identical in every path.
inline void act_scale(float amax, int qmax, float& d, float& id) {
    d = amax / (float)qmax;
    id = amax != 0.0f ? (float)qmax / amax : 0.0f;
}

inline float amax_scalar(const float* x, int64_t n) {
    float a = 0.0f;
    for (int64_t j = 0; j < n; ++j) a = std::max(a, std::fabs(x[j]));
    return a;
}

// Quantizes n values; q = round_half_even(x * id), clamped to +-qmax.
inline void quant_scalar(const float* x, int64_t n, float id, int qmax, int16_t* q) {
    for (int64_t j = 0; j < n; ++j) {
        int v = (int)std::nearbyint(x[j] * id);  // default rounding mode: half to even
        v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
        q[j] = (int16_t)v;
    }
}

#if ORCD_MM_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline float amax_simd(const float* x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// n (multiple of 16) values -> int16 codes, same rounding as quant_scalar.
inline void quant_simd(const float* x, int64_t n, float id, int qmax, int16_t* q) {
    const __m256 mul = _mm256_set1_ps(id);
    const __m256i hi = _mm256_set1_epi32(qmax), lo = _mm256_set1_epi32(-qmax);
    for (int64_t j = 0; j < n; j += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), mul));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), mul));
        a = _mm256_max_epi32(_mm256_min_epi32(a, hi), lo);
        b = _mm256_max_epi32(_mm256_min_epi32(b, hi), lo);
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), p);
    }
}
#endif

// One activation row -> blocks of B codes (+ per-32 sums when B = 256).
void quant_row(const float* x, int64_t nb, int64_t B, uint8_t* row, bool scalar) {
    int16_t* q = reinterpret_cast<int16_t*>(row);
    float* d = reinterpret_cast<float*>(row + nb * B * 2);
    float* s = reinterpret_cast<float*>(row + nb * B * 2 + nb * 4);
    const int qmax = act_qmax(B);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * B;
        int16_t* qb = q + b * B;
        float id;
#if ORCD_MM_AVX2
        if (!scalar) {
            act_scale(amax_simd(xb, B), qmax, d[b], id);
            quant_simd(xb, B, id, qmax, qb);
        } else
#endif
        {
            act_scale(amax_scalar(xb, B), qmax, d[b], id);
            quant_scalar(xb, B, id, qmax, qb);
        }
        if (B == 256)
            for (int j = 0; j < 8; ++j) {
                int32_t t = 0;
                for (int l = 0; l < 32; ++l) t += qb[32 * j + l];
                s[8 * b + j] = d[b] * (float)t;
            }
    }
}

// ------------------------------------------------------------ scalar kernels
// One weight row against MR activation rows; out[i] = dot with act row i0+i.
// Integer block sums exactly as the SIMD kernels form them.
template <int MR>
void s_q32(uint32_t type, const uint8_t* w, const Act& a, int64_t i0, float* out) {
    for (int i = 0; i < MR; ++i) {
        const int16_t* xq = a.q(i0 + i);
        const float* xd = a.d(i0 + i);
        float sum = 0.0f;
        for (int64_t b = 0; b < a.nb; ++b) {
            const int16_t* x = xq + b * 32;
            int32_t isum = 0;
            float dw;
            if (type == T_Q4_0) {
                const uint8_t* B = w + b * LQ4_0::bytes;
                const uint8_t* qs = B + LQ4_0::qs;
                dw = fp16_operand(B + LQ4_0::d);
                for (int j = 0; j < 16; ++j) {
                    isum += ((qs[j] & 15) - 8) * x[j];
                    isum += ((qs[j] >> 4) - 8) * x[j + 16];
                }
            } else if (type == T_Q5_0) {
                const uint8_t* B = w + b * LQ5_0::bytes;
                const uint8_t* qs = B + LQ5_0::qs;
                dw = fp16_operand(B + LQ5_0::d);
                const uint32_t qh = read_u32le(B + LQ5_0::qh);
                for (int j = 0; j < 16; ++j) {
                    isum += (((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16) * x[j];
                    isum += (((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * x[j + 16];
                }
            } else {  // Q8_0
                const uint8_t* B = w + b * LQ8_0::bytes;
                dw = fp16_operand(B + LQ8_0::d);
                const int8_t* qs = reinterpret_cast<const int8_t*>(B + LQ8_0::qs);
                for (int j = 0; j < 32; ++j) isum += qs[j] * x[j];
            }
            sum += (float)isum * xd[b] * dw;
        }
        out[i] = sum;
    }
}

template <int MR>
void s_qk(uint32_t type, const uint8_t* w, const Act& a, int64_t i0, float* out) {
    for (int i = 0; i < MR; ++i) {
        const int16_t* xq = a.q(i0 + i);
        const float* xs = a.s(i0 + i);
        const float* xd = a.d(i0 + i);
        float sum = 0.0f;
        for (int64_t b = 0; b < a.nb; ++b) {
            const int16_t* x = xq + b * 256;
            if (type == T_Q6_K) {
                const uint8_t* B = w + b * LQ6_K::bytes;
                const int8_t* sc = reinterpret_cast<const int8_t*>(B + LQ6_K::scales);
                const float d = fp16_operand(B + LQ6_K::d);
                int32_t isum = 0;
                for (int h = 0; h < 2; ++h) {
                    const uint8_t* ql = B + LQ6_K::ql + 64 * h;
                    const uint8_t* qh = B + LQ6_K::qh + 32 * h;
                    for (int l = 0; l < 32; ++l) {
                        const int xo = 128 * h + l, g = 8 * h + l / 16;
                        const int q0 = (ql[l] & 15) | ((qh[l] & 3) << 4);
                        const int q1 = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                        const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        const int q3 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                        isum += (q0 - 32) * sc[g] * x[xo];
                        isum += (q1 - 32) * sc[g + 2] * x[xo + 32];
                        isum += (q2 - 32) * sc[g + 4] * x[xo + 64];
                        isum += (q3 - 32) * sc[g + 6] * x[xo + 96];
                    }
                }
                sum += (float)isum * (d * xd[b]);
            } else {  // Q4_K / Q5_K
                const bool q5 = type == T_Q5_K;
                const uint8_t* B = w + b * (q5 ? LQ45_K<true>::bytes : LQ45_K<false>::bytes);
                const float d = fp16_operand(B + LQ45_K<false>::d), dmin = fp16_operand(B + LQ45_K<false>::dmin);
                uint8_t sc[8], mn[8];
                k4_scales_mins(B + LQ45_K<false>::scales, sc, mn);
                const uint8_t* qh = B + LQ45_K<true>::qh;
                const uint8_t* qs = B + (q5 ? LQ45_K<true>::qs : LQ45_K<false>::qs);
                int32_t isum = 0;
                float msum = 0.0f;
                for (int j = 0; j < 4; ++j)
                    for (int l = 0; l < 32; ++l) {
                        int vl = qs[32 * j + l] & 15, vh = qs[32 * j + l] >> 4;
                        if (q5) {
                            vl |= ((qh[l] >> (2 * j)) & 1) << 4;
                            vh |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                        }
                        isum += vl * sc[2 * j] * x[64 * j + l];
                        isum += vh * sc[2 * j + 1] * x[64 * j + 32 + l];
                    }
                for (int k = 0; k < 8; ++k) msum += (float)mn[k] * dmin * xs[8 * b + k];
                sum += (float)isum * (d * xd[b]) - msum;
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
        return fp16_operand(w + 2 * k);
    } else {
        return bf16_bits_to_fp32(read_u16le(w + 2 * k));
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

// acc + pairwise int16 products (vpdpwssd; vpmaddwd + vpaddd on AVX2).
inline __m256i dp16(__m256i acc, __m256i a, __m256i b) {
#if ORCD_MM_VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
inline __m256i ld(const int16_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i ldu(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i zx16(const uint8_t* p) {  // 16 bytes -> 16 uint16
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Q5_0 codes: int16 lanes v + 16*(bit l of `bits16`) - 16.
inline __m256i q5_lanes(__m256i v, uint32_t bits16) {
#if ORCD_MM_VNNI
    // lanes whose bit is clear get v - 16, the others keep v (= v + 16 - 16)
    return _mm256_mask_sub_epi16(v, _cvtu32_mask16(~bits16 & 0xFFFF), v, _mm256_set1_epi16(16));
#else
    const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          (short)0x8000);
    __m256i m = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)bits16), sel), sel);
    return _mm256_sub_epi16(v, _mm256_andnot_si256(m, _mm256_set1_epi16(16)));
#endif
}
// fp16 at p broadcast to 8 floats. F16C, one instruction in the per-block
// loop: it differs from read_fp16le only in quieting signalling NaNs, and a
// NaN scale makes the product NaN either way.
inline __m256 bcast_h(const uint8_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16((short)read_u16le(p))); }

// The 32 weights of a Q4_0 / Q5_0 / Q8_0 block as signed int16 codes: w0 the
// elements 0..15, w1 16..31.
template <uint32_t T>
inline void q32_codes(const uint8_t* B, __m256i& w0, __m256i& w1) {
    using L = Block<T>;
    if constexpr (T == T_Q8_0) {
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + L::qs)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + L::qs + 16)));
    } else if constexpr (T == T_Q4_0) {
        const __m256i v = zx16(B + L::qs), m15 = _mm256_set1_epi16(15), c8 = _mm256_set1_epi16(8);
        w0 = _mm256_sub_epi16(_mm256_and_si256(v, m15), c8);
        w1 = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), c8);
    } else {
        const __m256i v = zx16(B + L::qs), m15 = _mm256_set1_epi16(15);
        const uint32_t qh = read_u32le(B + L::qh);
        w0 = q5_lanes(_mm256_and_si256(v, m15), qh & 0xFFFF);
        w1 = q5_lanes(_mm256_srli_epi16(v, 4), qh >> 16);
    }
}

// A Q4_K / Q5_K block: its float scales, 6-bit scales and mins, and its
// groups of 64 elements as int16 weights q*sc (<= 63*31 = 1953).
template <bool Q5>
struct K45Block {
    using L = LQ45_K<Q5>;
    float d, dmin;
    uint8_t sc[8], mn[8];
    const uint8_t* qs;
    __m256i hq0, hq1;  // Q5: the high-bit bytes qh[0..15], qh[16..31] as int16

    explicit K45Block(const uint8_t* B) : d(fp16_operand(B + L::d)), dmin(fp16_operand(B + L::dmin)), qs(B + L::qs) {
        k4_scales_mins(B + L::scales, sc, mn);
        if constexpr (Q5) {
            hq0 = zx16(B + Block<T_Q5_K>::qh);
            hq1 = zx16(B + Block<T_Q5_K>::qh + 16);
        } else {
            hq0 = hq1 = _mm256_setzero_si256();
        }
    }

    // Group j (elements 64j..64j+63): l0, l1 the low nibbles (64j..64j+31, sub-block
    // 2j), h0, h1 the high ones (64j+32..64j+63, sub-block 2j+1), times their scales.
    // Q5: bit 2j of qh[l] is bit 4 of element 64j+l, bit 2j+1 of element 64j+32+l.
    inline void group(int j, __m256i& l0, __m256i& l1, __m256i& h0, __m256i& h1) const {
        const __m256i m15 = _mm256_set1_epi16(15);
        const __m256i v0 = zx16(qs + 32 * j), v1 = zx16(qs + 32 * j + 16);
        l0 = _mm256_and_si256(v0, m15);
        l1 = _mm256_and_si256(v1, m15);
        h0 = _mm256_srli_epi16(v0, 4);
        h1 = _mm256_srli_epi16(v1, 4);
        if constexpr (Q5) {
            const __m256i bl = _mm256_set1_epi16((short)(1 << (2 * j))), bh = _mm256_set1_epi16((short)(2 << (2 * j)));
            const __m256i c16 = _mm256_set1_epi16(16);
            l0 = _mm256_add_epi16(l0, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(hq0, bl), bl), c16));
            l1 = _mm256_add_epi16(l1, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(hq1, bl), bl), c16));
            h0 = _mm256_add_epi16(h0, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(hq0, bh), bh), c16));
            h1 = _mm256_add_epi16(h1, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(hq1, bh), bh), c16));
        }
        const __m256i s0 = _mm256_set1_epi16(sc[2 * j]), s1 = _mm256_set1_epi16(sc[2 * j + 1]);
        l0 = _mm256_mullo_epi16(l0, s0);
        l1 = _mm256_mullo_epi16(l1, s0);
        h0 = _mm256_mullo_epi16(h0, s1);
        h1 = _mm256_mullo_epi16(h1, s1);
    }
};

// Half h (elements 128h..128h+127) of a Q6_K block: q[k] holds the 6-bit codes
// (0..63) of elements 128h + 32k + (0..31) as bytes.
inline void q6k_codes(const uint8_t* B, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    const __m256i qlA = ldu(B + LQ6_K::ql + 64 * h), qlB = ldu(B + LQ6_K::ql + 64 * h + 32);
    const __m256i qh = ldu(B + LQ6_K::qh + 32 * h);
    q[0] = _mm256_or_si256(_mm256_and_si256(qlA, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(qlB, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), m4), _mm256_and_si256(qh, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}
// Codes q (elements 128h+32k+0..31) as int16 weights (q-32)*sc (|.| <= 4096): w0 the
// first 16 (scale sc[8h+2k]), w1 the next 16 (sc[8h+2k+1]).
inline void q6k_weights(__m256i q, const int8_t* sc, int h, int k, __m256i& w0, __m256i& w1) {
    const __m256i c32 = _mm256_set1_epi16(32);
    w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
    w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
    w0 = _mm256_mullo_epi16(_mm256_sub_epi16(w0, c32), _mm256_set1_epi16(sc[8 * h + 2 * k]));
    w1 = _mm256_mullo_epi16(_mm256_sub_epi16(w1, c32), _mm256_set1_epi16(sc[8 * h + 2 * k + 1]));
}

// Q4_0 / Q5_0 / Q8_0 against MR activation rows: the 32 weights of a block
// as two vectors of 16 signed int16, one dot product per activation row.
template <uint32_t T, int MR>
void v_q32(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    using L = Block<T>;
    const int16_t* xq[MR];
    const float* xd[MR];
    __m256 acc0[MR], acc1[MR];  // even / odd blocks: two FMA chains per row
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xd[i] = a.d(i0 + i);
        acc0[i] = acc1[i] = _mm256_setzero_ps();
    }
    auto step = [&](int64_t b, __m256* acc) __attribute__((always_inline)) {
        const uint8_t* B = w + b * L::bytes;
        const __m256 dw = bcast_h(B + L::d);
        __m256i w0, w1;  // elements 0..15, 16..31
        q32_codes<T>(B, w0, w1);
        for (int i = 0; i < MR; ++i) {
            const int16_t* x = xq[i] + 32 * b;
            __m256i p = dp16(_mm256_madd_epi16(w0, ld(x)), w1, ld(x + 16));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[i][b])), dw, acc[i]);
        }
    };
    int64_t b = 0;
    for (; b + 1 < a.nb; b += 2) {
        step(b, acc0);
        step(b + 1, acc1);
    }
    if (b < a.nb) step(b, acc0);
    for (int i = 0; i < MR; ++i) out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i]));
}

// Q4_K / Q5_K against MR activation rows: weights q*sc as int16 (<= 1953),
// summed over the super-block in int32, mins via the per-32 code sums.
template <bool Q5, int MR>
void v_q45k(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    const int16_t* xq[MR];
    const float* xs[MR];
    const float* xd[MR];
    __m256 acc[MR], accm[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xs[i] = a.s(i0 + i);
        xd[i] = a.d(i0 + i);
        acc[i] = accm[i] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < a.nb; ++b) {
        const K45Block<Q5> blk(w + b * LQ45_K<Q5>::bytes);
        uint64_t mn64;
        std::memcpy(&mn64, blk.mn, 8);
        const __m256 mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn64))),
                                          _mm256_set1_ps(blk.dmin));
        __m256i ia[MR], ib[MR];
        for (int i = 0; i < MR; ++i) ia[i] = ib[i] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            __m256i l0, l1, h0, h1;
            blk.group(j, l0, l1, h0, h1);
            for (int i = 0; i < MR; ++i) {
                const int16_t* x = xq[i] + 256 * b + 64 * j;
                ia[i] = dp16(dp16(ia[i], l0, ld(x)), l1, ld(x + 16));
                ib[i] = dp16(dp16(ib[i], h0, ld(x + 32)), h1, ld(x + 48));
            }
        }
        for (int i = 0; i < MR; ++i) {
            const float dx = xd[i][b];
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia[i], ib[i])), _mm256_set1_ps(blk.d * dx),
                                     acc[i]);
            accm[i] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs[i] + 8 * b), accm[i]);
        }
    }
    for (int i = 0; i < MR; ++i) out[i] = hsum(_mm256_sub_ps(acc[i], accm[i]));
}

// Q6_K against MR activation rows: weights (q-32)*sc as int16 (|.| <= 4096).
template <int MR>
void v_q6k(const uint8_t* w, const Act& a, int64_t i0, float* out) {
    const int16_t* xq[MR];
    const float* xd[MR];
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xd[i] = a.d(i0 + i);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* B = w + b * LQ6_K::bytes;
        const int8_t* sc = reinterpret_cast<const int8_t*>(B + LQ6_K::scales);
        const float d = fp16_operand(B + LQ6_K::d);
        __m256i ia[MR], ib[MR];
        for (int i = 0; i < MR; ++i) ia[i] = ib[i] = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            __m256i q[4];
            q6k_codes(B, h, q);
            for (int k = 0; k < 4; ++k) {
                __m256i w0, w1;
                q6k_weights(q[k], sc, h, k, w0, w1);
                for (int i = 0; i < MR; ++i) {
                    const int16_t* x = xq[i] + 256 * b + 128 * h + 32 * k;
                    if (k & 1)
                        ib[i] = dp16(dp16(ib[i], w0, ld(x)), w1, ld(x + 16));
                    else
                        ia[i] = dp16(dp16(ia[i], w0, ld(x)), w1, ld(x + 16));
                }
            }
        }
        for (int i = 0; i < MR; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia[i], ib[i])), _mm256_set1_ps(d * xd[i][b]), acc[i]);
    }
    for (int i = 0; i < MR; ++i) out[i] = hsum(acc[i]);
}

#if ORCD_MM_AVX2
// ---------------------------------------------------------------- packed GEMM
// For m >= kPackMinRows: a tile of kNT = 16 weight rows is unpacked once to
// signed int16 codes (exactly the codes the row kernels use: q, q*sc or
// (q-32)*sc) and transposed so that one zmm holds the pair (k, k+1) of all 16
// rows. The micro-kernel then broadcasts a pair of activation codes and
// issues one vpdpwssd per pair for 16 output rows at once: the int32 lanes
// are output rows, so no horizontal sums are needed, and a tile of 8
// activation rows reuses every weight register 8 times. The int32 sums cover
// one group of 32 inputs (at most 32 products of |w| <= 4096 and
// |qx| <= 16383, or |w| <= 128 and |qx| <= 32767: no overflow) and are then
// scaled in float: y += sum * dx * d_w (per-row scale vector), and for
// Q4_K/Q5_K y -= (dmin*m_s) * (dx*sum_s(qx)).
constexpr int kNT = 16;          // weight rows per packed tile
#if ORCD_MM_VNNI
constexpr int kPMR = 8;          // activation rows per micro-kernel call
#else
constexpr int kPMR = 6;          // (AVX2: 6 int + 6 float accumulators, a weight vector, a broadcast)
#endif
constexpr int64_t kPackMinRows = 16;

struct Packed {
    int32_t* W = nullptr;  // [G][16 pairs][16 rows] int16 pairs
    float* S = nullptr;    // [G][16] per-row scale of each 32-group
    float* M = nullptr;    // [G][16] per-row mins coefficient (Q4_K/Q5_K)
    int64_t G = 0;         // groups of 32 inputs
};

// Unpack one block (32 elements, Q*_0) or super-block (256, K-quants) of a
// weight row into the row kernels' int16 codes; per 32-group scale and mins
// coefficient. The primary template serves Q4_0 / Q5_0 / Q8_0.
template <uint32_t T>
struct Unpack {
    static constexpr int UE = 32, BB = Block<T>::bytes;
    static void run(const uint8_t* B, int16_t* dst, float* sc, float*) {
        __m256i w0, w1;
        q32_codes<T>(B, w0, w1);
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst), w0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16), w1);
        sc[0] = fp16_operand(B + Block<T>::d);
    }
};
template <bool Q5>
struct UnpackK45 {
    static constexpr int UE = 256, BB = LQ45_K<Q5>::bytes;
    static void run(const uint8_t* B, int16_t* dst, float* scv, float* mc) {
        const K45Block<Q5> blk(B);
        for (int j = 0; j < 4; ++j) {
            __m256i l0, l1, h0, h1;
            blk.group(j, l0, l1, h0, h1);
            __m256i* o = reinterpret_cast<__m256i*>(dst + 64 * j);
            _mm256_store_si256(o + 0, l0);
            _mm256_store_si256(o + 1, l1);
            _mm256_store_si256(o + 2, h0);
            _mm256_store_si256(o + 3, h1);
        }
        for (int g = 0; g < 8; ++g) {
            scv[g] = blk.d;
            mc[g] = blk.dmin * (float)blk.mn[g];
        }
    }
};
template <>
struct Unpack<T_Q4_K> : UnpackK45<false> {};
template <>
struct Unpack<T_Q5_K> : UnpackK45<true> {};
template <>
struct Unpack<T_Q6_K> {
    static constexpr int UE = 256, BB = LQ6_K::bytes;
    static void run(const uint8_t* B, int16_t* dst, float* scv, float*) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(B + LQ6_K::scales);
        const float d = fp16_operand(B + LQ6_K::d);
        for (int h = 0; h < 2; ++h) {
            __m256i q[4];
            q6k_codes(B, h, q);
            for (int k = 0; k < 4; ++k) {
                __m256i w0, w1;
                q6k_weights(q[k], sc, h, k, w0, w1);
                __m256i* o = reinterpret_cast<__m256i*>(dst + 128 * h + 32 * k);
                _mm256_store_si256(o, w0);
                _mm256_store_si256(o + 1, w1);
            }
        }
        for (int g = 0; g < 8; ++g) scv[g] = d;
    }
};

#if ORCD_MM_VNNI
// In-register transpose of a 16x16 matrix of 32-bit elements.
inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int e = 0; e < 4; ++e) {
        const __m512i x0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), x1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44),
                      y1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
        r[0 + e] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        r[8 + e] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

#endif  // ORCD_MM_VNNI

// Packs rows [r0, r0+nr) (nr <= 16; missing rows are zero) into P.
// tmp: 16 * UE int16, 64-byte aligned.
template <uint32_t T>
void pack_tile(const WeightView& w, int64_t r0, int nr, Packed& P, int16_t* tmp) {
    using U = Unpack<T>;
    constexpr int GU = U::UE / 32;  // groups per unit
    const int64_t units = w.n_in / U::UE;
    float sc[kNT][GU], mc[kNT][GU];
    for (int64_t u = 0; u < units; ++u) {
        for (int r = 0; r < kNT; ++r) {
            if (r < nr) {
                U::run(w.data + (r0 + r) * w.row_bytes + u * U::BB, tmp + r * U::UE, sc[r], mc[r]);
            } else {
                std::memset(tmp + r * U::UE, 0, U::UE * 2);
                for (int g = 0; g < GU; ++g) sc[r][g] = mc[r][g] = 0.0f;
            }
        }
        for (int gi = 0; gi < GU; ++gi) {
            const int64_t g = u * GU + gi;
            int32_t* Wg = P.W + g * 256;
#if ORCD_MM_VNNI
            __m512i rows[16];
            for (int r = 0; r < kNT; ++r) rows[r] = _mm512_load_si512(tmp + r * U::UE + 32 * gi);
            transpose16(rows);
            for (int j = 0; j < 16; ++j) _mm512_store_si512(Wg + 16 * j, rows[j]);
#else  // pair j of row r to Wg[16 j + r] (once per 16 rows: the micro-kernel's cost dwarfs it)
            for (int r = 0; r < kNT; ++r) {
                const int32_t* src = reinterpret_cast<const int32_t*>(tmp + r * U::UE + 32 * gi);
                for (int j = 0; j < 16; ++j) Wg[16 * j + r] = src[j];
            }
#endif
            for (int r = 0; r < kNT; ++r) {
                P.S[g * 16 + r] = sc[r][gi];
                if (P.M) P.M[g * 16 + r] = mc[r][gi];
            }
        }
    }
}

// y[(i0+i)*ldy + c] for c < nr, i < MR: one packed tile against MR act rows.
#if ORCD_MM_VNNI
template <int MR, bool MINS>
void packed_kernel(const Packed& P, const Act& a, int64_t i0, int gshift, float* y, int64_t ldy, int nr) {
    const int16_t* xq[MR];
    const float* xd[MR];
    const float* xs[MR];
    __m512 facc[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xd[i] = a.d(i0 + i);
        xs[i] = MINS ? a.s(i0 + i) : nullptr;
        facc[i] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < P.G; ++g) {
        __m512i ia[MR];
        for (int i = 0; i < MR; ++i) ia[i] = _mm512_setzero_si512();
        const int32_t* Wg = P.W + g * 256;
        for (int j = 0; j < 16; ++j) {
            const __m512i wv = _mm512_load_si512(Wg + 16 * j);
            for (int i = 0; i < MR; ++i) {
                int32_t pair;
                std::memcpy(&pair, xq[i] + 32 * g + 2 * j, 4);
                ia[i] = _mm512_dpwssd_epi32(ia[i], wv, _mm512_set1_epi32(pair));
            }
        }
        const __m512 s = _mm512_load_ps(P.S + 16 * g);
        for (int i = 0; i < MR; ++i)
            facc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ia[i]), _mm512_set1_ps(xd[i][g >> gshift])), s,
                                      facc[i]);
        if constexpr (MINS) {
            const __m512 mv = _mm512_load_ps(P.M + 16 * g);
            for (int i = 0; i < MR; ++i) facc[i] = _mm512_fnmadd_ps(mv, _mm512_set1_ps(xs[i][g]), facc[i]);
        }
    }
    const __mmask16 k = (__mmask16)((1u << nr) - 1);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + (i0 + i) * ldy, k, facc[i]);
}
#else
// AVX2: each half of the tile (rows 8h .. 8h+7) in turn, the same integer sums and the same
// float operations per group as the vpdpwssd kernel, so the two variants agree bit for bit.
template <int MR, bool MINS>
void packed_kernel(const Packed& P, const Act& a, int64_t i0, int gshift, float* y, int64_t ldy, int nr) {
    const int16_t* xq[MR];
    const float* xd[MR];
    const float* xs[MR];
    for (int i = 0; i < MR; ++i) {
        xq[i] = a.q(i0 + i);
        xd[i] = a.d(i0 + i);
        xs[i] = MINS ? a.s(i0 + i) : nullptr;
    }
    for (int h = 0; h < 2 && 8 * h < nr; ++h) {
        __m256 facc[MR];
        for (int i = 0; i < MR; ++i) facc[i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < P.G; ++g) {
            __m256i ia[MR];
            for (int i = 0; i < MR; ++i) ia[i] = _mm256_setzero_si256();
            const int32_t* Wg = P.W + g * 256 + 8 * h;
            // unrolled by 4: rolled, GCC copied every accumulator each pair (vpaddd does not
            // accumulate in place as vpdpwssd does); unrolled by 16 it hoisted all 96 products
            // and spilled them (m=256 Q5_0 896x4864: 63 / 51 / 38 ms rolled / by 16 / by 4)
#if defined(__clang__)
#pragma unroll 4
#else
#pragma GCC unroll 4
#endif
            for (int j = 0; j < 16; ++j) {
                const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(Wg + 16 * j));
                for (int i = 0; i < MR; ++i) {
                    int32_t pair;
                    std::memcpy(&pair, xq[i] + 32 * g + 2 * j, 4);
                    ia[i] = _mm256_add_epi32(ia[i], _mm256_madd_epi16(wv, _mm256_set1_epi32(pair)));
                }
            }
            const __m256 sv = _mm256_load_ps(P.S + 16 * g + 8 * h);
            for (int i = 0; i < MR; ++i)
                facc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ia[i]), _mm256_set1_ps(xd[i][g >> gshift])),
                                          sv, facc[i]);
            if constexpr (MINS) {
                const __m256 mv = _mm256_load_ps(P.M + 16 * g + 8 * h);
                for (int i = 0; i < MR; ++i) facc[i] = _mm256_fnmadd_ps(mv, _mm256_set1_ps(xs[i][g]), facc[i]);
            }
        }
        const int n = std::min(8, nr - 8 * h);
        if (n == 8) {
            for (int i = 0; i < MR; ++i) _mm256_storeu_ps(y + (i0 + i) * ldy + 8 * h, facc[i]);
        } else {
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
            for (int i = 0; i < MR; ++i) _mm256_maskstore_ps(y + (i0 + i) * ldy + 8 * h, k, facc[i]);
        }
    }
}
#endif

using PackFn = void (*)(const WeightView& w, int64_t r0, int nr, Packed& P, int16_t* tmp);
using PKernFn = void (*)(const Packed& P, const Act& a, int64_t i0, int gshift, float* y, int64_t ldy, int nr);

template <bool MINS>
PKernFn packed_kernel_for(int mr) {
#if ORCD_MM_VNNI
    static const PKernFn t[kPMR] = {packed_kernel<1, MINS>, packed_kernel<2, MINS>, packed_kernel<3, MINS>,
                                    packed_kernel<4, MINS>, packed_kernel<5, MINS>, packed_kernel<6, MINS>,
                                    packed_kernel<7, MINS>, packed_kernel<8, MINS>};
#else
    static const PKernFn t[kPMR] = {packed_kernel<1, MINS>, packed_kernel<2, MINS>, packed_kernel<3, MINS>,
                                    packed_kernel<4, MINS>, packed_kernel<5, MINS>, packed_kernel<6, MINS>};
#endif
    return t[mr - 1];
}
#endif  // ORCD_MM_AVX2

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
    QFn q[kMR] = {};    // Q32/QK: [MR-1]
    FFn f[kMR][2] = {}; // Float/Fallback: [MR-1][NR-1]
#if ORCD_MM_AVX2
    PackFn pack = nullptr;  // packed GEMM for m >= kPackMinRows (Q32/QK, SIMD only)
    bool mins = false;      // Q4_K/Q5_K: packed tiles carry mins coefficients
#endif
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
#if ORCD_MM_AVX2
        if (!Scalar) {
            QFn t[kMR] = {v_q32<T, 1>, v_q32<T, 2>, v_q32<T, 3>, v_q32<T, 4>};
            std::memcpy(k.q, t, sizeof(t));
            k.pack = pack_tile<T>;
            return k;
        }
#endif
        QFn t[kMR] = {s_q32_t<T, 1>, s_q32_t<T, 2>, s_q32_t<T, 3>, s_q32_t<T, 4>};
        std::memcpy(k.q, t, sizeof(t));
    } else if constexpr (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) {
        k.kind = Kind::QK;
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
            k.pack = pack_tile<T>;
            k.mins = T != T_Q6_K;
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

#if ORCD_MM_AVX2
// Rows [r0, r1) through packed tiles: a few tiles are packed (about 256 KiB,
// L2-resident), then every activation micro-tile runs against each of them.
void band_packed(const Kernel& K, const WeightView& w, const Act& a, int64_t m, int64_t r0, int64_t r1, float* y) {
    thread_local AlignedBuf pbuf, tbuf;
    const int64_t G = w.n_in / 32;
    const size_t wbytes = (size_t)G * 1024, sbytes = (size_t)G * 64;
    const size_t tile_bytes = wbytes + 2 * sbytes;
    const int64_t TS = std::max<int64_t>(1, std::min<int64_t>(8, (256 * 1024) / (int64_t)tile_bytes));
    uint8_t* buf = pbuf.get(tile_bytes * TS);
    int16_t* tmp = reinterpret_cast<int16_t*>(tbuf.get(kNT * 256 * 2));
    Packed P[8];
    for (int64_t t = 0; t < TS; ++t) {
        uint8_t* b = buf + t * tile_bytes;
        P[t].W = reinterpret_cast<int32_t*>(b);
        P[t].S = reinterpret_cast<float*>(b + wbytes);
        P[t].M = K.mins ? reinterpret_cast<float*>(b + wbytes + sbytes) : nullptr;
        P[t].G = G;
    }
    const int gshift = a.B == 256 ? 3 : 0;
    for (int64_t rs = r0; rs < r1; rs += kNT * TS) {
        int nt = 0;
        int nrs[8];
        for (int64_t r = rs; r < r1 && nt < TS; r += kNT, ++nt) {
            nrs[nt] = (int)std::min<int64_t>(kNT, r1 - r);
            K.pack(w, r, nrs[nt], P[nt], tmp);
        }
        for (int64_t i0 = 0; i0 < m; i0 += kPMR) {
            const int mr = (int)std::min<int64_t>(kPMR, m - i0);
            const PKernFn fn = K.mins ? packed_kernel_for<true>(mr) : packed_kernel_for<false>(mr);
            for (int t = 0; t < nt; ++t) fn(P[t], a, i0, gshift, y + rs + t * kNT, w.n_out, nrs[t]);
        }
    }
}
#endif

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

}  // namespace

// y = x · Wᵀ with this variant's kernels; the arguments are checked (matmul.cpp).
void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool) {
    constexpr bool scalar = kScalar;
    const Kernel& K = *kernel_for<kScalar>(w.type);
    const int nt = pool.size();

    // Activation quantization (once per call), on the calling thread for
    // small m, else spread over the pool.
    thread_local AlignedBuf abuf;
    Act act;
    if (K.kind == Kind::Q32 || K.kind == Kind::QK) {
        act.B = K.kind == Kind::QK ? 256 : 32;
        act.nb = w.n_in / act.B;
        act.stride = act_stride(act.nb, act.B);
        uint8_t* base = abuf.get(act.stride * (size_t)m);
        act.base = base;
        auto quant = [&](int64_t i0, int64_t i1, int) {
            for (int64_t i = i0; i < i1; ++i) quant_row(x + i * w.n_in, act.nb, act.B, base + i * act.stride, scalar);
        };
        if (m * w.n_in < 32768 || nt == 1)
            quant(0, m, 0);
        else
            pool.parallel_for(m, quant);
    }

    // Output rows in chunks, handed out dynamically.
    bool packed = false;
#if ORCD_MM_AVX2
    packed = K.pack != nullptr && m >= kPackMinRows;
#endif
    int64_t chunk = std::max<int64_t>(2, w.n_out / ((int64_t)nt * 6));
    if (m > 1 && K.kind != Kind::Float && K.kind != Kind::Fallback)
        chunk = std::max<int64_t>(chunk, std::min<int64_t>(rows_per_block(w.row_bytes), w.n_out / nt));
    chunk = (chunk + 1) & ~(int64_t)1;
    if (packed) chunk = std::max<int64_t>(16, chunk / 16 * 16);
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
#if ORCD_MM_AVX2
                    if (packed) {
                        band_packed(K, w, act, m, r0, r1, y);
                        break;
                    }
#endif
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

}  // namespace ORCD_CPU_NS
}  // namespace orcd

#if ORCD_CPU_ISA >= 1
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
