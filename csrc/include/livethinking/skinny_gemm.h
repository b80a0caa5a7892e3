// A GEMM for few rows against a large weight: the standalone C++ API of livethinking.
//
//   out[m, n] = Σ_k x[m, k] · w[n, k]      m < rows, n in [n_begin, n_end)
//
// float32, x (rows, depth) and w (·, depth) row-major with unit stride along depth
// (leading strides given), out (rows, ·) with its own leading stride. This is the shape
// of a decode step (a few tokens against a projection or an expert): the weight is read
// once from memory, in order, while a tile of it is in cache for every row, and the next
// tile is prefetched as the current one is used. Where the CPU has AVX2 and FMA, a
// micro-kernel of 4 rows × 3 weight rows, eight lanes per product, fused multiply-adds;
// otherwise a portable loop with eight partial sums. Each output is one dot product in a
// fixed order: results do not depend on the thread count or on how the columns are
// split. Error (first order): |out − exact| <= (⌈depth / 8⌉ + 18) · 2^-24 · Σ_k |x[m, k] w[n, k]|
// (a lane's running sum, the three pairwise adds of the lanes, the depth's tail of < 8).
//
// Errors: negative sizes, or strides shorter than depth, throw std::invalid_argument.
#pragma once

#include <cstdint>

namespace livethinking::cpu {

struct SkinnyGemm {
  const float* x;
  int64_t rows;
  int64_t depth;
  int64_t x_stride;  // between rows of x, >= depth
  const float* w;
  int64_t w_stride;  // between rows of w, >= depth
  float* out;
  int64_t out_stride;  // between rows of out
};

// Columns [n_begin, n_end) of out (threads split the columns, in tiles).
void skinny_gemm(const SkinnyGemm& gemm, int64_t n_begin, int64_t n_end);

// The column tile the kernel works in for this many rows (a multiple of 3): the unit in
// which callers split the columns among threads.
int64_t skinny_gemm_tile(int64_t rows);

// The portable loop alone (what CPUs without AVX2 + FMA run; tests check both paths).
void skinny_gemm_portable(const SkinnyGemm& gemm, int64_t n_begin, int64_t n_end);

// Whether this CPU runs the AVX2 + FMA micro-kernel (else the portable loop).
bool skinny_gemm_vectorised();

}  // namespace livethinking::cpu
