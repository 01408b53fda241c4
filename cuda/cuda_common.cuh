// cuda_common.cuh - error checking for every CUDA runtime and cuBLAS call.
//
// CUDA_CHECK(call, what)   throws orcd::CudaError "<call> failed: <error
//                          string> (<what>)" where `what` names the kernel,
//                          tensor or buffer involved.
// CUDA_LAUNCH_CHECK(what)  after a kernel launch: cudaGetLastError (no sync).
// CUBLAS_CHECK(call, what) likewise for cuBLAS status codes.
#pragma once
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda_api.h"

namespace orcd {

[[noreturn]] void throw_cuda(const char* call, cudaError_t e, const std::string& what);
[[noreturn]] void throw_cublas(const char* call, cublasStatus_t s, const std::string& what);

}  // namespace orcd

#define CUDA_CHECK(call, what)                                         \
    do {                                                               \
        cudaError_t e_ = (call);                                       \
        if (e_ != cudaSuccess) ::orcd::throw_cuda(#call, e_, (what));  \
    } while (0)

#define CUDA_LAUNCH_CHECK(what)                                                     \
    do {                                                                            \
        cudaError_t e_ = cudaGetLastError();                                        \
        if (e_ != cudaSuccess) ::orcd::throw_cuda("kernel launch", e_, (what));     \
    } while (0)

#define CUBLAS_CHECK(call, what)                                                     \
    do {                                                                             \
        cublasStatus_t s_ = (call);                                                  \
        if (s_ != CUBLAS_STATUS_SUCCESS) ::orcd::throw_cublas(#call, s_, (what));    \
    } while (0)
