// cpu_kernels_avx2.cpp - the "avx2" variant of the CPU matmul: AVX2 + FMA + F16C.
// The code is cpu_kernels_impl.h; see cpu_kernels.h for how a variant is chosen.
#include "cpu_features.h"
#if ORCD_CPU_X86
#define ORCD_CPU_ISA 1
#include "cpu_kernels_impl.h"
#endif
