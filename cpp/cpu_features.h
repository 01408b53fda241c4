// cpu_features.h - the CPU matmul variants and which of them this processor runs.
//
// Variants, lowest first (each needs what the one before it needs):
//   "scalar"  any CPU;
//   "avx2"    AVX2 + FMA + F16C;
//   "avx512"  the above + AVX-512 F, BW, VL and VNNI.
// Support is read with CPUID once per process (__builtin_cpu_supports, which
// also checks that the OS saves the vector registers).
#pragma once
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define ORCD_CPU_X86 1
#else
#define ORCD_CPU_X86 0
#endif

namespace orcd {

enum class CpuKernel : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// "scalar", "avx2" or "avx512".
const char* cpu_kernel_name(CpuKernel k);
// The variant named `name`; throws orcd::Error naming `what` (where the name
// came from, e.g. "ORCD_CPU_KERNEL") and the accepted names when unknown.
CpuKernel parse_cpu_kernel(const std::string& name, const char* what);
// True when this CPU (and OS) can run variant k.
bool cpu_kernel_supported(CpuKernel k);
// The highest variant this CPU runs.
CpuKernel cpu_kernel_best();
// The names of the variants this CPU runs, lowest first.
std::vector<std::string> cpu_kernels_supported();
// True when the core was built with -march=native (ORCD_NATIVE=ON): then all of
// it, not only the variants above, may use this machine's instructions.
bool cpu_build_native();

}  // namespace orcd
