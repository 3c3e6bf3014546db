// Per-element math of the fused Mahalanobis op, shared by the CPU and CUDA kernels.
//
// The model stores, per patch, the lower factor L of the precision (precision = L^T L),
// packed row-major: row i holds L[i][0..i] and starts at i * (i + 1) / 2. The squared
// distance of x is ||L (x - mean)||^2, i.e. the sum over rows of y_i^2 with
// y_i = sum_{j <= i} L[i][j] * d[j] and d = x - mean.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace stnpadim {
namespace mahalanobis_math {

// int64 throughout: patches * C(C+1)/2 exceeds 2^31 for C = 550 and P = 3136.
C10_HOST_DEVICE inline int64_t packed_row_offset(int64_t row) {
  return row * (row + 1) / 2;
}

C10_HOST_DEVICE inline int64_t packed_size(int64_t dim) {
  return dim * (dim + 1) / 2;
}

// Partial row product: sum over j in [begin, end) of row[j] * d[j * d_stride].
template <typename acc_t, typename factor_t>
C10_HOST_DEVICE inline acc_t row_dot(const factor_t* row, const acc_t* d, int64_t d_stride,
                                     int64_t begin, int64_t end) {
  acc_t sum = acc_t(0);
  for (int64_t j = begin; j < end; ++j) {
    sum += static_cast<acc_t>(row[j]) * d[j * d_stride];
  }
  return sum;
}

}  // namespace mahalanobis_math
}  // namespace stnpadim
