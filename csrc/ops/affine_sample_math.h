// Per-pixel math of affine_sample, shared by the CPU and CUDA kernels.
//
// An output pixel (h, w) of image n samples the input at
//   (gx, gy) = theta[n] @ (bx(w), by(h), 1),
// where bx, by are affine_grid's base coordinates; grid_sample's unnormalisation and
// padding then map (gx, gy) to pixel coordinates. Each function mirrors the matching
// step of ATen's GridSampler (same formulas, same edge cases), so the op reproduces
// F.grid_sample(F.affine_grid(...)) to rounding.
//
// T is the math type: the scalar type for float/double, float for half/bfloat16.
// Pixel indices are int32: coordinates are kept within +-2^30 and the op rejects planes
// of 2^31 pixels or more.
//
// The CPU kernels run these functions inside loops over a row of pixels, which GCC only
// vectorises when the body has no branches. Hence: everything that depends on the axis
// alone (size, align_corners) is precomputed in Axis; conditions are single comparisons
// feeding ?: (no &&, no bool arithmetic); clamps use min/max.
// setup.py builds with -fno-trapping-math: under GCC's default it keeps a select that
// guards a float operation as a branch, and the loop does not vectorise at all.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// Forced inlining: the CPU loops only vectorise once these are inlined, and GCC does not
// inline into its per-ISA clones otherwise.
#if defined(__CUDACC__)
#define STNPADIM_MATH_INLINE C10_HOST_DEVICE __forceinline__
#else
#define STNPADIM_MATH_INLINE C10_ALWAYS_INLINE
#endif

namespace stnpadim {
namespace affine {

// Same codes as ATen's GridSamplerInterpolation / GridSamplerPadding.
enum Interpolation : int64_t { kBilinear = 0, kNearest = 1, kBicubic = 2 };
enum Padding : int64_t { kZeros = 0, kBorder = 1, kReflection = 2 };

// Coordinates this far out sample nothing but padding; beyond it (and for NaN), the
// integer conversions below would be undefined.
constexpr double kCoordLimit = 1073741824.0;  // 2^30
// Where a NaN or runaway coordinate's taps are put: outside the image, as ATen does.
constexpr double kCoordOutside = -100.0;

// What a NaN or infinite sampling point gives; torch differs between devices and each
// backend follows torch on its own device. torch's CPU kernels compute the interpolation
// weights from the raw coordinate, so the pixel turns NaN even in zero padding
// (kPropagate). torch's CUDA kernels first move such a coordinate to kCoordOutside
// (GridSampler.cuh: safe_downgrade_to_int_range), so bilinear and nearest sample zero
// padding there (kOutside). Bicubic weights come from the raw coordinate on both devices.
enum NonFinite : int { kPropagate = 0, kOutside = 1 };

// floor(x). On the host it is built from nearbyint, which GCC vectorises (it does not
// vectorise floor under the default -ftrapping-math); exact in round-to-nearest mode.
template <typename T>
STNPADIM_MATH_INLINE T floor_of(T x) {
#ifdef __CUDA_ARCH__
  return std::floor(x);
#else
  const T r = std::nearbyint(x);
  return r > x ? r - T(1) : r;
#endif
}

// floor(x) as an index, for |x| < 2^30: truncation, one down where that rounded up.
// Exact (a float beyond 2^23 is an integer already), and unlike nearbyint it vectorises
// with SSE2 alone, so the default CPU variant's planning loops are vector code too.
template <typename T>
STNPADIM_MATH_INLINE int32_t floor_index(T x) {
  const int32_t t = static_cast<int32_t>(x);
  return static_cast<T>(t) > x ? t - 1 : t;
}

STNPADIM_MATH_INLINE int32_t clamp_index(int32_t i, int32_t lo, int32_t hi) {
#ifdef __CUDA_ARCH__
  return ::min(::max(i, lo), hi);
#else
  return std::min(std::max(i, lo), hi);
#endif
}

// What the sampling math needs to know about one input axis.
template <typename T>
struct Axis {
  int32_t size;
  // unnormalize(c) = ((c + 1) * pre - shift) * post: ATen's ((c + 1) / 2) * (size - 1)
  // with align_corners, ((c + 1) * size - 1) / 2 without, with the same roundings.
  T pre, shift, post;
  T scale;  // d unnormalize / d c
  T hi;     // size - 1, the last pixel centre
  // Reflection folds coordinates about `low` and `low + twice_span / 2`; on a 1-pixel
  // axis with align_corners there is nothing to fold across and `reflects` is 0.
  T low, twice_span, reflects;
};

template <typename T>
STNPADIM_MATH_INLINE Axis<T> make_axis(int64_t size, bool align_corners) {
  Axis<T> a;
  a.size = static_cast<int32_t>(size);
  a.pre = align_corners ? T(0.5) : static_cast<T>(size);
  a.shift = align_corners ? T(0) : T(1);
  a.post = align_corners ? static_cast<T>(size - 1) : T(0.5);
  a.scale = align_corners ? static_cast<T>(size - 1) * T(0.5) : static_cast<T>(size) * T(0.5);
  a.hi = static_cast<T>(size - 1);
  a.low = align_corners ? T(0) : T(-0.5);
  const T span2 = align_corners ? T(2) * static_cast<T>(size - 1) : T(2) * static_cast<T>(size);
  a.reflects = span2 > T(0) ? T(1) : T(0);
  a.twice_span = span2 > T(0) ? span2 : T(1);
  return a;
}

// Normalised [-1, 1] coordinate -> pixel coordinate.
template <typename T>
STNPADIM_MATH_INLINE T unnormalize(T coord, const Axis<T>& a) {
  return ((coord + T(1)) * a.pre - a.shift) * a.post;
}

// Clamps to [0, size - 1] (NaN -> 0); grad is 0 on and beyond the borders, as in ATen.
template <typename T>
STNPADIM_MATH_INLINE T clip_coord(T x, const Axis<T>& a, T& grad) {
  grad = x > T(0) ? (x < a.hi ? T(1) : T(0)) : T(0);
  x = x > T(0) ? x : T(0);
  return x < a.hi ? x : a.hi;
}

// Folds x into [low, low + twice_span / 2] like a mirror; grad is +-1.
template <typename T>
STNPADIM_MATH_INLINE T reflect_coord(T x, const Axis<T>& a, T& grad) {
  const T d = x - a.low;
  const T sign = d < T(0) ? T(-1) : T(1);
  const T dist = sign * d;
  const T extra = dist - floor_of(dist / a.twice_span) * a.twice_span;
  const T flipped = a.twice_span - extra;
  grad = a.reflects * (extra > flipped ? -sign : sign);
  return a.reflects * ((extra > flipped ? flipped : extra) + a.low);
}

template <typename T>
STNPADIM_MATH_INLINE T keep_in_int_range(T x) {
  return x > T(-kCoordLimit) ? (x < T(kCoordLimit) ? x : T(kCoordOutside)) : T(kCoordOutside);
}

// 1 for a finite coordinate, NaN for a NaN or infinite one. ATen computes interpolation
// weights from the raw coordinate, so a NaN sampling point (from a NaN theta) gives NaN
// even where its taps fall in zero padding; multiplying the weights by this keeps that.
template <typename T>
STNPADIM_MATH_INLINE T nan_unless_finite(T x) {
  return (x - x) + T(1);
}

// Border / reflection mapping of a pixel coordinate; grad = d result / d x.
template <typename T>
STNPADIM_MATH_INLINE T pad_coord(T x, const Axis<T>& a, int64_t padding, T& grad) {
  grad = T(1);
  if (padding == kBorder) {
    x = clip_coord(x, a, grad);
  } else if (padding == kReflection) {
    T grad_reflect, grad_clip;
    x = reflect_coord(x, a, grad_reflect);
    x = clip_coord(x, a, grad_clip);
    grad = grad_reflect * grad_clip;
  }
  return x;
}

// grid_sample's source pixel coordinate for normalised coord; grad = d result / d coord.
template <typename T>
STNPADIM_MATH_INLINE T source_coord(T coord, const Axis<T>& a, int64_t padding, T& grad) {
  T pad_grad;
  const T x = pad_coord(unnormalize(coord, a), a, padding, pad_grad);
  grad = a.scale * pad_grad;
  return x;
}

// Linear interpolation along one axis as two slots i0 and i0 + 1 that both lie inside
// the image (one slot on a 1-pixel axis), so kernels read without bounds checks:
//   value = w0 * v[i0] + w1 * v[i0 + 1],   d value / d x = d0 * v[i0] + d1 * v[i0 + 1].
// ATen's taps floor(x) (weight 1 - t) and floor(x) + 1 (weight t) that fall outside get
// no slot, which is zero padding. in0 / in1 say whether a tap landed on the slot: a
// kernel that reads only those reads exactly ATen's in-bounds taps, so an Inf pixel
// under a zero weight still gives NaN, as in torch.
template <typename T>
struct LinearTaps {
  int32_t i0;
  T w0, w1;
  T d0, d1;
  bool in0, in1;
};

template <typename T, int kNonFinite = kPropagate>
STNPADIM_MATH_INLINE LinearTaps<T> linear_taps(T x_raw, int32_t size) {
  const T x = keep_in_int_range(x_raw);
  const int32_t i = floor_index(x);
  const T t = x - static_cast<T>(i);
  LinearTaps<T> taps;
  taps.i0 = clamp_index(i, 0, size > 1 ? size - 2 : 0);
  // A tap is inside exactly when it lands on a slot. A 1-pixel axis has no slot 1: i1 is
  // then a value no tap index takes.
  const int32_t i1 = size > 1 ? taps.i0 + 1 : std::numeric_limits<int32_t>::min();
  taps.w0 = (i == taps.i0 ? T(1) - t : T(0)) + (i + 1 == taps.i0 ? t : T(0));
  taps.w1 = (i == i1 ? T(1) - t : T(0)) + (i + 1 == i1 ? t : T(0));
  taps.d0 = (i == taps.i0 ? T(-1) : T(0)) + (i + 1 == taps.i0 ? T(1) : T(0));
  taps.d1 = (i == i1 ? T(-1) : T(0)) + (i + 1 == i1 ? T(1) : T(0));
  taps.in0 = (i == taps.i0) | (i + 1 == taps.i0);
  taps.in1 = (i == i1) | (i + 1 == i1);
  if constexpr (kNonFinite == kPropagate) {
    const T poison = nan_unless_finite(x_raw);
    taps.w0 *= poison;
    taps.w1 *= poison;
  }
  return taps;
}

// The same for a pixel coordinate known to lie inside the image, 0 < x < size - 1: then
// the slots are floor(x) and floor(x) + 1 with both taps on them, and the selects above
// all give these values.
template <typename T>
STNPADIM_MATH_INLINE LinearTaps<T> interior_linear_taps(T x) {
  LinearTaps<T> taps;
  taps.i0 = floor_index(x);
  const T t = x - static_cast<T>(taps.i0);
  taps.w0 = T(1) - t;
  taps.w1 = t;
  taps.d0 = T(-1);
  taps.d1 = T(1);
  taps.in0 = true;
  taps.in1 = true;
  return taps;
}

// Nearest pixel (round half to even, as ATen's nearbyint), clamped inside; it exists
// (else zero padding) when clamping left it unchanged: index == unclamped.
struct NearestTap {
  int32_t index, unclamped;
};

template <typename T>
STNPADIM_MATH_INLINE NearestTap nearest_tap(T x, int32_t size) {
  const int32_t i = static_cast<int32_t>(std::nearbyint(keep_in_int_range(x)));
  return {clamp_index(i, 0, size - 1), i};
}

// Cubic convolution (A = -0.75, as ATen): weights of the taps at distance s <= 1 and
// 1 < s < 2 from the sampling point, and their derivatives.
template <typename T>
STNPADIM_MATH_INLINE T cubic_near(T s) {
  constexpr T A = T(-0.75);
  return ((A + T(2)) * s - (A + T(3))) * s * s + T(1);
}

template <typename T>
STNPADIM_MATH_INLINE T cubic_far(T s) {
  constexpr T A = T(-0.75);
  return ((A * s - T(5) * A) * s + T(8) * A) * s - T(4) * A;
}

template <typename T>
STNPADIM_MATH_INLINE T cubic_near_grad(T s) {
  constexpr T A = T(-0.75);
  return (T(3) * (A + T(2)) * s - T(2) * (A + T(3))) * s;
}

template <typename T>
STNPADIM_MATH_INLINE T cubic_far_grad(T s) {
  constexpr T A = T(-0.75);
  return (T(3) * A * s - T(10) * A) * s + T(8) * A;
}

// Tap k (0..3) of bicubic interpolation at pixel coordinate x (unnormalised, unpadded):
// the pixel floor(x) - 1 + k with padding applied (clamped inside), its weight (0 when
// it falls in zero padding), d weight / d x and whether it lies inside (ATen reads the
// pixel then, whatever the weight). As in ATen, the padding maps each tap's integer
// coordinate, not the sampling point, and has no gradient.
template <typename T>
struct CubicTap {
  int32_t index;
  T w, d;
  bool inside;
};

template <typename T>
STNPADIM_MATH_INLINE CubicTap<T> cubic_tap(T x, int k, const Axis<T>& a, int64_t padding) {
  const T f = floor_of(x);
  const T t = x - f;
  CubicTap<T> tap;
  if (k == 0) {
    tap.w = cubic_far(t + T(1));
    tap.d = cubic_far_grad(t + T(1));
  } else if (k == 1) {
    tap.w = cubic_near(t);
    tap.d = cubic_near_grad(t);
  } else if (k == 2) {
    tap.w = cubic_near(T(1) - t);
    tap.d = -cubic_near_grad(T(1) - t);
  } else {
    tap.w = cubic_far(T(2) - t);
    tap.d = -cubic_far_grad(T(2) - t);
  }
  T unused;
  const T c = keep_in_int_range(pad_coord(f + static_cast<T>(k - 1), a, padding, unused));
  const int32_t i = static_cast<int32_t>(c);
  tap.index = clamp_index(i, 0, a.size - 1);
  tap.inside = tap.index == i;
  tap.w = (tap.index == i ? tap.w : T(0)) * nan_unless_finite(x);
  tap.d = tap.index == i ? tap.d : T(0);
  return tap;
}

}  // namespace affine
}  // namespace stnpadim
