// quants.cpp - dequantization of GGUF tensor blocks to float32 (CPU).
//
// Every kernel reproduces the float operations of the `gguf` Python
// package's NumPy reference (gguf/quants.py) one for one, all in float32:
//   Q4_0/Q5_0/Q8_0  y = d * q                       (q signed, exact in float)
//   Q4_1/Q5_1       y = (d * q) + m
//   Q2_K            y = ((d * sc) * q) - (dmin * m)
//   Q3_K/Q6_K       y = (d * sc) * q
//   Q4_K/Q5_K       y = ((d * sc) * q) - (dmin * m)  (mins are subtracted)
//   MXFP4           y = d_half * q2                  (d_half a power of two, q2 = 2 * E2M1 value)
// where each parenthesised product is rounded to float32 on its own (never
// in fp16). With fp16 scales (11-bit significands) and the small integer
// scales/quants of these formats every product is in fact exact in float32,
// so only the final add/subtract rounds; contraction into FMA is still
// switched off for this file (the build uses -march=native, and GCC contracts
// across statements by default in gnu++ mode) so the results never depend on
// that argument.
//
// Block layouts and field readers: block_formats.h. fp16 -> fp32 is its exact
// conversion (subnormals, inf and NaN; NaN payloads are kept and signalling
// NaNs are not quieted, as NumPy does).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quants.h"

#include <cstring>
#include <string>

#include "block_formats.h"
#include "error.h"

namespace orcd {

namespace {

constexpr int QK = 32;    // block size of the legacy types
constexpr int QK_K = 256; // block size of the K-quants

inline float h2f(const uint8_t* p) { return read_fp16le(p); }

// ---------------------------------------------------------------- plain types

void deq_f32(const uint8_t* x, float* y, int64_t n) { std::memcpy(y, x, size_t(n) * 4); }

void deq_f16(const uint8_t* x, float* y, int64_t n) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(x);  // little-endian host
    uint32_t* o = reinterpret_cast<uint32_t*>(y);
    for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, h + i, 2);
        o[i] = fp16_bits_to_fp32_bits(v);
    }
}

void deq_bf16(const uint8_t* x, float* y, int64_t n) {
    uint32_t* o = reinterpret_cast<uint32_t*>(y);
    for (int64_t i = 0; i < n; ++i) o[i] = uint32_t(read_u16le(x + 2 * i)) << 16;
}

// ---------------------------------------------------------------- legacy 32-element blocks
// Layouts: block_formats.h. Q4_0: element i<16 is the low nibble of qs[i],
// i>=16 the high nibble of qs[i-16], minus 8.
void deq_q4_0(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q4_0>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK) {
        const float d = h2f(x + L::d);
        const uint8_t* qs = x + L::qs;
#pragma GCC unroll 1
        for (int i = 0; i < 16; ++i) {
            y[i] = d * float(int(qs[i] & 0x0F) - 8);
            y[i + 16] = d * float(int(qs[i] >> 4) - 8);
        }
    }
}

// Q4_1: as Q4_0 without the offset, plus m.
void deq_q4_1(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q4_1>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK) {
        const float d = h2f(x + L::d), m = h2f(x + L::m);
        const uint8_t* qs = x + L::qs;
#pragma GCC unroll 1
        for (int i = 0; i < 16; ++i) {
            const float p0 = d * float(qs[i] & 0x0F);
            const float p1 = d * float(qs[i] >> 4);
            y[i] = p0 + m;
            y[i + 16] = p1 + m;
        }
    }
}

// Q5_0 / Q5_1: bit i of qh is the fifth bit of element i; Q5_0 subtracts 16,
// Q5_1 adds m.
template <uint32_t T>
void deq_q5(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK) {
        const float d = h2f(x + L::d);
        float m = 0.0f;
        if constexpr (T == T_Q5_1) m = h2f(x + L::m);
        const uint32_t qh = read_u32le(x + L::qh);
        const uint8_t* qs = x + L::qs;
        for (int i = 0; i < 16; ++i) {
            const int lo = (qs[i] & 0x0F) | int(((qh >> i) & 1u) << 4);
            const int hi = (qs[i] >> 4) | int(((qh >> (i + 16)) & 1u) << 4);
            if constexpr (T == T_Q5_0) {
                y[i] = d * float(lo - 16);
                y[i + 16] = d * float(hi - 16);
            } else {
                const float p0 = d * float(lo);
                const float p1 = d * float(hi);
                y[i] = p0 + m;
                y[i + 16] = p1 + m;
            }
        }
    }
}

// Q8_0: int8 codes.
void deq_q8_0(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q8_0>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK) {
        const float d = h2f(x + L::d);
        const int8_t* qs = reinterpret_cast<const int8_t*>(x + L::qs);
        for (int i = 0; i < 32; ++i) y[i] = float(qs[i]) * d;
    }
}

// ---------------------------------------------------------------- K-quants (256-element blocks)
// Q2_K: sub-block s (16 elements) has scale scales[s] & 15 and min
// scales[s] >> 4. Element 128*j + 32*k + l is bits 2k..2k+1 of qs[32*j + l].
void deq_q2_k(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q2_K>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK_K) {
        const uint8_t* sc = x + L::scales;
        const uint8_t* qs = x + L::qs;
        const float d = h2f(x + L::d), dmin = h2f(x + L::dmin);
        for (int j = 0; j < 2; ++j) {
            for (int k = 0; k < 4; ++k) {
                const int s0 = 8 * j + 2 * k;  // sub-blocks s0 (l < 16) and s0 + 1
                const float dl0 = d * float(sc[s0] & 0x0F), ml0 = dmin * float(sc[s0] >> 4);
                const float dl1 = d * float(sc[s0 + 1] & 0x0F), ml1 = dmin * float(sc[s0 + 1] >> 4);
                const uint8_t* q = qs + 32 * j;
                float* o = y + 128 * j + 32 * k;
                const int sh = 2 * k;
#pragma GCC unroll 1
                for (int l = 0; l < 16; ++l) {
                    const float p0 = dl0 * float((q[l] >> sh) & 3);
                    const float p1 = dl1 * float((q[l + 16] >> sh) & 3);
                    o[l] = p0 - ml0;
                    o[l + 16] = p1 - ml1;
                }
            }
        }
    }
}

// Q3_K: 16 sub-blocks of 16 with 6-bit signed scales (q3k_scale). Element
// 128*j + 32*k + l: low 2 bits are bits 2k.. of qs[32*j + l]; the value is
// lowered by 4 when bit (4*j + k) of hmask[l] is clear.
void deq_q3_k(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q3_K>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK_K) {
        const uint8_t* hm = x + L::hmask;
        const uint8_t* qs = x + L::qs;
        const float d = h2f(x + L::d);
        float dl[16];
        const uint8_t* sc = x + L::scales;
        for (int s = 0; s < 16; ++s) dl[s] = d * float(q3k_scale(sc, s));
        for (int j = 0; j < 2; ++j) {
            for (int k = 0; k < 4; ++k) {
                const int bit = 4 * j + k;
                const uint8_t* q = qs + 32 * j;
                float* o = y + 128 * j + 32 * k;
                const float d0 = dl[8 * j + 2 * k], d1 = dl[8 * j + 2 * k + 1];
                for (int l = 0; l < 32; ++l) {
                    const int v = int((q[l] >> (2 * k)) & 3) - (((hm[l] >> bit) & 1) ? 0 : 4);
                    o[l] = (l < 16 ? d0 : d1) * float(v);
                }
            }
        }
    }
}

// Q4_K / Q5_K: sub-block 2j (32 elements) is the low nibbles of
// qs[32j..32j+31], sub-block 2j+1 the high nibbles; scales and mins from
// k4_scales_mins. Q5_K: the fifth bit of element l of sub-block s is bit s of qh[l].
template <bool Q5>
void deq_q45_k(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<Q5 ? T_Q5_K : T_Q4_K>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK_K) {
        const float d = h2f(x + L::d), dmin = h2f(x + L::dmin);
        uint8_t sc[8], mn[8];
        k4_scales_mins(x + L::scales, sc, mn);
        const uint8_t* qs = x + L::qs;
        for (int j = 0; j < 4; ++j) {
            const float d0 = d * float(sc[2 * j]), m0 = dmin * float(mn[2 * j]);
            const float d1 = d * float(sc[2 * j + 1]), m1 = dmin * float(mn[2 * j + 1]);
            const uint8_t* q = qs + 32 * j;
            float* o = y + 64 * j;
            for (int l = 0; l < 32; ++l) {
                int v0 = q[l] & 0x0F, v1 = q[l] >> 4;
                if constexpr (Q5) {
                    const uint8_t* qh = x + Block<T_Q5_K>::qh;
                    v0 |= ((qh[l] >> (2 * j)) & 1) << 4;
                    v1 |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                }
                const float p0 = d0 * float(v0);
                const float p1 = d1 * float(v1);
                o[l] = p0 - m0;
                o[l + 32] = p1 - m1;
            }
        }
    }
}

// Q6_K: element 128*h + 32*k + l (k < 4): low 4 bits are nibble k/2 of
// ql[64*h + 32*(k%2) + l], high 2 bits are bits 2k.. of qh[32*h + l]; value
// minus 32, scale scales[element/16].
void deq_q6_k(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_Q6_K>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += QK_K) {
        const uint8_t* ql = x + L::ql;
        const uint8_t* qh = x + L::qh;
        const int8_t* sc = reinterpret_cast<const int8_t*>(x + L::scales);
        const float d = h2f(x + L::d);
        for (int h = 0; h < 2; ++h) {
            for (int k = 0; k < 4; ++k) {
                const uint8_t* l4 = ql + 64 * h + 32 * (k % 2);
                const int shift = 4 * (k / 2);
                const uint8_t* h2 = qh + 32 * h;
                const int s0 = 8 * h + 2 * k;
                const float d0 = d * float(sc[s0]), d1 = d * float(sc[s0 + 1]);
                float* o = y + 128 * h + 32 * k;
                for (int l = 0; l < 32; ++l) {
                    const int v = (((l4[l] >> shift) & 0x0F) | (((h2[l] >> (2 * k)) & 3) << 4)) - 32;
                    o[l] = (l < 16 ? d0 : d1) * float(v);
                }
            }
        }
    }
}

// MXFP4: 32 E2M1 codes under one E8M0 exponent (block_formats.h); element i < 16 is the
// low nibble of qs[i], element i + 16 its high nibble.
void deq_mxfp4(const uint8_t* x, float* y, int64_t nb) {
    using L = Block<T_MXFP4>;
    for (int64_t b = 0; b < nb; ++b, x += L::bytes, y += 32) {
        const float d = bits_float(e8m0_half_bits(x[L::e]));
        const uint8_t* qs = x + L::qs;
        for (int i = 0; i < 16; ++i) {
            y[i] = d * float(mxfp4_code2(qs[i] & 0x0F));
            y[i + 16] = d * float(mxfp4_code2(qs[i] >> 4));
        }
    }
}

[[noreturn]] void unsupported(uint32_t type, const char* what) {
    throw Error(std::string(what) + ": cannot dequantize type " + type_name(type) + " (id " +
                std::to_string(type) + ")");
}

}  // namespace

// ---------------------------------------------------------------- public API

float fp16_to_fp32(uint16_t h) { return fp16_bits_to_fp32(h); }

uint16_t fp32_to_fp16(float f) {
    uint32_t x = float_bits(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u)  // NaN: keep the top payload bits, make it quiet
        return uint16_t(sign | 0x7e00u | ((x >> 13) & 0x03ffu));
    if (x >= 0x477ff000u)  // >= 65520 (incl. inf) rounds to inf
        return uint16_t(sign | 0x7c00u);
    if (x >= 0x38800000u) {  // normal half: rebias 127 -> 15, round to nearest even
        x -= 0x38000000u;
        x += 0x0fffu + ((x >> 13) & 1u);
        return uint16_t(sign | (x >> 13));
    }
    const uint32_t e = x >> 23;  // biased fp32 exponent, value < 2^-14
    if (e < 102) return sign;    // < 2^-25: rounds to zero
    const uint32_t m = (x & 0x007fffffu) | 0x00800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal
    return uint16_t(sign | r);
}

float bf16_to_fp32(uint16_t h) { return bf16_bits_to_fp32(h); }

bool can_dequantize(uint32_t type) {
    const TypeInfo* t = type_info(type);  // the type table marks what deq_* below covers
    return t && t->dequantizable;
}

void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n) {
    if (!can_dequantize(type)) unsupported(type, "dequantize_row");
    const TypeInfo* ti = type_info(type);
    if (n < 0 || n % ti->block_size != 0)
        throw Error("dequantize_row: " + std::to_string(n) + " elements is not a multiple of the " +
                    ti->name + " block size " + std::to_string(ti->block_size));
    if (n == 0) return;
    const uint8_t* x = static_cast<const uint8_t*>(src);
    const int64_t nb = n / ti->block_size;
    switch (type) {
    case T_F32: deq_f32(x, dst, n); break;
    case T_F16: deq_f16(x, dst, n); break;
    case T_BF16: deq_bf16(x, dst, n); break;
    case T_Q4_0: deq_q4_0(x, dst, nb); break;
    case T_Q4_1: deq_q4_1(x, dst, nb); break;
    case T_Q5_0: deq_q5<T_Q5_0>(x, dst, nb); break;
    case T_Q5_1: deq_q5<T_Q5_1>(x, dst, nb); break;
    case T_Q8_0: deq_q8_0(x, dst, nb); break;
    case T_Q2_K: deq_q2_k(x, dst, nb); break;
    case T_Q3_K: deq_q3_k(x, dst, nb); break;
    case T_Q4_K: deq_q45_k<false>(x, dst, nb); break;
    case T_Q5_K: deq_q45_k<true>(x, dst, nb); break;
    case T_Q6_K: deq_q6_k(x, dst, nb); break;
    case T_MXFP4: deq_mxfp4(x, dst, nb); break;
    default: unsupported(type, "dequantize_row");
    }
}

void dequantize_rows(const TensorInfo& t, int64_t r0, int64_t r1, float* dst) {
    const std::string who = "tensor '" + t.name + "'";
    if (!can_dequantize(t.type)) unsupported(t.type, who.c_str());
    const int64_t nrows = t.n_rows();
    if (r0 < 0 || r1 < r0 || r1 > nrows)
        throw Error(who + " " + t.shape_str() + ": rows [" + std::to_string(r0) + ", " +
                    std::to_string(r1) + ") out of range (it has " + std::to_string(nrows) + " rows)");
    const TypeInfo* ti = type_info(t.type);
    if (t.ne[0] % ti->block_size != 0)
        throw Error(who + ": row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                    ti->name + " block size " + std::to_string(ti->block_size));
    if (r1 == r0) return;
    if (t.data == nullptr) throw Error(who + ": tensor data is not available (file closed?)");
    const uint8_t* src = t.data + uint64_t(r0) * t.row_bytes();
    dequantize_row(t.type, src, dst, (r1 - r0) * t.ne[0]);
}

}  // namespace orcd
