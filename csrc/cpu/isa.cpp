#include "cpu/isa.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

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
  const char* value = std::getenv("SMCA_CPU_ISA");
  std::string requested = value == nullptr ? "" : value;
  // Any case, as ONEDNN_MAX_CPU_ISA=AVX2 beside it is written.
  std::transform(requested.begin(), requested.end(), requested.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (requested.empty() || requested == "auto") return supported.front();
  std::string choices;
  for (Isa isa : supported) {
    if (requested == isa_name(isa)) return isa;
    choices += std::string(choices.empty() ? "" : ", ") + isa_name(isa);
  }
  bool known = false;  // a level's name, though not one this CPU or build runs
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault}) {
    known = known || requested == isa_name(isa);
  }
  C10_THROW_ERROR(ValueError,
                  c10::str("SMCA_CPU_ISA=", value, ": ",
                           known ? "this CPU or build does not support it" : "not an ISA level",
                           "; expected auto or one of: ", choices));
}

}  // namespace smca::cpu
