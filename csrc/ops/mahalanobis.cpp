// Schema and input checks of stnpadim::mahalanobis; kernels live in cpu/ and cuda/.
#include "ops/mahalanobis.h"

#include <torch/library.h>

#include "ops/mahalanobis_math.h"

namespace stnpadim {

void mahalanobis_check_inputs(const at::Tensor& emb, const at::Tensor& mean,
                              const at::Tensor& factor_packed) {
  TORCH_CHECK(emb.dim() == 3, "emb must have shape [B, C, P], got ", emb.sizes());
  TORCH_CHECK(at::isFloatingType(emb.scalar_type()),
              "emb must be a floating-point tensor, got ", emb.scalar_type());
  TORCH_CHECK(mean.dim() == 2, "mean must have shape [P, C], got ", mean.sizes());
  TORCH_CHECK(factor_packed.dim() == 2,
              "factor_packed must have shape [P, C(C+1)/2], got ", factor_packed.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat, "mean must be float32, got ", mean.scalar_type());
  TORCH_CHECK(factor_packed.scalar_type() == at::kFloat || factor_packed.scalar_type() == at::kBFloat16,
              "factor_packed must be float32 or bfloat16, got ", factor_packed.scalar_type());
  const int64_t dim = emb.size(1);
  const int64_t patches = emb.size(2);
  TORCH_CHECK(mean.size(0) == patches && mean.size(1) == dim, "mean must have shape [P, C] = [",
              patches, ", ", dim, "] to match emb ", emb.sizes(), ", got ", mean.sizes());
  TORCH_CHECK(factor_packed.size(0) == patches &&
                  factor_packed.size(1) == mahalanobis_math::packed_size(dim),
              "factor_packed must have shape [P, C(C+1)/2] = [", patches, ", ",
              mahalanobis_math::packed_size(dim), "] to match emb ", emb.sizes(), ", got ",
              factor_packed.sizes());
  TORCH_CHECK(mean.device() == emb.device(), "mean must be on emb's device ", emb.device(),
              ", got ", mean.device());
  TORCH_CHECK(factor_packed.device() == emb.device(), "factor_packed must be on emb's device ",
              emb.device(), ", got ", factor_packed.device());
}

at::ScalarType mahalanobis_result_type(const at::Tensor& emb) {
  return emb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor mahalanobis_kernel_factor(const at::Tensor& emb, const at::Tensor& factor_packed) {
  // float64 embeddings accumulate in float64 from a float32 factor (a bfloat16 one widens
  // exactly); the others read a bfloat16 factor as it is: half the bytes.
  const bool widen = factor_packed.scalar_type() == at::kBFloat16 && emb.scalar_type() == at::kDouble;
  return (widen ? factor_packed.to(at::kFloat) : factor_packed).contiguous();
}

TORCH_LIBRARY_FRAGMENT(stnpadim, m) {
  // Distances (not squared) [B, P] of emb [B, C, P] to per-patch Gaussians given by their
  // mean [P, C] and the packed lower factor of the precision [P, C(C+1)/2], float32 or
  // bfloat16 (half the bytes to read; accumulated in float32 either way).
  m.def("mahalanobis(Tensor emb, Tensor mean, Tensor factor_packed) -> Tensor");
}

}  // namespace stnpadim
