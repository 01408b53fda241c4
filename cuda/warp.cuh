// warp.cuh - warp- and block-wide reductions shared by the kernels (every thread gets the result).
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

// Block-wide sum / max; every thread gets the result. NTH: the block's threads when fixed
// at compile time (the loop over the warps' values unrolls), 0: blockDim.x. `buf` holds a
// float per warp (32 floats serve any block); the leading barrier lets a call reuse the
// buffer of the call before it, and the two barriers publish the block's shared-memory
// writes made before the call.
template <int NTH = 0>
__device__ __forceinline__ float block_sum(float v, float* buf) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const int nw = NTH > 0 ? NTH / 32 : int(blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) buf[w] = v;
    __syncthreads();
    float r = 0.f;
#pragma unroll
    for (int i = 0; i < nw; ++i) r += buf[i];
    return r;
}
template <int NTH = 0>
__device__ __forceinline__ float block_max(float v, float* buf) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const int nw = NTH > 0 ? NTH / 32 : int(blockDim.x + 31) / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) buf[w] = v;
    __syncthreads();
    float r = -INFINITY;
#pragma unroll
    for (int i = 0; i < nw; ++i) r = fmaxf(r, buf[i]);
    return r;
}

}  // namespace cu
}  // namespace orcd
