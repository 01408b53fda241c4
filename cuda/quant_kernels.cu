// quant_kernels.cu - reading GGUF blocks on the GPU: dequantization to fp16,
// the decode mat-vec that reads quantized weights directly, and the
// embedding lookup.
//
// All three are built on deq8<T>(row, u, n, out): the 8 consecutive elements
// 8u .. 8u+7 of a row (or a whole tensor seen as one row), as float32. The
// float operations are those of cpp/quants.cpp one for one (each product
// rounded on its own: __fmul_rn/__fadd_rn/__fsub_rn keep nvcc from
// contracting them into FMAs), so a dequantized value is bitwise the CPU's
// and its fp16 rounding is numpy's float16 of the CPU result.
//
// Block layouts: cpp/block_formats.h. Within a block, 8 consecutive elements starting at a multiple of 8 always
// share one scale (sub-blocks are 16 or 32 elements), which deq8 exploits.
#include <cstdio>
#include <string>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "quants.h"
#include "kernels.cuh"
#include "quant_common.cuh"

namespace orcd {
namespace cu {
namespace {

// ---------------------------------------------------------------- dequantize to fp16
template <uint32_t T>
__global__ void dequant_f16_kernel(const uint8_t* __restrict__ src, int64_t n, __half* __restrict__ dst) {
    const int64_t units = (n + 7) / 8;
    for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += int64_t(gridDim.x) * blockDim.x) {
        float w[8];
        deq8<T>(src, u, n, w);
        const int64_t e0 = u * 8;
        if (e0 + 8 <= n) {
            __align__(16) __half h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(w[i]);
            *reinterpret_cast<uint4*>(dst + e0) = *reinterpret_cast<const uint4*>(h);
        } else {
            for (int i = 0; i < 8 && e0 + i < n; ++i) dst[e0 + i] = __float2half_rn(w[i]);
        }
    }
}

// ---------------------------------------------------------------- mat-vec
// One warp per output row, 4 rows per block. Lane l takes the 8-element units
// l, l+32, ... of the row; each unit is dequantized once and dotted with the
// same 8 elements of each of the M activation rows.
constexpr int kMvWarps = 4;

template <uint32_t T, int M>
__global__ void __launch_bounds__(32 * kMvWarps)
matvec_kernel(const uint8_t* __restrict__ W, size_t row_bytes, int n_in, int n_out, const float* __restrict__ x,
              int ldx, float* __restrict__ y, int ldy, const float* __restrict__ bias, int accumulate) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.x * kMvWarps + warp;
    if (r >= n_out) return;
    const uint8_t* row = W + size_t(r) * row_bytes;
    const int units = (n_in + 7) / 8;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int u = lane; u < units; u += 32) {
        float w[8];
        deq8<T>(row, u, n_in, w);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float* xm = x + size_t(m) * ldx + size_t(u) * 8;
            if constexpr (!is_plain<T>()) {  // n_in % 32 == 0, ldx % 4 == 0: aligned float4
                const float4 a = *reinterpret_cast<const float4*>(xm);
                const float4 c = *reinterpret_cast<const float4*>(xm + 4);
                acc[m] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * c.x + w[5] * c.y +
                          w[6] * c.z + w[7] * c.w;
            } else {
                const int e0 = u * 8;
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (e0 + i < n_in) acc[m] += w[i] * xm[i];
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = acc[m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        acc[m] = v;
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[m];
            if (bias) v += bias[r];
            float* out = y + size_t(m) * ldy + r;
            if (accumulate) v += *out;
            *out = v;
        }
    }
}

// ---------------------------------------------------------------- embedding rows
template <uint32_t T>
__global__ void get_rows_kernel(const uint8_t* __restrict__ W, size_t row_bytes, int n_in,
                                const int32_t* __restrict__ ids, float* __restrict__ out) {
    const int i = blockIdx.y;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    const int units = (n_in + 7) / 8;
    if (u >= units) return;
    float w[8];
    deq8<T>(W + size_t(ids[i]) * row_bytes, u, n_in, w);
    float* o = out + size_t(i) * n_in + size_t(u) * 8;
    for (int k = 0; k < 8 && u * 8 + k < n_in; ++k) o[k] = w[k];
}

// Calls F::template run<T>() for the runtime type id.
#define ORCD_FOR_TYPE(type, CALL)                 \
    switch (type) {                                \
    case T_F32: CALL(T_F32); break;                \
    case T_F16: CALL(T_F16); break;                \
    case T_BF16: CALL(T_BF16); break;              \
    case T_Q4_0: CALL(T_Q4_0); break;              \
    case T_Q4_1: CALL(T_Q4_1); break;              \
    case T_Q5_0: CALL(T_Q5_0); break;              \
    case T_Q5_1: CALL(T_Q5_1); break;              \
    case T_Q8_0: CALL(T_Q8_0); break;              \
    case T_Q2_K: CALL(T_Q2_K); break;              \
    case T_Q3_K: CALL(T_Q3_K); break;              \
    case T_Q4_K: CALL(T_Q4_K); break;              \
    case T_Q5_K: CALL(T_Q5_K); break;              \
    case T_Q6_K: CALL(T_Q6_K); break;              \
    case T_MXFP4: CALL(T_MXFP4); break;            \
    default: unsupported(type, what);              \
    }

[[noreturn]] void unsupported(uint32_t type, const char* what) {
    throw Error(std::string("CUDA backend: no kernel for type ") + type_name(type) + " (id " +
                std::to_string(type) + ") of " + (what ? what : "?"));
}

int block_size_of(uint32_t type) {
    const TypeInfo* ti = type_info(type);
    return ti ? int(ti->block_size) : 1;
}

template <uint32_t T, int M>
void launch_matvec(const uint8_t* w, size_t row_bytes, int n_in, int n_out, const float* x, int ldx, float* y,
                   int ldy, const float* bias, bool acc, cudaStream_t st) {
    const int blocks = (n_out + kMvWarps - 1) / kMvWarps;
    matvec_kernel<T, M><<<blocks, 32 * kMvWarps, 0, st>>>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias,
                                                           acc ? 1 : 0);
}

template <uint32_t T>
void launch_matvec_rows(int rows, const uint8_t* w, size_t row_bytes, int n_in, int n_out, const float* x,
                        int ldx, float* y, int ldy, const float* bias, bool acc, cudaStream_t st) {
    switch (rows) {
    case 1: launch_matvec<T, 1>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 2: launch_matvec<T, 2>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 3: launch_matvec<T, 3>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 4: launch_matvec<T, 4>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 5: launch_matvec<T, 5>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 6: launch_matvec<T, 6>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 7: launch_matvec<T, 7>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    case 8: launch_matvec<T, 8>(w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, acc, st); break;
    }
}

}  // namespace

// deq8<T> covers every type the CPU dequantizes (MXFP4: gpt-oss's experts).
bool type_supported(uint32_t type) { return can_dequantize(type); }

void dequantize_f16(uint32_t type, const uint8_t* src, int64_t n, __half* dst, cudaStream_t st, const char* what) {
    if (n <= 0) return;
    if (n % block_size_of(type) != 0)
        throw Error(std::string("dequantize_f16: ") + std::to_string(n) + " elements of " + type_name(type) +
                    " is not a whole number of blocks (" + (what ? what : "?") + ")");
    const int64_t units = (n + 7) / 8;
    const int threads = 256;
    const int64_t want = (units + threads - 1) / threads;
    const int blocks = int(want < 65535 * 16 ? want : 65535 * 16);
#define ORCD_DQ(T) dequant_f16_kernel<T><<<blocks, threads, 0, st>>>(src, n, dst)
    ORCD_FOR_TYPE(type, ORCD_DQ)
#undef ORCD_DQ
    CUDA_LAUNCH_CHECK(std::string("dequant_f16_kernel<") + type_name(type) + "> for " + (what ? what : "?"));
}

void matvec(uint32_t type, const uint8_t* w, size_t row_bytes, int n_in, int n_out, const float* x, int ldx,
            int rows, float* y, int ldy, const float* bias, bool accumulate, cudaStream_t st, const char* what) {
    if (rows < 1 || rows > kMatvecMaxRows)
        throw Error("matvec: " + std::to_string(rows) + " rows (1.." + std::to_string(kMatvecMaxRows) +
                    " allowed) for " + (what ? what : "?"));
    if (n_in % block_size_of(type) != 0 || (block_size_of(type) > 1 && ldx % 4 != 0))
        throw Error(std::string("matvec: row length ") + std::to_string(n_in) + " / ldx " + std::to_string(ldx) +
                    " do not fit type " + type_name(type) + " (" + (what ? what : "?") + ")");
    if (n_out <= 0) return;
#define ORCD_MV(T) launch_matvec_rows<T>(rows, w, row_bytes, n_in, n_out, x, ldx, y, ldy, bias, accumulate, st)
    ORCD_FOR_TYPE(type, ORCD_MV)
#undef ORCD_MV
    CUDA_LAUNCH_CHECK(std::string("matvec_kernel<") + type_name(type) + "> for " + (what ? what : "?"));
}

void get_rows(uint32_t type, const uint8_t* w, size_t row_bytes, int n_in, const int32_t* ids, int n_ids,
              float* out, cudaStream_t st, const char* what) {
    if (n_ids <= 0) return;
    if (n_in % block_size_of(type) != 0)
        throw Error(std::string("get_rows: row length ") + std::to_string(n_in) + " does not fit type " +
                    type_name(type) + " (" + (what ? what : "?") + ")");
    const int units = (n_in + 7) / 8;
    const dim3 grid((units + 127) / 128, n_ids);
#define ORCD_GR(T) get_rows_kernel<T><<<grid, 128, 0, st>>>(w, row_bytes, n_in, ids, out)
    ORCD_FOR_TYPE(type, ORCD_GR)
#undef ORCD_GR
    CUDA_LAUNCH_CHECK(std::string("get_rows_kernel<") + type_name(type) + "> for " + (what ? what : "?"));
}

}  // namespace cu
}  // namespace orcd
