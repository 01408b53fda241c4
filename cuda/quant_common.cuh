// quant_common.cuh - reading GGUF blocks on the GPU: deq8<T>, the 8
// consecutive elements of a row as float32 with cpp/quants.cpp's float
// operations one for one. Shared by quant_kernels.cu (dequantize, mat-vec,
// embedding) and decode_kernels.cu (fused decode step). The block layouts
// (Block<T>) and the scale unpacking are cpp/block_formats.h's, shared with the CPU.
#pragma once
#include <cuda_fp16.h>
#include <cstdint>

#include "block_formats.h"
#include "ggml_types.h"

namespace orcd {
namespace cu {
namespace {

template <uint32_t T> __host__ __device__ constexpr bool is_plain() { return Block<T>::elems == 1; }

// Block fields at their natural 2-byte alignment: one load (and the hardware
// conversion for fp16) instead of block_formats.h's byte-wise readers. For every
// value but NaNs the same as read_fp16le / read_u32le.
__device__ __forceinline__ float ldh(const uint8_t* p) {  // fp16 at a 2-byte aligned address
    return __half2float(*reinterpret_cast<const __half*>(p));
}
__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {  // u32 LE at a 2-byte aligned address
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return uint32_t(h[0]) | (uint32_t(h[1]) << 16);
}

// The 8 elements 8u..8u+7 of `row`; for plain types elements >= n read as 0.
template <uint32_t T>
__device__ __forceinline__ void deq8(const uint8_t* __restrict__ row, int64_t u, int64_t n, float (&o)[8]) {
    if constexpr (is_plain<T>()) {
        const int64_t e0 = u * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int64_t e = e0 + i;
            float v = 0.f;
            if (e < n) {
                if constexpr (T == T_F32) v = reinterpret_cast<const float*>(row)[e];
                else if constexpr (T == T_F16) v = __half2float(reinterpret_cast<const __half*>(row)[e]);
                else v = __uint_as_float(uint32_t(reinterpret_cast<const uint16_t*>(row)[e]) << 16);
            }
            o[i] = v;
        }
    } else {
        using L = Block<T>;
        constexpr int UPB = L::elems / 8;  // 8-element units per block
        const uint8_t* b = row + (u / UPB) * L::bytes;
        const int j0 = int(u % UPB) * 8;
        if constexpr (T == T_Q4_0) {
            const float d = ldh(b + L::d);
            const uint8_t* qs = b + L::qs;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = j0 + i;
                const int q = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
                o[i] = __fmul_rn(d, float(q - 8));
            }
        } else if constexpr (T == T_Q4_1) {
            const float d = ldh(b + L::d), m = ldh(b + L::m);
            const uint8_t* qs = b + L::qs;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = j0 + i;
                const int q = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
                o[i] = __fadd_rn(__fmul_rn(d, float(q)), m);
            }
        } else if constexpr (T == T_Q5_0 || T == T_Q5_1) {
            constexpr bool one = T == T_Q5_1;
            const float d = ldh(b + L::d);
            float m = 0.f;
            if constexpr (one) m = ldh(b + Block<T_Q5_1>::m);
            const uint32_t qh = ld32(b + L::qh);
            const uint8_t* qs = b + L::qs;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = j0 + i;
                const int lo = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
                const int q = lo | int(((qh >> e) & 1u) << 4);
                if constexpr (one) o[i] = __fadd_rn(__fmul_rn(d, float(q)), m);
                else o[i] = __fmul_rn(d, float(q - 16));
            }
        } else if constexpr (T == T_Q8_0) {
            const float d = ldh(b + L::d);
            const int8_t* qs = reinterpret_cast<const int8_t*>(b + L::qs);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = __fmul_rn(float(qs[j0 + i]), d);
        } else if constexpr (T == T_Q2_K) {
            // element 128j + 32k + 16h + l: sub-block s = 8j + 2k + h, bits 2k of qs[32j + 16h + l]
            const int j = j0 >> 7, k = (j0 >> 5) & 3, h = (j0 >> 4) & 1, l0 = j0 & 15;
            const int s = 8 * j + 2 * k + h;
            const uint8_t sc = b[L::scales + s];
            const float d = ldh(b + L::d), dmin = ldh(b + L::dmin);
            const float dl = __fmul_rn(d, float(sc & 0x0F));
            const float ml = __fmul_rn(dmin, float(sc >> 4));
            const uint8_t* q = b + L::qs + 32 * j + 16 * h + l0;
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = __fsub_rn(__fmul_rn(dl, float((q[i] >> (2 * k)) & 3)), ml);
        } else if constexpr (T == T_Q3_K) {
            const int j = j0 >> 7, k = (j0 >> 5) & 3, h = (j0 >> 4) & 1, l0 = j0 & 15;
            const int s = 8 * j + 2 * k + h;
            const float dl = __fmul_rn(ldh(b + L::d), float(q3k_scale(b + L::scales, s)));
            const int bit = 4 * j + k;
            const uint8_t* q = b + L::qs + 32 * j + 16 * h + l0;
            const uint8_t* hm = b + L::hmask + 16 * h + l0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int v = int((q[i] >> (2 * k)) & 3) - (((hm[i] >> bit) & 1) ? 0 : 4);
                o[i] = __fmul_rn(dl, float(v));
            }
        } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
            // element 64g + 32sub + l: sub-block is = 2g + sub; nibble `sub` of qs[32g + l]
            const int g = j0 >> 6, sub = (j0 >> 5) & 1, l0 = j0 & 31;
            const int is = 2 * g + sub;
            int sc, mn;
            k4_scale_min(b + L::scales, is, sc, mn);
            const float d0 = __fmul_rn(ldh(b + L::d), float(sc));
            const float m0 = __fmul_rn(ldh(b + L::dmin), float(mn));
            if constexpr (T == T_Q4_K) {
                const uint8_t* q = b + L::qs + 32 * g + l0;
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    o[i] = __fsub_rn(__fmul_rn(d0, float((q[i] >> (4 * sub)) & 0x0F)), m0);
            } else {
                const uint8_t* qh = b + Block<T_Q5_K>::qh + l0;
                const uint8_t* q = b + Block<T_Q5_K>::qs + 32 * g + l0;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const int v = ((q[i] >> (4 * sub)) & 0x0F) | (((qh[i] >> is) & 1) << 4);
                    o[i] = __fsub_rn(__fmul_rn(d0, float(v)), m0);
                }
            }
        } else if constexpr (T == T_MXFP4) {
            // element i < 16: low nibble of qs[i], else the high nibble of qs[i - 16]; each an E2M1
            // code doubled (mxfp4_code2) under the halved E8M0 scale, as deq_mxfp4
            const float d = __uint_as_float(e8m0_half_bits(b[L::e]));
            const uint8_t* qs = b + L::qs;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = j0 + i;
                const int c = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
                o[i] = __fmul_rn(d, float(mxfp4_code2(c)));
            }
        } else if constexpr (T == T_Q6_K) {
            // element 128h + 32k + l: nibble k/2 of ql[64h + 32(k%2) + l], bits 2k of qh[32h + l],
            // scale scales[8h + 2k + l/16]
            const int h = j0 >> 7, k = (j0 >> 5) & 3, l0 = j0 & 31;
            const int8_t* scales = reinterpret_cast<const int8_t*>(b + L::scales);
            const float dl = __fmul_rn(ldh(b + L::d), float(scales[8 * h + 2 * k + (l0 >> 4)]));
            const uint8_t* ql = b + L::ql + 64 * h + 32 * (k & 1) + l0;
            const uint8_t* qh = b + L::qh + 32 * h + l0;
            const int shift = 4 * (k >> 1);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int v = (((ql[i] >> shift) & 0x0F) | (((qh[i] >> (2 * k)) & 3) << 4)) - 32;
                o[i] = __fmul_rn(dl, float(v));
            }
        }
    }
}


}  // namespace
}  // namespace cu
}  // namespace orcd
