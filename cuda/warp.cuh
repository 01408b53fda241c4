// warp.cuh - warp-wide reductions shared by the kernels (every lane gets the result).
#pragma once
#include <cuda_runtime.h>

namespace orcd {
namespace cu {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

}  // namespace cu
}  // namespace orcd
