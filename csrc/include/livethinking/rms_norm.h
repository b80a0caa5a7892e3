// RMSNorm over the last dimension: the standalone C++ API of livethinking.
//
//   out[r, :] = weight ⊙ round(x[r, :] / sqrt(mean(x[r, :]²) + eps))
//
// with the normalisation in float (double for kFloat64) and rounded to the storage
// type before the weight multiplies it (as transformers' Qwen3 RMSNorm does: the norm
// in fp32, then weight · normed.to(dtype)). x, weight and out share one dtype; x and
// out are (num_rows, size), weight (size,), contiguous. The sum of squares keeps eight
// partial sums in a fixed order: results do not depend on the thread count.
//
// Errors: negative sizes or eps < 0 throw std::invalid_argument.
#pragma once

#include <cstdint>

#include "livethinking/dtype.h"

namespace livethinking::cpu {

// Rows [row_begin, row_end) of out (threads split the rows).
void rms_norm(const void* x, const void* weight, DType dtype, int64_t num_rows, int64_t size,
              double eps, int64_t row_begin, int64_t row_end, void* out);

}  // namespace livethinking::cpu
