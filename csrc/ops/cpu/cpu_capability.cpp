// Which instruction-set variant of the CPU kernels runs (see cpu_capability.h).
#include "ops/cpu/cpu_capability.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iterator>
#include <string>

namespace stnpadim {
namespace {

constexpr const char* kEnv = "STNPADIM_CPU_CAPABILITY";

bool cpu_runs(CpuCapability cap) {
  if (cap == CpuCapability::kDefault) {
    return true;
  }
#if STNPADIM_HAVE_ISA_VARIANTS
  __builtin_cpu_init();  // may run before libgcc's own constructor does
  // Checks the instructions and that the OS saves the wider registers (XCR0).
#if __GNUC__ >= 12
  return cap == CpuCapability::kAvx512 ? __builtin_cpu_supports("x86-64-v4") != 0
                                       : __builtin_cpu_supports("x86-64-v3") != 0;
#else  // GCC 11 knows the levels as targets but not here: their defining features
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  return cap == CpuCapability::kAvx512
             ? v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vl")
             : v3;
#endif
#else
  return false;
#endif
}

const char* missing_features(CpuCapability cap) {
  return cap == CpuCapability::kAvx512 ? "AVX-512 F/BW/CD/DQ/VL (x86-64-v4)"
                                       : "AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE (x86-64-v3)";
}

CpuCapability best_capability() {
  static const CpuCapability best = cpu_runs(CpuCapability::kAvx512) ? CpuCapability::kAvx512
                                    : cpu_runs(CpuCapability::kAvx2) ? CpuCapability::kAvx2
                                                                     : CpuCapability::kDefault;
  return best;
}

std::string capability_op() {
  return cpu_capability_name(cpu_capability());
}

}  // namespace

const char* cpu_capability_name(CpuCapability cap) {
  return cap == CpuCapability::kAvx512 ? "avx512" : (cap == CpuCapability::kAvx2 ? "avx2" : "default");
}

std::string cpu_capabilities() {
  std::string names = "default";
  for (CpuCapability cap : {CpuCapability::kAvx2, CpuCapability::kAvx512}) {
    if (static_cast<int>(cap) <= static_cast<int>(best_capability())) {
      names += std::string(",") + cpu_capability_name(cap);
    }
  }
  return names;
}

CpuCapability cpu_capability() {
  const char* env = std::getenv(kEnv);
  if (env == nullptr || *env == '\0') {
    return best_capability();
  }
  std::string want(env);
  std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
  const CpuCapability caps[] = {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512};
  const auto* found = std::find_if(std::begin(caps), std::end(caps),
                                   [&](CpuCapability cap) { return want == cpu_capability_name(cap); });
  TORCH_CHECK(found != std::end(caps), kEnv, " must be default, avx2 or avx512 (or unset), got '", env, "'");
  const CpuCapability cap = *found;
  TORCH_CHECK(static_cast<int>(cap) <= static_cast<int>(best_capability()), kEnv, "=", env,
              " asks for the ", want, " kernels, but ",
              STNPADIM_HAVE_ISA_VARIANTS ? "this CPU lacks " : "this build (not GCC 11+ on x86-64) has no ",
              STNPADIM_HAVE_ISA_VARIANTS ? missing_features(cap) : "such variant",
              "; variants it can run: ", cpu_capabilities(), " (or unset it)");
  return cap;
}

TORCH_LIBRARY_FRAGMENT(stnpadim, m) {
  // The CPU kernel variant in use ("default", "avx2", "avx512"), and all this CPU runs.
  m.def("_cpu_capability() -> str", &capability_op);
  m.def("_cpu_capabilities() -> str", &cpu_capabilities);
}

}  // namespace stnpadim
