// cpu_kernels_avx512.cpp - the "avx512" variant of the CPU matmul: AVX-512 F/BW/VL + VNNI (and AVX2 + FMA + F16C).
// The code is cpu_kernels_impl.h; see cpu_kernels.h for how a variant is chosen.
#include "cpu_features.h"
#if ORCD_CPU_X86
#define ORCD_CPU_ISA 2
#include "cpu_kernels_impl.h"
#endif
