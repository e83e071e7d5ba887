// The CPU kernels (cpu/kernels.h) for AVX2 + FMA (x86-64-v3); x86-64 with GCC only (cpu/isa.h).
#include "cpu/isa.h"

#if SMCA_CPU_X86_LEVELS
#define SMCA_ISA avx2
#define SMCA_ISA_LEVEL 1
#include "cpu/kernels.h"
#endif
