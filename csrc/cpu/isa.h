// Which instruction set the CPU kernels run with.
//
// The kernels (cpu/kernels.h) are compiled once per ISA level, each copy in its own namespace,
// in its own translation unit (kernels_avx512.cpp, kernels_avx2.cpp, kernels_default.cpp), with
// `#pragma GCC target` set after every outside header is included: only our own functions get the
// wider instructions, so no inline function of torch or the standard library is ever emitted for
// an ISA the machine may lack. The extension itself needs no -march flag and loads on any CPU of
// its architecture; the choice is made per call:
//
//   SMCA_CPU_ISA unset or "auto": the widest level this CPU supports;
//   SMCA_CPU_ISA=avx512 | avx2 | default (any case): that level (an error if this CPU or build
//   lacks it),
//
// so that every path can be tested and timed on one machine, as ONEDNN_MAX_CPU_ISA and
// MKL_ENABLE_INSTRUCTIONS do for those libraries. "default" is the architecture's baseline: SSE2
// on x86-64, NEON on aarch64, plain C++ elsewhere.
#pragma once

#include <string>
#include <vector>

// The x86 levels are built with GCC on x86-64 (`#pragma GCC target`); other compilers and
// architectures build the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SMCA_CPU_X86_LEVELS 1
#else
#define SMCA_CPU_X86_LEVELS 0
#endif

namespace smca::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

const char* isa_name(Isa isa);

// The levels this build has and this CPU runs, widest first.
std::vector<Isa> supported_isas();

// The level the kernels use now: SMCA_CPU_ISA if set (checked), else the widest supported.
// Raises (c10::Error) naming SMCA_CPU_ISA and the choices when the variable is not usable.
Isa selected_isa();

}  // namespace smca::cpu
