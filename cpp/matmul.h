// matmul.h - CPU matrix products that read GGUF weights in their stored type.
//
// A weight tensor W with ne = [n_in, n_out] holds n_out rows of n_in
// elements (ne[0] is contiguous), row r being output feature r. matmul
// computes y = x · Wᵀ for m activation rows:
//     y[i, r] = sum_k x[i, k] * W[r, k]      i < m, r < n_out, k < n_in
// Quantized weights are never expanded to a full float copy: each thread
// works on a band of output rows and reads the quantized blocks directly.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gguf.h"
#include "threadpool.h"

namespace orcd {

struct WeightView {
    uint32_t type = 0;              // ggml type id
    const uint8_t* data = nullptr;  // row 0, block 0
    int64_t n_in = 0;               // ne[0]: elements per row (reduction length)
    int64_t n_out = 0;              // ne[1]: rows (output features)
    size_t row_bytes = 0;           // bytes between consecutive rows
};

// View of a 2-D tensor; throws orcd::Error naming the tensor if it is not a
// matrix or its type has no matmul kernel.
WeightView weight_view(const TensorInfo& t);

// y[m, n_out] = x[m, n_in] · Wᵀ. x and y are row-major float32, y is
// overwritten. Runs on `pool`.
void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool);

// Copies row `row` of W (e.g. one token's embedding) into dst[n_in] as float32.
void weight_row(const WeightView& w, int64_t row, float* dst);

// ---- additions (matmul.cpp) -------------------------------------------------

// View of raw bytes holding n_out rows of n_in elements of ggml type `type`
// (for the bindings and tests). matmul also accepts views whose row_bytes is
// larger than one row (strided rows, e.g. one head of a float KV cache). Throws orcd::Error if the type has no kernel
// or n_in is not a multiple of its block size.
WeightView make_weight_view(uint32_t type, const void* data, int64_t n_in, int64_t n_out);

// True when matmul accepts weights of this type (integer kernel or the
// dequantize-to-scratch fallback).
bool matmul_supports(uint32_t type);
// True when the type has a dedicated kernel (F32, F16, BF16, Q4_0, Q5_0,
// Q8_0, Q4_K, Q5_K, Q6_K); other supported types take the fallback.
bool matmul_has_kernel(uint32_t type);

// The kernels come in variants per instruction set, chosen at run time
// (cpu_features.h): "scalar" (any CPU), "avx2" (AVX2 + FMA + F16C), "avx512"
// (AVX-512 F/BW/VL + VNNI). All use the same activation quantization and the
// same integer block sums, so their results agree up to float summation order.
// The default is ORCD_CPU_KERNEL=scalar|avx2|avx512 when set (lowered to what
// the CPU runs), else the best the CPU runs.

// Name of the variant in use. Throws orcd::Error if ORCD_CPU_KERNEL names no
// variant (as matmul does).
const char* matmul_kernel_name();
// The variants this CPU runs, lowest first.
std::vector<std::string> matmul_kernels();
// Test hook: use variant `name` process-wide (lowered to what the CPU runs);
// "" goes back to the default. Returns the name of the variant now in use;
// throws orcd::Error for an unknown name.
const char* matmul_set_kernel(const std::string& name);
// Test hook: matmul_set_kernel("scalar") when on, the default when off.
void matmul_force_scalar(bool on);

}  // namespace orcd
