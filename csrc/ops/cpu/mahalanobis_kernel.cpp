// Fused CPU kernel of stnpadim::mahalanobis.
//
// Parallel over blocks of patches. A block's batch tiles are staged as d = emb - mean
// (accumulator precision, lanes = batch elements; the only temporary, a few MB at most),
// then per patch the packed factor is streamed row by row: y_i = L[i][0..i] . d with the
// squares reduced on the fly. A patch's factor is read from memory once; its other batch
// tiles find it in cache.
//
// Two micro-kernels, both written with GCC vector extensions so one source compiles for
// AVX-512, AVX2 and baseline x86-64 (target_clones picks one at load time; we build
// without -march=native):
//  * tile_sq_norm: vector lanes run over the batch; a block of kRowBlock rows shares each
//    load of d[j] and broadcasts one factor element per row (register-blocked, no
//    horizontal sums, no tails over j).
//  * single_sq_norm: for a lone batch element; lanes run over j (a dot product per row,
//    the row's tail as one masked vector), which is what memory bandwidth allows for
//    B = 1 anyway.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops/mahalanobis.h"
#include "ops/mahalanobis_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STNPADIM_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STNPADIM_ISA_CLONES
#endif
// Inlined into each ISA clone, so the vector code is compiled once per target.
#define STNPADIM_INLINE inline __attribute__((always_inline))

// Vector types only pass between always-inline functions, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace stnpadim {
namespace {

using mahalanobis_math::packed_row_offset;
using mahalanobis_math::packed_size;
using mahalanobis_math::row_dot;

template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
};

// Eight rows share each load of d[j]: 8 accumulators fit the 16 AVX2 / 32 AVX-512 registers.
constexpr int kRowBlock = 8;

template <typename V, typename T>
STNPADIM_INLINE V load(const T* ptr) {
  V v;
  std::memcpy(&v, ptr, sizeof(V));  // an unaligned vector load
  return v;
}

// Sum over rows of y_i^2 for one batch tile: d is [dim][lanes] (zero-padded lanes), the
// result lanes go to out.
template <typename acc_t, int kBytes>
STNPADIM_INLINE void tile_sq_norm(const float* factor, const acc_t* d, int64_t dim,
                                  acc_t* out) {
  using V = typename Vec<acc_t, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(acc_t);
  V sq = {};
  int64_t i0 = 0;
  for (; i0 + kRowBlock <= dim; i0 += kRowBlock) {
    const float* rows[kRowBlock];
    V acc[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) {
      rows[r] = factor + packed_row_offset(i0 + r);
      acc[r] = V{};
    }
    // The block's rows are interleaved streams the hardware prefetcher follows poorly, so
    // fetch the next block's rows (contiguous after these) while this one computes.
    const float* next = factor + packed_row_offset(i0 + kRowBlock);
    for (int64_t j = 0; j <= i0; ++j) {
      __builtin_prefetch(next + kRowBlock * j);
      const V x = load<V>(d + j * kLanes);
      for (int r = 0; r < kRowBlock; ++r) {
        acc[r] += static_cast<acc_t>(rows[r][j]) * x;
      }
    }
    // Row i0 + r also has the columns i0 + 1 .. i0 + r of the diagonal block.
    for (int r = 1; r < kRowBlock; ++r) {
      for (int64_t j = i0 + 1; j <= i0 + r; ++j) {
        acc[r] += static_cast<acc_t>(rows[r][j]) * load<V>(d + j * kLanes);
      }
    }
    for (int r = 0; r < kRowBlock; ++r) {
      sq += acc[r] * acc[r];
    }
  }
  for (; i0 < dim; ++i0) {
    const float* row = factor + packed_row_offset(i0);
    V acc = {};
    for (int64_t j = 0; j <= i0; ++j) {
      acc += static_cast<acc_t>(row[j]) * load<V>(d + j * kLanes);
    }
    sq += acc * acc;
  }
  std::memcpy(out, &sq, sizeof(V));
}

// Sum of the lanes, by halving (a tree: log2(lanes) dependent adds, not lanes).
template <typename T, int kBytes>
STNPADIM_INLINE T hsum(typename Vec<T, kBytes>::type v) {
  if constexpr (kBytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    using H = typename Vec<T, kBytes / 2>::type;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum<T, kBytes / 2>(lo + hi);
  }
}

// Sum over rows of y_i^2 for one batch element: d is [dim] contiguous, readable (any
// value) for kLanes elements past its end. factor_end bounds reads of the factor.
template <typename acc_t>
STNPADIM_INLINE acc_t single_sq_norm(const float* factor, const acc_t* d, int64_t dim,
                                     const float* factor_end) {
  using V = typename Vec<acc_t, 64>::type;
  constexpr int64_t kLanes = 64 / sizeof(acc_t);
  using F = typename Vec<float, kLanes * sizeof(float)>::type;  // floats filling one V
  using Index = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  using I = typename Vec<Index, 64>::type;
  I lane;
  for (int64_t k = 0; k < kLanes; ++k) {
    lane[k] = static_cast<Index>(k);
  }
  acc_t sq = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const float* row = factor + packed_row_offset(i);
    const int64_t len = i + 1;
    V a0 = {}, a1 = {};  // two chains hide the FMA latency
    int64_t j = 0;
    for (; j + 2 * kLanes <= len; j += 2 * kLanes) {
      a0 += __builtin_convertvector(load<F>(row + j), V) * load<V>(d + j);
      a1 += __builtin_convertvector(load<F>(row + j + kLanes), V) * load<V>(d + j + kLanes);
    }
    if (j + kLanes <= len) {
      a0 += __builtin_convertvector(load<F>(row + j), V) * load<V>(d + j);
      j += kLanes;
    }
    acc_t y = 0;
    if (j < len && row + j + kLanes <= factor_end) {
      // The tail as one full vector: lanes past the row (the next row's factor, d past
      // the row) are selected away, not multiplied by zero, so no NaN can leak in.
      const V prod = __builtin_convertvector(load<F>(row + j), V) * load<V>(d + j);
      a1 += lane < static_cast<Index>(len - j) ? prod : V{};
    } else {
      y = row_dot(row, d, 1, j, len);
    }
    y += hsum<acc_t, 64>(a0 + a1);
    sq += y * y;
  }
  return sq;
}

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* emb;
  int64_t stride_b, stride_c, stride_p;
  const float* mean;
  const float* factor;
  acc_t* out;  // [B, P] contiguous
  int64_t batch, dim, patches;
};

// Lane counts of the wide and the narrow tile (64- and 32-byte vectors).
template <typename acc_t>
constexpr int64_t kWide = 64 / sizeof(acc_t);
template <typename acc_t>
constexpr int64_t kNarrow = 32 / sizeof(acc_t);

// Patches staged together. For [B, C, P] input, staging reads emb[b, j, p0 : p0 + block]
// from B * C rows on as many pages: a wide block spreads each page walk and cache-line
// miss over many patches (patch by patch, staging cost more than the arithmetic).
constexpr int64_t kPatchBlock = 64;
// ... as long as the staged tiles of one block stay within this (L2/L3-sized) budget.
constexpr int64_t kStageBytes = 2 * 1024 * 1024;

// A batch tile: lanes batch elements from b0 (n of them real, the rest zero padding),
// staged at offset in a patch's buffer as d[j * lanes + l].
struct Tile {
  int64_t b0, n, lanes, offset;
};

template <typename acc_t>
std::vector<Tile> plan_tiles(int64_t batch, int64_t dim) {
  // A tile with fewer live lanes than this costs more padded than one dot product per lane.
  constexpr int64_t kMinNarrow = kNarrow<acc_t> / 4 > 1 ? kNarrow<acc_t> / 4 : 2;
  std::vector<Tile> tiles;
  int64_t offset = 0;
  auto add = [&](int64_t b0, int64_t n, int64_t lanes) {
    tiles.push_back({b0, n, lanes, offset});
    offset += lanes * dim;
  };
  for (int64_t b0 = 0; b0 < batch; b0 += kWide<acc_t>) {
    const int64_t n = std::min(kWide<acc_t>, batch - b0);
    if (n > kNarrow<acc_t>) {
      add(b0, n, kWide<acc_t>);
    } else if (n >= kMinNarrow) {
      add(b0, n, kNarrow<acc_t>);
    } else {
      for (int64_t l = 0; l < n; ++l) {
        add(b0 + l, 1, 1);
      }
    }
  }
  return tiles;
}

// Stages d = emb - mean for patches p0 .. p0 + np - 1 into buf (patch_stride apart).
// Lanes innermost, so each destination line is written whole; the source lines (one per
// lane) stay in L1 across the patches.
template <typename scalar_t, typename acc_t>
STNPADIM_INLINE void stage(const Args<scalar_t, acc_t>& a, const std::vector<Tile>& tiles,
                           int64_t p0, int64_t np, int64_t patch_stride, acc_t* buf) {
  const float* mean = a.mean + p0 * a.dim;
  for (const Tile& t : tiles) {
    const scalar_t* src = a.emb + t.b0 * a.stride_b + p0 * a.stride_p;
    if (t.lanes == 1) {
      // Patch by patch: mean and d stream contiguously; the emb lines (one per channel,
      // shared by the neighbouring patches) stay in L1 across them.
      for (int64_t q = 0; q < np; ++q) {
        const scalar_t* col = src + q * a.stride_p;
        const float* m = mean + q * a.dim;
        acc_t* dst = buf + q * patch_stride + t.offset;
        for (int64_t j = 0; j < a.dim; ++j) {
          dst[j] = static_cast<acc_t>(col[j * a.stride_c]) - m[j];
        }
      }
      continue;
    }
    for (int64_t j = 0; j < a.dim; ++j) {
      for (int64_t q = 0; q < np; ++q) {
        const scalar_t* col = src + j * a.stride_c + q * a.stride_p;
        const acc_t m = mean[q * a.dim + j];
        acc_t* dst = buf + q * patch_stride + t.offset + j * t.lanes;
        for (int64_t l = 0; l < t.n; ++l) {
          dst[l] = static_cast<acc_t>(col[l * a.stride_b]) - m;
        }
        for (int64_t l = t.n; l < t.lanes; ++l) {
          dst[l] = acc_t(0);
        }
      }
    }
  }
}

// Prefetches slice `part` of `parts` of the lines that stage() will read of the
// single-lane tiles for patches p0 .. p0 + np - 1 (and their mean). For a lone embedding
// these are a line or two per channel on as many pages: fetched in one go at staging,
// the misses stall the core for about a tenth of the patches' time.
template <typename scalar_t, typename acc_t>
STNPADIM_INLINE void prefetch_stage(const Args<scalar_t, acc_t>& a, const std::vector<Tile>& tiles,
                                    int64_t p0, int64_t np, int64_t part, int64_t parts) {
  constexpr int64_t kLine = 64;
  const char* mean = reinterpret_cast<const char*>(a.mean + p0 * a.dim);
  const int64_t mean_lines = (np * a.dim * static_cast<int64_t>(sizeof(float)) + kLine - 1) / kLine;
  for (int64_t k = mean_lines * part / parts; k < mean_lines * (part + 1) / parts; ++k) {
    __builtin_prefetch(mean + k * kLine);
  }
  // A [dim, np] box of emb per tile: runs along the axis of the smaller stride.
  const bool channel_runs = a.stride_c < a.stride_p;
  const int64_t outer_n = channel_runs ? np : a.dim, inner_n = channel_runs ? a.dim : np;
  const int64_t outer_stride = channel_runs ? a.stride_p : a.stride_c;
  const int64_t inner_bytes = (channel_runs ? a.stride_c : a.stride_p) * sizeof(scalar_t);
  const int64_t inner_step = inner_bytes >= kLine ? 1 : kLine / std::max<int64_t>(inner_bytes, 1);
  for (const Tile& t : tiles) {
    if (t.lanes != 1) {
      continue;
    }
    const scalar_t* src = a.emb + t.b0 * a.stride_b + p0 * a.stride_p;
    for (int64_t o = outer_n * part / parts; o < outer_n * (part + 1) / parts; ++o) {
      const char* run = reinterpret_cast<const char*>(src + o * outer_stride);
      for (int64_t k = 0; k < inner_n; k += inner_step) {
        __builtin_prefetch(run + k * inner_bytes);
      }
      __builtin_prefetch(run + (inner_n - 1) * inner_bytes);
    }
  }
}

// Patches p0 .. p0 + np - 1; next_p0 (if below the patch count) is the block that this
// thread does next, whose staging input is prefetched meanwhile.
template <typename scalar_t, typename acc_t>
STNPADIM_INLINE void patch_block(const Args<scalar_t, acc_t>& a, const std::vector<Tile>& tiles,
                                 int64_t patch_stride, int64_t p0, int64_t np, int64_t next_p0,
                                 int64_t block, std::vector<acc_t>& buf) {
  stage(a, tiles, p0, np, patch_stride, buf.data());
  const bool prefetch = next_p0 < a.patches;
  const int64_t next_np = std::min(block, a.patches - next_p0);
  const float* factor_end = a.factor + a.patches * packed_size(a.dim);
  acc_t sq[kWide<acc_t>];
  for (int64_t q = 0; q < np; ++q) {
    if (prefetch) {
      prefetch_stage(a, tiles, next_p0, next_np, q, np);
    }
    const int64_t p = p0 + q;
    const float* factor = a.factor + p * packed_size(a.dim);
    const acc_t* d = buf.data() + q * patch_stride;
    for (const Tile& t : tiles) {
      if (t.lanes == kWide<acc_t>) {
        tile_sq_norm<acc_t, 64>(factor, d + t.offset, a.dim, sq);
      } else if (t.lanes == kNarrow<acc_t>) {
        tile_sq_norm<acc_t, 32>(factor, d + t.offset, a.dim, sq);
      } else {
        sq[0] = single_sq_norm(factor, d + t.offset, a.dim, factor_end);
      }
      for (int64_t l = 0; l < t.n; ++l) {
        a.out[(t.b0 + l) * a.patches + p] = std::sqrt(sq[l]);
      }
    }
  }
}

// Claims patch blocks from a shared counter until none is left: threads that the shared
// machine slows down take fewer blocks instead of holding up the others.
template <typename scalar_t, typename acc_t>
STNPADIM_INLINE void worker(const Args<scalar_t, acc_t>& a, std::atomic<int64_t>& next_block) {
  const std::vector<Tile> tiles = plan_tiles<acc_t>(a.batch, a.dim);
  const int64_t patch_stride = tiles.back().offset + tiles.back().lanes * a.dim;
  const int64_t block = std::clamp<int64_t>(
      kStageBytes / static_cast<int64_t>(patch_stride * sizeof(acc_t)), 1, kPatchBlock);
  // kWide spare elements: single_sq_norm reads a full vector at the end of d.
  std::vector<acc_t> buf(static_cast<size_t>(block * patch_stride + kWide<acc_t>));
  // A lone embedding claims its next block before this one is done, so that the block's
  // input can be fetched meanwhile. Batches do not: their blocks are long, and a thread
  // that the shared machine preempts would hold two of them back from the others.
  const bool ahead = tiles.front().lanes == 1;
  int64_t p0 = block * next_block++;
  while (p0 < a.patches) {
    const int64_t next_p0 = ahead ? block * next_block++ : a.patches;
    patch_block(a, tiles, patch_stride, p0, std::min(block, a.patches - p0), next_p0, block, buf);
    p0 = ahead ? next_p0 : block * next_block++;
  }
}

// One entry point per input dtype, each cloned per ISA.
#define STNPADIM_WORKER(scalar_t, acc_t)                                                   \
  STNPADIM_ISA_CLONES void worker_entry(const Args<scalar_t, acc_t>& a,                    \
                                        std::atomic<int64_t>& next_block) {                \
    worker(a, next_block);                                                                 \
  }
STNPADIM_WORKER(float, float)
STNPADIM_WORKER(double, double)
STNPADIM_WORKER(c10::Half, float)
STNPADIM_WORKER(c10::BFloat16, float)
#undef STNPADIM_WORKER

at::Tensor mahalanobis_forward_kernel(const at::Tensor& emb, const at::Tensor& mean,
                                      const at::Tensor& factor_packed) {
  mahalanobis_check_inputs(emb, mean, factor_packed);
  TORCH_CHECK(emb.device().is_cpu(), "emb must be a CPU tensor");
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor factor_c = factor_packed.contiguous();
  const int64_t batch = emb.size(0), dim = emb.size(1), patches = emb.size(2);
  at::Tensor out = at::empty({batch, patches}, emb.options().dtype(mahalanobis_result_type(emb)));
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, emb.scalar_type(), "mahalanobis_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Args<scalar_t, acc_t> args{emb.const_data_ptr<scalar_t>(),
                                         emb.stride(0), emb.stride(1), emb.stride(2),
                                         mean_c.const_data_ptr<float>(),
                                         factor_c.const_data_ptr<float>(),
                                         out.mutable_data_ptr<acc_t>(),
                                         batch, dim, patches};
        std::atomic<int64_t> next_block{0};
        at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            worker_entry(args, next_block);
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stnpadim, CPU, m) {
  m.impl("mahalanobis", &mahalanobis_forward_kernel);
}

}  // namespace stnpadim
