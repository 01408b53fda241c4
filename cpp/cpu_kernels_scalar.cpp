// cpu_kernels_scalar.cpp - the "scalar" variant of the CPU matmul: portable C++,
// built for the baseline instruction set of the build (any x86-64, or any other CPU).
// The code is cpu_kernels_impl.h; see cpu_kernels.h for how a variant is chosen.
#define ORCD_CPU_ISA 0
#include "cpu_kernels_impl.h"
