// Small helpers shared by the CPU kernels: argument checks and the storage-type dispatch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "float_convert.h"
#include "livethinking/dtype.h"

namespace livethinking::cpu::detail {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

#if defined(__GNUC__) || defined(__clang__)
#define LT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LT_ALWAYS_INLINE inline
#endif

// Σ_i a[i] b[i] with eight partial sums in a fixed order (the compiler turns them into
// vector lanes without any reassociation flag), added pairwise, then the tail of < 8.
template <typename Acc>
LT_ALWAYS_INLINE Acc lane_dot(const Acc* a, const Acc* b, int64_t n) {
  Acc lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  Acc total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
              ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Calls fn(T{}) with T the storage type of dtype.
template <typename Fn>
void dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat64: fn(double{}); return;
    case DType::kFloat16: fn(Half{}); return;
    case DType::kBFloat16: fn(BFloat16{}); return;
  }
  throw std::invalid_argument("dtype: unknown DType " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace livethinking::cpu::detail
