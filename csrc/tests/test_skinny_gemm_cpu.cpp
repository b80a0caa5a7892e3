// Self-contained test of the CPU skinny GEMM (livethinking/skinny_gemm.h) against a
// float64 reference, within the header's error bound, on fixed-seed pseudo-random inputs:
// rows 1-33 (every row-block tail), depths with and without a tail of < 8, column counts
// that leave partial tiles, padded strides; output poisoned (NaN) around the columns
// asked for, which must stay untouched; column ranges must equal one call over all.
// Prints one line per failure and, last, "N passed, M failed"; exits 1 on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "livethinking/skinny_gemm.h"

namespace lt = livethinking::cpu;
using livethinking::test::g_case;

namespace {

std::mt19937 g_rng(11u);

float uniform() { return -1.0f + 2.0f * static_cast<float>(g_rng() >> 8) * (1.0f / 16777216.0f); }

using Kernel = void (*)(const lt::SkinnyGemm&, int64_t, int64_t);

void run_case(Kernel kernel, const char* name, int64_t rows, int64_t depth, int64_t cols, int64_t pad) {
  std::snprintf(g_case, sizeof g_case, "%s: rows %lld depth %lld cols %lld pad %lld", name,
                static_cast<long long>(rows), static_cast<long long>(depth),
                static_cast<long long>(cols), static_cast<long long>(pad));
  const int64_t xs = depth + pad, ws = depth + 2 * pad, os = cols + 3;
  std::vector<float> x(rows * xs), w(cols * ws);
  for (auto& v : x) v = uniform();
  for (auto& v : w) v = uniform();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t m = 0; m < rows; ++m) for (int64_t k = depth; k < xs; ++k) x[m * xs + k] = nan;
  for (int64_t n = 0; n < cols; ++n) for (int64_t k = depth; k < ws; ++k) w[n * ws + k] = nan;
  std::vector<float> out(rows * os, nan), split(rows * os, nan);
  lt::SkinnyGemm gemm{x.data(), rows, depth, xs, w.data(), ws, out.data(), os};
  kernel(gemm, 0, cols);
  // the same columns in uneven ranges (as threads split them)
  lt::SkinnyGemm parts = gemm;
  parts.out = split.data();
  for (int64_t n = 0; n < cols;) {
    const int64_t next = std::min(cols, n + 1 + (n * 7) % 11);
    kernel(parts, n, next);
    n = next;
  }
  const double unit = std::ldexp(1.0, -24);
  long bad = 0, differ = 0, touched = 0;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t n = 0; n < os; ++n) {
      const float got = out[m * os + n];
      if (n >= cols) {
        touched += !std::isnan(got) || !std::isnan(split[m * os + n]);
        continue;
      }
      double exact = 0, magnitude = 0;
      for (int64_t k = 0; k < depth; ++k) {
        const double p = static_cast<double>(x[m * xs + k]) * w[n * ws + k];
        exact += p;
        magnitude += std::fabs(p);
      }
      const double budget = (static_cast<double>((depth + 7) / 8) + 18) * unit * magnitude;
      bad += !(std::fabs(got - exact) <= budget);
      differ += !(got == split[m * os + n]);
    }
  }
  CHECK(bad == 0, "%ld outputs outside the error bound", bad);
  CHECK(differ == 0, "%ld outputs differ when the columns are split", differ);
  CHECK(touched == 0, "%ld outputs past the columns were written", touched);
}

}  // namespace

int main() {
  std::printf("skinny_gemm: %s path\n", lt::skinny_gemm_vectorised() ? "AVX2+FMA" : "portable");
  for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 32, 33}) {
    for (int64_t depth : {1, 7, 8, 9, 64, 97, 512}) {
      for (int64_t cols : {1, 2, 5, 6, 7, 25, 50}) {
        run_case(&lt::skinny_gemm, "dispatch", rows, depth, cols, rows % 3);
        run_case(&lt::skinny_gemm_portable, "portable", rows, depth, cols, rows % 3);
      }
    }
  }
  run_case(&lt::skinny_gemm, "dispatch", 4, 0, 5, 1);  // empty depth: zeros
  run_case(&lt::skinny_gemm_portable, "portable", 4, 0, 5, 1);
  std::snprintf(g_case, sizeof g_case, "bad arguments");
  std::vector<float> a(64, 1.0f), out(64, 0.0f);
  lt::SkinnyGemm bad{a.data(), 2, 8, 4, a.data(), 8, out.data(), 4};
  CHECK_THROWS(lt::skinny_gemm(bad, 0, 2));  // x stride shorter than depth
  lt::SkinnyGemm good{a.data(), 2, 8, 8, a.data(), 8, out.data(), 4};
  CHECK_THROWS(lt::skinny_gemm(good, 2, 1));  // n_end < n_begin
  lt::SkinnyGemm negative{a.data(), -1, 8, 8, a.data(), 8, out.data(), 4};
  CHECK_THROWS(lt::skinny_gemm(negative, 0, 1));
  return livethinking::test::report();
}
