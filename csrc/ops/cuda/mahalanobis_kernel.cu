// Fused CUDA kernel of stnpadim::mahalanobis.
//
// One block per (patch, batch tile of kTile). The block stages d = emb - mean for its tile
// in shared memory, then each warp takes blocks of kRows factor rows: lanes stride over the
// columns j (coalesced reads of the packed rows, each factor element read once per block)
// and every lane keeps kRows x kTile = 32 partial products. A butterfly reduce-scatter
// leaves lane l with the full row product of value l, so squaring and summing need no
// further per-row reductions. kTile = 8 and kRows = 4 make each shared-memory read of d
// feed kRows FMAs and each factor load feed kTile FMAs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "ops/mahalanobis.h"
#include "ops/mahalanobis_math.h"

namespace stnpadim {
namespace {

using mahalanobis_math::packed_row_offset;
using mahalanobis_math::packed_size;

constexpr int kTile = 8;
constexpr int kRows = 4;
constexpr int kValues = kTile * kRows;  // one per lane after the reduce-scatter
constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
static_assert(kValues == kWarpSize, "the reduce-scatter maps one value to each lane");

// On entry each lane holds partial sums of kWarpSize values; on return lane l holds the
// warp-wide sum of value l in v[0]. Step kHalf keeps the lower or upper half of the live
// values (by the lane's bit kHalf) and adds the partner lane's copy of that half. kHalf
// is a template argument so every index is a constant and v stays in registers.
template <int kHalf, typename T>
__device__ __forceinline__ void warp_reduce_scatter(T (&v)[kWarpSize], int lane) {
  const bool upper = lane & kHalf;
#pragma unroll
  for (int k = 0; k < kHalf; ++k) {
    const T send = upper ? v[k] : v[k + kHalf];
    const T keep = upper ? v[k + kHalf] : v[k];
    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
  if constexpr (kHalf > 1) {
    warp_reduce_scatter<kHalf / 2>(v, lane);
  }
}

// A factor element through the read-only cache; bfloat16 widens exactly to float.
__device__ __forceinline__ float load_factor(const float* ptr) {
  return __ldg(ptr);
}

__device__ __forceinline__ float load_factor(const c10::BFloat16* ptr) {
  return static_cast<float>(
      c10::BFloat16(__ldg(reinterpret_cast<const unsigned short*>(ptr)), c10::BFloat16::from_bits()));
}

template <typename scalar_t, typename acc_t, typename factor_t>
__global__ void __launch_bounds__(kThreads)
    mahalanobis_kernel_impl(const scalar_t* __restrict__ emb, int64_t stride_b,
                            int64_t stride_c, int64_t stride_p,
                            const float* __restrict__ mean, const factor_t* __restrict__ factor,
                            acc_t* __restrict__ out, int64_t batch, int64_t dim,
                            int64_t patches, int64_t tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* d = reinterpret_cast<acc_t*>(smem);           // [dim][kTile]
  acc_t* partial = d + dim * kTile;                     // [kWarps][kTile]

  const int64_t p = blockIdx.x / tiles;
  const int64_t b0 = (blockIdx.x % tiles) * kTile;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t idx = threadIdx.x; idx < dim * kTile; idx += kThreads) {
    const int64_t j = idx / kTile;
    const int64_t b = b0 + idx % kTile;
    d[idx] = b < batch ? static_cast<acc_t>(emb[b * stride_b + j * stride_c + p * stride_p]) -
                             static_cast<acc_t>(mean[p * dim + j])
                       : acc_t(0);
  }
  __syncthreads();

  const factor_t* patch_factor = factor + p * packed_size(dim);
  acc_t sq = 0;  // lane l: sum of y^2 over its rows, for batch element l % kTile
  for (int64_t i0 = int64_t(warp) * kRows; i0 < dim; i0 += int64_t(kWarps) * kRows) {
    acc_t acc[kValues];
#pragma unroll
    for (int k = 0; k < kValues; ++k) {
      acc[k] = acc_t(0);
    }
    const int64_t last = (i0 + kRows < dim ? i0 + kRows : dim) - 1;  // longest row of the block
    for (int64_t j = lane; j <= last; j += kWarpSize) {
      acc_t dj[kTile];
#pragma unroll
      for (int b = 0; b < kTile; ++b) {
        dj[b] = d[j * kTile + b];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = i0 + r;
        // Entries past the row are skipped, not multiplied by a zero factor: an Inf in d
        // must give Inf, not 0 * Inf = NaN (as in the CPU kernel).
        if (row < dim && j <= row) {
          const acc_t l = static_cast<acc_t>(load_factor(patch_factor + packed_row_offset(row) + j));
#pragma unroll
          for (int b = 0; b < kTile; ++b) {
            acc[r * kTile + b] += l * dj[b];
          }
        }
      }
    }
    warp_reduce_scatter<kWarpSize / 2>(acc, lane);
    const acc_t y = acc[0];  // row i0 + lane / kTile, batch element b0 + lane % kTile
    sq += y * y;
  }
  // Lanes l, l ^ 8, l ^ 16, l ^ 24 hold the same batch element.
#pragma unroll
  for (int offset = kTile; offset < kWarpSize; offset *= 2) {
    sq += __shfl_xor_sync(0xffffffffu, sq, offset);
  }
  if (lane < kTile) {
    partial[warp * kTile + lane] = sq;
  }
  __syncthreads();
  if (threadIdx.x < kTile && b0 + threadIdx.x < batch) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += partial[w * kTile + threadIdx.x];
    }
    out[(b0 + threadIdx.x) * patches + p] = sqrt(total);
  }
}

template <typename scalar_t, typename acc_t, typename factor_t>
void launch(const at::Tensor& emb, const at::Tensor& mean, const at::Tensor& factor, at::Tensor& out,
            int64_t tiles, cudaStream_t stream) {
  const int64_t batch = emb.size(0), dim = emb.size(1), patches = emb.size(2);
  const size_t smem = sizeof(acc_t) * (dim * kTile + kWarps * kTile);
  const auto kernel = mahalanobis_kernel_impl<scalar_t, acc_t, factor_t>;
  if (smem > 48 * 1024) {
    const int64_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(static_cast<int64_t>(smem) <= limit, "emb has C=", dim,
                " channels, more than the CUDA kernel's shared memory allows (", limit, " bytes)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned int>(patches * tiles), kThreads, smem, stream>>>(
      emb.const_data_ptr<scalar_t>(), emb.stride(0), emb.stride(1), emb.stride(2),
      mean.const_data_ptr<float>(), factor.const_data_ptr<factor_t>(), out.mutable_data_ptr<acc_t>(),
      batch, dim, patches, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mahalanobis_forward_kernel(const at::Tensor& emb, const at::Tensor& mean,
                                      const at::Tensor& factor_packed) {
  mahalanobis_check_inputs(emb, mean, factor_packed);
  TORCH_CHECK(emb.is_cuda(), "emb must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(emb.device());
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor factor_c = mahalanobis_kernel_factor(emb, factor_packed);
  const bool bf16_factor = factor_c.scalar_type() == at::kBFloat16;
  const int64_t batch = emb.size(0), dim = emb.size(1), patches = emb.size(2);
  at::Tensor out = at::empty({batch, patches}, emb.options().dtype(mahalanobis_result_type(emb)));
  if (out.numel() == 0) {
    return out;
  }
  const int64_t tiles = (batch + kTile - 1) / kTile;
  TORCH_CHECK(patches * tiles <= std::numeric_limits<int32_t>::max(),
              "emb has too many patches x batch tiles for one launch: ", patches * tiles);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, emb.scalar_type(), "mahalanobis_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (bf16_factor) {
            return launch<scalar_t, acc_t, c10::BFloat16>(emb, mean_c, factor_c, out, tiles, stream);
          }
        }
        launch<scalar_t, acc_t, float>(emb, mean_c, factor_c, out, tiles, stream);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stnpadim, CUDA, m) {
  m.impl("mahalanobis", &mahalanobis_forward_kernel);
}

}  // namespace stnpadim
