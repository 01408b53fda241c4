// test_quants.cpp - dequantization on hand-built blocks.
//
// Each test packs logical values (scales, mins, quants) into the block layout
// of ggml-common.h byte by byte and checks the dequantized floats against the
// formula evaluated here by hand. Scales are powers of two or small integers
// so the expected values are exact. Bitwise agreement with gguf.quants on
// random blocks and on the real model is checked by tests/test_dequant.py.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "block_formats.h"
#include "error.h"
#include "ggml_types.h"
#include "gguf.h"
#include "quants.h"

using namespace orcd;

namespace {

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
void put16(std::vector<uint8_t>& b, size_t off, uint16_t v) {
    b[off] = uint8_t(v & 0xFF);
    b[off + 1] = uint8_t(v >> 8);
}

std::vector<float> deq(uint32_t type, const std::vector<uint8_t>& blk, int64_t n) {
    std::vector<float> y(size_t(n), -12345.0f);
    dequantize_row(type, blk.data(), y.data(), n);
    return y;
}

// fp16 bit patterns used as scales
constexpr uint16_t H_ONE = 0x3C00;      // 1.0
constexpr uint16_t H_HALF = 0x3800;     // 0.5
constexpr uint16_t H_QUARTER = 0x3400;  // 0.25
constexpr uint16_t H_EIGHTH = 0x3000;   // 0.125
constexpr uint16_t H_TWO = 0x4000;      // 2.0
constexpr uint16_t H_MINUS_ONE = 0xBC00;  // -1.0

}  // namespace

// ------------------------------------------------------------------ conversions

TEST_CASE("quants: fp16_to_fp32 normal, subnormal, zero, inf, nan") {
    CHECK(fp16_to_fp32(0x3C00) == 1.0f);
    CHECK(fp16_to_fp32(0xC000) == -2.0f);
    CHECK(fp16_to_fp32(0x3555) == 1365.0f / 4096.0f);  // 0x3555 = 2^-2 * (1 + 0x155/1024)
    CHECK(fp16_to_fp32(0x7BFF) == 65504.0f);
    CHECK(fp16_to_fp32(0x0400) == std::ldexp(1.0f, -14));          // smallest normal
    CHECK(fp16_to_fp32(0x0001) == std::ldexp(1.0f, -24));          // smallest subnormal
    CHECK(fp16_to_fp32(0x03FF) == std::ldexp(1023.0f, -24));       // largest subnormal
    CHECK(fp16_to_fp32(0x8003) == -std::ldexp(3.0f, -24));
    CHECK(bits(fp16_to_fp32(0x0000)) == 0x00000000u);
    CHECK(bits(fp16_to_fp32(0x8000)) == 0x80000000u);  // -0.0 keeps its sign
    CHECK(bits(fp16_to_fp32(0x7C00)) == 0x7F800000u);
    CHECK(bits(fp16_to_fp32(0xFC00)) == 0xFF800000u);
    CHECK(bits(fp16_to_fp32(0x7E00)) == 0x7FC00000u);  // quiet NaN
    CHECK(bits(fp16_to_fp32(0x7C01)) == 0x7F802000u);  // signalling NaN: payload kept, not quieted (as NumPy)
    CHECK(bits(fp16_to_fp32(0xFD55)) == 0xFFAAA000u);
}

TEST_CASE("quants: fp32_to_fp16 rounds to nearest even") {
    CHECK(fp32_to_fp16(1.0f) == 0x3C00);
    CHECK(fp32_to_fp16(-2.0f) == 0xC000);
    CHECK(fp32_to_fp16(0.0f) == 0x0000);
    CHECK(fp32_to_fp16(-0.0f) == 0x8000);
    CHECK(fp32_to_fp16(65504.0f) == 0x7BFF);
    CHECK(fp32_to_fp16(65519.0f) == 0x7BFF);  // below the halfway point to 65536
    CHECK(fp32_to_fp16(65520.0f) == 0x7C00);  // halfway: even is inf
    CHECK(fp32_to_fp16(1e10f) == 0x7C00);
    CHECK(fp32_to_fp16(-INFINITY) == 0xFC00);
    // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to the even 0x3C00
    CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
    // 1 + 3*2^-11 is halfway between 0x3C01 and 0x3C02: ties to 0x3C02
    CHECK(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
    CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3C01);
    // subnormals (units of 2^-24)
    CHECK(fp32_to_fp16(std::ldexp(1.0f, -24)) == 0x0001);
    CHECK(fp32_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);   // halfway to 0 and 1: even 0
    CHECK(fp32_to_fp16(std::ldexp(3.0f, -26)) == 0x0001);   // 0.75 units
    CHECK(fp32_to_fp16(std::ldexp(3.0f, -25)) == 0x0002);   // 1.5 units: even 2
    CHECK(fp32_to_fp16(std::ldexp(5.0f, -25)) == 0x0002);   // 2.5 units: even 2
    CHECK(fp32_to_fp16(std::ldexp(1.0f, -30)) == 0x0000);
    CHECK(fp32_to_fp16(-std::ldexp(1023.0f, -24)) == 0x83FF);
    CHECK(fp32_to_fp16(std::ldexp(2047.0f, -25)) == 0x0400);  // 1023.5 units: rounds up into the smallest normal
    uint16_t nan = fp32_to_fp16(NAN);
    CHECK((nan & 0x7C00) == 0x7C00);
    CHECK((nan & 0x03FF) != 0);
}

TEST_CASE("quants: fp16 round trip over every non-NaN half") {
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7C00) == 0x7C00 && (h & 0x03FF)) continue;  // NaN
        if (fp32_to_fp16(fp16_to_fp32(uint16_t(h))) != h) ++bad;
    }
    CHECK(bad == 0);
}

TEST_CASE("quants: bf16_to_fp32 is the top half of the float") {
    CHECK(bf16_to_fp32(0x3F80) == 1.0f);
    CHECK(bf16_to_fp32(0xC040) == -3.0f);
    CHECK(bits(bf16_to_fp32(0x7FC1)) == 0x7FC10000u);
    CHECK(bits(bf16_to_fp32(0x0001)) == 0x00010000u);  // subnormal stays subnormal
}

// ------------------------------------------------------------------ block_formats.h readers

// fp16 -> fp32 bits by arithmetic on the fields (independent of the bit tricks
// under test): subnormals m * 2^-24, normals (1024 + m) * 2^(e-25), inf, and
// NaNs with sign and payload in place (NumPy's conversion).
static uint32_t fp16_rule(uint32_t h) {
    const uint32_t sign = (h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) return sign | 0x7F800000u | (m << 13);
    const float mag = e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(1024 + m), int(e) - 25);
    return sign | bits(mag);
}

TEST_CASE("block_formats: every fp16 pattern through each fp16 reader") {
    int bad_bits = 0, bad_value = 0, bad_read = 0, bad_operand = 0;
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const uint32_t want = fp16_rule(h);
        if (fp16_bits_to_fp32_bits(h) != want) ++bad_bits;
        if (bits(fp16_bits_to_fp32(uint16_t(h))) != want) ++bad_value;  // F16C fast path + NaN fallback
        const uint8_t le[3] = {0xEE, uint8_t(h & 0xFF), uint8_t(h >> 8)};  // at an odd address
        if (bits(read_fp16le(le + 1)) != want) ++bad_read;
        // the arithmetic operand form may only quiet signalling NaNs
        const uint32_t op = bits(read_fp16le_operand(le + 1));
        const bool nan = (h & 0x7C00) == 0x7C00 && (h & 0x03FF);
        if (nan ? (op | 0x00400000u) != (want | 0x00400000u) : op != want) ++bad_operand;
    }
    CHECK(bad_bits == 0);
    CHECK(bad_value == 0);
    CHECK(bad_read == 0);
    CHECK(bad_operand == 0);
    CHECK(bits(fp16_to_fp32(0x7C01)) == 0x7F802000u);  // quants.h's entry point is the same reader
}

TEST_CASE("block_formats: little-endian fields at any alignment") {
    const uint8_t b[6] = {0x11, 0x22, 0x33, 0x44, 0x55, 0x66};
    CHECK(read_u16le(b) == 0x2211);
    CHECK(read_u16le(b + 1) == 0x3322);
    CHECK(read_u32le(b + 1) == 0x55443322u);
    CHECK(read_u32le(b + 2) == 0x66554433u);
    CHECK(bits(bf16_bits_to_fp32(0xC040)) == 0xC0400000u);
}

TEST_CASE("block_formats: layouts agree with the type table") {
    auto same = [](uint32_t t, int elems, int bytes) {
        const TypeInfo* ti = type_info(t);
        return ti && ti->block_size == elems && ti->block_bytes == bytes;
    };
    CHECK(same(T_Q4_0, 32, 18));
    CHECK(same(T_Q5_1, 32, 24));
    CHECK(same(T_Q3_K, 256, 110));
    CHECK(same(T_Q6_K, 256, 210));
    // the last field of every block ends at the block's end
    CHECK(Block<T_Q4_0>::qs + 16 == Block<T_Q4_0>::bytes);
    CHECK(Block<T_Q4_1>::qs + 16 == Block<T_Q4_1>::bytes);
    CHECK(Block<T_Q5_0>::qs + 16 == Block<T_Q5_0>::bytes);
    CHECK(Block<T_Q5_1>::qs + 16 == Block<T_Q5_1>::bytes);
    CHECK(Block<T_Q8_0>::qs + 32 == Block<T_Q8_0>::bytes);
    CHECK(Block<T_Q2_K>::dmin + 2 == Block<T_Q2_K>::bytes);
    CHECK(Block<T_Q3_K>::d + 2 == Block<T_Q3_K>::bytes);
    CHECK(Block<T_Q4_K>::qs + 128 == Block<T_Q4_K>::bytes);
    CHECK(Block<T_Q5_K>::qs + 128 == Block<T_Q5_K>::bytes);
    CHECK(Block<T_Q6_K>::d + 2 == Block<T_Q6_K>::bytes);
}

// ------------------------------------------------------------------ plain types

TEST_CASE("quants: F32, F16 (with subnormals) and BF16 rows") {
    std::vector<float> f = {1.5f, -0.0f, 3e-39f, 7.0f};
    std::vector<uint8_t> b(16);
    std::memcpy(b.data(), f.data(), 16);
    auto y = deq(T_F32, b, 4);
    for (int i = 0; i < 4; ++i) CHECK(bits(y[size_t(i)]) == bits(f[size_t(i)]));

    std::vector<uint8_t> h(8);
    put16(h, 0, 0x3C00);  // 1
    put16(h, 2, 0x0001);  // 2^-24
    put16(h, 4, 0x8200);  // -512 * 2^-24
    put16(h, 6, 0x5640);  // 2^5 * (1 + 0x240/1024) = 100
    y = deq(T_F16, h, 4);
    CHECK(y[0] == 1.0f);
    CHECK(y[1] == std::ldexp(1.0f, -24));
    CHECK(y[2] == -std::ldexp(1.0f, -15));
    CHECK(y[3] == 100.0f);

    std::vector<uint8_t> bf(4);
    put16(bf, 0, 0x4049);  // 3.140625
    put16(bf, 2, 0xBF00);  // -0.5
    y = deq(T_BF16, bf, 2);
    CHECK(y[0] == 3.140625f);
    CHECK(y[1] == -0.5f);
}

// ------------------------------------------------------------------ legacy blocks

TEST_CASE("quants: Q4_0 block, d = 0.5") {
    std::vector<uint8_t> b(18);
    put16(b, 0, H_HALF);
    for (int i = 0; i < 16; ++i) b[size_t(2 + i)] = uint8_t(i | ((15 - i) << 4));  // low = i, high = 15 - i
    auto y = deq(T_Q4_0, b, 32);
    for (int i = 0; i < 16; ++i) {
        CHECK(y[size_t(i)] == 0.5f * float(i - 8));
        CHECK(y[size_t(i + 16)] == 0.5f * float(15 - i - 8));
    }
    CHECK(y[0] == -4.0f);
    CHECK(y[16] == 3.5f);
}

TEST_CASE("quants: Q4_1 block adds the min") {
    std::vector<uint8_t> b(20);
    put16(b, 0, H_QUARTER);
    put16(b, 2, H_MINUS_ONE);
    for (int i = 0; i < 16; ++i) b[size_t(4 + i)] = uint8_t(((i * 3) & 15) | (((i * 5 + 1) & 15) << 4));
    auto y = deq(T_Q4_1, b, 32);
    for (int i = 0; i < 16; ++i) {
        CHECK(y[size_t(i)] == 0.25f * float((i * 3) & 15) - 1.0f);
        CHECK(y[size_t(i + 16)] == 0.25f * float((i * 5 + 1) & 15) - 1.0f);
    }
}

TEST_CASE("quants: Q5_0 block takes the fifth bit from qh") {
    std::vector<uint8_t> b(22);
    put16(b, 0, H_ONE);
    const uint32_t qh = 0xA5F0'0F3Cu;  // bit i: high bit of element i
    for (int k = 0; k < 4; ++k) b[size_t(2 + k)] = uint8_t(qh >> (8 * k));
    for (int i = 0; i < 16; ++i) b[size_t(6 + i)] = uint8_t((i & 15) | ((i ^ 9) << 4));
    auto y = deq(T_Q5_0, b, 32);
    for (int i = 0; i < 32; ++i) {
        int low = i < 16 ? (i & 15) : ((i - 16) ^ 9);
        int q = low | int(((qh >> i) & 1u) << 4);
        CHECK(y[size_t(i)] == float(q - 16));
    }
    CHECK(y[0] == -16.0f);        // bit 0 clear, nibble 0
    CHECK(y[2] == 2.0f);          // qh byte 0 = 0b00111100: bit 2 set -> (2 | 16) - 16
}

TEST_CASE("quants: Q5_1 block") {
    std::vector<uint8_t> b(24);
    put16(b, 0, H_TWO);
    put16(b, 2, H_HALF);
    const uint32_t qh = 0x8000'0001u;  // element 0 and element 31 have the high bit
    for (int k = 0; k < 4; ++k) b[size_t(4 + k)] = uint8_t(qh >> (8 * k));
    for (int i = 0; i < 16; ++i) b[size_t(8 + i)] = uint8_t(0xF0 | (i & 15));  // low = i, high = 15
    auto y = deq(T_Q5_1, b, 32);
    CHECK(y[0] == 2.0f * 16 + 0.5f);
    CHECK(y[1] == 2.0f * 1 + 0.5f);
    CHECK(y[15] == 2.0f * 15 + 0.5f);
    CHECK(y[16] == 2.0f * 15 + 0.5f);
    CHECK(y[31] == 2.0f * 31 + 0.5f);
}

TEST_CASE("quants: Q8_0 block") {
    std::vector<uint8_t> b(34);
    put16(b, 0, H_EIGHTH);
    for (int i = 0; i < 32; ++i) b[size_t(2 + i)] = uint8_t(int8_t(i * 8 - 128));
    auto y = deq(T_Q8_0, b, 32);
    for (int i = 0; i < 32; ++i) CHECK(y[size_t(i)] == 0.125f * float(i * 8 - 128));
    CHECK(y[0] == -16.0f);
}

TEST_CASE("quants: two consecutive Q4_0 blocks and a subnormal scale") {
    std::vector<uint8_t> b(36);
    put16(b, 0, H_ONE);
    put16(b, 18, 0x0004);  // 4 * 2^-24 = 2^-22
    for (int i = 0; i < 16; ++i) b[size_t(2 + i)] = b[size_t(20 + i)] = 0xF0;  // low 0, high 15
    auto y = deq(T_Q4_0, b, 64);
    CHECK(y[0] == -8.0f);
    CHECK(y[16] == 7.0f);
    CHECK(y[32] == -8.0f * std::ldexp(1.0f, -22));
    CHECK(y[63] == 7.0f * std::ldexp(1.0f, -22));
}

// ------------------------------------------------------------------ K-quants

TEST_CASE("quants: Q2_K block subtracts dmin * m") {
    // scales[16] qs[64] d dmin
    std::vector<uint8_t> b(84);
    int sc[16], mn[16], q[256];
    for (int s = 0; s < 16; ++s) {
        sc[s] = (s * 7 + 3) & 15;
        mn[s] = (s * 5) & 15;
        b[size_t(s)] = uint8_t(sc[s] | (mn[s] << 4));
    }
    for (int e = 0; e < 256; ++e) q[e] = (e * 3 + e / 7) & 3;
    // element 128*j + 32*k + l lives in bits 2k..2k+1 of qs[32*j + l]
    for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < 32; ++l) b[size_t(16 + 32 * j + l)] |= uint8_t(q[128 * j + 32 * k + l] << (2 * k));
    put16(b, 80, H_HALF);     // d
    put16(b, 82, H_QUARTER);  // dmin
    auto y = deq(T_Q2_K, b, 256);
    int bad = 0;
    for (int e = 0; e < 256; ++e) {
        float want = 0.5f * float(sc[e / 16]) * float(q[e]) - 0.25f * float(mn[e / 16]);
        if (y[size_t(e)] != want) ++bad;
    }
    CHECK(bad == 0);
    // sub-block 1: sc 10, min 5; element 18 has q = (54 + 2) & 3 = 0 -> -0.25 * 5
    CHECK(q[18] == 0);
    CHECK(y[18] == -1.25f);
}

// Packs 16 six-bit Q3_K scale codes (0..63) into 12 bytes.
static void pack_q3k_scales(const int code[16], uint8_t* s) {
    std::memset(s, 0, 12);
    for (int i = 0; i < 16; ++i) {
        s[i % 8] |= uint8_t((code[i] & 15) << (4 * (i / 8)));
        s[8 + i % 4] |= uint8_t(((code[i] >> 4) & 3) << (2 * (i / 4)));
    }
}

TEST_CASE("quants: Q3_K block: signed 6-bit scales, hmask bit clear subtracts 4") {
    // hmask[32] qs[64] scales[12] d
    std::vector<uint8_t> b(110);
    int code[16], q2[256], hb[256];
    for (int s = 0; s < 16; ++s) code[s] = (s * 13 + 5) & 63;  // scale = code - 32
    for (int e = 0; e < 256; ++e) {
        q2[e] = (e * 7 + 1) & 3;
        hb[e] = ((e * 11) >> 3) & 1;
    }
    for (int e = 0; e < 256; ++e) {
        const int j = e / 128, k = (e % 128) / 32, l = e % 32;
        b[size_t(32 + 32 * j + l)] |= uint8_t(q2[e] << (2 * k));  // qs
        b[size_t(l)] |= uint8_t(hb[e] << (e / 32));                 // hmask bit e/32 of byte l
    }
    pack_q3k_scales(code, b.data() + 96);
    put16(b, 108, H_HALF);
    auto y = deq(T_Q3_K, b, 256);
    int bad = 0;
    for (int e = 0; e < 256; ++e) {
        const int qv = q2[e] - (hb[e] ? 0 : 4);
        const float want = 0.5f * float(code[e / 16] - 32) * float(qv);
        if (y[size_t(e)] != want) ++bad;
    }
    CHECK(bad == 0);
    // element 0: code 5 -> scale -27; q2 = 1, hmask bit clear -> q = -3; y = 0.5 * -27 * -3
    CHECK(y[0] == 40.5f);
}

// Packs 8 six-bit scales and 8 six-bit mins the Q4_K/Q5_K way into 12 bytes.
static void pack_k4_scales(const int sc[8], const int mn[8], uint8_t* s) {
    for (int i = 0; i < 4; ++i) {
        s[i] = uint8_t((sc[i] & 63) | ((sc[4 + i] >> 4) << 6));
        s[4 + i] = uint8_t((mn[i] & 63) | ((mn[4 + i] >> 4) << 6));
        s[8 + i] = uint8_t((sc[4 + i] & 15) | ((mn[4 + i] & 15) << 4));
    }
}

TEST_CASE("block_formats: K-quant scales unpack what was packed, one at a time or all eight") {
    std::mt19937 rng(11);
    int bad = 0;
    for (int trial = 0; trial < 2000; ++trial) {
        int sc[8], mn[8];
        for (int j = 0; j < 8; ++j) {
            sc[j] = int(rng() % 64);
            mn[j] = int(rng() % 64);
        }
        uint8_t s[12];
        pack_k4_scales(sc, mn, s);
        uint8_t all_sc[8], all_mn[8];
        k4_scales_mins(s, all_sc, all_mn);
        for (int j = 0; j < 8; ++j) {
            int a, b;
            k4_scale_min(s, j, a, b);
            if (a != sc[j] || b != mn[j] || all_sc[j] != sc[j] || all_mn[j] != mn[j]) ++bad;
        }
    }
    CHECK(bad == 0);
}

TEST_CASE("block_formats: Q3_K scales unpack what was packed") {
    std::mt19937 rng(12);
    int bad = 0;
    for (int trial = 0; trial < 2000; ++trial) {
        int want[16];
        uint8_t s[12] = {};
        for (int k = 0; k < 16; ++k) {  // 6-bit codes: low 4 bits in nibble k/8 of s[k%8], high 2 at bit 2*(k/4) of s[8+k%4]
            const int code = int(rng() % 64);
            want[k] = code - 32;
            s[k % 8] |= uint8_t((code & 15) << (4 * (k / 8)));
            s[8 + k % 4] |= uint8_t((code >> 4) << (2 * (k / 4)));
        }
        for (int k = 0; k < 16; ++k)
            if (q3k_scale(s, k) != want[k]) ++bad;
    }
    CHECK(bad == 0);
}

TEST_CASE("quants: Q4_K block: y = d*sc*q - dmin*m (mins subtracted)") {
    // d dmin scales[12] qs[128]
    std::vector<uint8_t> b(144);
    const int sc[8] = {1, 2, 63, 17, 33, 48, 5, 60};
    const int mn[8] = {3, 0, 40, 63, 16, 1, 59, 32};
    int q[256];
    for (int e = 0; e < 256; ++e) q[e] = (e * 5 + e / 32) & 15;
    put16(b, 0, H_HALF);      // d
    put16(b, 2, H_QUARTER);   // dmin
    pack_k4_scales(sc, mn, b.data() + 4);
    // sub-block 2j: low nibbles of qs[32j..], sub-block 2j+1: high nibbles
    for (int e = 0; e < 256; ++e) {
        const int s = e / 32, l = e % 32;
        b[size_t(16 + 32 * (s / 2) + l)] |= uint8_t(q[e] << (4 * (s % 2)));
    }
    auto y = deq(T_Q4_K, b, 256);
    int bad = 0;
    for (int e = 0; e < 256; ++e) {
        const float want = 0.5f * float(sc[e / 32]) * float(q[e]) - 0.25f * float(mn[e / 32]);
        if (y[size_t(e)] != want) ++bad;
    }
    CHECK(bad == 0);
    CHECK(q[0] == 0);
    CHECK(y[0] == -0.75f);  // sc 1, q 0, m 3: the min is subtracted
    // sub-block 3 (sc 17, m 63) uses the high bits of both
    CHECK(y[96] == 0.5f * 17 * float(q[96]) - 0.25f * 63);
}

TEST_CASE("quants: Q4_K final subtraction rounds in float32") {
    std::vector<uint8_t> b(144, 0);
    put16(b, 0, 0x6400);  // d = 1024
    put16(b, 2, 0x0400);  // dmin = 2^-14
    const int sc[8] = {63, 0, 0, 0, 0, 0, 0, 0};
    const int mn[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    pack_k4_scales(sc, mn, b.data() + 4);
    b[16] = 0x0F;  // element 0: q = 15
    auto y = deq(T_Q4_K, b, 256);
    volatile float p = 1024.0f * 63.0f * 15.0f, m = std::ldexp(1.0f, -14);
    CHECK(bits(y[0]) == bits(float(p - m)));  // 967680 - 2^-14 rounds back to 967680
    CHECK(y[0] == 967680.0f);
    CHECK(y[1] == -std::ldexp(1.0f, -14));
}

TEST_CASE("quants: Q5_K block: fifth bit of sub-block s is bit s of qh") {
    // d dmin scales[12] qh[32] qs[128]
    std::vector<uint8_t> b(176);
    const int sc[8] = {7, 63, 16, 1, 40, 2, 31, 50};
    const int mn[8] = {0, 5, 63, 20, 1, 48, 9, 33};
    int q[256];
    for (int e = 0; e < 256; ++e) q[e] = (e * 9 + e / 16) & 31;
    put16(b, 0, H_QUARTER);
    put16(b, 2, H_HALF);
    pack_k4_scales(sc, mn, b.data() + 4);
    for (int e = 0; e < 256; ++e) {
        const int s = e / 32, l = e % 32;
        b[size_t(48 + 32 * (s / 2) + l)] |= uint8_t((q[e] & 15) << (4 * (s % 2)));
        b[size_t(16 + l)] |= uint8_t((q[e] >> 4) << s);
    }
    auto y = deq(T_Q5_K, b, 256);
    int bad = 0;
    for (int e = 0; e < 256; ++e) {
        const float want = 0.25f * float(sc[e / 32]) * float(q[e]) - 0.5f * float(mn[e / 32]);
        if (y[size_t(e)] != want) ++bad;
    }
    CHECK(bad == 0);
    CHECK(y[0] == 0.0f);  // q 0, m 0
}

TEST_CASE("quants: Q6_K block: int8 scales, 6-bit quants minus 32") {
    // ql[128] qh[64] scales[16] d
    std::vector<uint8_t> b(210);
    int q[256];
    const int8_t sc[16] = {1, -1, 127, -128, 5, 0, -7, 33, 64, -64, 2, 3, -2, 100, -100, 9};
    for (int e = 0; e < 256; ++e) q[e] = (e * 37 + 11) & 63;
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, k = (e % 128) / 32, l = e % 32;
        b[size_t(64 * h + 32 * (k % 2) + l)] |= uint8_t((q[e] & 15) << (4 * (k / 2)));  // ql
        b[size_t(128 + 32 * h + l)] |= uint8_t((q[e] >> 4) << (2 * k));                // qh
    }
    for (int s = 0; s < 16; ++s) b[size_t(192 + s)] = uint8_t(sc[s]);
    put16(b, 208, H_EIGHTH);
    auto y = deq(T_Q6_K, b, 256);
    int bad = 0;
    for (int e = 0; e < 256; ++e) {
        const float want = 0.125f * float(sc[e / 16]) * float(q[e] - 32);
        if (y[size_t(e)] != want) ++bad;
    }
    CHECK(bad == 0);
    CHECK(y[0] == 0.125f * 1 * float(11 - 32));
}

// ------------------------------------------------------------------ errors and rows

TEST_CASE("quants: unsupported types and bad lengths throw") {
    std::vector<uint8_t> b(1024);
    std::vector<float> y(1024);
    CHECK_FALSE(can_dequantize(T_Q8_1));
    CHECK_FALSE(can_dequantize(T_Q8_K));
    CHECK_FALSE(can_dequantize(16));  // IQ2_XXS
    CHECK_FALSE(can_dequantize(99));
    for (uint32_t t : {T_F32, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_Q2_K, T_Q3_K,
                       T_Q4_K, T_Q5_K, T_Q6_K}) {
        CHECK(can_dequantize(t));
        CHECK(type_info(t)->dequantizable);
    }
    CHECK_THROWS_AS(dequantize_row(T_Q8_1, b.data(), y.data(), 32), Error);
    CHECK_THROWS_WITH_AS(dequantize_row(16, b.data(), y.data(), 256), doctest::Contains("IQ2_XXS"), Error);
    CHECK_THROWS_AS(dequantize_row(99, b.data(), y.data(), 32), Error);
    CHECK_THROWS_AS(dequantize_row(T_Q4_0, b.data(), y.data(), 31), Error);  // not a whole block
    CHECK_THROWS_AS(dequantize_row(T_Q4_K, b.data(), y.data(), 32), Error);
    CHECK_NOTHROW(dequantize_row(T_Q4_K, b.data(), y.data(), 0));
}

TEST_CASE("quants: dequantize_rows picks rows of a tensor and names it in errors") {
    // 3 rows of 64 Q8_0 elements (2 blocks per row); row r, block k has d = 1 and qs = 10*r + k
    std::vector<uint8_t> data(3 * 2 * 34);
    for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 2; ++k) {
            const size_t off = size_t((r * 2 + k) * 34);
            put16(data, off, H_ONE);
            for (int i = 0; i < 32; ++i) data[off + 2 + size_t(i)] = uint8_t(10 * r + k);
        }
    TensorInfo t;
    t.name = "blk.0.ffn_up.weight";
    t.n_dims = 2;
    t.ne[0] = 64;
    t.ne[1] = 3;
    t.type = T_Q8_0;
    t.nbytes = data.size();
    t.data = data.data();
    REQUIRE(t.row_bytes() == 68);

    std::vector<float> y(2 * 64, -1.0f);
    dequantize_rows(t, 1, 3, y.data());
    for (int r = 0; r < 2; ++r)
        for (int i = 0; i < 64; ++i) CHECK(y[size_t(r * 64 + i)] == float(10 * (r + 1) + i / 32));

    CHECK_NOTHROW(dequantize_rows(t, 2, 2, y.data()));
    CHECK_THROWS_WITH_AS(dequantize_rows(t, 2, 4, y.data()), doctest::Contains("blk.0.ffn_up.weight"), Error);
    CHECK_THROWS_AS(dequantize_rows(t, -1, 1, y.data()), Error);
    CHECK_THROWS_AS(dequantize_rows(t, 2, 1, y.data()), Error);
    t.type = T_Q8_1;
    CHECK_THROWS_WITH_AS(dequantize_rows(t, 0, 1, y.data()), doctest::Contains("blk.0.ffn_up.weight"), Error);
}
