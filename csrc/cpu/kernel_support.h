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

// Functions compiled for AVX2 + FMA (x86-64 GCC/Clang), called only where
// has_avx2_fma() says the CPU runs them.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define LT_HAVE_AVX2_PATH 1
#define LT_AVX2 __attribute__((target("avx2,fma")))
}  // namespace livethinking::cpu::detail
#include <immintrin.h>
namespace livethinking::cpu::detail {
inline bool has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// The sum of v's eight lanes.
LT_AVX2 inline float lane_sum(__m256 v) {
  __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  low = _mm_add_ps(low, _mm_movehl_ps(low, low));
  return _mm_cvtss_f32(_mm_add_ss(low, _mm_shuffle_ps(low, low, 1)));
}
#else
inline bool has_avx2_fma() { return false; }
#endif

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
