// affine_sample: argument checks and base coordinates shared by the CPU and CUDA kernels
// (defined in affine_sample.cpp beside the schemas), so every backend fails with the same
// messages and samples at the same points as torch on its device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace stnpadim {

void check_affine_sample_args(const at::Tensor& input, const at::Tensor& theta, int64_t out_h,
                              int64_t out_w, int64_t interpolation, int64_t padding);

void check_affine_sample_backward_args(const at::Tensor& grad_output,
                                       const std::optional<at::Tensor>& input,
                                       const at::Tensor& theta, int64_t in_h, int64_t in_w,
                                       int64_t interpolation, int64_t padding, bool theta_grad);

// affine_grid's base coordinates of an axis of n output pixels, [n] in `options`' dtype
// and device: x (or y) of pixel i before theta is applied.
at::Tensor affine_base_coords(int64_t n, bool align_corners, const at::TensorOptions& options);

}  // namespace stnpadim
