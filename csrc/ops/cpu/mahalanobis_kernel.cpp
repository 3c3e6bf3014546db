// Fused CPU kernel of stnpadim::mahalanobis.
//
// Parallel over blocks of patches. A block's batch tiles are staged as d = emb - mean
// (accumulator precision, lanes = batch elements; the only temporary, a few MB at most),
// then per patch the packed factor is streamed row by row: y_i = L[i][0..i] . d with the
// squares reduced on the fly. The rows come in panels that fit L2, and every batch tile
// runs over a panel before the next is read: a patch's factor is read from memory once,
// whatever the batch (C = 550: 605 KB per patch, more than a core's L2).
//
// A bfloat16 factor is widened to float32 as it is read (exactly: the upper half of a float),
// halving the bytes per patch, which is what bounds the time of small batches.
//
// Compiled once per instruction-set variant (cpu_capability.h), with vector and tile
// widths that follow it, in GCC vector extensions:
//  * tile_rows: vector lanes run over the batch; a block of rows shares each load of d[j]
//    and broadcasts one factor element per row (register-blocked, no horizontal sums, no
//    tails over j). A tile is one vector register or a pair of them, with as many rows as
//    leave the accumulators in registers (16 registers below AVX-512, 32 with it).
//  * single_rows: for a lone batch element; lanes run over j (a dot product per row, the
//    row's tail as one masked vector), which is what memory bandwidth allows for B = 1.
// plan_tiles covers the batch with the cheapest mix of these (a cost per tile kind), so
// no batch size pays for padding a wide tile: B = 9 is an 8-lane tile plus one dot product
// per row on AVX2, not a half-empty 16-lane tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/transpose8.h"
#include "ops/mahalanobis.h"
#include "ops/mahalanobis_math.h"

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

template <typename V, typename T>
STNPADIM_INLINE V load(const T* ptr) {
  V v;
  std::memcpy(&v, ptr, sizeof(V));  // an unaligned vector load
  return v;
}

// Adds to sq the squares of rows i0 .. i0 + kRows - 1 for one batch tile of kVecs vectors
// of kBytes: d is [dim][lanes] (zero-padded lanes), lanes = kVecs * kBytes / sizeof(acc_t);
// panel holds the packed float32 rows from the one at packed offset base. The kRows rows
// share each load of d[j], and their kRows * kVecs accumulators are independent chains.
template <typename acc_t, int kBytes, int kVecs, int kRows, typename V = typename Vec<acc_t, kBytes>::type>
STNPADIM_INLINE void row_block(const float* panel, int64_t base, const acc_t* d, int64_t i0, V (&sq)[kVecs]) {
  constexpr int64_t kLanes = kBytes / sizeof(acc_t);
  constexpr int64_t kStride = kVecs * kLanes;
  const float* rows[kRows];
  V acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    rows[r] = panel + (packed_row_offset(i0 + r) - base);
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = V{};
    }
  }
  // The block's rows are interleaved streams the hardware prefetcher follows poorly, so
  // fetch the next block's rows (contiguous after these) while this one computes.
  const float* next = panel + (packed_row_offset(i0 + kRows) - base);
  for (int64_t j = 0; j <= i0; ++j) {
    __builtin_prefetch(next + kRows * j);
    V x[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      x[v] = load<V>(d + j * kStride + v * kLanes);
    }
    for (int r = 0; r < kRows; ++r) {
      const acc_t f = static_cast<acc_t>(rows[r][j]);
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] += f * x[v];
      }
    }
  }
  // Row i0 + r also has the columns i0 + 1 .. i0 + r of the diagonal block.
  for (int r = 1; r < kRows; ++r) {
    for (int64_t j = i0 + 1; j <= i0 + r; ++j) {
      const acc_t f = static_cast<acc_t>(rows[r][j]);
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] += f * load<V>(d + j * kStride + v * kLanes);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      sq[v] += acc[r][v] * acc[r][v];
    }
  }
}

// The n < kRows rows left after the full blocks, as one block of n rows: one by one, a
// row's one or two accumulators wait on the FMA latency (C = 100, B = 32 in 6-row blocks
// leaves its 4 longest rows: 23.2 -> 22.2 ms, one thread, AMD EPYC Zen 3).
template <typename acc_t, int kBytes, int kVecs, int kRows, typename V>
STNPADIM_INLINE void last_rows(const float* panel, int64_t base, const acc_t* d, int64_t i0, int64_t n,
                               V (&sq)[kVecs]) {
  if constexpr (kRows > 0) {
    if (n == kRows) {
      row_block<acc_t, kBytes, kVecs, kRows>(panel, base, d, i0, sq);
    } else {
      last_rows<acc_t, kBytes, kVecs, kRows - 1>(panel, base, d, i0, n, sq);
    }
  }
}

// Adds to sq[0 .. lanes) the squares of rows [r0, r1) for one batch tile (row_block);
// panel holds the packed float32 rows r0 .. r1 - 1, row r0 first.
template <typename acc_t, int kBytes, int kVecs, int kRows>
STNPADIM_INLINE void tile_rows(const float* panel, const acc_t* d, int64_t r0, int64_t r1, acc_t* sq_out) {
  const int64_t base = packed_row_offset(r0);
  using V = typename Vec<acc_t, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(acc_t);
  V sq[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    sq[v] = load<V>(sq_out + v * kLanes);
  }
  int64_t i0 = r0;
  for (; i0 + kRows <= r1; i0 += kRows) {
    row_block<acc_t, kBytes, kVecs, kRows>(panel, base, d, i0, sq);
  }
  last_rows<acc_t, kBytes, kVecs, kRows - 1>(panel, base, d, i0, r1 - i0, sq);
  for (int v = 0; v < kVecs; ++v) {
    std::memcpy(sq_out + v * kLanes, &sq[v], sizeof(V));
  }
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

// kLanes factor elements from ptr, as a vector V of the accumulator type. bfloat16 is the
// upper half of a float32: widened by a shift, exactly.
template <typename V, int64_t kLanes>
STNPADIM_INLINE V load_factor(const float* ptr) {
  using F = typename Vec<float, kLanes * sizeof(float)>::type;
  return __builtin_convertvector(load<F>(ptr), V);
}

template <typename V, int64_t kLanes>
STNPADIM_INLINE V load_factor(const c10::BFloat16* ptr) {
  using H = typename Vec<uint16_t, kLanes * sizeof(uint16_t)>::type;
  using U = typename Vec<uint32_t, kLanes * sizeof(uint32_t)>::type;
  using F = typename Vec<float, kLanes * sizeof(float)>::type;
  const U bits = __builtin_convertvector(load<H>(ptr), U) << 16;
  F f;
  std::memcpy(&f, &bits, sizeof(F));
  return __builtin_convertvector(f, V);
}

constexpr int64_t kLine = 64;  // bytes per cache line
// How far ahead single_rows fetches a bfloat16 factor. It spends fewer cycles per byte
// than on a float32 factor, and the hardware prefetcher alone left it waiting on memory.
constexpr int64_t kFactorAhead = 4096;

// Adds to *sq_out the squares of rows [r0, r1) for one batch element: d is [dim]
// contiguous, readable (any value) for a vector's lanes past its end. factor_end bounds
// reads of the factor.
template <typename acc_t, int kBytes, typename factor_t>
STNPADIM_INLINE void single_rows(const factor_t* factor, const acc_t* d, int64_t r0, int64_t r1,
                                 const factor_t* factor_end, acc_t* sq_out) {
  using V = typename Vec<acc_t, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(acc_t);
  using Index = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  using I = typename Vec<Index, kBytes>::type;
  I lane;
  for (int64_t k = 0; k < kLanes; ++k) {
    lane[k] = static_cast<Index>(k);
  }
  acc_t sq = *sq_out;
  for (int64_t i = r0; i < r1; ++i) {
    const factor_t* row = factor + packed_row_offset(i);
    const int64_t len = i + 1;
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};  // four chains hide the FMA latency
    int64_t j = 0;
    for (; j + 4 * kLanes <= len; j += 4 * kLanes) {
      if constexpr (std::is_same_v<factor_t, c10::BFloat16>) {
        for (int64_t k = 0; k < 4 * kLanes * int64_t{sizeof(factor_t)}; k += kLine) {
          __builtin_prefetch(reinterpret_cast<const char*>(row + j) + kFactorAhead + k);
        }
      }
      a0 += load_factor<V, kLanes>(row + j) * load<V>(d + j);
      a1 += load_factor<V, kLanes>(row + j + kLanes) * load<V>(d + j + kLanes);
      a2 += load_factor<V, kLanes>(row + j + 2 * kLanes) * load<V>(d + j + 2 * kLanes);
      a3 += load_factor<V, kLanes>(row + j + 3 * kLanes) * load<V>(d + j + 3 * kLanes);
    }
    for (; j + kLanes <= len; j += kLanes) {
      a2 += load_factor<V, kLanes>(row + j) * load<V>(d + j);
    }
    a0 += a2;
    a1 += a3;
    acc_t y = 0;
    if (j < len && row + j + kLanes <= factor_end) {
      // The tail as one full vector: lanes past the row (the next row's factor, d past
      // the row) are selected away, not multiplied by zero, so no NaN can leak in.
      const V prod = load_factor<V, kLanes>(row + j) * load<V>(d + j);
      a1 += lane < static_cast<Index>(len - j) ? prod : V{};
    } else {
      y = row_dot(row, d, 1, j, len);
    }
    y += hsum<acc_t, kBytes>(a0 + a1);
    sq += y * y;
  }
  *sq_out = sq;
}

template <typename scalar_t, typename acc_t, typename factor_t>
struct Args {
  const scalar_t* emb;
  int64_t stride_b, stride_c, stride_p;
  const float* mean;
  const factor_t* factor;
  acc_t* out;  // [B, P] contiguous
  int64_t batch, dim, patches;
};

// The tile kinds, with their widths per variant and a cost per patch that plan_tiles
// minimises. A tile of one register's lanes costs one FMA per factor element; a pair of
// registers shares each factor broadcast between them (fewer loads per FMA); a lone
// element is a dot product over j, a vector of factor elements per FMA.
enum TileKind : int { kPair = 0, kOne = 1, kNarrow = 2, kSingle = 3 };

template <CpuCapability kCap, typename acc_t>
struct Widths {
  static constexpr int kBytes = kVectorBytes<kCap>;  // one register
  static constexpr bool kWide = kVectorRegisters<kCap> >= 32;
  // Row blocks: accumulators (rows x registers per row) + the d loads + a broadcast must
  // fit the registers, 16 below AVX-512 (8 + 1 + 1 and 12 + 2 + 1), 32 with it.
  static constexpr int kPairRows = kWide ? 8 : 6;
  static constexpr int kOneRows = 8;
  // Half-register tiles help where a full register costs more than half of one (AVX-512
  // on double-pumped or down-clocking cores); elsewhere a half-empty register costs the same.
  static constexpr int kNarrowBytes = kCap == CpuCapability::kAvx512 ? 32 : 0;
  static constexpr std::array<int64_t, 4> kLanes = {2 * kBytes / int64_t(sizeof(acc_t)),
                                                    kBytes / int64_t(sizeof(acc_t)),
                                                    kNarrowBytes / int64_t(sizeof(acc_t)), 1};
  // Time per patch relative to a one-register tile (0: kind not used). Default and AVX2:
  // measured on a 2-core AMD EPYC (Zen 3), C = 550, one thread, factor in L3: a pair takes
  // 1.4-1.5x a one-register tile, a lone element 0.35-0.45x of one (B = 3 is faster as a
  // tile, B = 2 about even). AVX-512 keeps the thresholds measured for the earlier kernel
  // (8-lane tiles from 2 elements, 16-lane above 8); pairs there are not measured, so unused.
  static constexpr std::array<double, 4> kCost =
      kCap == CpuCapability::kAvx512 ? std::array<double, 4>{0.0, 1.0, 0.55, 0.3}
                                     : std::array<double, 4>{1.5, 1.0, 0.0, 0.4};
};

// Patches staged together. For [B, C, P] input, staging reads emb[b, j, p0 : p0 + block]
// from B * C rows on as many pages: a wide block spreads each page walk and cache-line
// miss over many patches (patch by patch, staging cost more than the arithmetic).
constexpr int64_t kPatchBlock = 64;
// ... as long as the staged tiles of one block stay within this (L2/L3-sized) budget.
constexpr int64_t kStageBytes = 2 * 1024 * 1024;
// Factor rows per panel: every tile runs over a panel while it stays in L2, beside the
// staged embeddings of the patch (281 KB for B = 128, C = 550). 64 and 128 KB measured
// alike (within noise) on AMD EPYC Zen 3 (512 KB L2), 256 KB 10-15% slower.
constexpr int64_t kPanelBytes = 64 * 1024;
// Panels start at multiples of this (every kind's row block), so only a patch's last rows
// run one by one.
constexpr int64_t kPanelRowStep = 24;

// A batch tile: lanes batch elements from b0 (n of them real, the rest zero padding),
// staged at offset in a patch's buffer as d[j * lanes + l]; its squared norms accumulate
// at sq in the patch's sums.
struct Tile {
  int64_t b0, n, lanes, offset, sq;
  TileKind kind;
};

// Covers the batch with tiles of least total cost: cost[b] = the cheapest way to cover b
// elements, a tile of some kind plus the cheapest cover of the rest.
template <CpuCapability kCap, typename acc_t>
std::vector<Tile> plan_tiles(int64_t batch, int64_t dim) {
  using W = Widths<kCap, acc_t>;
  std::vector<double> cost(batch + 1, 0.0);
  std::vector<int> choice(batch + 1, kSingle);
  for (int64_t b = 1; b <= batch; ++b) {
    cost[b] = std::numeric_limits<double>::infinity();
    for (int k = 0; k < 4; ++k) {
      if (W::kCost[k] <= 0.0) {
        continue;
      }
      const double c = W::kCost[k] + cost[std::max<int64_t>(0, b - W::kLanes[k])];
      if (c < cost[b]) {
        cost[b] = c;
        choice[b] = k;
      }
    }
  }
  std::vector<Tile> tiles;
  int64_t offset = 0, sq = 0;
  for (int64_t b0 = 0; b0 < batch;) {
    const TileKind kind = static_cast<TileKind>(choice[batch - b0]);
    const int64_t lanes = W::kLanes[kind];
    const int64_t n = std::min(lanes, batch - b0);
    tiles.push_back({b0, n, lanes, offset, sq, kind});
    offset += lanes * dim;
    sq += lanes;
    b0 += n;
  }
  return tiles;
}

// Stages d = emb - mean for patches p0 .. p0 + np - 1 into buf (patch_stride apart).
// Lanes innermost, so each destination line is written whole; the source lines (one per
// lane) stay in L1 across the patches. Where patches are contiguous in float32 input and
// 32-byte vectors are registers, full tiles go 8 lanes x 8 patches at a time: 8 vector
// loads (one per lane's row), less the patches' means, and an 8x8 transpose into the
// patches' lane order. Element by element, every lane is a load from another row (one
// thread, B = 32: C = 96 29.9 -> 18.5 ms, C = 100 27.3 -> 24.3 ms on AMD EPYC Zen 3).
template <CpuCapability kCap, typename scalar_t, typename acc_t, typename factor_t>
STNPADIM_INLINE void stage(const Args<scalar_t, acc_t, factor_t>& a, const std::vector<Tile>& tiles,
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
    int64_t q_fast = 0;
    if constexpr (kVectorBytes<kCap> >= 32 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (a.stride_p == 1 && t.n == t.lanes && t.lanes % 8 == 0) {
        q_fast = np & ~int64_t{7};
        alignas(32) float block[64];
        for (int64_t j = 0; j < a.dim; ++j) {
          // The next channel's rows (a short run per lane, each on its own page), fetched
          // while this channel is transposed rather than missed one load at a time: staging
          // C = 100, B = 32 took 9-10 ms of the 23 ms without it, 7-8 ms with it (one
          // thread, AMD EPYC Zen 3).
          for (int64_t l = 0; j + 1 < a.dim && l < t.lanes; ++l) {
            const float* row = src + l * a.stride_b + (j + 1) * a.stride_c;
            for (int64_t k = 0; k < q_fast; k += 16) {
              __builtin_prefetch(row + k);
            }
          }
          for (int64_t q0 = 0; q0 < q_fast; q0 += 8) {
            float m[8];
            for (int k = 0; k < 8; ++k) {
              m[k] = mean[(q0 + k) * a.dim + j];
            }
            for (int64_t l0 = 0; l0 < t.lanes; l0 += 8) {
              for (int r = 0; r < 8; ++r) {
                const float* row = src + (l0 + r) * a.stride_b + j * a.stride_c + q0;
                for (int k = 0; k < 8; ++k) {
                  block[r * 8 + k] = row[k] - m[k];
                }
              }
              transpose_block8(block, 8, buf + q0 * patch_stride + t.offset + j * t.lanes + l0, patch_stride);
            }
          }
        }
      }
    }
    for (int64_t j = 0; j < a.dim; ++j) {
      for (int64_t q = q_fast; q < np; ++q) {
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
template <typename scalar_t, typename acc_t, typename factor_t>
STNPADIM_INLINE void prefetch_stage(const Args<scalar_t, acc_t, factor_t>& a, const std::vector<Tile>& tiles,
                                    int64_t p0, int64_t np, int64_t part, int64_t parts) {
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

// The end of the panel of factor rows from r0: as many rows as fit kPanelBytes (as float32),
// in steps of kPanelRowStep.
STNPADIM_INLINE int64_t panel_end(int64_t r0, int64_t dim) {
  int64_t r1 = std::min(dim, r0 + kPanelRowStep);
  while (r1 < dim && static_cast<int64_t>(sizeof(float)) *
                             (packed_row_offset(r1 + kPanelRowStep) - packed_row_offset(r0)) <= kPanelBytes) {
    r1 = std::min(dim, r1 + kPanelRowStep);
  }
  return r1;
}

// The packed rows [r0, r1) of a factor as float32, for the batch tiles: a float32 factor
// in place; a bfloat16 one widened into panel (nullptr when only lone elements run, which
// read bfloat16 directly). Widening once per panel, vectorised, instead of at each
// broadcast keeps the tiles' inner loop as short as with a float32 factor.
STNPADIM_INLINE const float* float_panel(const float* factor, int64_t r0, int64_t, float*) {
  return factor + packed_row_offset(r0);
}

STNPADIM_INLINE const float* float_panel(const c10::BFloat16* factor, int64_t r0, int64_t r1, float* panel) {
  if (panel == nullptr) {
    return nullptr;
  }
  const int64_t begin = packed_row_offset(r0), n = packed_row_offset(r1) - begin;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(factor + begin);
  // 64-byte lines at a time, each fetching the line as far ahead (the next panel's, or the
  // next patch's after the last): read from memory while the tiles work on this panel.
  constexpr int64_t kLineElements = kLine / sizeof(uint16_t);
  for (int64_t k0 = 0; k0 < n; k0 += kLineElements) {
    __builtin_prefetch(bits + n + k0);
    const int64_t k1 = std::min(n, k0 + kLineElements);
    for (int64_t k = k0; k < k1; ++k) {
      const uint32_t wide = static_cast<uint32_t>(bits[k]) << 16;
      std::memcpy(panel + k, &wide, sizeof(float));
    }
  }
  return panel;
}

// Squared norms of one patch for every tile, into sq (the tiles' lanes, zeroed here);
// panel: room for a panel of float32 rows (float_panel).
template <CpuCapability kCap, typename acc_t, typename factor_t>
STNPADIM_INLINE void patch_sq_norms(const std::vector<Tile>& tiles, const factor_t* factor, const acc_t* d,
                                    int64_t dim, const factor_t* factor_end, acc_t* sq, float* panel) {
  using W = Widths<kCap, acc_t>;
  std::fill_n(sq, tiles.back().sq + tiles.back().lanes, acc_t(0));
  for (int64_t r0 = 0; r0 < dim;) {
    const int64_t r1 = panel_end(r0, dim);
    const float* rows = float_panel(factor, r0, r1, panel);
    for (const Tile& t : tiles) {
      const acc_t* dt = d + t.offset;
      acc_t* st = sq + t.sq;
      if (t.kind == kPair) {
        tile_rows<acc_t, W::kBytes, 2, W::kPairRows>(rows, dt, r0, r1, st);
      } else if (t.kind == kOne) {
        tile_rows<acc_t, W::kBytes, 1, W::kOneRows>(rows, dt, r0, r1, st);
      } else if (t.kind == kNarrow) {
        if constexpr (W::kNarrowBytes > 0) {
          tile_rows<acc_t, W::kNarrowBytes, 1, W::kOneRows>(rows, dt, r0, r1, st);
        }
      } else {
        single_rows<acc_t, W::kBytes>(factor, dt, r0, r1, factor_end, st);
      }
    }
    r0 = r1;
  }
}

// Patches p0 .. p0 + np - 1; next_p0 (if below the patch count) is the block that this
// thread does next, whose staging input is prefetched meanwhile.
template <CpuCapability kCap, typename scalar_t, typename acc_t, typename factor_t>
STNPADIM_INLINE void patch_block(const Args<scalar_t, acc_t, factor_t>& a, const std::vector<Tile>& tiles,
                                 int64_t patch_stride, int64_t p0, int64_t np, int64_t next_p0,
                                 int64_t block, std::vector<acc_t>& buf, std::vector<acc_t>& sq,
                                 float* panel) {
  stage<kCap>(a, tiles, p0, np, patch_stride, buf.data());
  const bool prefetch = next_p0 < a.patches;
  const int64_t next_np = std::min(block, a.patches - next_p0);
  const auto* factor_end = a.factor + a.patches * packed_size(a.dim);
  for (int64_t q = 0; q < np; ++q) {
    if (prefetch) {
      prefetch_stage(a, tiles, next_p0, next_np, q, np);
    }
    const int64_t p = p0 + q;
    patch_sq_norms<kCap>(tiles, a.factor + p * packed_size(a.dim), buf.data() + q * patch_stride, a.dim,
                         factor_end, sq.data(), panel);
    for (const Tile& t : tiles) {
      for (int64_t l = 0; l < t.n; ++l) {
        a.out[(t.b0 + l) * a.patches + p] = std::sqrt(sq[t.sq + l]);
      }
    }
  }
}

// Claims patch blocks from a shared counter until none is left: threads that the shared
// machine slows down take fewer blocks instead of holding up the others.
template <CpuCapability kCap, typename scalar_t, typename acc_t, typename factor_t>
STNPADIM_INLINE void worker(const Args<scalar_t, acc_t, factor_t>& a, std::atomic<int64_t>& next_block) {
  const std::vector<Tile> tiles = plan_tiles<kCap, acc_t>(a.batch, a.dim);
  const int64_t patch_stride = tiles.back().offset + tiles.back().lanes * a.dim;
  const int64_t block = std::clamp<int64_t>(
      kStageBytes / static_cast<int64_t>(patch_stride * sizeof(acc_t)), 1, kPatchBlock);
  // Spare elements: single_rows reads a full vector at the end of d.
  constexpr int64_t kSpare = kVectorBytes<kCap> / sizeof(acc_t);
  std::vector<acc_t> buf(static_cast<size_t>(block * patch_stride + kSpare));
  std::vector<acc_t> sq(static_cast<size_t>(tiles.back().sq + tiles.back().lanes));
  // A bfloat16 factor's panels widened for the batch tiles (none when only lone elements run).
  std::vector<float> panel;
  const bool widen = std::is_same_v<factor_t, c10::BFloat16> &&
                     std::any_of(tiles.begin(), tiles.end(), [](const Tile& t) { return t.kind != kSingle; });
  for (int64_t r0 = 0; widen && r0 < a.dim; r0 = panel_end(r0, a.dim)) {
    const int64_t n = packed_row_offset(panel_end(r0, a.dim)) - packed_row_offset(r0);
    panel.resize(std::max<size_t>(panel.size(), static_cast<size_t>(n)));
  }
  // A lone embedding claims its next block before this one is done, so that the block's
  // input can be fetched meanwhile. Batches do not: their blocks are long, and a thread
  // that the shared machine preempts would hold two of them back from the others.
  const bool ahead = tiles.front().lanes == 1;
  int64_t p0 = block * next_block++;
  while (p0 < a.patches) {
    const int64_t next_p0 = ahead ? block * next_block++ : a.patches;
    patch_block<kCap>(a, tiles, patch_stride, p0, std::min(block, a.patches - p0), next_p0, block, buf, sq,
                      panel.empty() ? nullptr : panel.data());
    p0 = ahead ? next_p0 : block * next_block++;
  }
}

template <typename scalar_t, typename acc_t, typename factor_t>
using Worker = void (*)(const Args<scalar_t, acc_t, factor_t>&, std::atomic<int64_t>&);

// One entry point per input dtype, factor dtype and instruction-set variant, and the
// pick_worker overload that chooses among the variants.
#define STNPADIM_WORKER(name, scalar_t, acc_t, factor_t)                                            \
  STNPADIM_CPU_VARIANTS(void, name, worker,                                                        \
                        (const Args<scalar_t, acc_t, factor_t>& a, std::atomic<int64_t>& next_block), \
                        (a, next_block))                                                           \
  Worker<scalar_t, acc_t, factor_t> pick_worker(CpuCapability cap, const Args<scalar_t, acc_t, factor_t>&) { \
    return pick_variant<Worker<scalar_t, acc_t, factor_t>>(cap, name##_default, name##_avx2,        \
                                                           name##_avx512);                         \
  }
STNPADIM_WORKER(worker_float, float, float, float)
STNPADIM_WORKER(worker_double, double, double, float)
STNPADIM_WORKER(worker_half, c10::Half, float, float)
STNPADIM_WORKER(worker_bfloat16, c10::BFloat16, float, float)
STNPADIM_WORKER(worker_float_bf16, float, float, c10::BFloat16)
STNPADIM_WORKER(worker_half_bf16, c10::Half, float, c10::BFloat16)
STNPADIM_WORKER(worker_bfloat16_bf16, c10::BFloat16, float, c10::BFloat16)
#undef STNPADIM_WORKER

template <typename scalar_t, typename acc_t, typename factor_t>
void run_workers(const at::Tensor& emb, const at::Tensor& mean, const at::Tensor& factor,
                 at::Tensor& out, CpuCapability cap) {
  const Args<scalar_t, acc_t, factor_t> args{emb.const_data_ptr<scalar_t>(),
                                             emb.stride(0), emb.stride(1), emb.stride(2),
                                             mean.const_data_ptr<float>(),
                                             factor.const_data_ptr<factor_t>(),
                                             out.mutable_data_ptr<acc_t>(),
                                             emb.size(0), emb.size(1), emb.size(2)};
  const auto work = pick_worker(cap, args);
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      work(args, next_block);
    }
  });
}

at::Tensor mahalanobis_forward_kernel(const at::Tensor& emb, const at::Tensor& mean,
                                      const at::Tensor& factor_packed) {
  mahalanobis_check_inputs(emb, mean, factor_packed);
  TORCH_CHECK(emb.device().is_cpu(), "emb must be a CPU tensor");
  const CpuCapability cap = cpu_capability();  // before any work: a refused variant raises here
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor factor_c = mahalanobis_kernel_factor(emb, factor_packed);
  const bool bf16_factor = factor_c.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({emb.size(0), emb.size(2)}, emb.options().dtype(mahalanobis_result_type(emb)));
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, emb.scalar_type(), "mahalanobis_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (bf16_factor) {
            return run_workers<scalar_t, acc_t, c10::BFloat16>(emb, mean_c, factor_c, out, cap);
          }
        }
        run_workers<scalar_t, acc_t, float>(emb, mean_c, factor_c, out, cap);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stnpadim, CPU, m) {
  m.impl("mahalanobis", &mahalanobis_forward_kernel);
}

}  // namespace stnpadim
