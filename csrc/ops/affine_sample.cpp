// affine_sample: schemas and the argument checks every backend runs.
//
// The forward samples input [N, C, H, W] at affine_grid(theta [N, 2, 3]) of size
// [out_h, out_w], as F.grid_sample(F.affine_grid(...)) does, without building the grid.
// The private backward takes the input's spatial size so the input itself is only needed
// (and only saved) when theta's gradient is asked for. Autograd and fake kernels are
// registered from Python (stnpadim_ext/ops/affine_sample.py).
#include "ops/affine_sample.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "ops/affine_sample_math.h"

namespace stnpadim {
namespace {

// float16 / bfloat16 are computed in float32 on every device (see the kernels).
bool supported_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_modes(int64_t interpolation, int64_t padding) {
  TORCH_CHECK(interpolation >= affine::kBilinear && interpolation <= affine::kBicubic,
              "affine_sample: interpolation must be 0 (bilinear), 1 (nearest) or 2 (bicubic), got ",
              interpolation);
  TORCH_CHECK(padding >= affine::kZeros && padding <= affine::kReflection,
              "affine_sample: padding must be 0 (zeros), 1 (border) or 2 (reflection), got ", padding);
}

void check_theta(const at::Tensor& theta, const at::Tensor& like, int64_t n) {
  TORCH_CHECK(theta.dim() == 3 && theta.size(1) == 2 && theta.size(2) == 3,
              "affine_sample: theta must have shape [N, 2, 3], got ", theta.sizes());
  TORCH_CHECK(theta.size(0) == n, "affine_sample: theta has ", theta.size(0),
              " matrices but the batch has ", n, " images");
  TORCH_CHECK(theta.device() == like.device(), "affine_sample: theta is on ", theta.device(),
              " but the images are on ", like.device());
  TORCH_CHECK(theta.scalar_type() == like.scalar_type(), "affine_sample: theta dtype ",
              theta.scalar_type(), " differs from the images' dtype ", like.scalar_type());
}

}  // namespace

void check_affine_sample_args(const at::Tensor& input, const at::Tensor& theta, int64_t out_h,
                              int64_t out_w, int64_t interpolation, int64_t padding) {
  TORCH_CHECK(input.dim() == 4, "affine_sample: input must be a 4-D tensor [N, C, H, W], got ",
              input.dim(), "-D");
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0,
              "affine_sample: input must have a non-empty spatial size, got ", input.sizes());
  // The kernels index a channel plane with int32 offsets.
  TORCH_CHECK(input.size(2) * input.size(3) < std::numeric_limits<int32_t>::max(),
              "affine_sample: input planes must have fewer than 2^31 pixels, got ", input.sizes());
  TORCH_CHECK(supported_dtype(input), "affine_sample: input dtype ", input.scalar_type(),
              " is not supported on ", input.device().type(),
              " (float32, float64, float16, bfloat16)");
  check_theta(theta, input, input.size(0));
  TORCH_CHECK(out_h > 0 && out_w > 0, "affine_sample: output size must be positive, got (",
              out_h, ", ", out_w, ")");
  check_modes(interpolation, padding);
}

void check_affine_sample_backward_args(const at::Tensor& grad_output,
                                       const std::optional<at::Tensor>& input,
                                       const at::Tensor& theta, int64_t in_h, int64_t in_w,
                                       int64_t interpolation, int64_t padding, bool theta_grad) {
  TORCH_CHECK(grad_output.dim() == 4, "affine_sample backward: grad_output must be 4-D, got ",
              grad_output.dim(), "-D");
  TORCH_CHECK(supported_dtype(grad_output), "affine_sample backward: grad_output dtype ",
              grad_output.scalar_type(), " is not supported on ", grad_output.device().type());
  TORCH_CHECK(in_h > 0 && in_w > 0 && in_h * in_w < std::numeric_limits<int32_t>::max(),
              "affine_sample backward: input size must be positive and under 2^31 pixels, got (",
              in_h, ", ", in_w, ")");
  check_theta(theta, grad_output, grad_output.size(0));
  check_modes(interpolation, padding);
  const bool needs_input = theta_grad && interpolation != affine::kNearest;
  TORCH_CHECK(!needs_input || input.has_value(),
              "affine_sample backward: input is needed for theta's gradient");
  if (input.has_value()) {
    const auto& x = *input;
    TORCH_CHECK(x.dim() == 4 && x.size(0) == grad_output.size(0) && x.size(1) == grad_output.size(1) &&
                    x.size(2) == in_h && x.size(3) == in_w,
                "affine_sample backward: input has shape ", x.sizes(), ", expected [",
                grad_output.size(0), ", ", grad_output.size(1), ", ", in_h, ", ", in_w, "]");
    TORCH_CHECK(x.device() == grad_output.device() && x.scalar_type() == grad_output.scalar_type(),
                "affine_sample backward: input and grad_output differ in device or dtype");
  }
}

// The same ATen calls affine_grid makes (linspace, then * (n - 1) / n without
// align_corners), so the coordinates are affine_grid's to the last bit on each device: a
// closed formula cannot be, since torch's CPU linspace rounds per vector chunk and its
// CUDA division by a scalar multiplies by the reciprocal. Nearest sampling at exact
// half-pixels (any 2x downsampling) picks its pixel by those last bits.
at::Tensor affine_base_coords(int64_t n, bool align_corners, const at::TensorOptions& options) {
  if (n <= 1) {
    return at::zeros({n}, options);
  }
  at::Tensor range = at::linspace(-1, 1, n, options);
  if (!align_corners) {
    range = range * (n - 1) / n;
  }
  return range;
}

TORCH_LIBRARY_FRAGMENT(stnpadim, m) {
  m.def(
      "affine_sample(Tensor input, Tensor theta, SymInt out_h, SymInt out_w, int interpolation, "
      "int padding, bool align_corners) -> Tensor");
  m.def(
      "_affine_sample_backward(Tensor grad_output, Tensor? input, Tensor theta, SymInt in_h, "
      "SymInt in_w, int interpolation, int padding, bool align_corners, bool input_grad, "
      "bool theta_grad) -> (Tensor, Tensor)");
}

}  // namespace stnpadim
