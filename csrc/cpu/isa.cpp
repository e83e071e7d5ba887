#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace smca::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kDefault:
      break;
  }
  return "default";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
#if SMCA_CPU_X86_LEVELS
  // libgcc's checks include the operating system's support (XCR0) for the wider registers.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) isas.push_back(Isa::kAvx512);
  if (__builtin_cpu_supports("x86-64-v3")) isas.push_back(Isa::kAvx2);
#endif
  isas.push_back(Isa::kDefault);
  return isas;
}

Isa selected_isa() {
  static const std::vector<Isa> supported = supported_isas();
  const char* requested = std::getenv("SMCA_CPU_ISA");
  if (requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0) {
    return supported.front();
  }
  std::string choices;
  for (Isa isa : supported) {
    if (std::strcmp(requested, isa_name(isa)) == 0) return isa;
    choices += std::string(choices.empty() ? "" : ", ") + isa_name(isa);
  }
  const bool known = std::strcmp(requested, "avx512") == 0 || std::strcmp(requested, "avx2") == 0;
  C10_THROW_ERROR(ValueError,
                  c10::str("SMCA_CPU_ISA=", requested, ": ",
                           known ? "this CPU or build does not support it" : "not an ISA level",
                           "; expected auto or one of: ", choices));
}

}  // namespace smca::cpu
