// The CPU kernels (cpu/kernels.h) for the architecture's baseline: SSE2 on x86-64, NEON on
// aarch64, plain C++ elsewhere. Built everywhere; the only level off x86-64 (cpu/isa.h).
#define SMCA_ISA generic
#define SMCA_ISA_LEVEL 0
#include "cpu/kernels.h"
