// quants.cpp - dequantization of GGUF tensor blocks to float32 (CPU).
//
// Every kernel reproduces the float operations of the `gguf` Python
// package's NumPy reference (gguf/quants.py) one for one, all in float32:
//   Q4_0/Q5_0/Q8_0  y = d * q                       (q signed, exact in float)
//   Q4_1/Q5_1       y = (d * q) + m
//   Q2_K            y = ((d * sc) * q) - (dmin * m)
//   Q3_K/Q6_K       y = (d * sc) * q
//   Q4_K/Q5_K       y = ((d * sc) * q) - (dmin * m)  (mins are subtracted)
// where each parenthesised product is rounded to float32 on its own (never
// in fp16). With fp16 scales (11-bit significands) and the small integer
// scales/quants of these formats every product is in fact exact in float32,
// so only the final add/subtract rounds; contraction into FMA is still
// switched off for this file (the build uses -march=native, and GCC contracts
// across statements by default in gnu++ mode) so the results never depend on
// that argument.
//
// fp16 -> fp32 is done on the bits (exact for subnormals, inf and NaN; NaN
// payloads are kept and signalling NaNs are not quieted, as NumPy does), not
// with F16C, whose conversion quiets signalling NaNs.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quants.h"

#include <cstring>
#include <string>

#include "error.h"

namespace orcd {

namespace {

constexpr int QK = 32;    // block size of the legacy types
constexpr int QK_K = 256; // block size of the K-quants

inline uint32_t f2u(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float u2f(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
inline uint32_t rd32(const uint8_t* p) {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// Branch-free (masks, no selects the compiler turns into jumps) so loops over
// it vectorize.
inline uint32_t h2f_bits(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                   // exponent and mantissa
    const uint32_t normal = (em << 13) + 0x38000000u;  // rebias 15 -> 127
    const uint32_t infnan = (em << 13) | 0x7f800000u;  // payload kept as is
    const uint32_t sub = f2u(float(int32_t(em)) * 0x1p-24f);  // exact: em < 2^10
    const uint32_t m_inf = 0u - uint32_t(em >= 0x7c00u);
    const uint32_t m_sub = 0u - uint32_t(em < 0x0400u);
    const uint32_t m_norm = ~(m_inf | m_sub);
    return sign | (normal & m_norm) | (infnan & m_inf) | (sub & m_sub);
}
inline float h2f(const uint8_t* p) { return u2f(h2f_bits(rd16(p))); }

// ---------------------------------------------------------------- plain types

void deq_f32(const uint8_t* x, float* y, int64_t n) { std::memcpy(y, x, size_t(n) * 4); }

void deq_f16(const uint8_t* x, float* y, int64_t n) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(x);  // little-endian host
    uint32_t* o = reinterpret_cast<uint32_t*>(y);
    for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, h + i, 2);
        o[i] = h2f_bits(v);
    }
}

void deq_bf16(const uint8_t* x, float* y, int64_t n) {
    uint32_t* o = reinterpret_cast<uint32_t*>(y);
    for (int64_t i = 0; i < n; ++i) o[i] = uint32_t(rd16(x + 2 * i)) << 16;
}

// ---------------------------------------------------------------- legacy 32-element blocks
// Q4_0: d(f16) qs[16]; element i<16 is the low nibble of qs[i], i>=16 the high nibble of qs[i-16].
void deq_q4_0(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 18, y += QK) {
        const float d = h2f(x);
        const uint8_t* qs = x + 2;
#pragma GCC unroll 1
        for (int i = 0; i < 16; ++i) {
            y[i] = d * float(int(qs[i] & 0x0F) - 8);
            y[i + 16] = d * float(int(qs[i] >> 4) - 8);
        }
    }
}

// Q4_1: d(f16) m(f16) qs[16].
void deq_q4_1(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 20, y += QK) {
        const float d = h2f(x), m = h2f(x + 2);
        const uint8_t* qs = x + 4;
#pragma GCC unroll 1
        for (int i = 0; i < 16; ++i) {
            const float p0 = d * float(qs[i] & 0x0F);
            const float p1 = d * float(qs[i] >> 4);
            y[i] = p0 + m;
            y[i + 16] = p1 + m;
        }
    }
}

// Q5_0: d(f16) qh(u32 LE) qs[16]; bit i of qh is the fifth bit of element i.
void deq_q5_0(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 22, y += QK) {
        const float d = h2f(x);
        const uint32_t qh = rd32(x + 2);
        const uint8_t* qs = x + 6;
        for (int i = 0; i < 16; ++i) {
            const int lo = (qs[i] & 0x0F) | int(((qh >> i) & 1u) << 4);
            const int hi = (qs[i] >> 4) | int(((qh >> (i + 16)) & 1u) << 4);
            y[i] = d * float(lo - 16);
            y[i + 16] = d * float(hi - 16);
        }
    }
}

// Q5_1: d(f16) m(f16) qh(u32 LE) qs[16].
void deq_q5_1(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 24, y += QK) {
        const float d = h2f(x), m = h2f(x + 2);
        const uint32_t qh = rd32(x + 4);
        const uint8_t* qs = x + 8;
        for (int i = 0; i < 16; ++i) {
            const int lo = (qs[i] & 0x0F) | int(((qh >> i) & 1u) << 4);
            const int hi = (qs[i] >> 4) | int(((qh >> (i + 16)) & 1u) << 4);
            const float p0 = d * float(lo);
            const float p1 = d * float(hi);
            y[i] = p0 + m;
            y[i + 16] = p1 + m;
        }
    }
}

// Q8_0: d(f16) qs[32] (int8).
void deq_q8_0(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 34, y += QK) {
        const float d = h2f(x);
        const int8_t* qs = reinterpret_cast<const int8_t*>(x + 2);
        for (int i = 0; i < 32; ++i) y[i] = float(qs[i]) * d;
    }
}

// ---------------------------------------------------------------- K-quants (256-element blocks)
// Q2_K: scales[16] qs[64] d(f16) dmin(f16). Sub-block s (16 elements) has
// scale scales[s] & 15 and min scales[s] >> 4. Element 128*j + 32*k + l is
// bits 2k..2k+1 of qs[32*j + l].
void deq_q2_k(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 84, y += QK_K) {
        const uint8_t* sc = x;
        const uint8_t* qs = x + 16;
        const float d = h2f(x + 80), dmin = h2f(x + 82);
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

// Q3_K: hmask[32] qs[64] scales[12] d(f16). 16 sub-blocks of 16 with 6-bit
// signed scales (low 4 bits from scales[0..7], high 2 bits from scales[8..11]),
// minus 32. Element 128*j + 32*k + l: low 2 bits are bits 2k.. of qs[32*j + l];
// the value is lowered by 4 when bit (4*j + k) of hmask[l] is clear.
void deq_q3_k(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 110, y += QK_K) {
        const uint8_t* hm = x;
        const uint8_t* qs = x + 32;
        const uint8_t* sc = x + 96;
        const float d = h2f(x + 108);
        float dl[16];
        for (int s = 0; s < 16; ++s) {
            const int lo = (sc[s % 8] >> (4 * (s / 8))) & 0x0F;
            const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 0x03;
            dl[s] = d * float((lo | (hi << 4)) - 32);
        }
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

// The 12-byte packed 6-bit scales and mins of Q4_K/Q5_K.
inline void get_scale_min_k4(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
    for (int i = 0; i < 4; ++i) {
        sc[i] = s[i] & 0x3F;
        mn[i] = s[4 + i] & 0x3F;
        sc[4 + i] = uint8_t((s[8 + i] & 0x0F) | ((s[i] >> 2) & 0x30));
        mn[4 + i] = uint8_t((s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30));
    }
}

// Q4_K: d(f16) dmin(f16) scales[12] qs[128]. Sub-block 2j (32 elements) is the
// low nibbles of qs[32j..32j+31], sub-block 2j+1 the high nibbles.
void deq_q4_k(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 144, y += QK_K) {
        const float d = h2f(x), dmin = h2f(x + 2);
        uint8_t sc[8], mn[8];
        get_scale_min_k4(x + 4, sc, mn);
        const uint8_t* qs = x + 16;
        for (int j = 0; j < 4; ++j) {
            const float d0 = d * float(sc[2 * j]), m0 = dmin * float(mn[2 * j]);
            const float d1 = d * float(sc[2 * j + 1]), m1 = dmin * float(mn[2 * j + 1]);
            const uint8_t* q = qs + 32 * j;
            float* o = y + 64 * j;
            for (int l = 0; l < 32; ++l) {
                const float p0 = d0 * float(q[l] & 0x0F);
                const float p1 = d1 * float(q[l] >> 4);
                o[l] = p0 - m0;
                o[l + 32] = p1 - m1;
            }
        }
    }
}

// Q5_K: d(f16) dmin(f16) scales[12] qh[32] qs[128]. Like Q4_K; the fifth bit
// of element l of sub-block s is bit s of qh[l].
void deq_q5_k(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 176, y += QK_K) {
        const float d = h2f(x), dmin = h2f(x + 2);
        uint8_t sc[8], mn[8];
        get_scale_min_k4(x + 4, sc, mn);
        const uint8_t* qh = x + 16;
        const uint8_t* qs = x + 48;
        for (int j = 0; j < 4; ++j) {
            const float d0 = d * float(sc[2 * j]), m0 = dmin * float(mn[2 * j]);
            const float d1 = d * float(sc[2 * j + 1]), m1 = dmin * float(mn[2 * j + 1]);
            const uint8_t* q = qs + 32 * j;
            float* o = y + 64 * j;
            for (int l = 0; l < 32; ++l) {
                const int v0 = (q[l] & 0x0F) | (((qh[l] >> (2 * j)) & 1) << 4);
                const int v1 = (q[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
                const float p0 = d0 * float(v0);
                const float p1 = d1 * float(v1);
                o[l] = p0 - m0;
                o[l + 32] = p1 - m1;
            }
        }
    }
}

// Q6_K: ql[128] qh[64] scales[16] (int8) d(f16). Element 128*h + 32*k + l
// (k < 4): low 4 bits are nibble k/2 of ql[64*h + 32*(k%2) + l], high 2 bits
// are bits 2k.. of qh[32*h + l]; value minus 32, scale scales[element/16].
void deq_q6_k(const uint8_t* x, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 210, y += QK_K) {
        const uint8_t* ql = x;
        const uint8_t* qh = x + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
        const float d = h2f(x + 208);
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

[[noreturn]] void unsupported(uint32_t type, const char* what) {
    throw Error(std::string(what) + ": cannot dequantize type " + type_name(type) + " (id " +
                std::to_string(type) + ")");
}

}  // namespace

// ---------------------------------------------------------------- public API

float fp16_to_fp32(uint16_t h) { return u2f(h2f_bits(h)); }

uint16_t fp32_to_fp16(float f) {
    uint32_t x = f2u(f);
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

float bf16_to_fp32(uint16_t h) { return u2f(uint32_t(h) << 16); }

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
    case T_Q5_0: deq_q5_0(x, dst, nb); break;
    case T_Q5_1: deq_q5_1(x, dst, nb); break;
    case T_Q8_0: deq_q8_0(x, dst, nb); break;
    case T_Q2_K: deq_q2_k(x, dst, nb); break;
    case T_Q3_K: deq_q3_k(x, dst, nb); break;
    case T_Q4_K: deq_q4_k(x, dst, nb); break;
    case T_Q5_K: deq_q5_k(x, dst, nb); break;
    case T_Q6_K: deq_q6_k(x, dst, nb); break;
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
