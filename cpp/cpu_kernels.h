// cpu_kernels.h - the variants of the CPU matmul, one per instruction set.
//
// cpu_kernels_impl.h is compiled three times (cpu_kernels_scalar.cpp,
// cpu_kernels_avx2.cpp, cpu_kernels_avx512.cpp), each time into its own
// namespace and with its own target instruction set; matmul.cpp calls the one
// picked once per process (cpu_features.h: CPUID, or ORCD_CPU_KERNEL). A
// variant may only be called on a CPU that cpu_kernel_supported() says runs it.
#pragma once
#include <cstdint>

#include "cpu_features.h"
#include "matmul.h"

namespace orcd {

// y[m, n_out] = x · Wᵀ with one variant's kernels; w, m are already checked
// (m > 0, n_out > 0).
using CpuMatmulFn = void (*)(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool);

namespace cpu_scalar {
void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool);
}
#if ORCD_CPU_X86
namespace cpu_avx2 {
void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool);
}
namespace cpu_avx512 {
void matmul(const WeightView& w, const float* x, int64_t m, float* y, ThreadPool& pool);
}
#endif

}  // namespace orcd
