// CUDA kernels of affine_sample.
//
// Forward: one thread per output pixel (grid-stride), looping over channels. The
// pixel's sampling taps come from the shared per-pixel math once, then every channel
// reuses them; neighbouring threads read neighbouring input pixels and write coalesced.
// When there are too few pixels to fill the GPU, grid.z splits the channels as well.
// Backward: one thread per output pixel again, a 2-D grid whose y index is the image.
// grad_input is scattered with atomics into an accumulator of the math type (float32 for
// half types, so that the many taps landing on one pixel are not summed in 16 bits);
// theta's gradient is summed per thread, reduced across the block, then added with one
// atomic per block and matrix entry into a float32 (float64 for double) accumulator.
//
// Half and bfloat16 (the contract of stnpadim_ext.ops.affine_sample, as on the CPU):
// pixels and theta are read as such and upcast exactly; base coordinates, sampling
// coordinates, weights and sums are float32; each result is rounded once to the dtype. So
// a half result is the float32 result on the same (half) inputs, rounded. torch's own
// composition instead rounds affine_grid's coordinates to the dtype.
//
// Matching torch on CUDA: only taps inside the image are read, whatever their weight
// (an Inf pixel under a zero weight gives NaN, as in torch); NaN or infinite sampling
// points follow torch-CUDA's rule (affine::kOutside); the base coordinates are
// affine_grid's own (affine_base_coords), and setup.py builds without --use_fast_math,
// so coordinates round as in torch and nearest sampling breaks exact half-pixel ties
// the same way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "ops/affine_sample.h"
#include "ops/affine_sample_math.h"

namespace stnpadim {
namespace {

using namespace affine;

constexpr int kThreads = 256;

// Sizes and strides, as kernel arguments.
struct Shape {
  int64_t N, C, Ho, Wo;
  int32_t H, W;
  int64_t sN, sC, sH, sW;  // input strides (contiguous in the backward)
  int64_t padding;
  bool align_corners;
  bool narrow;  // all output pixel indices fit 32 bits: cheaper index arithmetic
};

// (q, r) = (a / b, a % b), in 32 bits when the indices allow (64-bit division is slow).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, bool narrow, int64_t& q, int64_t& r) {
  if (narrow) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = static_cast<uint32_t>(a) - q32 * static_cast<uint32_t>(b);
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// Sampling taps of one output pixel along one axis: pixel indices (already multiplied by
// the axis stride and clamped inside), whether each tap lies inside the image (taps in
// zero padding are never read), weights and d weight / d coord, where coord is the
// normalised coordinate (gx or gy). The interpolation mode is a template argument so
// that the tap loops unroll and the arrays stay in registers.
template <int64_t kMode>
constexpr int kTaps = kMode == kBicubic ? 4 : (kMode == kNearest ? 1 : 2);

template <typename T, int64_t kMode>
struct AxisTaps {
  int64_t off[kTaps<kMode>];
  bool in[kTaps<kMode>];
  T w[kTaps<kMode>];
  T d[kTaps<kMode>];
};

template <typename T, int64_t kMode>
__device__ __forceinline__ AxisTaps<T, kMode> axis_taps(T coord, const Axis<T>& a, int64_t stride,
                                                        int64_t padding) {
  AxisTaps<T, kMode> t;
  if constexpr (kMode == kBicubic) {
    const T x = unnormalize(coord, a);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const CubicTap<T> tap = cubic_tap(x, k, a, padding);
      t.off[k] = tap.index * stride;
      t.in[k] = tap.inside;
      t.w[k] = tap.w;
      t.d[k] = tap.d * a.scale;
    }
  } else if constexpr (kMode == kNearest) {
    T unused;
    const NearestTap tap = nearest_tap(source_coord(coord, a, padding, unused), a.size);
    t.off[0] = tap.index * stride;
    t.in[0] = tap.index == tap.unclamped;
    t.w[0] = T(1);
    t.d[0] = T(0);
  } else {
    T grad;
    const LinearTaps<T> tap = linear_taps<T, kOutside>(source_coord(coord, a, padding, grad), a.size);
    t.off[0] = tap.i0 * stride;
    t.off[1] = a.size > 1 ? t.off[0] + stride : t.off[0];
    t.in[0] = tap.in0;
    t.in[1] = tap.in1;
    t.w[0] = tap.w0;
    t.w[1] = tap.w1;
    t.d[0] = tap.d0 * grad;
    t.d[1] = tap.d1 * grad;
  }
  return t;
}

// affine_grid's normalised coordinates (gx, gy) of output pixel (h, w) of image n, from
// the base coordinates base_x [Wo] and base_y [Ho].
template <typename scalar_t, typename T>
__device__ __forceinline__ void grid_point(const scalar_t* __restrict__ theta, const T* __restrict__ base_x,
                                           const T* __restrict__ base_y, int64_t n, int64_t h, int64_t w,
                                           T& bx, T& by, T& gx, T& gy) {
  const scalar_t* th = theta + 6 * n;
  bx = base_x[w];
  by = base_y[h];
  gx = static_cast<T>(th[0]) * bx + static_cast<T>(th[1]) * by + static_cast<T>(th[2]);
  gy = static_cast<T>(th[3]) * bx + static_cast<T>(th[4]) * by + static_cast<T>(th[5]);
}

// Channels [blockIdx.z * channels_per_z, ...) of every output pixel.
template <typename scalar_t, int64_t kMode>
__global__ void __launch_bounds__(kThreads)
    affine_sample_forward_kernel_impl(const scalar_t* __restrict__ input, const scalar_t* __restrict__ theta,
                                      const at::opmath_type<scalar_t>* __restrict__ base_x,
                                      const at::opmath_type<scalar_t>* __restrict__ base_y,
                                      scalar_t* __restrict__ output, const Shape s, int64_t channels_per_z) {
  using T = at::opmath_type<scalar_t>;
  const Axis<T> ax = make_axis<T>(s.W, s.align_corners), ay = make_axis<T>(s.H, s.align_corners);
  const int64_t plane = s.Ho * s.Wo, total = s.N * plane;
  const int64_t c_begin = blockIdx.z * channels_per_z;
  const int64_t c_end = c_begin + channels_per_z < s.C ? c_begin + channels_per_z : s.C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t n, hw, h, w;
    divmod(i, plane, s.narrow, n, hw);
    divmod(hw, s.Wo, s.narrow, h, w);
    T bx, by, gx, gy;
    grid_point(theta, base_x, base_y, n, h, w, bx, by, gx, gy);
    const AxisTaps<T, kMode> tx = axis_taps<T, kMode>(gx, ax, s.sW, s.padding);
    const AxisTaps<T, kMode> ty = axis_taps<T, kMode>(gy, ay, s.sH, s.padding);
    const scalar_t* src = input + n * s.sN + c_begin * s.sC;
    scalar_t* dst = output + (n * s.C + c_begin) * plane + hw;
    for (int64_t c = c_begin; c < c_end; ++c, src += s.sC, dst += plane) {
      T acc = 0;
#pragma unroll
      for (int j = 0; j < kTaps<kMode>; ++j) {
        T row = 0;
#pragma unroll
        for (int k = 0; k < kTaps<kMode>; ++k) {
          // Taps in zero padding are not read: pixels sampling outside cost no bandwidth.
          const T v = ty.in[j] && tx.in[k] ? static_cast<T>(src[ty.off[j] + tx.off[k]]) : T(0);
          row += tx.w[k] * v;
        }
        acc += ty.w[j] * row;
      }
      *dst = static_cast<scalar_t>(acc);
    }
  }
}

// Sum of v over the block, valid in thread 0. `shared` holds one slot per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  __syncthreads();  // `shared` may still be read by the previous call
  if (lane == 0) {
    shared[warp] = v;
  }
  __syncthreads();
  T sum = 0;
  if (threadIdx.x == 0) {
    for (int k = 0; k < int(blockDim.x / warpSize); ++k) {
      sum += shared[k];
    }
  }
  return sum;
}

// grad_output, input and grad_input are contiguous. input is null unless theta_acc is set;
// grad_input and theta_acc are null when that gradient is not wanted. Nearest sampling
// has no theta gradient (the host fills zeros), so its instance has no theta code at all.
template <typename scalar_t, int64_t kMode>
__global__ void __launch_bounds__(kThreads) affine_sample_backward_kernel_impl(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ theta, const at::opmath_type<scalar_t>* __restrict__ base_x,
    const at::opmath_type<scalar_t>* __restrict__ base_y, at::opmath_type<scalar_t>* __restrict__ grad_input,
    at::opmath_type<scalar_t>* __restrict__ theta_acc, const Shape s) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool kTheta = kMode != kNearest;
  const Axis<T> ax = make_axis<T>(s.W, s.align_corners), ay = make_axis<T>(s.H, s.align_corners);
  const int64_t plane = s.Ho * s.Wo, in_plane = int64_t{s.H} * s.W;
  const int64_t gi_numel = s.N * s.C * in_plane;
  for (int64_t n = blockIdx.y; n < s.N; n += gridDim.y) {
    T sums[6] = {0, 0, 0, 0, 0, 0};
    for (int64_t hw = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; hw < plane;
         hw += int64_t{gridDim.x} * blockDim.x) {
      int64_t h, w;
      divmod(hw, s.Wo, s.narrow, h, w);
      T bx, by, gx, gy;
      grid_point(theta, base_x, base_y, n, h, w, bx, by, gx, gy);
      const AxisTaps<T, kMode> tx = axis_taps<T, kMode>(gx, ax, s.sW, s.padding);
      const AxisTaps<T, kMode> ty = axis_taps<T, kMode>(gy, ay, s.sH, s.padding);
      T dgx = 0, dgy = 0;  // d loss / d (gx, gy)
      for (int64_t c = 0; c < s.C; ++c) {
        const T g = static_cast<T>(grad_output[(n * s.C + c) * plane + hw]);
        const int64_t base = (n * s.C + c) * in_plane;
#pragma unroll
        for (int j = 0; j < kTaps<kMode>; ++j) {
          T row = 0, drow = 0;
#pragma unroll
          for (int k = 0; k < kTaps<kMode>; ++k) {
            const int64_t idx = base + ty.off[j] + tx.off[k];
            const bool inside = ty.in[j] && tx.in[k];
            // Every tap inside gets its share, even a zero one: 0 * NaN is NaN in torch too.
            if (grad_input != nullptr && inside) {
              at::native::fastAtomicAdd(grad_input, idx, gi_numel, ty.w[j] * tx.w[k] * g, true);
            }
            if constexpr (kTheta) {
              if (theta_acc != nullptr) {
                const T v = inside ? static_cast<T>(input[idx]) : T(0);
                row += tx.w[k] * v;
                drow += tx.d[k] * v;
              }
            }
          }
          if constexpr (kTheta) {
            dgx += g * ty.w[j] * drow;
            dgy += g * ty.d[j] * row;
          }
        }
      }
      if constexpr (kTheta) {
        sums[0] += dgx * bx;
        sums[1] += dgx * by;
        sums[2] += dgx;
        sums[3] += dgy * bx;
        sums[4] += dgy * by;
        sums[5] += dgy;
      }
    }
    if constexpr (kTheta) {
      __shared__ T shared[kThreads / 32];
      if (theta_acc != nullptr) {  // uniform across the block: every thread reaches the reduction
        for (int k = 0; k < 6; ++k) {
          const T total = block_sum(sums[k], shared);
          if (threadIdx.x == 0) {
            atomicAdd(theta_acc + 6 * n + k, total);
          }
        }
      }
    }
  }
}

int64_t grid_size(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
  return std::max<int64_t>(1, std::min(blocks, cap));
}

// How many slices grid.z cuts the C channels into: enough that (pixel blocks) x (slices)
// fills every SM with kThreads-thread blocks (2048 threads each), when N x Ho x Wo alone
// does not (a 56 x 56 map of one image makes 13 blocks).
int64_t channel_slices(int64_t pixel_blocks, int64_t C) {
  const int64_t want = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * (2048 / kThreads);
  const int64_t slices = (want + pixel_blocks - 1) / pixel_blocks;
  return std::max<int64_t>(1, std::min({slices, C, int64_t{65535}}));
}

// affine_base_coords of both output axes, in the kernels' math type.
std::pair<at::Tensor, at::Tensor> base_coords(const at::Tensor& theta, int64_t Ho, int64_t Wo,
                                              bool align_corners) {
  const auto options = theta.options().dtype(theta.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return {affine_base_coords(Wo, align_corners, options), affine_base_coords(Ho, align_corners, options)};
}

Shape make_shape(const at::Tensor& input, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                 int64_t padding, bool align_corners) {
  Shape s{};
  s.N = N;
  s.C = C;
  s.Ho = Ho;
  s.Wo = Wo;
  s.H = static_cast<int32_t>(H);
  s.W = static_cast<int32_t>(W);
  s.sN = input.defined() ? input.stride(0) : C * H * W;
  s.sC = input.defined() ? input.stride(1) : H * W;
  s.sH = input.defined() ? input.stride(2) : W;
  s.sW = input.defined() ? input.stride(3) : 1;
  s.padding = padding;
  s.align_corners = align_corners;
  s.narrow = N * Ho * Wo < (int64_t{1} << 31);
  return s;
}

at::Tensor affine_sample_forward_kernel(const at::Tensor& input, const at::Tensor& theta, int64_t out_h,
                                       int64_t out_w, int64_t interpolation, int64_t padding,
                                       bool align_corners) {
  check_affine_sample_args(input, theta, out_h, out_w, interpolation, padding);
  TORCH_CHECK(input.is_cuda(), "affine_sample: input must be a CUDA tensor here");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::empty({N, C, out_h, out_w}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor theta_c = theta.contiguous();
  const auto [base_x, base_y] = base_coords(theta, out_h, out_w, align_corners);
  const Shape s = make_shape(input, N, C, H, W, out_h, out_w, padding, align_corners);
  const int64_t blocks = grid_size(N * out_h * out_w);
  const int64_t slices = channel_slices(blocks, C);
  const int64_t per_slice = (C + slices - 1) / slices;
  const dim3 grid(static_cast<unsigned>(blocks), 1, static_cast<unsigned>((C + per_slice - 1) / per_slice));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_sample_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          input.const_data_ptr<scalar_t>(), theta_c.const_data_ptr<scalar_t>(),
          base_x.const_data_ptr<opmath_t>(), base_y.const_data_ptr<opmath_t>(),
          output.mutable_data_ptr<scalar_t>(), s, per_slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (interpolation == kBilinear) {
      launch(affine_sample_forward_kernel_impl<scalar_t, kBilinear>);
    } else if (interpolation == kNearest) {
      launch(affine_sample_forward_kernel_impl<scalar_t, kNearest>);
    } else {
      launch(affine_sample_forward_kernel_impl<scalar_t, kBicubic>);
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> affine_sample_backward_kernel(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& input, const at::Tensor& theta,
    int64_t in_h, int64_t in_w, int64_t interpolation, int64_t padding, bool align_corners,
    bool input_grad, bool theta_grad) {
  check_affine_sample_backward_args(grad_output, input, theta, in_h, in_w, interpolation, padding,
                                    theta_grad);
  TORCH_CHECK(grad_output.is_cuda(), "affine_sample backward: grad_output must be a CUDA tensor here");
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const int64_t N = grad_output.size(0), C = grad_output.size(1);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  // Scattered into the math type (float32 for half types), rounded to the dtype at the end.
  const auto acc_dtype = theta.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_input_acc = input_grad ? at::zeros({N, C, in_h, in_w}, grad_output.options().dtype(acc_dtype))
                                         : at::empty({0}, grad_output.options().dtype(acc_dtype));
  // Nearest sampling is piecewise constant: theta's gradient is zero.
  const bool reduce_theta = theta_grad && interpolation != kNearest;
  at::Tensor theta_acc = at::zeros({reduce_theta ? N : 0, 6}, theta.options().dtype(acc_dtype));
  auto finish = [&] {
    at::Tensor grad_theta = theta_grad ? theta_acc.view({-1, 2, 3}).to(theta.scalar_type())
                                       : at::empty({0}, theta.options());
    if (theta_grad && !reduce_theta) {
      grad_theta = at::zeros({N, 2, 3}, theta.options());
    }
    return std::make_tuple(grad_input_acc.to(grad_output.scalar_type()), grad_theta);
  };
  if (grad_output.numel() == 0 || (!input_grad && !reduce_theta)) {
    return finish();
  }
  // Atomic adds make the summation order vary from run to run.
  at::globalContext().alertNotDeterministic("affine_sample_backward_cuda");
  const at::Tensor gout = grad_output.contiguous();
  const at::Tensor x = reduce_theta ? input->contiguous() : at::Tensor();
  const at::Tensor theta_c = theta.contiguous();
  const auto [base_x, base_y] = base_coords(theta, Ho, Wo, align_corners);
  const Shape s = make_shape(x, N, C, in_h, in_w, Ho, Wo, padding, align_corners);
  const dim3 grid(static_cast<unsigned>(grid_size(Ho * Wo)), static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gout.scalar_type(), "affine_sample_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gout.const_data_ptr<scalar_t>(), reduce_theta ? x.const_data_ptr<scalar_t>() : nullptr,
          theta_c.const_data_ptr<scalar_t>(), base_x.const_data_ptr<opmath_t>(),
          base_y.const_data_ptr<opmath_t>(), input_grad ? grad_input_acc.mutable_data_ptr<opmath_t>() : nullptr,
          reduce_theta ? theta_acc.mutable_data_ptr<opmath_t>() : nullptr, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (interpolation == kBilinear) {
      launch(affine_sample_backward_kernel_impl<scalar_t, kBilinear>);
    } else if (interpolation == kNearest) {
      launch(affine_sample_backward_kernel_impl<scalar_t, kNearest>);
    } else {
      launch(affine_sample_backward_kernel_impl<scalar_t, kBicubic>);
    }
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(stnpadim, CUDA, m) {
  m.impl("affine_sample", &affine_sample_forward_kernel);
  m.impl("_affine_sample_backward", &affine_sample_backward_kernel);
}

}  // namespace stnpadim
