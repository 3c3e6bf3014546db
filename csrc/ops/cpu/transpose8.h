// An 8x8 float transpose in 32-byte vectors, shared by the CPU kernels that move data
// between channel planes and channel-interleaved (or batch-interleaved) buffers.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

#include "ops/cpu/cpu_capability.h"

namespace stnpadim {

using v8f = float __attribute__((vector_size(32)));

// A 32-byte streaming store (d aligned to 32 bytes): it skips reading the line first,
// which a plain store to memory not in cache does. The builtin, not _mm256_stream_ps: an
// intrinsic's ISA is checked where it is written, a builtin's where it is compiled, which
// is inside the AVX2/AVX-512 variants (the only callers). Builds without those variants
// store plainly.
C10_ALWAYS_INLINE void stream_store8(float* d, const v8f& v) {
#if STNPADIM_HAVE_ISA_VARIANTS
  __builtin_ia32_movntps256(d, v);
#else
  std::memcpy(d, &v, sizeof(v));
#endif
}

// One row of a transposed block: streamed (d aligned to 32 bytes) or stored plainly.
template <bool kStream>
C10_ALWAYS_INLINE void store8(float* d, const v8f& v) {
  if constexpr (kStream) {
    stream_store8(d, v);
  } else {
    std::memcpy(d, &v, sizeof(v));
  }
}

// Transposes an 8x8 float block: d[j * ds + i] = s[i * ss + j]. In GCC vector types,
// so that every variant gets its own shuffles (8 loads, 24 shuffles, 8 stores). 32-byte
// vectors are one register from AVX2 on; below that, callers use narrower blocks.
// kStream: d and ds aligned to 32 bytes, rows written with streaming stores.
template <bool kStream = false>
C10_ALWAYS_INLINE void transpose_block8(const float* __restrict s, int64_t ss, float* __restrict d,
                                        int64_t ds) {
  using v8 = v8f;
  using m8 = int32_t __attribute__((vector_size(32)));
  // Named values, not arrays: GCC kept arrays of vectors on the stack (a spill per shuffle).
  v8 r0, r1, r2, r3, r4, r5, r6, r7;
  std::memcpy(&r0, s, sizeof(v8));
  std::memcpy(&r1, s + ss, sizeof(v8));
  std::memcpy(&r2, s + 2 * ss, sizeof(v8));
  std::memcpy(&r3, s + 3 * ss, sizeof(v8));
  std::memcpy(&r4, s + 4 * ss, sizeof(v8));
  std::memcpy(&r5, s + 5 * ss, sizeof(v8));
  std::memcpy(&r6, s + 6 * ss, sizeof(v8));
  std::memcpy(&r7, s + 7 * ss, sizeof(v8));
  constexpr m8 kLo{0, 8, 1, 9, 4, 12, 5, 13}, kHi{2, 10, 3, 11, 6, 14, 7, 15};  // pairs of rows
  const v8 t0 = __builtin_shuffle(r0, r1, kLo), t1 = __builtin_shuffle(r0, r1, kHi);
  const v8 t2 = __builtin_shuffle(r2, r3, kLo), t3 = __builtin_shuffle(r2, r3, kHi);
  const v8 t4 = __builtin_shuffle(r4, r5, kLo), t5 = __builtin_shuffle(r4, r5, kHi);
  const v8 t6 = __builtin_shuffle(r6, r7, kLo), t7 = __builtin_shuffle(r6, r7, kHi);
  constexpr m8 kLo2{0, 1, 8, 9, 4, 5, 12, 13}, kHi2{2, 3, 10, 11, 6, 7, 14, 15};  // pairs of pairs
  const v8 u0 = __builtin_shuffle(t0, t2, kLo2), u1 = __builtin_shuffle(t0, t2, kHi2);
  const v8 u2 = __builtin_shuffle(t1, t3, kLo2), u3 = __builtin_shuffle(t1, t3, kHi2);
  const v8 u4 = __builtin_shuffle(t4, t6, kLo2), u5 = __builtin_shuffle(t4, t6, kHi2);
  const v8 u6 = __builtin_shuffle(t5, t7, kLo2), u7 = __builtin_shuffle(t5, t7, kHi2);
  constexpr m8 kFirst{0, 1, 2, 3, 8, 9, 10, 11}, kSecond{4, 5, 6, 7, 12, 13, 14, 15};  // halves
  const v8 o0 = __builtin_shuffle(u0, u4, kFirst), o4 = __builtin_shuffle(u0, u4, kSecond);
  const v8 o1 = __builtin_shuffle(u1, u5, kFirst), o5 = __builtin_shuffle(u1, u5, kSecond);
  const v8 o2 = __builtin_shuffle(u2, u6, kFirst), o6 = __builtin_shuffle(u2, u6, kSecond);
  const v8 o3 = __builtin_shuffle(u3, u7, kFirst), o7 = __builtin_shuffle(u3, u7, kSecond);
  store8<kStream>(d, o0);
  store8<kStream>(d + ds, o1);
  store8<kStream>(d + 2 * ds, o2);
  store8<kStream>(d + 3 * ds, o3);
  store8<kStream>(d + 4 * ds, o4);
  store8<kStream>(d + 5 * ds, o5);
  store8<kStream>(d + 6 * ds, o6);
  store8<kStream>(d + 7 * ds, o7);
}

}  // namespace stnpadim
