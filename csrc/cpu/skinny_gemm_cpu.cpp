// CPU implementation of the skinny GEMM (livethinking/skinny_gemm.h).
//
// Columns go in tiles of 6 (up to 8 rows) or 24 weight rows. Within a tile, each block of
// up to 4 rows of x meets the tile's weight rows three at a time: 12 accumulators of
// eight lanes, one load of each weight row and of each x row per eight columns of depth.
// The tile stays in L1/L2 across the row blocks; the next tile is prefetched into L2
// (T1; asking for L1 measured slower), one cache line per step of the inner loop, while
// this one is used (the weight streams from memory once: at decode that is the whole
// cost). A product's eight lanes are added pairwise at
// the end, then the tail of the depth in order.
//
// MKL's sgemm on 1-4 rows runs at 26-49 % of the memory floor here (it packs
// the weight per call); this kernel measured 1.37-3.36× faster on 1-16 rows and 0.99-1.20×
// on 64 (bench_skinny_linear.py, benchmarks/RESULTS.md).
#include "livethinking/skinny_gemm.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernel_support.h"

namespace livethinking::cpu {
namespace {

using detail::require;

constexpr int64_t kCacheLine = 64;

// Prefetches the next tile one line at a time while the current one is used.
struct Prefetcher {
  const char* next;
  const char* end;
};

void portable_columns(const SkinnyGemm& g, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < g.rows; ++m) {
      g.out[m * g.out_stride + n] =
          detail::lane_dot(g.x + m * g.x_stride, g.w + n * g.w_stride, g.depth);
    }
  }
}

#ifdef LT_HAVE_AVX2_PATH
using detail::lane_sum;

// out[m, n] for MB rows of x and NB consecutive rows of w.
template <int MB, int NB>
LT_AVX2 inline void micro_kernel(const SkinnyGemm& g, const float* x, const float* w, float* out,
                                 Prefetcher& prefetch) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m) {
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  }
  const int64_t depth = g.depth;
  int64_t k = 0;
  for (; k + 8 <= depth; k += 8) {
    if (prefetch.next < prefetch.end) {
      _mm_prefetch(prefetch.next, _MM_HINT_T1);
      prefetch.next += kCacheLine;
    }
    __m256 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = _mm256_loadu_ps(w + n * g.w_stride + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * g.x_stride + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int n = 0; n < NB; ++n) {
      float total = lane_sum(acc[m][n]);
      for (int64_t kk = k; kk < depth; ++kk) total += x[m * g.x_stride + kk] * w[n * g.w_stride + kk];
      out[m * g.out_stride + n] = total;
    }
  }
}

// MB rows of x against the tile's weight rows [n0, n1).
template <int MB>
LT_AVX2 void row_block(const SkinnyGemm& g, int64_t m0, int64_t n0, int64_t n1, Prefetcher& prefetch) {
  const float* x = g.x + m0 * g.x_stride;
  float* out = g.out + m0 * g.out_stride;
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) micro_kernel<MB, 3>(g, x, g.w + n * g.w_stride, out + n, prefetch);
  for (; n < n1; ++n) micro_kernel<MB, 1>(g, x, g.w + n * g.w_stride, out + n, prefetch);
}

LT_AVX2 void vector_columns(const SkinnyGemm& g, int64_t n_begin, int64_t n_end) {
  const int64_t tile = skinny_gemm_tile(g.rows);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += tile) {
    const int64_t n1 = std::min(n_end, n0 + tile), ahead = std::min(n_end, n1 + tile);
    // the next tile's rows, whole (a row's stride past depth is not read)
    Prefetcher prefetch{reinterpret_cast<const char*>(g.w + n1 * g.w_stride),
                        reinterpret_cast<const char*>(g.w + ahead * g.w_stride)};
    int64_t m = 0;
    for (; m + 4 <= g.rows; m += 4) row_block<4>(g, m, n0, n1, prefetch);
    switch (g.rows - m) {
      case 3: row_block<3>(g, m, n0, n1, prefetch); break;
      case 2: row_block<2>(g, m, n0, n1, prefetch); break;
      case 1: row_block<1>(g, m, n0, n1, prefetch); break;
      default: break;
    }
    for (; prefetch.next < prefetch.end; prefetch.next += kCacheLine) {
      _mm_prefetch(prefetch.next, _MM_HINT_T1);
    }
  }
}
#endif

}  // namespace

int64_t skinny_gemm_tile(int64_t rows) { return rows <= 8 ? 6 : 24; }

bool skinny_gemm_vectorised() { return detail::has_avx2_fma(); }

namespace {

void check_gemm(const SkinnyGemm& g, int64_t n_begin, int64_t n_end) {
  require(g.rows >= 0 && g.depth >= 0, "skinny_gemm: rows and depth must be >= 0, got " +
                                           std::to_string(g.rows) + " and " + std::to_string(g.depth));
  require(g.x_stride >= g.depth && g.w_stride >= g.depth,
          "skinny_gemm: the strides of x and w must be >= depth (" + std::to_string(g.depth) + ")");
  require(0 <= n_begin && n_begin <= n_end, "skinny_gemm: need 0 <= n_begin <= n_end, got " +
                                                std::to_string(n_begin) + ", " + std::to_string(n_end));
}

}  // namespace

void skinny_gemm_portable(const SkinnyGemm& g, int64_t n_begin, int64_t n_end) {
  check_gemm(g, n_begin, n_end);
  portable_columns(g, n_begin, n_end);
}

void skinny_gemm(const SkinnyGemm& g, int64_t n_begin, int64_t n_end) {
  check_gemm(g, n_begin, n_end);
  if (g.rows == 0 || n_begin == n_end) return;
#ifdef LT_HAVE_AVX2_PATH
  if (skinny_gemm_vectorised()) {
    vector_columns(g, n_begin, n_end);
    return;
  }
#endif
  portable_columns(g, n_begin, n_end);
}

}  // namespace livethinking::cpu
