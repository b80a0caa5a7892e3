// CPU implementation of RMSNorm (livethinking/rms_norm.h): one pass for the sum of
// squares (eight partial sums, vectorised without reassociation flags), one for the
// scaled, rounded, weighted output.
#include <cmath>
#include <string>

#include "float_convert.h"
#include "kernel_support.h"
#include "livethinking/rms_norm.h"

namespace livethinking::cpu {
namespace {

template <typename T>
void normalise_rows(const T* x, const T* weight, int64_t size, double eps, int64_t row_begin,
                    int64_t row_end, T* out) {
  using Acc = typename detail::Compute<T>::type;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* in = x + r * size;
    T* dst = out + r * size;
    Acc lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= size; i += 8) {
      for (int j = 0; j < 8; ++j) {
        const Acc v = detail::load(in[i + j]);
        lanes[j] += v * v;
      }
    }
    Acc squares = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                  ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (; i < size; ++i) {
      const Acc v = detail::load(in[i]);
      squares += v * v;
    }
    const Acc inverse = Acc{1} / std::sqrt(squares / static_cast<Acc>(size) + static_cast<Acc>(eps));
    for (int64_t k = 0; k < size; ++k) {
      const T normed = detail::from_compute<T>(detail::load(in[k]) * inverse);
      dst[k] = detail::from_compute<T>(detail::load(weight[k]) * detail::load(normed));
    }
  }
}

}  // namespace

void rms_norm(const void* x, const void* weight, DType dtype, int64_t num_rows, int64_t size,
              double eps, int64_t row_begin, int64_t row_end, void* out) {
  detail::require(num_rows >= 0 && size >= 0, "num_rows and size must be >= 0, got " +
                                                  std::to_string(num_rows) + ", " +
                                                  std::to_string(size));
  detail::require(eps >= 0, "eps must be >= 0");
  detail::require(row_begin >= 0 && row_begin <= row_end && row_end <= num_rows,
                  "rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                      ") must lie within [0, num_rows = " + std::to_string(num_rows) + "]");
  detail::dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    normalise_rows(static_cast<const T*>(x), static_cast<const T*>(weight), size, eps, row_begin,
                   row_end, static_cast<T*>(out));
  });
}

}  // namespace livethinking::cpu
