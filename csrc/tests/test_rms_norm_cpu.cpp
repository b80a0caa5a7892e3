// Self-contained test of the CPU RMSNorm (livethinking/rms_norm.h) against a float64
// reference of the same formula (the norm exact, normed rounded to the storage type as
// the kernel rounds it, then the weight), on fixed-seed pseudo-random inputs; output
// buffers poisoned with a guard tail; row ranges must equal one call over all rows.
// Prints one line per failure and, last, "N passed, M failed"; exits 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "check.h"
#include "float_convert.h"
#include "livethinking/rms_norm.h"

namespace lt = livethinking;
namespace det = livethinking::cpu::detail;
using livethinking::test::g_case;

namespace {

std::mt19937 g_rng(7u);

float uniform(float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(g_rng() >> 8) * (1.0f / 16777216.0f);
}

template <typename T>
T store(double v) {
  if constexpr (std::is_same_v<T, det::Half>) return det::half_from_float(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, det::BFloat16>) return det::bfloat16_from_float(static_cast<float>(v));
  else return static_cast<T>(v);
}

template <typename T>
double widen(T v) { return static_cast<double>(det::to_float(v)); }

template <typename T>
void test_case(int64_t rows, int64_t size, lt::DType dtype, double unit) {
  std::snprintf(g_case, sizeof g_case, "rows=%lld size=%lld dtype=%d", (long long)rows,
                (long long)size, (int)dtype);
  std::vector<T> x(static_cast<size_t>(rows * size)), w(static_cast<size_t>(size));
  for (auto& v : x) v = store<T>(uniform(-3.f, 3.f));
  for (auto& v : w) v = store<T>(uniform(-2.f, 2.f));
  const size_t n = x.size(), guard = 8;
  std::vector<T> out(n + guard), split(n + guard);
  std::memset(static_cast<void*>(out.data()), 0x7f, (n + guard) * sizeof(T));
  std::memset(static_cast<void*>(split.data()), 0x7f, (n + guard) * sizeof(T));
  lt::cpu::rms_norm(x.data(), w.data(), dtype, rows, size, 1e-6, 0, rows, out.data());
  for (int64_t r = 0; r < rows; r += 2) {
    lt::cpu::rms_norm(x.data(), w.data(), dtype, rows, size, 1e-6, r, std::min(r + 2, rows),
                      split.data());
  }
  CHECK(std::memcmp(out.data(), split.data(), n * sizeof(T)) == 0, "row ranges change the result");
  const auto* tail = reinterpret_cast<const unsigned char*>(out.data() + n);
  size_t bad = 0;
  for (size_t i = 0; i < guard * sizeof(T); ++i) bad += tail[i] != 0x7f;
  CHECK(bad == 0, "%zu guard bytes written", bad);
  const double acc = dtype == lt::DType::kFloat64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  for (int64_t r = 0; r < rows; ++r) {
    double squares = 0;
    for (int64_t k = 0; k < size; ++k) squares += widen(x[r * size + k]) * widen(x[r * size + k]);
    const double inverse = 1.0 / std::sqrt(squares / size + 1e-6);
    for (int64_t k = 0; k < size; ++k) {
      const double normed = widen(store<T>(widen(x[r * size + k]) * inverse));
      const double want = widen(w[k]) * normed;
      const double got = widen(out[r * size + k]);
      // relative, plus (fp16) the spacing of normed's subnormals, 2^-24, times |w|
      const double spacing = dtype == lt::DType::kFloat16 ? std::ldexp(1.0, -24) : 0.0;
      const double budget = (4 * unit + (size + 8) * acc) * std::fabs(want) +
                            4 * spacing * std::fabs(widen(w[k])) + 1e-300;
      CHECK(std::fabs(got - want) <= budget, "[%lld, %lld]: got %.9g want %.9g", (long long)r,
            (long long)k, got, want);
    }
  }
}

}  // namespace

int main() {
  for (int64_t rows : {0, 1, 3, 9}) {
    for (int64_t size : {1, 7, 8, 97, 128}) {
      test_case<float>(rows, size, lt::DType::kFloat32, std::ldexp(1.0, -24));
      test_case<double>(rows, size, lt::DType::kFloat64, std::ldexp(1.0, -53));
      test_case<det::Half>(rows, size, lt::DType::kFloat16, std::ldexp(1.0, -11));
      test_case<det::BFloat16>(rows, size, lt::DType::kBFloat16, std::ldexp(1.0, -8));
    }
  }
  std::snprintf(g_case, sizeof g_case, "invalid arguments");
  float x[4] = {1, 2, 3, 4}, w[2] = {1, 1}, out[4];
  CHECK_THROWS(lt::cpu::rms_norm(x, w, lt::DType::kFloat32, 2, 2, -1.0, 0, 2, out));  // eps < 0
  CHECK_THROWS(lt::cpu::rms_norm(x, w, lt::DType::kFloat32, 2, 2, 1e-6, 1, 3, out));  // rows
  return livethinking::test::report();
}
