// Host-side API of the fused Mahalanobis op, shared by its schema file and its kernels.
#pragma once

#include <ATen/ATen.h>

namespace stnpadim {

// Validates emb [B, C, P] (any strides), mean [P, C] and factor_packed [P, C(C+1)/2]
// (float32; the factor float32 or bfloat16; on emb's device); errors name the offending
// argument.
void mahalanobis_check_inputs(const at::Tensor& emb, const at::Tensor& mean,
                              const at::Tensor& factor_packed);

// The contiguous factor the kernels read: bfloat16 as given, except for float64 embeddings
// (then float32); else float32.
at::Tensor mahalanobis_kernel_factor(const at::Tensor& emb, const at::Tensor& factor_packed);

// float64 for float64 embeddings, float32 otherwise.
at::ScalarType mahalanobis_result_type(const at::Tensor& emb);

}  // namespace stnpadim
