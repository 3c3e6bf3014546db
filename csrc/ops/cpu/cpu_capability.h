// Instruction-set variants of the CPU kernels, and which one runs.
//
// Each CPU kernel is compiled three times from one source: for baseline x86-64 ("default",
// SSE2), x86-64-v3 ("avx2": AVX2, FMA, BMI) and x86-64-v4 ("avx512": AVX-512 F/BW/CD/DQ/VL).
// The variant in use is the best one the CPU runs, unless STNPADIM_CPU_CAPABILITY=default|
// avx2|avx512 forces one (as torch's ATEN_CPU_CAPABILITY does); a variant this CPU cannot
// run is refused with an error, never run. sp.backend_info()["cpu_capability"] names it.
//
// Why per-variant entry points with `target` attributes, and not GCC's target_clones nor
// torch's per-ISA objects (one .cpp compiled once per -m flag set):
//  * target_clones compiles one body per clone, so every clone has the same vector and
//    tile widths: 64-byte tiles meant for AVX-512 spilled to the stack in the AVX2 clone
//    (a 10x batch-size cliff in the Mahalanobis kernel). Here the variant is a template
//    argument of the kernel, so widths follow the instruction set. Its ifunc resolver can
//    also be neither forced nor asked which clone it picked.
//  * Per-ISA objects need per-file compiler flags (setuptools has none), and every inline
//    function of the ATen/c10/libstdc++ headers they instantiate is emitted as a weak
//    symbol compiled with AVX-512; the linker may keep that copy for the whole library,
//    which then dies with SIGILL on an older CPU. With target attributes only the entry
//    points and what they inline (the kernels' always-inline helpers) use the wider ISA.
// Hence kernels keep their hot loops in always-inline templates (STNPADIM_INLINE) and
// STNPADIM_CPU_VARIANTS defines one non-template entry point per variant around them.
#pragma once

#include <string>

#include <c10/macros/Macros.h>

namespace stnpadim {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// "default", "avx2" or "avx512".
const char* cpu_capability_name(CpuCapability cap);

// The variant the kernels run now: STNPADIM_CPU_CAPABILITY if set (checked: an unknown
// name, or a variant this CPU or build cannot run, raises a c10::Error saying so), else
// the best one the CPU supports. Read on every call, so a changed environment applies to
// the next op call.
CpuCapability cpu_capability();

// Variants this CPU can run with this build, comma-separated, worst first.
std::string cpu_capabilities();

// Vector register width of a variant, in bytes, and how many vector registers it has.
template <CpuCapability kCap>
constexpr int kVectorBytes = kCap == CpuCapability::kAvx512 ? 64 : (kCap == CpuCapability::kAvx2 ? 32 : 16);
template <CpuCapability kCap>
constexpr int kVectorRegisters = kCap == CpuCapability::kAvx512 ? 32 : 16;

// The function of `cap` among one entry point's variants.
template <typename Fn>
Fn pick_variant(CpuCapability cap, Fn fn_default, Fn fn_avx2, Fn fn_avx512) {
  return cap == CpuCapability::kAvx512 ? fn_avx512 : (cap == CpuCapability::kAvx2 ? fn_avx2 : fn_default);
}

}  // namespace stnpadim

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define STNPADIM_HAVE_ISA_VARIANTS 1
#define STNPADIM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define STNPADIM_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
// Other compilers (clang, GCC < 11) and architectures build the default variant only
// (cpu_capability() never returns another); the other entry points are then plain copies.
#define STNPADIM_HAVE_ISA_VARIANTS 0
#define STNPADIM_TARGET_AVX2
#define STNPADIM_TARGET_AVX512
#endif

// Inlined into each variant's entry point, so its vector code is compiled per target.
#define STNPADIM_INLINE inline __attribute__((always_inline))

// Defines RET NAME_default PARAMS, NAME_avx2 PARAMS and NAME_avx512 PARAMS, each compiled
// for its instruction set and returning IMPL<its CpuCapability> ARGS (IMPL always-inline).
// PARAMS and ARGS are parenthesised lists; pick one at run time with pick_variant.
#define STNPADIM_CPU_VARIANTS(RET, NAME, IMPL, PARAMS, ARGS)                                  \
  RET NAME##_default PARAMS { return IMPL<::stnpadim::CpuCapability::kDefault> ARGS; }        \
  STNPADIM_TARGET_AVX2 RET NAME##_avx2 PARAMS {                                               \
    return IMPL<::stnpadim::CpuCapability::kAvx2> ARGS;                                       \
  }                                                                                           \
  STNPADIM_TARGET_AVX512 RET NAME##_avx512 PARAMS {                                           \
    return IMPL<::stnpadim::CpuCapability::kAvx512> ARGS;                                     \
  }
