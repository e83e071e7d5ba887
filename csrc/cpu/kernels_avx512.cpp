// The CPU kernels (cpu/kernels.h) for AVX-512 (x86-64-v4: AVX-512 F, BW, CD, DQ, VL); x86-64
// with GCC only (cpu/isa.h).
#include "cpu/isa.h"

#if SMCA_CPU_X86_LEVELS
#define SMCA_ISA avx512
#define SMCA_ISA_LEVEL 2
#include "cpu/kernels.h"
#endif
