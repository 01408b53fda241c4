// cpu_features.cpp - CPUID checks for the CPU matmul variants (cpu_features.h).
#include "cpu_features.h"

#include "error.h"

#if ORCD_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ORCD_HAVE_CPU_BUILTINS 1
#endif

namespace orcd {

#if ORCD_HAVE_CPU_BUILTINS
namespace {
// F16C (CPUID leaf 1, ECX bit 29): clang has no __builtin_cpu_supports name for
// it. Its registers are the AVX ones, whose OS support the avx2 check covers.
bool has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
}  // namespace
#endif

const char* cpu_kernel_name(CpuKernel k) {
    switch (k) {
        case CpuKernel::Avx512: return "avx512";
        case CpuKernel::Avx2: return "avx2";
        default: return "scalar";
    }
}

CpuKernel parse_cpu_kernel(const std::string& name, const char* what) {
    for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512})
        if (name == cpu_kernel_name(k)) return k;
    throw Error(std::string(what) + " '" + name + "' is not a CPU kernel variant: use scalar, avx2 or avx512");
}

bool cpu_kernel_supported(CpuKernel k) {
    if (k == CpuKernel::Scalar) return true;
#if ORCD_HAVE_CPU_BUILTINS
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    if (k == CpuKernel::Avx2) return avx2;
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
}

CpuKernel cpu_kernel_best() {
    static const CpuKernel best = cpu_kernel_supported(CpuKernel::Avx512) ? CpuKernel::Avx512
                                  : cpu_kernel_supported(CpuKernel::Avx2) ? CpuKernel::Avx2
                                                                          : CpuKernel::Scalar;
    return best;
}

std::vector<std::string> cpu_kernels_supported() {
    std::vector<std::string> r;
    for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512})
        if (cpu_kernel_supported(k)) r.push_back(cpu_kernel_name(k));
    return r;
}

bool cpu_build_native() {
#if defined(ORCD_NATIVE_BUILD)
    return true;
#else
    return false;
#endif
}

}  // namespace orcd
