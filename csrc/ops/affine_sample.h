// affine_sample: argument checks shared by the CPU and CUDA kernels (defined in
// affine_sample.cpp beside the schemas), so every backend fails with the same messages.
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

}  // namespace stnpadim
