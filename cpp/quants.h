// quants.h - dequantization of GGUF tensor blocks to float32 (CPU).
//
// Block layouts follow the GGUF spec / ggml-common.h. Results are bitwise
// equal to the `gguf` Python package's gguf.quants.dequantize (the tests
// check this on random blocks and on every tensor of the real model).
#pragma once
#include <cstdint>

#include "gguf.h"

namespace orcd {

// True when dequantize_row supports ggml type `type`.
bool can_dequantize(uint32_t type);

// Dequantizes `n` consecutive elements starting at `src` (n must be a
// multiple of the type's block size; `src` points at a block boundary).
// Throws orcd::Error for an unsupported type.
void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n);

// Dequantizes rows [r0, r1) of tensor `t` (a row is ne[0] elements; rows are
// counted over ne[1]*ne[2]*ne[3]) into dst[(r1-r0) * ne[0]]. Throws naming
// the tensor on an unsupported type or an out-of-range row.
void dequantize_rows(const TensorInfo& t, int64_t r0, int64_t r1, float* dst);

// fp16 / bf16 <-> fp32 conversions shared by the CPU code.
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);  // round to nearest even
float bf16_to_fp32(uint16_t h);

}  // namespace orcd
