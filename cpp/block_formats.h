// block_formats.h - the GGUF block layouts and the bit-level readers of their
// fields, written once for the CPU (cpp/quants.cpp, cpp/matmul.cpp) and the
// GPU (cuda/quant_common.cuh, cuda/decode_kernels.cu).
//
// Layouts (ggml's ggml-common.h; elements per block, bytes per block, byte
// offsets; d/dmin/m are little-endian fp16, qh of Q5_0/Q5_1 a little-endian u32):
//   Q4_0 ( 32,  18)  d@0 qs[16]@2            element i<16: low nibble of qs[i], else high nibble of qs[i-16]
//   Q4_1 ( 32,  20)  d@0 m@2 qs[16]@4
//   Q5_0 ( 32,  22)  d@0 qh@2 qs[16]@6        fifth bit of element i: bit i of qh
//   Q5_1 ( 32,  24)  d@0 m@2 qh@4 qs[16]@8
//   Q8_0 ( 32,  34)  d@0 qs[32](int8)@2
//   Q2_K (256,  84)  scales[16]@0 qs[64]@16 d@80 dmin@82
//   Q3_K (256, 110)  hmask[32]@0 qs[64]@32 scales[12]@96 d@108
//   Q4_K (256, 144)  d@0 dmin@2 scales[12]@4 qs[128]@16
//   Q5_K (256, 176)  d@0 dmin@2 scales[12]@4 qh[32]@16 qs[128]@48
//   Q6_K (256, 210)  ql[128]@0 qh[64]@128 scales[16](int8)@192 d@208
//   MXFP4 ( 32,  17) e@0 (E8M0 exponent byte) qs[16]@1   element i<16: low nibble of qs[i], else high
//                    nibble of qs[i-16]; each nibble an E2M1 code (mxfp4_code2)
// How the codes of each type map to elements is described where they are
// decoded (cpp/quants.cpp for the plain dequantization).
//
// Everything here is integer bit manipulation: no float rounding happens, so
// every caller (dequantization, the matmul kernels, the CUDA kernels) reads the
// same values. ORCD_HD functions are inline on the host and
// __host__ __device__ __forceinline__ under nvcc.
#pragma once
#include <cstdint>
#include <cstring>

#include "ggml_types.h"

#if defined(__CUDACC__)
#define ORCD_HD __host__ __device__ __forceinline__
#else
#define ORCD_HD inline
#endif

#if !defined(__CUDACC__) && defined(__F16C__)
#include <immintrin.h>
#define ORCD_HOST_F16C 1
#endif

namespace orcd {

// ---------------------------------------------------------------- layouts
// Block<T>: elems (elements per block), bytes (bytes per block) and the byte
// offsets of the fields, for the types orcd decodes.
template <uint32_t T>
struct Block;
template <> struct Block<T_F32> { static constexpr int elems = 1, bytes = 4; };
template <> struct Block<T_F16> { static constexpr int elems = 1, bytes = 2; };
template <> struct Block<T_BF16> { static constexpr int elems = 1, bytes = 2; };
template <> struct Block<T_Q4_0> { static constexpr int elems = 32, bytes = 18, d = 0, qs = 2; };
template <> struct Block<T_Q4_1> { static constexpr int elems = 32, bytes = 20, d = 0, m = 2, qs = 4; };
template <> struct Block<T_Q5_0> { static constexpr int elems = 32, bytes = 22, d = 0, qh = 2, qs = 6; };
template <> struct Block<T_Q5_1> { static constexpr int elems = 32, bytes = 24, d = 0, m = 2, qh = 4, qs = 8; };
template <> struct Block<T_Q8_0> { static constexpr int elems = 32, bytes = 34, d = 0, qs = 2; };
template <> struct Block<T_Q2_K> { static constexpr int elems = 256, bytes = 84, scales = 0, qs = 16, d = 80, dmin = 82; };
template <> struct Block<T_Q3_K> { static constexpr int elems = 256, bytes = 110, hmask = 0, qs = 32, scales = 96, d = 108; };
template <> struct Block<T_Q4_K> { static constexpr int elems = 256, bytes = 144, d = 0, dmin = 2, scales = 4, qs = 16; };
template <> struct Block<T_Q5_K> { static constexpr int elems = 256, bytes = 176, d = 0, dmin = 2, scales = 4, qh = 16, qs = 48; };
template <> struct Block<T_Q6_K> { static constexpr int elems = 256, bytes = 210, ql = 0, qh = 128, scales = 192, d = 208; };
template <> struct Block<T_MXFP4> { static constexpr int elems = 32, bytes = 17, e = 0, qs = 1; };

// ---------------------------------------------------------------- little-endian fields
// At any alignment; on the host the compiler turns each into one load.
ORCD_HD uint16_t read_u16le(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
ORCD_HD uint32_t read_u32le(const uint8_t* p) {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// The bits of a value as another type of the same size (memcpy is a register
// move after inlining, on the host and in device code).
template <class To, class From>
ORCD_HD To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
    To t;
    memcpy(&t, &v, sizeof(To));
    return t;
}
ORCD_HD uint32_t float_bits(float f) { return bit_cast<uint32_t>(f); }
ORCD_HD float bits_float(uint32_t u) { return bit_cast<float>(u); }

// fp16 bits -> fp32 bits, exact for every input: subnormals, +-0, +-inf, and
// NaNs keep sign and payload, signalling NaNs are not quieted (NumPy's
// float16 -> float32; F16C's vcvtph2ps quiets them). Branch-free (masks, no
// selects a compiler turns into jumps) so loops over it vectorize.
ORCD_HD uint32_t fp16_bits_to_fp32_bits(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                   // exponent and mantissa
    const uint32_t normal = (em << 13) + 0x38000000u;  // rebias 15 -> 127
    const uint32_t infnan = (em << 13) | 0x7f800000u;  // payload kept as is
    const uint32_t sub = float_bits(float(int32_t(em)) * 0x1p-24f);  // exact: em < 2^10 when used
    const uint32_t m_inf = 0u - uint32_t(em >= 0x7c00u);
    const uint32_t m_sub = 0u - uint32_t(em < 0x0400u);
    const uint32_t m_norm = ~(m_inf | m_sub);
    return sign | (normal & m_norm) | (infnan & m_inf) | (sub & m_sub);
}
// One value: F16C's single instruction where it is exact (everything but NaNs,
// which it would quiet), the bit form for NaNs.
ORCD_HD float fp16_bits_to_fp32(uint16_t h) {
#if defined(ORCD_HOST_F16C)
    const float f = _cvtsh_ss(h);
    if (f == f) return f;
#endif
    return bits_float(fp16_bits_to_fp32_bits(h));
}
// The fp16 field at p (any alignment).
ORCD_HD float read_fp16le(const uint8_t* p) { return fp16_bits_to_fp32(read_u16le(p)); }
// The fp16 field at p as an operand of float arithmetic (the matmul kernels'
// block scales): F16C's one instruction on hosts that have it, without
// read_fp16le's NaN check. It differs from read_fp16le only in returning
// signalling NaNs quiet, and the arithmetic that consumes the value quiets them
// anyway, so every result is the same bits.
ORCD_HD float read_fp16le_operand(const uint8_t* p) {
#if defined(ORCD_HOST_F16C)
    return _cvtsh_ss(read_u16le(p));
#else
    return read_fp16le(p);
#endif
}
ORCD_HD float bf16_bits_to_fp32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// ---------------------------------------------------------------- K-quant scales
// Q4_K / Q5_K: scale and min (6 bits each) of sub-block j (0..7, 32 elements)
// from the 12 packed bytes s: for j < 4 the low 6 bits of s[j] and s[j+4];
// for j >= 4 the nibbles of s[j+4] below the top 2 bits of s[j-4] and s[j].
ORCD_HD void k4_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 0x3F;
        mn = s[j + 4] & 0x3F;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// All eight at once, the same expressions as k4_scale_min (tests/cpp/test_quants.cpp
// checks they agree) in one loop per half: GCC turns this form into fewer
// instructions than a loop over k4_scale_min, which matters in the matmul kernels.
ORCD_HD void k4_scales_mins(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
    }
    for (int j = 4; j < 8; ++j) {
        sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q3_K: signed scale (-32..31) of sub-block s (0..15, 16 elements) from the 12
// packed bytes sc: low 4 bits from nibble s/8 of sc[s%8], high 2 bits from
// bits 2*(s/4) of sc[8 + s%4].
ORCD_HD int q3k_scale(const uint8_t* sc, int s) {
    const int lo = (sc[s % 8] >> (4 * (s / 8))) & 0x0F;
    const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 0x03;
    return (lo | (hi << 4)) - 32;
}

// MXFP4 (OCP microscaling, as ggml stores it): a code c (4 bits) is an E2M1 value
// (sign, 2 exponent bits, 1 mantissa bit: 0, .5, 1, 1.5, 2, 3, 4, 6 and their
// negatives); ggml keeps it doubled as a small integer, mxfp4_code2(c) = 2 * value,
// and halves the block scale instead, so every product is of integers and a power
// of two (exact in float).
ORCD_HD int mxfp4_code2(int c) {
    const int mag = (c & 7) < 4 ? (c & 7) : (c & 7) == 4 ? 4 : (c & 7) == 5 ? 6 : (c & 7) == 6 ? 8 : 12;
    return (c & 8) ? -mag : mag;
}
// The E8M0 exponent byte e (scale 2^(e-127)) times 1/2, as float bits: 2^(e-128).
// e < 2 gives the subnormals 2^-128 (e = 1) and 2^-129 (e = 0); e = 255 (the spec's NaN)
// gives 2^127, as ggml's ggml_e8m0_to_fp32_half and gguf-py do.
ORCD_HD uint32_t e8m0_half_bits(uint8_t e) {
    return e < 2 ? (uint32_t(0x00200000) << e) : (uint32_t(e - 1) << 23);
}

}  // namespace orcd
