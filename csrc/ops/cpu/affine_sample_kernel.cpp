// CPU kernels of affine_sample.
//
// Work unit: one output row of one image, done in two passes:
//  1. plan: for every output pixel of the row, the sampling taps (int32 offsets into a
//     channel plane) and their weights, from the shared per-pixel math. Vectorised
//     across pixels; for bilinear sampling, the columns whose taps all lie inside the
//     image (an interval of the row, found in closed form) take a loop without the
//     padding and clamping selects.
//  2. channels: for every channel, one loop over the row that gathers the taps and blends
//     them. All channels reuse the plan, so the coordinate math is paid once per pixel.
// Bilinear taps are a 2x2 block that always lies inside the image, with zero weights
// standing in for padding, so the channel loop has no bounds checks and no branches.
//
// Before a row's channel loops, RowToucher reads the input rows they will gather from in
// order, so that the gathers hit cache (see there).
//
// The forward runs rows in parallel. The input gradient is a scatter, so the backward
// hands each task whole images (split into channel blocks when there are few images):
// no two tasks write the same grad_input element. With many channels, bilinear sampling
// works on channel-interleaved copies instead (see "bilinear, many channels"). theta's gradient is summed per row,
// accumulated per task in float64 and the tasks' sums added in a fixed order, so the
// backward is deterministic.
//
// Each inner loop is its own function with __restrict pointer parameters: GCC only
// vectorises the gathers when it can see that the output does not alias the inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/affine_sample.h"
#include "ops/affine_sample_math.h"
#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/transpose8.h"

// The extension is built for baseline x86-64 so that one wheel runs everywhere; the
// entry points at the end of the kernels are compiled once per instruction-set variant
// (default, AVX2, AVX-512; cpu_capability.h) and the host code runs the one in use. The
// loops are plain C++ that GCC vectorises for each target; the one explicit width is the
// interleaved kernels' transpose block (8x8 in 32-byte vectors from AVX2 on, 4x4 in
// 16-byte vectors in the default variant, where a 32-byte shuffle is no instruction).

namespace stnpadim {
namespace {

using namespace affine;

// Enough pixel-channels per task to amortise starting it.
constexpr int64_t kGrainWork = 1 << 14;

// The input (or grad_input) channel plane, as the per-pixel math sees it.
template <typename T>
struct Plane {
  Axis<T> x, y;
  int32_t H, W, sH, sW;
};

template <typename T>
struct Problem {
  const T* input;  // null when only the input gradient is wanted
  const T* theta;  // [N, 6], contiguous
  const T* base_x;  // [Wo], affine_grid's base coordinates (affine_base_coords)
  const T* base_y;  // [Ho]
  int64_t N, C, Ho, Wo;
  int64_t sN, sC;  // input strides (the backward uses contiguous ones)
  Plane<T> plane;
  int64_t interpolation, padding;
  bool align_corners;
};

// One normalised coordinate (gx or gy) along output row h, as a function of the base x
// coordinate, in the order of affine_grid's matrix product: theta row . (bx, by, 1).
template <typename T>
struct RowCoord {
  T t_bx, t_by, t_1;  // t_by already multiplied by by
  C10_ALWAYS_INLINE T operator()(T bx) const { return t_bx * bx + t_by + t_1; }
};

template <typename T>
struct RowTransform {
  RowCoord<T> gx, gy;
  T by;
  RowTransform(const Problem<T>& p, int64_t n, int64_t h) {
    const T* th = p.theta + 6 * n;
    by = p.base_y[h];
    gx = {th[0], th[1] * by, th[2]};
    gy = {th[3], th[4] * by, th[5]};
  }
};

// Per-task row buffers, one slot per output column: allocated once per task, never per
// pixel. `bx` is affine_grid's base x coordinate of every column.
template <typename T>
class RowScratch {
 public:
  RowScratch(const Problem<T>& p, int n_vals, int n_idx)
      : width_(p.Wo), vals_(p.Wo * n_vals), idx_(p.Wo * n_idx), bx_(p.base_x) {}
  T* val(int k) { return vals_.data() + k * width_; }
  int32_t* idx(int k) { return idx_.data() + k * width_; }
  const T* bx() const { return bx_; }

 private:
  int64_t width_;
  std::vector<T> vals_;
  std::vector<int32_t> idx_;
  const T* bx_;
};

// Adds one row's share of theta's gradient, given d loss / d (gx, gy) of its pixels.
template <typename T>
C10_ALWAYS_INLINE void add_theta_partial(const T* __restrict gxs, const T* __restrict gys,
                                         const T* __restrict bxs, T by, int64_t Wo, double* partial) {
  T sx = 0, sx1 = 0, sy = 0, sy1 = 0;
#pragma omp simd reduction(+ : sx, sx1, sy, sy1)
  for (int64_t w = 0; w < Wo; ++w) {
    sx += gxs[w] * bxs[w];
    sx1 += gxs[w];
    sy += gys[w] * bxs[w];
    sy1 += gys[w];
  }
  partial[0] += sx;
  partial[1] += static_cast<double>(sx1) * by;
  partial[2] += sx1;
  partial[3] += sy;
  partial[4] += static_cast<double>(sy1) * by;
  partial[5] += sy1;
}

// Input rows [lo, hi] that a row's channel loops read.
struct RowSpan {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
  void add(const RowSpan& o) {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
  }
};

// ----------------------------------------------------------------------------- bilinear

// A row's bilinear taps: block offset, x/y weights of the block's two columns/rows, and
// (backward) their derivatives with respect to the normalised coordinates gx, gy.
template <typename T>
struct BilinearPlan {
  int32_t* off;
  T *ax0, *ax1, *ay0, *ay1, *dx0, *dx1, *dy0, *dy1, *gxs, *gys;
  T *c00, *c01, *c10, *c11;  // the scatter's per-tap shares of one channel's gradient
  int64_t dx, dy;  // block step along x and y; 0 on a 1-pixel axis, where the pair collapses
  explicit BilinearPlan(RowScratch<T>& s, const Plane<T>& g)
      : off(s.idx(0)), ax0(s.val(0)), ax1(s.val(1)), ay0(s.val(2)), ay1(s.val(3)), dx0(s.val(4)),
        dx1(s.val(5)), dy0(s.val(6)), dy1(s.val(7)), gxs(s.val(8)), gys(s.val(9)), c00(s.val(10)),
        c01(s.val(11)), c10(s.val(12)), c11(s.val(13)), dx(g.W > 1 ? g.sW : 0), dy(g.H > 1 ? g.sH : 0) {}
  static constexpr int kVals = 14;
};

// Taps of columns [begin, end) of a row; returns the range of the block's first row.
// kInterior: the columns' sampling points lie inside the image on both axes (see
// interior_columns), where padding, clamping and the NaN guard change nothing, so the
// loop leaves them out: a tenth of the general loop's instructions (~300 per 8 pixels in
// AVX2), the same values.
template <typename T, int64_t kPad, bool kGrad, bool kInterior>
C10_ALWAYS_INLINE RowSpan plan_bilinear_loop(const RowTransform<T> tr, const Plane<T> g,
                                             const T* __restrict bxs, int64_t begin, int64_t end,
                                             int32_t* __restrict off, T* __restrict ax0, T* __restrict ax1,
                                             T* __restrict ay0, T* __restrict ay1, T* __restrict dx0,
                                             T* __restrict dx1, T* __restrict dy0, T* __restrict dy1) {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
  for (int64_t w = begin; w < end; ++w) {
    const T bx = bxs[w];
    T mx, my;
    LinearTaps<T> tx, ty;
    if constexpr (kInterior) {
      mx = g.x.scale;
      my = g.y.scale;
      tx = interior_linear_taps(unnormalize(tr.gx(bx), g.x));
      ty = interior_linear_taps(unnormalize(tr.gy(bx), g.y));
    } else {
      tx = linear_taps(source_coord(tr.gx(bx), g.x, kPad, mx), g.W);
      ty = linear_taps(source_coord(tr.gy(bx), g.y, kPad, my), g.H);
    }
    off[w] = ty.i0 * g.sH + tx.i0 * g.sW;
    lo = std::min(lo, ty.i0);
    hi = std::max(hi, ty.i0);
    ax0[w] = tx.w0;
    ax1[w] = tx.w1;
    ay0[w] = ty.w0;
    ay1[w] = ty.w1;
    if (kGrad) {
      dx0[w] = tx.d0 * mx;
      dx1[w] = tx.d1 * mx;
      dy0[w] = ty.d0 * my;
      dy1[w] = ty.d1 * my;
    }
  }
  RowSpan span;
  span.lo = lo;
  span.hi = hi;
  return span;
}

// The interval of base x coordinates where one axis samples strictly inside the image:
// margin <= unnormalize(coord(bx)) <= size - 1 - margin, solved in double. The margin
// (a quarter pixel, more for large terms) exceeds the rounding of the row's float math.
template <typename T>
std::pair<double, double> interior_bx(const RowCoord<T>& c, const Axis<T>& a) {
  const double pre = a.pre, post = a.post, shift = a.shift;
  const double slope = double{c.t_bx} * pre * post;
  const double at0 = ((double{c.t_by} + double{c.t_1} + 1.0) * pre - shift) * post;
  const double scale = (std::abs(double{c.t_bx}) + std::abs(double{c.t_by}) + std::abs(double{c.t_1}) + 1.0) *
                       pre * post + shift * post;
  const double margin = 0.25 + 1e-5 * scale;
  const double lo = margin, hi = double{a.hi} - margin;
  constexpr double kAll = std::numeric_limits<double>::infinity();
  if (!(std::isfinite(slope) && std::isfinite(at0)) || !(lo <= hi)) {
    return {kAll, -kAll};  // empty
  }
  if (std::abs(slope) < 1e-12) {
    return at0 >= lo && at0 <= hi ? std::pair{-kAll, kAll} : std::pair{kAll, -kAll};
  }
  const double b0 = (lo - at0) / slope, b1 = (hi - at0) / slope;
  return {std::min(b0, b1), std::max(b0, b1)};
}

// Columns [begin, end) of a row whose taps are all inside the image (base x coordinates
// ascend along the row).
template <typename T>
std::pair<int64_t, int64_t> interior_columns(const RowTransform<T>& tr, const Plane<T>& g, const T* bxs,
                                             int64_t Wo) {
  const auto [x0, x1] = interior_bx(tr.gx, g.x);
  const auto [y0, y1] = interior_bx(tr.gy, g.y);
  const double b0 = std::max(x0, y0), b1 = std::min(x1, y1);
  if (!(b0 <= b1)) {
    return {0, 0};
  }
  const int64_t begin = std::lower_bound(bxs, bxs + Wo, b0, [](T v, double b) { return v < b; }) - bxs;
  const int64_t end = std::upper_bound(bxs, bxs + Wo, b1, [](double b, T v) { return b < v; }) - bxs;
  return {begin, std::max(begin, end)};
}

template <typename T, int64_t kPad, bool kGrad, bool kInterior>
C10_ALWAYS_INLINE RowSpan plan_bilinear_columns(const BilinearPlan<T>& pl, const RowTransform<T>& tr,
                                                const Plane<T>& g, const T* bxs, int64_t begin, int64_t end) {
  return plan_bilinear_loop<T, kPad, kGrad, kInterior>(tr, g, bxs, begin, end, pl.off, pl.ax0, pl.ax1, pl.ay0,
                                                       pl.ay1, pl.dx0, pl.dx1, pl.dy0, pl.dy1);
}

// (No lambdas in the kernels: a lambda is compiled for the baseline instruction set, not
// for the variant of the function it sits in.)
template <typename T, int64_t kPad, bool kGrad>
C10_ALWAYS_INLINE RowSpan plan_bilinear(const BilinearPlan<T>& pl, const RowTransform<T>& tr,
                                        const Plane<T>& g, const T* bxs, int64_t Wo) {
  RowSpan span;
  // Reflection is left out: its folding rounds coordinates even inside the image.
  if (kPad != kReflection && g.W > 1 && g.H > 1) {
    const auto [begin, end] = interior_columns(tr, g, bxs, Wo);
    span = plan_bilinear_columns<T, kPad, kGrad, false>(pl, tr, g, bxs, 0, begin);
    span.add(plan_bilinear_columns<T, kPad, kGrad, true>(pl, tr, g, bxs, begin, end));
    span.add(plan_bilinear_columns<T, kPad, kGrad, false>(pl, tr, g, bxs, end, Wo));
  } else {
    span = plan_bilinear_columns<T, kPad, kGrad, false>(pl, tr, g, bxs, 0, Wo);
  }
  span.hi = std::min(span.hi + 1, g.H - 1);
  return span;
}

// Loads the floats p[0] and p[1] with one 8-byte load. With float data and adjacent
// columns (dx == 1) a pixel then needs two gathered loads, not four: ~30% faster loops,
// since the compiler emulates gathers element by element.
C10_ALWAYS_INLINE void load_pair(const float* p, float& a, float& b) {
  uint64_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  const uint32_t lo = static_cast<uint32_t>(bits), hi = static_cast<uint32_t>(bits >> 32);
  std::memcpy(&a, &lo, sizeof(a));
  std::memcpy(&b, &hi, sizeof(b));
}

template <typename T>
constexpr bool kPairLoads = std::is_same_v<T, float> && std::endian::native == std::endian::little;

template <typename T>
C10_ALWAYS_INLINE void blend_bilinear_pairs(const BilinearPlan<T>& pl, const float* __restrict src,
                                            float* __restrict dst, int64_t Wo) {
  const int32_t* __restrict off = pl.off;
  const float* __restrict ax0 = pl.ax0;
  const float* __restrict ax1 = pl.ax1;
  const float* __restrict ay0 = pl.ay0;
  const float* __restrict ay1 = pl.ay1;
  const int64_t dy = pl.dy;
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t o = off[w];
    float v00, v01, v10, v11;
    load_pair(src + o, v00, v01);
    load_pair(src + o + dy, v10, v11);
    dst[w] = ay0[w] * (ax0[w] * v00 + ax1[w] * v01) + ay1[w] * (ax0[w] * v10 + ax1[w] * v11);
  }
}

template <typename T>
C10_ALWAYS_INLINE void blend_bilinear(const BilinearPlan<T>& pl, const T* __restrict src,
                                      T* __restrict dst, int64_t Wo) {
  if constexpr (kPairLoads<T>) {
    if (pl.dx == 1) {
      blend_bilinear_pairs(pl, src, dst, Wo);
      return;
    }
  }
  const int32_t* __restrict off = pl.off;
  const T* __restrict ax0 = pl.ax0;
  const T* __restrict ax1 = pl.ax1;
  const T* __restrict ay0 = pl.ay0;
  const T* __restrict ay1 = pl.ay1;
  const int64_t dx = pl.dx, dy = pl.dy, dxy = dx + dy;
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t o = off[w];
    const T top = ax0[w] * src[o] + ax1[w] * src[o + dx];
    const T bot = ax0[w] * src[o + dy] + ax1[w] * src[o + dxy];
    dst[w] = ay0[w] * top + ay1[w] * bot;
  }
}

// Accumulates d loss / d (gx, gy) of one channel into gxs, gys.
template <typename T, bool kPairs>
C10_ALWAYS_INLINE void coord_grad_bilinear_loop(const BilinearPlan<T>& pl, const T* __restrict src,
                                                const T* __restrict g, T* __restrict gxs,
                                                T* __restrict gys, int64_t Wo) {
  const int32_t* __restrict off = pl.off;
  const T* __restrict ax0 = pl.ax0;
  const T* __restrict ax1 = pl.ax1;
  const T* __restrict ay0 = pl.ay0;
  const T* __restrict ay1 = pl.ay1;
  const T* __restrict dx0 = pl.dx0;
  const T* __restrict dx1 = pl.dx1;
  const T* __restrict dy0 = pl.dy0;
  const T* __restrict dy1 = pl.dy1;
  const int64_t dx = pl.dx, dy = pl.dy, dxy = dx + dy;
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t o = off[w];
    T v00, v01, v10, v11;
    if constexpr (kPairs) {
      load_pair(src + o, v00, v01);
      load_pair(src + o + dy, v10, v11);
    } else {
      v00 = src[o];
      v01 = src[o + dx];
      v10 = src[o + dy];
      v11 = src[o + dxy];
    }
    const T top = ax0[w] * v00 + ax1[w] * v01;
    const T bot = ax0[w] * v10 + ax1[w] * v11;
    const T dtop = dx0[w] * v00 + dx1[w] * v01;
    const T dbot = dx0[w] * v10 + dx1[w] * v11;
    gxs[w] += g[w] * (ay0[w] * dtop + ay1[w] * dbot);
    gys[w] += g[w] * (dy0[w] * top + dy1[w] * bot);
  }
}

template <typename T>
C10_ALWAYS_INLINE void coord_grad_bilinear(const BilinearPlan<T>& pl, const T* src, const T* g,
                                           T* gxs, T* gys, int64_t Wo) {
  if constexpr (kPairLoads<T>) {
    if (pl.dx == 1) {
      coord_grad_bilinear_loop<T, true>(pl, src, g, gxs, gys, Wo);
      return;
    }
  }
  coord_grad_bilinear_loop<T, false>(pl, src, g, gxs, gys, Wo);
}

// Each tap's share of the gradient, for a whole row at once (a vector loop), so that the
// scalar scatter below only adds.
template <typename T>
C10_ALWAYS_INLINE void scatter_shares(const T* __restrict g, const T* __restrict ax0, const T* __restrict ax1,
                                      const T* __restrict ay0, const T* __restrict ay1, T* __restrict c00,
                                      T* __restrict c01, T* __restrict c10, T* __restrict c11, int64_t Wo) {
  for (int64_t w = 0; w < Wo; ++w) {
    const T g0 = ay0[w] * g[w], g1 = ay1[w] * g[w];
    c00[w] = ax0[w] * g0;
    c01[w] = ax1[w] * g0;
    c10[w] = ax0[w] * g1;
    c11[w] = ax1[w] * g1;
  }
}

// A scatter, so scalar: pixels of one row share taps. Neighbouring pixels mostly hit the
// same 2x2 block or the block one column on; adding into memory there would chain each
// pixel's loads to the previous pixel's stores, so the block's sums are carried in
// registers (`pending`) until the row moves past them.
template <typename T>
C10_ALWAYS_INLINE void scatter_bilinear(const BilinearPlan<T>& pl, const T* __restrict g,
                                        T* __restrict dst, int64_t Wo) {
  scatter_shares(g, pl.ax0, pl.ax1, pl.ay0, pl.ay1, pl.c00, pl.c01, pl.c10, pl.c11, Wo);
  const int64_t dx = pl.dx, dy = pl.dy, dxy = dx + dy;
  int64_t po = -1;                // pending block offset; -1: none
  T p00 = 0, p01 = 0, p10 = 0, p11 = 0;
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t o = pl.off[w];
    const T c00 = pl.c00[w], c01 = pl.c01[w], c10 = pl.c10[w], c11 = pl.c11[w];
    if (o == po) {
      p00 += c00;
      p01 += c01;
      p10 += c10;
      p11 += c11;
      continue;
    }
    if (po >= 0) {
      if (o == po + dx) {  // the block moved one column on: its left column is final
        dst[po] += p00;
        dst[po + dy] += p10;
        p00 = p01 + c00;
        p10 = p11 + c10;
        p01 = c01;
        p11 = c11;
        po = o;
        continue;
      }
      dst[po] += p00;
      dst[po + dx] += p01;
      dst[po + dy] += p10;
      dst[po + dxy] += p11;
    }
    po = o;
    p00 = c00;
    p01 = c01;
    p10 = c10;
    p11 = c11;
  }
  if (po >= 0) {
    dst[po] += p00;
    dst[po + dx] += p01;
    dst[po + dy] += p10;
    dst[po + dxy] += p11;
  }
}

// ----------------------------------------------------------------------------- nearest

template <typename T>
struct NearestPlan {
  int32_t* off;
  T* inside;  // 1 where the nearest pixel exists, 0 in zero padding
  T *gxs = nullptr, *gys = nullptr;  // unused: nearest sampling has no coordinate gradient
  explicit NearestPlan(RowScratch<T>& s, const Plane<T>&) : off(s.idx(0)), inside(s.val(0)) {}
  static constexpr int kVals = 1;
};

template <typename T, int64_t kPad>
C10_ALWAYS_INLINE RowSpan plan_nearest_loop(const RowTransform<T> tr, const Plane<T> g,
                                            const T* __restrict bxs, int64_t Wo,
                                            int32_t* __restrict off, T* __restrict inside) {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
  for (int64_t w = 0; w < Wo; ++w) {
    const T bx = bxs[w];
    T unused;
    const NearestTap tx = nearest_tap(source_coord(tr.gx(bx), g.x, kPad, unused), g.W);
    const NearestTap ty = nearest_tap(source_coord(tr.gy(bx), g.y, kPad, unused), g.H);
    off[w] = ty.index * g.sH + tx.index * g.sW;
    lo = std::min(lo, ty.index);
    hi = std::max(hi, ty.index);
    inside[w] = (tx.index == tx.unclamped ? T(1) : T(0)) * (ty.index == ty.unclamped ? T(1) : T(0));
  }
  RowSpan span;
  span.lo = lo;
  span.hi = hi;
  return span;
}

template <typename T, int64_t kPad>
C10_ALWAYS_INLINE RowSpan plan_nearest(const NearestPlan<T>& pl, const RowTransform<T>& tr,
                                       const Plane<T>& g, const T* bxs, int64_t Wo) {
  return plan_nearest_loop<T, kPad>(tr, g, bxs, Wo, pl.off, pl.inside);
}

template <typename T>
C10_ALWAYS_INLINE void blend_nearest(const NearestPlan<T>& pl, const T* __restrict src,
                                     T* __restrict dst, int64_t Wo) {
  const int32_t* __restrict off = pl.off;
  const T* __restrict inside = pl.inside;
  for (int64_t w = 0; w < Wo; ++w) {
    const T v = src[int64_t{off[w]}];
    dst[w] = inside[w] != T(0) ? v : T(0);
  }
}

template <typename T>
C10_ALWAYS_INLINE void scatter_nearest(const NearestPlan<T>& pl, const T* __restrict g,
                                       T* __restrict dst, int64_t Wo) {
  for (int64_t w = 0; w < Wo; ++w) {
    if (pl.inside[w] != T(0)) {
      dst[pl.off[w]] += g[w];
    }
  }
}

// ----------------------------------------------------------------------------- bicubic

// A row's bicubic taps: 4 column offsets and 4 row offsets per pixel (the sample reads
// their 4x4 products), with weights and (backward) derivatives per axis.
template <typename T>
struct CubicPlan {
  int32_t *xo[4], *yo[4];
  T *xw[4], *yw[4], *xd[4], *yd[4];
  T *gxs, *gys;
  explicit CubicPlan(RowScratch<T>& s, const Plane<T>&) : gxs(s.val(16)), gys(s.val(17)) {
    for (int k = 0; k < 4; ++k) {
      xo[k] = s.idx(k);
      yo[k] = s.idx(4 + k);
      xw[k] = s.val(k);
      yw[k] = s.val(4 + k);
      xd[k] = s.val(8 + k);
      yd[k] = s.val(12 + k);
    }
  }
  static constexpr int kVals = 18;
};

// Tap kK of every pixel of the row along one axis.
template <typename T, int64_t kPad, bool kGrad, int kK>
C10_ALWAYS_INLINE RowSpan plan_cubic_axis(const RowCoord<T> coord, const Axis<T> a, int32_t stride,
                                          const T* __restrict bxs, int32_t* __restrict off,
                                          T* __restrict weight, T* __restrict deriv, int64_t Wo) {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
  for (int64_t w = 0; w < Wo; ++w) {
    const CubicTap<T> tap = cubic_tap(unnormalize(coord(bxs[w]), a), kK, a, kPad);
    off[w] = tap.index * stride;
    lo = std::min(lo, tap.index);
    hi = std::max(hi, tap.index);
    weight[w] = tap.w;
    if (kGrad) {
      deriv[w] = tap.d * a.scale;
    }
  }
  RowSpan span;
  span.lo = lo;
  span.hi = hi;
  return span;
}

template <typename T, int64_t kPad, bool kGrad, int kK>
C10_ALWAYS_INLINE RowSpan plan_cubic_tap(const CubicPlan<T>& pl, const RowTransform<T>& tr,
                                         const Plane<T>& g, const T* bxs, int64_t Wo) {
  plan_cubic_axis<T, kPad, kGrad, kK>(tr.gx, g.x, g.sW, bxs, pl.xo[kK], pl.xw[kK], pl.xd[kK], Wo);
  return plan_cubic_axis<T, kPad, kGrad, kK>(tr.gy, g.y, g.sH, bxs, pl.yo[kK], pl.yw[kK], pl.yd[kK], Wo);
}

template <typename T, int64_t kPad, bool kGrad>
C10_ALWAYS_INLINE RowSpan plan_bicubic(const CubicPlan<T>& pl, const RowTransform<T>& tr, const Plane<T>& g,
                                       const T* bxs, int64_t Wo) {
  RowSpan span = plan_cubic_tap<T, kPad, kGrad, 0>(pl, tr, g, bxs, Wo);
  span.add(plan_cubic_tap<T, kPad, kGrad, 1>(pl, tr, g, bxs, Wo));
  span.add(plan_cubic_tap<T, kPad, kGrad, 2>(pl, tr, g, bxs, Wo));
  span.add(plan_cubic_tap<T, kPad, kGrad, 3>(pl, tr, g, bxs, Wo));
  return span;
}

template <typename T>
C10_ALWAYS_INLINE void blend_bicubic(const CubicPlan<T>& pl, const T* __restrict src,
                                     T* __restrict dst, int64_t Wo) {
  const int32_t *__restrict x0 = pl.xo[0], *__restrict x1 = pl.xo[1], *__restrict x2 = pl.xo[2],
                *__restrict x3 = pl.xo[3];
  const int32_t *__restrict y0 = pl.yo[0], *__restrict y1 = pl.yo[1], *__restrict y2 = pl.yo[2],
                *__restrict y3 = pl.yo[3];
  const T *__restrict a0 = pl.xw[0], *__restrict a1 = pl.xw[1], *__restrict a2 = pl.xw[2],
          *__restrict a3 = pl.xw[3];
  const T *__restrict b0 = pl.yw[0], *__restrict b1 = pl.yw[1], *__restrict b2 = pl.yw[2],
          *__restrict b3 = pl.yw[3];
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t c0 = x0[w], c1 = x1[w], c2 = x2[w], c3 = x3[w];
    const T w0 = a0[w], w1 = a1[w], w2 = a2[w], w3 = a3[w];
    const int64_t r0 = y0[w], r1 = y1[w], r2 = y2[w], r3 = y3[w];
    dst[w] = b0[w] * (w0 * src[r0 + c0] + w1 * src[r0 + c1] + w2 * src[r0 + c2] + w3 * src[r0 + c3]) +
             b1[w] * (w0 * src[r1 + c0] + w1 * src[r1 + c1] + w2 * src[r1 + c2] + w3 * src[r1 + c3]) +
             b2[w] * (w0 * src[r2 + c0] + w1 * src[r2 + c1] + w2 * src[r2 + c2] + w3 * src[r2 + c3]) +
             b3[w] * (w0 * src[r3 + c0] + w1 * src[r3 + c1] + w2 * src[r3 + c2] + w3 * src[r3 + c3]);
  }
}

template <typename T>
C10_ALWAYS_INLINE void coord_grad_bicubic(const CubicPlan<T>& pl, const T* __restrict src,
                                          const T* __restrict g, T* __restrict gxs,
                                          T* __restrict gys, int64_t Wo) {
  const int32_t *__restrict x0 = pl.xo[0], *__restrict x1 = pl.xo[1], *__restrict x2 = pl.xo[2],
                *__restrict x3 = pl.xo[3];
  const int32_t *__restrict y0 = pl.yo[0], *__restrict y1 = pl.yo[1], *__restrict y2 = pl.yo[2],
                *__restrict y3 = pl.yo[3];
  const T *__restrict a0 = pl.xw[0], *__restrict a1 = pl.xw[1], *__restrict a2 = pl.xw[2],
          *__restrict a3 = pl.xw[3];
  const T *__restrict e0 = pl.xd[0], *__restrict e1 = pl.xd[1], *__restrict e2 = pl.xd[2],
          *__restrict e3 = pl.xd[3];
  const T *__restrict b0 = pl.yw[0], *__restrict b1 = pl.yw[1], *__restrict b2 = pl.yw[2],
          *__restrict b3 = pl.yw[3];
  const T *__restrict f0 = pl.yd[0], *__restrict f1 = pl.yd[1], *__restrict f2 = pl.yd[2],
          *__restrict f3 = pl.yd[3];
  for (int64_t w = 0; w < Wo; ++w) {
    const int64_t c0 = x0[w], c1 = x1[w], c2 = x2[w], c3 = x3[w];
    const int64_t r0 = y0[w], r1 = y1[w], r2 = y2[w], r3 = y3[w];
    const T v00 = src[r0 + c0], v01 = src[r0 + c1], v02 = src[r0 + c2], v03 = src[r0 + c3];
    const T v10 = src[r1 + c0], v11 = src[r1 + c1], v12 = src[r1 + c2], v13 = src[r1 + c3];
    const T v20 = src[r2 + c0], v21 = src[r2 + c1], v22 = src[r2 + c2], v23 = src[r2 + c3];
    const T v30 = src[r3 + c0], v31 = src[r3 + c1], v32 = src[r3 + c2], v33 = src[r3 + c3];
    // Per tap row j: the row's x-interpolated value and its x-derivative.
    const T v0 = a0[w] * v00 + a1[w] * v01 + a2[w] * v02 + a3[w] * v03;
    const T v1 = a0[w] * v10 + a1[w] * v11 + a2[w] * v12 + a3[w] * v13;
    const T v2 = a0[w] * v20 + a1[w] * v21 + a2[w] * v22 + a3[w] * v23;
    const T v3 = a0[w] * v30 + a1[w] * v31 + a2[w] * v32 + a3[w] * v33;
    const T d0 = e0[w] * v00 + e1[w] * v01 + e2[w] * v02 + e3[w] * v03;
    const T d1 = e0[w] * v10 + e1[w] * v11 + e2[w] * v12 + e3[w] * v13;
    const T d2 = e0[w] * v20 + e1[w] * v21 + e2[w] * v22 + e3[w] * v23;
    const T d3 = e0[w] * v30 + e1[w] * v31 + e2[w] * v32 + e3[w] * v33;
    gxs[w] += g[w] * (b0[w] * d0 + b1[w] * d1 + b2[w] * d2 + b3[w] * d3);
    gys[w] += g[w] * (f0[w] * v0 + f1[w] * v1 + f2[w] * v2 + f3[w] * v3);
  }
}

template <typename T>
C10_ALWAYS_INLINE void scatter_bicubic(const CubicPlan<T>& pl, const T* __restrict g,
                                       T* __restrict dst, int64_t Wo) {
  for (int64_t w = 0; w < Wo; ++w) {
    for (int j = 0; j < 4; ++j) {
      T* r = dst + int64_t{pl.yo[j][w]};
      const T gj = pl.yw[j][w] * g[w];
      for (int i = 0; i < 4; ++i) {
        r[int64_t{pl.xo[i][w]}] += pl.xw[i][w] * gj;
      }
    }
  }
}

// ----------------------------------------------------------------------------- rows

// Row entry points per interpolation mode, so the drivers are written once.
template <typename T, int64_t kPad>
struct Bilinear {
  using Plan = BilinearPlan<T>;
  static C10_ALWAYS_INLINE RowSpan plan(const Plan& pl, const RowTransform<T>& tr, const Plane<T>& g,
                                         const T* bxs, int64_t Wo, bool grad) {
    return grad ? plan_bilinear<T, kPad, true>(pl, tr, g, bxs, Wo)
                : plan_bilinear<T, kPad, false>(pl, tr, g, bxs, Wo);
  }
  static constexpr bool kHasCoordGrad = true;
};

template <typename T, int64_t kPad>
struct Nearest {
  using Plan = NearestPlan<T>;
  static C10_ALWAYS_INLINE RowSpan plan(const Plan& pl, const RowTransform<T>& tr, const Plane<T>& g,
                                         const T* bxs, int64_t Wo, bool) {
    return plan_nearest<T, kPad>(pl, tr, g, bxs, Wo);
  }
  static constexpr bool kHasCoordGrad = false;
};

template <typename T, int64_t kPad>
struct Bicubic {
  using Plan = CubicPlan<T>;
  static C10_ALWAYS_INLINE RowSpan plan(const Plan& pl, const RowTransform<T>& tr, const Plane<T>& g,
                                         const T* bxs, int64_t Wo, bool grad) {
    return grad ? plan_bicubic<T, kPad, true>(pl, tr, g, bxs, Wo)
                : plan_bicubic<T, kPad, false>(pl, tr, g, bxs, Wo);
  }
  static constexpr bool kHasCoordGrad = true;
};

template <typename T>
C10_ALWAYS_INLINE void blend(const BilinearPlan<T>& pl, const T* src, T* dst, int64_t Wo) {
  blend_bilinear(pl, src, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void blend(const NearestPlan<T>& pl, const T* src, T* dst, int64_t Wo) {
  blend_nearest(pl, src, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void blend(const CubicPlan<T>& pl, const T* src, T* dst, int64_t Wo) {
  blend_bicubic(pl, src, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void scatter(const BilinearPlan<T>& pl, const T* g, T* dst, int64_t Wo) {
  scatter_bilinear(pl, g, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void scatter(const NearestPlan<T>& pl, const T* g, T* dst, int64_t Wo) {
  scatter_nearest(pl, g, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void scatter(const CubicPlan<T>& pl, const T* g, T* dst, int64_t Wo) {
  scatter_bicubic(pl, g, dst, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void coord_grad(const BilinearPlan<T>& pl, const T* src, const T* g, int64_t Wo) {
  coord_grad_bilinear(pl, src, g, pl.gxs, pl.gys, Wo);
}
template <typename T>
C10_ALWAYS_INLINE void coord_grad(const NearestPlan<T>&, const T*, const T*, int64_t) {}
template <typename T>
C10_ALWAYS_INLINE void coord_grad(const CubicPlan<T>& pl, const T* src, const T* g, int64_t Wo) {
  coord_grad_bicubic(pl, src, g, pl.gxs, pl.gys, Wo);
}

// Brings the input rows a task is about to gather from into cache, or (for grad_input)
// zeroes them on first use. The gathers of a rotated output row hop across dozens of
// input rows, a pattern the hardware prefetcher does not follow, so they miss all the way
// to memory; reading the rows first, in order, one load per cache line, is cheap and the
// gathers then hit (3-4x faster gather loops, measured on the 224x224 benchmark). Each
// input row is touched once per image: the task remembers the span [lo, hi] it covered.
//
// The band of rows moves with the output row, so touch() also covers kAhead rows further
// on in its direction. Those are not needed yet: they are read later, one channel at a
// time, by touch_ahead() just before that channel's loop, so that their memory latency
// overlaps the loop's arithmetic instead of stalling it.
template <typename T>
class RowToucher {
 public:
  // zero: grad_input mode (rows are zeroed, and finish() zeroes the rest); else reads.
  RowToucher(const Problem<T>& p, bool zero) : p_(p), zero_(zero) {
    const Plane<T>& g = p.plane;
    row_len_ = (int64_t{g.W} - 1) * g.sW + 1;
    // Channel planes that do not interleave (NCHW-like) are touched plane by plane; for
    // interleaved ones (channels_last), one span per row covers all channels.
    separate_planes_ = p.sC >= (int64_t{g.H} - 1) * g.sH + row_len_;
  }

  // Covers rows span.lo..span.hi (and any gap to the rows covered before) of channels
  // [c_begin, c_end) of the image at `image` now, and queues the rows ahead.
  void touch(T* image, int64_t n, const RowSpan& span, int64_t c_begin, int64_t c_end) {
    if (n != n_) {
      n_ = n;
      lo_ = span.lo;
      hi_ = span.lo - 1;  // empty, extended below
    }
    ahead_lo_ = 0;
    ahead_hi_ = -1;
    if (span.lo < lo_) {
      touch_rows(image, span.lo, lo_ - 1, c_begin, c_end);
      const int32_t lo = zero_ ? span.lo : std::max(0, span.lo - kAhead);
      ahead_lo_ = lo;
      ahead_hi_ = span.lo - 1;
      lo_ = lo;
    }
    if (span.hi > hi_) {
      touch_rows(image, hi_ + 1, span.hi, c_begin, c_end);
      touch_rows(image, ahead_lo_, ahead_hi_, c_begin, c_end);  // the band grew both ways
      const int32_t hi = zero_ ? span.hi : std::min(p_.plane.H - 1, span.hi + kAhead);
      ahead_lo_ = span.hi + 1;
      ahead_hi_ = hi;
      hi_ = hi;
    }
  }

  // Reads the queued rows ahead of channel c (all channels at c == c_begin when the
  // planes interleave). Call it for every channel of the range given to touch().
  void touch_ahead(const T* image, int64_t c, int64_t c_begin, int64_t c_end) {
    if (ahead_lo_ > ahead_hi_) {
      return;
    }
    if (separate_planes_) {
      touch_rows(const_cast<T*>(image), ahead_lo_, ahead_hi_, c, c + 1);
    } else if (c == c_begin) {
      touch_rows(const_cast<T*>(image), ahead_lo_, ahead_hi_, c_begin, c_end);
    }
  }

  // Forgets what was touched (the next rows belong to other channels).
  void reset() { n_ = -1; }

  // Zero mode: zeroes the rows of image n never touched, so the whole plane is written.
  void finish(T* image, int64_t n, int64_t c_begin, int64_t c_end) {
    if (n != n_) {
      touch_rows(image, 0, p_.plane.H - 1, c_begin, c_end);
      return;
    }
    touch_rows(image, 0, lo_ - 1, c_begin, c_end);
    touch_rows(image, hi_ + 1, p_.plane.H - 1, c_begin, c_end);
  }

 private:
  void touch_rows(T* image, int32_t y0, int32_t y1, int64_t c_begin, int64_t c_end) {
    if (y0 > y1) {
      return;
    }
    const Plane<T>& g = p_.plane;
    if (zero_) {  // grad_input is contiguous
      for (int64_t c = c_begin; c < c_end; ++c) {
        std::fill_n(image + c * p_.sC + int64_t{y0} * g.W, int64_t{y1 - y0 + 1} * g.W, T(0));
      }
      return;
    }
    for (int64_t c = c_begin; c < (separate_planes_ ? c_end : c_begin + 1); ++c) {
      const int64_t len = separate_planes_ ? row_len_ : row_len_ + (c_end - c_begin - 1) * p_.sC;
      const T* first = image + c * p_.sC + int64_t{y0} * g.sH;
      if (len == g.sH) {  // rows follow each other in memory: one sequential read
        read_range(first, len * (y1 - y0 + 1));
        continue;
      }
      for (int64_t y = y0; y <= y1; ++y) {
        read_range(first + (y - y0) * g.sH, len);
      }
    }
  }

  // One load per cache line of [p, p + len): brings the range into cache. Loads, not
  // prefetch instructions: on the machines measured, __builtin_prefetch here left the
  // kernels 1.5-2x slower.
  static void read_range(const T* p, int64_t len) {
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t i = 0; i < len; i += kLine) {
      static_cast<void>(*static_cast<const volatile T*>(p + i));
    }
    static_cast<void>(*static_cast<const volatile T*>(p + len - 1));
  }

  static constexpr int32_t kAhead = 8;

  const Problem<T>& p_;
  bool zero_;
  int64_t row_len_;
  bool separate_planes_;
  int64_t n_ = -1;
  int32_t lo_ = 0, hi_ = -1;              // rows covered (read, queued or zeroed)
  int32_t ahead_lo_ = 0, ahead_hi_ = -1;  // rows queued by the last touch()
};

// Forward rows [begin, end) of the flattened (image, output row) range.
template <typename T, typename Mode>
C10_ALWAYS_INLINE void forward_rows_mode(const Problem<T>& p, T* out, int64_t begin, int64_t end) {
  RowScratch<T> s(p, Mode::Plan::kVals, 8);
  const typename Mode::Plan pl(s, p.plane);
  RowToucher<T> toucher(p, false);
  const int64_t C = p.C, Wo = p.Wo, out_sC = p.Ho * Wo;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / p.Ho, h = r % p.Ho;
    const RowSpan span = Mode::plan(pl, RowTransform<T>(p, n, h), p.plane, s.bx(), Wo, false);
    const T* in = p.input + n * p.sN;
    toucher.touch(const_cast<T*>(in), n, span, 0, C);
    T* out_row = out + (n * C * p.Ho + h) * Wo;
    for (int64_t c = 0; c < C; ++c) {
      toucher.touch_ahead(in, c, 0, C);
      blend(pl, in + c * p.sC, out_row + c * out_sC, Wo);
    }
  }
}

// How the backward splits its work. While scattering into grad_input (and always on the
// interleaved path), a task is one image's channel block [k * block, (k + 1) * block)
// over all output rows, so no two tasks write the same grad_input element; otherwise a
// task is one output row. Task i belongs to
// image i / per_image and writes theta's partial sums to partials[6 * i] (if any).
struct BackwardSplit {
  bool scatter;
  int64_t per_image, block;
  double* partials;
};

template <typename T, typename Mode>
C10_ALWAYS_INLINE void backward_tasks_mode(const Problem<T>& p, const T* gout, T* gin,
                                           const BackwardSplit& split, int64_t begin, int64_t end) {
  RowScratch<T> s(p, Mode::Plan::kVals, 8);
  const typename Mode::Plan pl(s, p.plane);
  const bool theta_grad = Mode::kHasCoordGrad && split.partials != nullptr;
  const int64_t C = p.C, Wo = p.Wo, go_sC = p.Ho * Wo, gi_sC = int64_t{p.plane.H} * p.plane.W;
  RowToucher<T> reader(p, false), zeroer(p, true);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / split.per_image, k = i % split.per_image;
    const int64_t h_begin = split.scatter ? 0 : k, h_end = split.scatter ? p.Ho : k + 1;
    const int64_t c_begin = split.scatter ? k * split.block : 0;
    const int64_t c_end = split.scatter ? std::min(C, c_begin + split.block) : C;
    double* partial = theta_grad ? split.partials + 6 * i : nullptr;
    if (split.scatter) {  // a new channel block: nothing of it is in cache or zeroed yet
      reader.reset();
      zeroer.reset();
    }
    const T* in_image = theta_grad ? p.input + n * p.sN : nullptr;
    // grad_input is allocated uninitialised: each task zeroes its planes as it goes.
    T* gin_image = gin ? gin + n * C * gi_sC : nullptr;
    for (int64_t h = h_begin; h < h_end; ++h) {
      const RowTransform<T> tr(p, n, h);
      const RowSpan span = Mode::plan(pl, tr, p.plane, s.bx(), Wo, theta_grad);
      if (theta_grad) {
        reader.touch(const_cast<T*>(in_image), n, span, c_begin, c_end);
        std::fill(pl.gxs, pl.gxs + Wo, T(0));
        std::fill(pl.gys, pl.gys + Wo, T(0));
      }
      if (gin) {
        zeroer.touch(gin_image, n, span, c_begin, c_end);
      }
      const T* g_row = gout + (n * C * p.Ho + h) * Wo;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const T* g = g_row + c * go_sC;
        if (theta_grad) {
          reader.touch_ahead(in_image, c, c_begin, c_end);
          coord_grad(pl, in_image + c * p.sC, g, Wo);
        }
        if (gin) {
          scatter(pl, g, gin_image + c * gi_sC, Wo);
        }
      }
      if (theta_grad) {
        add_theta_partial(pl.gxs, pl.gys, s.bx(), tr.by, Wo, partial);
      }
    }
    if (gin) {
      zeroer.finish(gin_image, n, c_begin, c_end);
    }
  }
}

// ----------------------------------------------------------------------------- bilinear, many channels

// With many channels, bilinear sampling of one image's channel block runs on
// channel-interleaved (HWC) copies of the input, output or grad_output, and grad_input: a
// pixel's four taps are then four runs of contiguous channels, so the blend, the scatter
// into grad_input and the sums for theta's gradient become vector loops over channels,
// where planes need gathers and a scalar scatter. The copies cost a transpose each, far
// less than that (64-channel 56x56 maps, one thread: backward 2.5x, forward 1.7x faster).
// Blocks have at most kMaxInterleavedBlock channels and kMaxInterleaved elements per copy
// (a few MB per thread); fewer than kMinInterleavedChannels channels run planar.
constexpr int64_t kMinInterleavedChannels = 16;
constexpr int64_t kMaxInterleavedBlock = 64;
constexpr int64_t kMaxInterleaved = int64_t{1} << 20;
constexpr int64_t kOutChunk = 1024;
constexpr int64_t kStreamBytes = int64_t{16} << 20;  // half a common last-level cache

// The same for a 4x4 block in 16-byte vectors (SSE's unpck / movlh / movhl), for the
// default variant: there a 32-byte shuffle is no instruction, and GCC's lowering of
// transpose_block8 made the many-channel kernels slower than torch (B=8, 16 channels).
C10_ALWAYS_INLINE void transpose_block4(const float* __restrict s, int64_t ss, float* __restrict d,
                                        int64_t ds) {
  using v4 = float __attribute__((vector_size(16)));
  using m4 = int32_t __attribute__((vector_size(16)));
  v4 r[4];
  for (int i = 0; i < 4; ++i) {
    std::memcpy(&r[i], s + i * ss, sizeof(v4));
  }
  const v4 t0 = __builtin_shuffle(r[0], r[1], m4{0, 4, 1, 5}), t1 = __builtin_shuffle(r[0], r[1], m4{2, 6, 3, 7});
  const v4 t2 = __builtin_shuffle(r[2], r[3], m4{0, 4, 1, 5}), t3 = __builtin_shuffle(r[2], r[3], m4{2, 6, 3, 7});
  const v4 o[4] = {__builtin_shuffle(t0, t2, m4{0, 1, 4, 5}), __builtin_shuffle(t0, t2, m4{2, 3, 6, 7}),
                   __builtin_shuffle(t1, t3, m4{0, 1, 4, 5}), __builtin_shuffle(t1, t3, m4{2, 3, 6, 7})};
  for (int j = 0; j < 4; ++j) {
    std::memcpy(d + j * ds, &o[j], sizeof(v4));
  }
}

template <int kBlock, bool kStream = false>
C10_ALWAYS_INLINE void transpose_block(const float* __restrict s, int64_t ss, float* __restrict d, int64_t ds) {
  if constexpr (kBlock == 8) {
    transpose_block8<kStream>(s, ss, d, ds);
  } else {
    transpose_block4(s, ss, d, ds);
  }
}

// Whole blocks from a buffer in cache to channel planes, kBlock planes at a time.
template <int kBlock, bool kStream>
C10_ALWAYS_INLINE void blocks_to_planes(const float* __restrict src, int64_t src_stride, float* __restrict dst,
                                        int64_t dst_stride, int64_t rows_b, int64_t cols_b) {
  for (int64_t j = 0; j < cols_b; j += kBlock) {
    for (int64_t i = 0; i < rows_b; i += kBlock) {
      transpose_block<kBlock, kStream>(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
    }
  }
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols. One side is
// channel planes in memory, the other a buffer in cache: the blocks sweep the planes'
// side kBlock planes at a time, so that its lines are read or written whole, in order.
// kBlock: 8 where 32-byte vectors are registers (AVX2, AVX-512), else 4. `stream`: write
// planes with streaming stores where they are aligned (outputs too large to stay in cache).
template <int kBlock, typename T>
C10_ALWAYS_INLINE void transpose(const T* __restrict src, int64_t src_stride, T* __restrict dst,
                                 int64_t dst_stride, int64_t rows, int64_t cols, bool stream = false) {
  int64_t rows_b = 0, cols_b = 0;
  if constexpr (std::is_same_v<T, float>) {
    rows_b = rows & ~int64_t{kBlock - 1};
    cols_b = cols & ~int64_t{kBlock - 1};
    if (src_stride >= dst_stride) {
      for (int64_t i = 0; i < rows_b; i += kBlock) {
        for (int64_t j = 0; j < cols_b; j += kBlock) {
          transpose_block<kBlock>(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
        }
      }
    } else if (kBlock == 8 && stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && dst_stride % 8 == 0) {
      blocks_to_planes<kBlock, true>(src, src_stride, dst, dst_stride, rows_b, cols_b);
#if STNPADIM_HAVE_ISA_VARIANTS
      __builtin_ia32_sfence();  // streaming stores are weakly ordered
#endif
    } else {
      blocks_to_planes<kBlock, false>(src, src_stride, dst, dst_stride, rows_b, cols_b);
    }
  }
  // The rest: all of it for double (not worth its own shuffles), edges for float.
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i < rows_b ? cols_b : 0; j < cols; ++j) {
      dst[j * dst_stride + i] = src[i * src_stride + j];
    }
  }
}

// One output pixel's bilinear coefficients: tap weights (for grad_input) and the taps'
// derivatives with respect to gx and gy (for theta), corner by corner.
template <typename T>
struct Corners {
  T w00, w01, w10, w11, a00, a01, a10, a11, b00, b01, b10, b11;
};

// Per-channel sums of a row's d loss / d (gx, gy), plain and weighted by the pixels' base
// x coordinate bx: theta's gradient needs no more. Kept per channel, so the pixel loop
// stays a vector loop; one reduction over channels per row (not per pixel) follows.
template <typename T>
struct ChannelSums {
  T *x, *x_bx, *y, *y_bx;
};

// One output pixel over `len` interleaved channels: its taps are x[0], x[dx], x[dy],
// x[dx + dy] (input) and the same in q (grad_input), dx, dy >= len; g holds the pixel's
// output gradients, bx its base x coordinate.
template <typename T, bool kIn, bool kTheta>
C10_ALWAYS_INLINE void pixel_channels(const Corners<T>& k, T bx, const T* __restrict g, const T* __restrict x,
                                      T* __restrict q, int64_t dx, int64_t dy, int64_t len,
                                      T* __restrict sx, T* __restrict sx_bx, T* __restrict sy,
                                      T* __restrict sy_bx) {
  const int64_t dxy = dx + dy;
  // The four taps never overlap (dx, dy >= len), which omp simd takes on trust.
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    const T gc = g[c];
    if constexpr (kTheta) {
      const T u00 = x[c], u01 = x[dx + c], u10 = x[dy + c], u11 = x[dxy + c];
      const T tx = gc * (k.a00 * u00 + k.a01 * u01 + k.a10 * u10 + k.a11 * u11);
      const T ty = gc * (k.b00 * u00 + k.b01 * u01 + k.b10 * u10 + k.b11 * u11);
      sx[c] += tx;
      sx_bx[c] += bx * tx;
      sy[c] += ty;
      sy_bx[c] += bx * ty;
    }
    if constexpr (kIn) {
      q[c] += k.w00 * gc;
      q[dx + c] += k.w01 * gc;
      q[dy + c] += k.w10 * gc;
      q[dxy + c] += k.w11 * gc;
    }
  }
}

// Adds one row's share of theta's gradient from its per-channel sums, and clears them.
template <typename T>
C10_ALWAYS_INLINE void add_theta_partial_channels(const ChannelSums<T>& s, int64_t len, T by, double* partial) {
  T sx = 0, sx_bx = 0, sy = 0, sy_bx = 0;
#pragma omp simd reduction(+ : sx, sx_bx, sy, sy_bx)
  for (int64_t c = 0; c < len; ++c) {
    sx += s.x[c];
    sx_bx += s.x_bx[c];
    sy += s.y[c];
    sy_bx += s.y_bx[c];
  }
  partial[0] += sx_bx;
  partial[1] += static_cast<double>(sx) * by;
  partial[2] += sx;
  partial[3] += sy_bx;
  partial[4] += static_cast<double>(sy) * by;
  partial[5] += sy;
  std::fill_n(s.x, 4 * len, T(0));
}

// Whether the problem's input is channels_last (interleaved already): the interleaved
// kernels then read it in place instead of copying it.
template <typename T>
bool input_in_place(const Problem<T>& p) {
  return p.input != nullptr && p.sC == 1 && p.plane.sW == p.C && p.plane.sH == p.plane.W * p.C;
}

// Backward tasks [begin, end) of the interleaved path; tasks as in BackwardSplit (scatter).
// Needs H, W >= 2, so that a pixel's four taps are distinct. The input and grad_input
// copies are whole channel blocks (the taps of a row wander over many input rows), the
// grad_output copy one row at a time. channels_last input is read in place, where the host
// allows it: its offsets are then also grad_input's (one block per image) or only the
// input is read (theta's gradient alone).
template <int kBlock, typename T, int64_t kPad, bool kIn, bool kTheta>
C10_ALWAYS_INLINE void interleaved_tasks_mode(const Problem<T>& p, const T* gout, T* gin,
                                              const BackwardSplit& split, int64_t begin, int64_t end) {
  const int64_t C = p.C, Ho = p.Ho, Wo = p.Wo, W = p.plane.W;
  const int64_t HW = int64_t{p.plane.H} * W, HWo = Ho * Wo;
  const bool in_place = kTheta && input_in_place(p);
  std::vector<T> x_buf(kTheta && !in_place ? HW * split.block : 0), g_row(Wo * split.block),
      q_buf(kIn ? HW * split.block : 0), sums(4 * split.block);
  RowScratch<T> s(p, BilinearPlan<T>::kVals, 1);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / split.per_image, c_begin = (i % split.per_image) * split.block;
    const int64_t cb = std::min(C, c_begin + split.block) - c_begin;
    Plane<T> plane = p.plane;
    const T* xb = in_place ? p.input + n * p.sN + c_begin : x_buf.data();
    if (!in_place) {
      plane.sH = static_cast<int32_t>(W * cb);
      plane.sW = static_cast<int32_t>(cb);
      if constexpr (kTheta) {
        transpose<kBlock>(p.input + n * p.sN + c_begin * p.sC, p.sC, x_buf.data(), cb, cb, HW);
      }
    }
    const BilinearPlan<T> pl(s, plane);
    const ChannelSums<T> cs{sums.data(), sums.data() + cb, sums.data() + 2 * cb, sums.data() + 3 * cb};
    if constexpr (kIn) {
      std::fill_n(q_buf.data(), HW * cb, T(0));
    }
    T* qb = q_buf.data();
    const T* bxs = s.bx();
    double* partial = kTheta ? split.partials + 6 * i : nullptr;
    for (int64_t h = 0; h < Ho; ++h) {
      const RowTransform<T> tr(p, n, h);
      plan_bilinear<T, kPad, kTheta>(pl, tr, plane, bxs, Wo);
      transpose<kBlock>(gout + (n * C + c_begin) * HWo + h * Wo, HWo, g_row.data(), cb, cb, Wo);
      for (int64_t w = 0; w < Wo; ++w) {
        const int64_t o = pl.off[w];
        Corners<T> k;
        k.w00 = pl.ay0[w] * pl.ax0[w];
        k.w01 = pl.ay0[w] * pl.ax1[w];
        k.w10 = pl.ay1[w] * pl.ax0[w];
        k.w11 = pl.ay1[w] * pl.ax1[w];
        if constexpr (kTheta) {
          k.a00 = pl.ay0[w] * pl.dx0[w];
          k.a01 = pl.ay0[w] * pl.dx1[w];
          k.a10 = pl.ay1[w] * pl.dx0[w];
          k.a11 = pl.ay1[w] * pl.dx1[w];
          k.b00 = pl.dy0[w] * pl.ax0[w];
          k.b01 = pl.dy0[w] * pl.ax1[w];
          k.b10 = pl.dy1[w] * pl.ax0[w];
          k.b11 = pl.dy1[w] * pl.ax1[w];
        }
        pixel_channels<T, kIn, kTheta>(k, bxs[w], g_row.data() + w * cb, kTheta ? xb + o : nullptr,
                                       kIn ? qb + o : nullptr, pl.dx, pl.dy, cb, cs.x, cs.x_bx, cs.y,
                                       cs.y_bx);
      }
      if constexpr (kTheta) {
        add_theta_partial_channels(cs, cb, tr.by, partial);
      }
    }
    if constexpr (kIn) {
      transpose<kBlock>(qb, cb, gin + (n * C + c_begin) * HW, HW, HW, cb);
    }
  }
}

// Forward of one output pixel over `len` interleaved channels (taps as in pixel_channels).
template <typename T>
C10_ALWAYS_INLINE void blend_channels(T ax0, T ax1, T ay0, T ay1, const T* __restrict x, int64_t dx,
                                      int64_t dy, int64_t len, T* __restrict out) {
  const int64_t dxy = dx + dy;
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    out[c] = ay0 * (ax0 * x[c] + ax1 * x[dx + c]) + ay1 * (ax0 * x[dy + c] + ax1 * x[dxy + c]);
  }
}

// Forward tasks [begin, end) on interleaved copies; a task is one image's channel block
// [k * block, (k + 1) * block). Needs H, W >= 2 and contiguous input planes or channels_last input.
template <int kBlock, typename T, int64_t kPad>
C10_ALWAYS_INLINE void interleaved_forward_mode(const Problem<T>& p, T* out, int64_t block, int64_t per_image,
                                                int64_t begin, int64_t end) {
  const int64_t C = p.C, Ho = p.Ho, Wo = p.Wo, W = p.plane.W;
  const int64_t HW = int64_t{p.plane.H} * W, HWo = Ho * Wo;
  const bool in_place = input_in_place(p);
  // Output rows are blended into o_rows and moved to the planes kOutChunk pixels at a
  // time: a row at a time, each plane got a few lines per visit, too short a run for the
  // prefetchers across 64 planes. Large outputs are written with streaming stores, which
  // skip reading each line before writing it (Zen 3, B=32 64x56x56: 3.6 -> 3.1 ms).
  const int64_t rows = std::max<int64_t>(1, std::min(Ho, kOutChunk / Wo));
  const bool stream = p.N * C * HWo * int64_t{sizeof(T)} >= kStreamBytes;
  std::vector<T> x_buf(in_place ? 0 : HW * block), o_rows(rows * Wo * block);
  RowScratch<T> s(p, BilinearPlan<T>::kVals, 1);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / per_image, c_begin = (i % per_image) * block;
    const int64_t cb = std::min(C, c_begin + block) - c_begin;
    Plane<T> plane = p.plane;
    const T* src = p.input + n * p.sN + c_begin;
    if (!in_place) {
      plane.sH = static_cast<int32_t>(W * cb);
      plane.sW = static_cast<int32_t>(cb);
      transpose<kBlock>(p.input + n * p.sN + c_begin * p.sC, p.sC, x_buf.data(), cb, cb, HW);
      src = x_buf.data();
    }
    const BilinearPlan<T> pl(s, plane);
    for (int64_t h0 = 0; h0 < Ho; h0 += rows) {
      const int64_t h1 = std::min(Ho, h0 + rows);
      for (int64_t h = h0; h < h1; ++h) {
        plan_bilinear<T, kPad, false>(pl, RowTransform<T>(p, n, h), plane, s.bx(), Wo);
        T* o_row = o_rows.data() + (h - h0) * Wo * cb;
        for (int64_t w = 0; w < Wo; ++w) {
          blend_channels(pl.ax0[w], pl.ax1[w], pl.ay0[w], pl.ay1[w], src + pl.off[w], pl.dx, pl.dy,
                         cb, o_row + w * cb);
        }
      }
      transpose<kBlock>(o_rows.data(), cb, out + (n * C + c_begin) * HWo + h0 * Wo, HWo, (h1 - h0) * Wo, cb,
                        stream);
    }
  }
}

template <int kBlock, typename T>
C10_ALWAYS_INLINE void interleaved_forward_impl(const Problem<T>& p, T* out, int64_t block, int64_t per_image,
                                                int64_t begin, int64_t end) {
  if (p.padding == kZeros) {
    interleaved_forward_mode<kBlock, T, kZeros>(p, out, block, per_image, begin, end);
  } else if (p.padding == kBorder) {
    interleaved_forward_mode<kBlock, T, kBorder>(p, out, block, per_image, begin, end);
  } else {
    interleaved_forward_mode<kBlock, T, kReflection>(p, out, block, per_image, begin, end);
  }
}

template <int kBlock, typename T, int64_t kPad>
C10_ALWAYS_INLINE void interleaved_tasks_pad(const Problem<T>& p, const T* gout, T* gin,
                                             const BackwardSplit& split, int64_t begin, int64_t end) {
  if (gin == nullptr) {
    interleaved_tasks_mode<kBlock, T, kPad, false, true>(p, gout, gin, split, begin, end);
  } else if (split.partials == nullptr) {
    interleaved_tasks_mode<kBlock, T, kPad, true, false>(p, gout, gin, split, begin, end);
  } else {
    interleaved_tasks_mode<kBlock, T, kPad, true, true>(p, gout, gin, split, begin, end);
  }
}

template <int kBlock, typename T>
C10_ALWAYS_INLINE void interleaved_tasks_impl(const Problem<T>& p, const T* gout, T* gin,
                                              const BackwardSplit& split, int64_t begin, int64_t end) {
  if (p.padding == kZeros) {
    interleaved_tasks_pad<kBlock, T, kZeros>(p, gout, gin, split, begin, end);
  } else if (p.padding == kBorder) {
    interleaved_tasks_pad<kBlock, T, kBorder>(p, gout, gin, split, begin, end);
  } else {
    interleaved_tasks_pad<kBlock, T, kReflection>(p, gout, gin, split, begin, end);
  }
}

template <typename T, template <typename, int64_t> class Mode>
C10_ALWAYS_INLINE void forward_rows_pad(const Problem<T>& p, T* out, int64_t begin, int64_t end) {
  if (p.padding == kZeros) {
    forward_rows_mode<T, Mode<T, kZeros>>(p, out, begin, end);
  } else if (p.padding == kBorder) {
    forward_rows_mode<T, Mode<T, kBorder>>(p, out, begin, end);
  } else {
    forward_rows_mode<T, Mode<T, kReflection>>(p, out, begin, end);
  }
}

template <typename T>
C10_ALWAYS_INLINE void forward_rows_impl(const Problem<T>& p, T* out, int64_t begin, int64_t end) {
  if (p.interpolation == kBilinear) {
    forward_rows_pad<T, Bilinear>(p, out, begin, end);
  } else if (p.interpolation == kNearest) {
    forward_rows_pad<T, Nearest>(p, out, begin, end);
  } else {
    forward_rows_pad<T, Bicubic>(p, out, begin, end);
  }
}

template <typename T, template <typename, int64_t> class Mode>
C10_ALWAYS_INLINE void backward_tasks_pad(const Problem<T>& p, const T* gout, T* gin,
                                          const BackwardSplit& split, int64_t begin, int64_t end) {
  if (p.padding == kZeros) {
    backward_tasks_mode<T, Mode<T, kZeros>>(p, gout, gin, split, begin, end);
  } else if (p.padding == kBorder) {
    backward_tasks_mode<T, Mode<T, kBorder>>(p, gout, gin, split, begin, end);
  } else {
    backward_tasks_mode<T, Mode<T, kReflection>>(p, gout, gin, split, begin, end);
  }
}

template <typename T>
C10_ALWAYS_INLINE void backward_tasks_impl(const Problem<T>& p, const T* gout, T* gin,
                                           const BackwardSplit& split, int64_t begin, int64_t end) {
  if (p.interpolation == kBilinear) {
    backward_tasks_pad<T, Bilinear>(p, gout, gin, split, begin, end);
  } else if (p.interpolation == kNearest) {
    backward_tasks_pad<T, Nearest>(p, gout, gin, split, begin, end);
  } else {
    backward_tasks_pad<T, Bicubic>(p, gout, gin, split, begin, end);
  }
}

// Non-template entry points, one per dtype and instruction-set variant (each inlines its
// whole kernel, so each is vectorised for its target), and one per dtype that runs the
// variant given.
template <CpuCapability, typename T>
C10_ALWAYS_INLINE void forward_rows_isa(const Problem<T>& p, T* out, int64_t begin, int64_t end) {
  forward_rows_impl(p, out, begin, end);
}
template <CpuCapability, typename T>
C10_ALWAYS_INLINE void backward_tasks_isa(const Problem<T>& p, const T* gout, T* gin, const BackwardSplit& split,
                                          int64_t begin, int64_t end) {
  backward_tasks_impl(p, gout, gin, split, begin, end);
}
// Transpose blocks of the interleaved kernels: 8x8 where 32-byte vectors are registers.
template <CpuCapability kCap>
constexpr int kTransposeBlock = kVectorBytes<kCap> >= 32 ? 8 : 4;

template <CpuCapability kCap, typename T>
C10_ALWAYS_INLINE void interleaved_forward_isa(const Problem<T>& p, T* out, int64_t block, int64_t per_image,
                                               int64_t begin, int64_t end) {
  interleaved_forward_impl<kTransposeBlock<kCap>>(p, out, block, per_image, begin, end);
}
template <CpuCapability kCap, typename T>
C10_ALWAYS_INLINE void interleaved_tasks_isa(const Problem<T>& p, const T* gout, T* gin,
                                             const BackwardSplit& split, int64_t begin, int64_t end) {
  interleaved_tasks_impl<kTransposeBlock<kCap>>(p, gout, gin, split, begin, end);
}

#define STNPADIM_AFFINE_ENTRIES(T, SUFFIX)                                                                    \
  STNPADIM_CPU_VARIANTS(void, forward_rows_##SUFFIX, forward_rows_isa,                                        \
                        (const Problem<T>& p, T* out, int64_t begin, int64_t end), (p, out, begin, end))      \
  STNPADIM_CPU_VARIANTS(void, backward_tasks_##SUFFIX, backward_tasks_isa,                                    \
                        (const Problem<T>& p, const T* gout, T* gin, const BackwardSplit& split,              \
                         int64_t begin, int64_t end),                                                         \
                        (p, gout, gin, split, begin, end))                                                    \
  STNPADIM_CPU_VARIANTS(void, interleaved_forward_##SUFFIX, interleaved_forward_isa,                          \
                        (const Problem<T>& p, T* out, int64_t block, int64_t per_image, int64_t begin,        \
                         int64_t end),                                                                        \
                        (p, out, block, per_image, begin, end))                                               \
  STNPADIM_CPU_VARIANTS(void, interleaved_tasks_##SUFFIX, interleaved_tasks_isa,                              \
                        (const Problem<T>& p, const T* gout, T* gin, const BackwardSplit& split,              \
                         int64_t begin, int64_t end),                                                         \
                        (p, gout, gin, split, begin, end))                                                    \
  void forward_rows(CpuCapability cap, const Problem<T>& p, T* out, int64_t begin, int64_t end) {             \
    pick_variant(cap, forward_rows_##SUFFIX##_default, forward_rows_##SUFFIX##_avx2,                          \
                 forward_rows_##SUFFIX##_avx512)(p, out, begin, end);                                         \
  }                                                                                                           \
  void backward_tasks(CpuCapability cap, const Problem<T>& p, const T* gout, T* gin,                          \
                      const BackwardSplit& split, int64_t begin, int64_t end) {                               \
    pick_variant(cap, backward_tasks_##SUFFIX##_default, backward_tasks_##SUFFIX##_avx2,                      \
                 backward_tasks_##SUFFIX##_avx512)(p, gout, gin, split, begin, end);                          \
  }                                                                                                           \
  void interleaved_forward(CpuCapability cap, const Problem<T>& p, T* out, int64_t block, int64_t per_image,  \
                           int64_t begin, int64_t end) {                                                      \
    pick_variant(cap, interleaved_forward_##SUFFIX##_default, interleaved_forward_##SUFFIX##_avx2,            \
                 interleaved_forward_##SUFFIX##_avx512)(p, out, block, per_image, begin, end);                \
  }                                                                                                           \
  void interleaved_tasks(CpuCapability cap, const Problem<T>& p, const T* gout, T* gin,                       \
                         const BackwardSplit& split, int64_t begin, int64_t end) {                            \
    pick_variant(cap, interleaved_tasks_##SUFFIX##_default, interleaved_tasks_##SUFFIX##_avx2,                \
                 interleaved_tasks_##SUFFIX##_avx512)(p, gout, gin, split, begin, end);                       \
  }
STNPADIM_AFFINE_ENTRIES(float, f32)
STNPADIM_AFFINE_ENTRIES(double, f64)
#undef STNPADIM_AFFINE_ENTRIES

// ----------------------------------------------------------------------------- host

// float16 / bfloat16 run in float32: upcast, our float kernels, one rounding of the result
// (the contract of stnpadim_ext.ops.affine_sample, the same as on CUDA). torch's own CPU
// sampler is never used for them: in torch 2.14 it computes tap offsets in a 16-bit
// integer type for these dtypes, which wrap once a plane's offsets reach 2^15.
bool is_low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Whether every offset within a channel plane fits the kernels' int32 offsets.
bool plane_offsets_fit(const at::Tensor& t) {
  const int64_t last = (t.size(2) - 1) * t.stride(2) + (t.size(3) - 1) * t.stride(3);
  return last < std::numeric_limits<int32_t>::max();
}

bool is_channels_last(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(3) == t.size(1) && t.stride(2) == t.size(3) * t.size(1);
}

// input may be undefined (backward without theta's gradient): offsets are then those of
// a contiguous plane of the given size, which is grad_input's layout.
// base_x, base_y: affine_base_coords of Wo and Ho; they must outlive the problem.
template <typename T>
Problem<T> make_problem(const at::Tensor& input, const at::Tensor& theta, const at::Tensor& base_x,
                        const at::Tensor& base_y, int64_t N, int64_t C, int64_t H, int64_t W,
                        int64_t Ho, int64_t Wo, int64_t interpolation, int64_t padding,
                        bool align_corners) {
  Problem<T> p{};
  p.input = input.defined() ? input.const_data_ptr<T>() : nullptr;
  p.theta = theta.const_data_ptr<T>();
  p.base_x = base_x.const_data_ptr<T>();
  p.base_y = base_y.const_data_ptr<T>();
  p.N = N;
  p.C = C;
  p.Ho = Ho;
  p.Wo = Wo;
  p.sN = input.defined() ? input.stride(0) : C * H * W;
  p.sC = input.defined() ? input.stride(1) : H * W;
  p.plane.x = make_axis<T>(W, align_corners);
  p.plane.y = make_axis<T>(H, align_corners);
  p.plane.H = static_cast<int32_t>(H);
  p.plane.W = static_cast<int32_t>(W);
  p.plane.sH = static_cast<int32_t>(input.defined() ? input.stride(2) : W);
  p.plane.sW = static_cast<int32_t>(input.defined() ? input.stride(3) : 1);
  p.align_corners = align_corners;
  p.interpolation = interpolation;
  p.padding = padding;
  return p;
}

// Channels per block of the interleaved (many-channel bilinear) kernels, or 0 where they
// do not apply. Blocks fit kMaxInterleaved elements; with few images, more blocks, so
// that every thread has work.
int64_t interleaved_block(int64_t interpolation, int64_t N, int64_t C, int64_t H, int64_t W, int64_t want) {
  if (interpolation != kBilinear || C < kMinInterleavedChannels || H < 2 || W < 2) {
    return 0;
  }
  const int64_t most = std::min(kMaxInterleavedBlock, kMaxInterleaved / (H * W));
  if (most < kMinInterleavedChannels) {
    return 0;
  }
  int64_t blocks = (C + most - 1) / most;
  if (N < want) {
    blocks = std::max(blocks, std::min(C / kMinInterleavedChannels, (want + N - 1) / N));
  }
  return (C + blocks - 1) / blocks;
}

at::Tensor affine_sample_forward_kernel(const at::Tensor& input, const at::Tensor& theta, int64_t out_h,
                                       int64_t out_w, int64_t interpolation, int64_t padding,
                                       bool align_corners) {
  check_affine_sample_args(input, theta, out_h, out_w, interpolation, padding);
  TORCH_CHECK(input.is_cpu(), "affine_sample: input must be a CPU tensor here");
  if (is_low_precision(input)) {
    return affine_sample_forward_kernel(input.to(at::kFloat), theta.to(at::kFloat), out_h, out_w, interpolation,
                                        padding, align_corners)
        .to(input.scalar_type());
  }
  const CpuCapability cap = cpu_capability();  // before any work: a refused variant raises here
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::empty({N, C, out_h, out_w}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor theta_c = theta.contiguous();
  const at::Tensor base_x = affine_base_coords(out_w, align_corners, theta.options());
  const at::Tensor base_y = affine_base_coords(out_h, align_corners, theta.options());
  // Strided inputs are read in place, unless their strides overflow int32 offsets.
  const at::Tensor x = plane_offsets_fit(input) ? input : input.contiguous();
  // The interleaved copy is made from whole planes, and channels_last input is read in
  // place: other layouts run planar.
  const bool planes = x.stride(3) == 1 && x.stride(2) == W;
  const int64_t block =
      planes || is_channels_last(x) ? interleaved_block(interpolation, N, C, H, W, 4 * at::get_num_threads()) : 0;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "affine_sample_forward_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(x, theta_c, base_x, base_y, N, C, H, W, out_h,
                                                       out_w, interpolation, padding, align_corners);
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    if (block > 0) {
      const int64_t per_image = (C + block - 1) / block;
      at::parallel_for(0, N * per_image, 1, [&](int64_t begin, int64_t end) {
        interleaved_forward(cap, p, out, block, per_image, begin, end);
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kGrainWork / (out_w * C));
    at::parallel_for(0, N * out_h, grain, [&](int64_t begin, int64_t end) {
      forward_rows(cap, p, out, begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> affine_sample_backward_kernel(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& input, const at::Tensor& theta,
    int64_t in_h, int64_t in_w, int64_t interpolation, int64_t padding, bool align_corners,
    bool input_grad, bool theta_grad) {
  check_affine_sample_backward_args(grad_output, input, theta, in_h, in_w, interpolation, padding,
                                    theta_grad);
  TORCH_CHECK(grad_output.is_cpu(), "affine_sample backward: grad_output must be a CPU tensor here");
  if (is_low_precision(grad_output)) {
    const std::optional<at::Tensor> input_f =
        input.has_value() ? std::optional<at::Tensor>(input->to(at::kFloat)) : std::nullopt;
    auto [grad_input, grad_theta] =
        affine_sample_backward_kernel(grad_output.to(at::kFloat), input_f, theta.to(at::kFloat), in_h, in_w,
                                      interpolation, padding, align_corners, input_grad, theta_grad);
    return {grad_input.to(grad_output.scalar_type()), grad_theta.to(theta.scalar_type())};
  }
  const CpuCapability cap = cpu_capability();
  const int64_t N = grad_output.size(0), C = grad_output.size(1);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  // Uninitialised: the tasks zero it row by row, just before scattering into the rows.
  at::Tensor grad_input = input_grad ? at::empty({N, C, in_h, in_w}, grad_output.options())
                                     : at::empty({0}, grad_output.options());
  at::Tensor grad_theta = theta_grad ? at::zeros({N, 2, 3}, theta.options())
                                     : at::empty({0}, theta.options());
  // Nearest sampling is piecewise constant: theta's gradient is zero.
  const bool reduce_theta = theta_grad && interpolation != kNearest;
  if (grad_output.numel() == 0 || (!input_grad && !reduce_theta)) {
    return {grad_input.zero_(), grad_theta};
  }
  const at::Tensor gout = grad_output.contiguous();
  const at::Tensor theta_c = theta.contiguous();
  const at::Tensor base_x = affine_base_coords(Wo, align_corners, theta.options());
  const at::Tensor base_y = affine_base_coords(Ho, align_corners, theta.options());

  // Few images: split them into channel blocks, so that every thread has work. Many
  // channels: blocks of at most kMaxBlock, so that the rows a task keeps in cache (input
  // and grad_input bands of every channel in the block) fit a core's share of L2.
  constexpr int64_t kMaxBlock = 16;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t interleaved = interleaved_block(interpolation, N, C, in_h, in_w, want);
  // The input is read with grad_input's (contiguous) offsets, so one plan serves both;
  // except that the interleaved kernels read channels_last input in place where its
  // offsets are grad_input's interleaved ones (one block per image), or grad_input is not
  // wanted (B=32 64x56x56, 2 threads, AMD EPYC Zen 3: forward + backward 15.4-17.4 ->
  // 11.1-11.7 ms, theta's gradient alone 13.1-14.3 -> 7.6-7.8 ms).
  const bool in_place = reduce_theta && interleaved > 0 && is_channels_last(*input) &&
                        plane_offsets_fit(*input) && (!input_grad || interleaved == C);
  const at::Tensor x = !reduce_theta ? at::Tensor() : in_place ? *input : input->contiguous();
  const bool by_block = input_grad || interleaved > 0;
  const int64_t block = interleaved > 0 ? interleaved
                        : !input_grad   ? C
                                        : std::min(kMaxBlock, N >= want ? C : std::max<int64_t>(1, C * N / want));
  const int64_t per_image = by_block ? (C + block - 1) / block : Ho;
  std::vector<double> partials(reduce_theta ? N * per_image * 6 : 0, 0.0);
  const BackwardSplit split{by_block, per_image, block, reduce_theta ? partials.data() : nullptr};

  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "affine_sample_backward_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(x, theta_c, base_x, base_y, N, C, in_h, in_w, Ho,
                                                       Wo, interpolation, padding, align_corners);
    const scalar_t* go = gout.const_data_ptr<scalar_t>();
    scalar_t* gin = input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    if (interleaved > 0) {
      at::parallel_for(0, N * per_image, 1, [&](int64_t begin, int64_t end) {
        interleaved_tasks(cap, p, go, gin, split, begin, end);
      });
    } else {
      const int64_t task_work = input_grad ? block * Ho * Wo : C * Wo;
      const int64_t grain = std::max<int64_t>(1, kGrainWork / task_work);
      at::parallel_for(0, N * per_image, grain, [&](int64_t begin, int64_t end) {
        backward_tasks(cap, p, go, gin, split, begin, end);
      });
    }
    if (reduce_theta) {
      scalar_t* gt = grad_theta.mutable_data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n) {
        for (int j = 0; j < 6; ++j) {
          double sum = 0;
          for (int64_t k = 0; k < per_image; ++k) {
            sum += partials[(n * per_image + k) * 6 + j];
          }
          gt[6 * n + j] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
  return {grad_input, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(stnpadim, CPU, m) {
  m.impl("affine_sample", &affine_sample_forward_kernel);
  m.impl("_affine_sample_backward", &affine_sample_backward_kernel);
}

}  // namespace stnpadim
