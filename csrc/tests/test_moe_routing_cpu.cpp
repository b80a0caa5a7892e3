// Self-contained test of the CPU MoE routing API (livethinking/moe_routing.h).
//
// Every function is compared, element by element, with a brute-force reference
// written here with a different algorithm (O(k * E) selection for top-k, one
// scan of all pairs per expert for align, float64 sums for the reductions), on
// fixed-seed pseudo-random inputs. Output buffers are poisoned with 0x7f bytes
// (plus a guard tail that must stay untouched) before every call.
// Prints one line per failure and, last, "N passed, M failed"; exits 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "float_convert.h"
#include "livethinking/moe_routing.h"

namespace lt = livethinking;
namespace det = livethinking::cpu::detail;

namespace {

long g_passed = 0;
long g_failed = 0;
char g_case[160] = "";  // the case being run, printed with each failure

void fail(const char* file, int line, const char* expr, const char* fmt, ...) {
  if (++g_failed > 50) return;  // keep counting, stop printing
  std::printf("FAIL %s:%d [%s] %s: ", file, line, g_case, expr);
  va_list args;
  va_start(args, fmt);
  std::vprintf(fmt, args);
  va_end(args);
  std::printf("\n");
}

#define CHECK(cond, ...)                                 \
  do {                                                   \
    if (cond) {                                          \
      ++g_passed;                                        \
    } else {                                             \
      fail(__FILE__, __LINE__, #cond, __VA_ARGS__);      \
    }                                                    \
  } while (0)

#define CHECK_THROWS(stmt)                                                       \
  do {                                                                           \
    const char* outcome = "nothing thrown";                                      \
    try {                                                                        \
      stmt;                                                                      \
    } catch (const std::invalid_argument&) {                                     \
      outcome = nullptr;                                                         \
    } catch (...) {                                                              \
      outcome = "another exception type";                                        \
    }                                                                            \
    CHECK(outcome == nullptr, "expected std::invalid_argument from %s: %s", #stmt, \
          outcome);                                                              \
  } while (0)

using ll = long long;
std::mt19937 g_rng(20240611u);

float uniform(float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(g_rng() >> 8) * (1.0f / 16777216.0f);
}

// Output buffers: n elements plus a guard tail, all bytes 0x7f (an int32 of
// 0x7f7f7f7f, a float of 3.39e38, a double of 1.4e306: never a valid result).
constexpr size_t kGuard = 8;
template <typename T>
std::vector<T> poisoned(int64_t n) {
  std::vector<T> v(static_cast<size_t>(n) + kGuard);
  std::memset(static_cast<void*>(v.data()), 0x7f, v.size() * sizeof(T));
  return v;
}
template <typename T>
void check_guard(const std::vector<T>& v, int64_t n, const char* name) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(v.data() + n);
  size_t bad = 0;
  for (size_t i = 0; i < kGuard * sizeof(T); ++i) bad += bytes[i] != 0x7f;
  CHECK(bad == 0, "%s: %zu bytes written past its %lld elements", name, bad, (ll)n);
}

// ----------------------------------------------------------------- topk_softmax
void test_topk(int64_t T, int64_t E, int64_t K, lt::DType dtype, bool renorm, bool ties) {
  std::snprintf(g_case, sizeof g_case, "topk T=%lld E=%lld K=%lld dtype=%d renorm=%d ties=%d",
                (ll)T, (ll)E, (ll)K, (int)dtype, (int)renorm, (int)ties);
  // The reference reads `logits`, the values after rounding to the storage type.
  std::vector<float> logits(static_cast<size_t>(T * E));
  std::vector<det::Half> half(logits.size());
  std::vector<det::BFloat16> bf16(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = ties ? std::floor(uniform(0.f, 4.f)) * 0.5f - 0.75f : uniform(-4.f, 4.f);
    if (dtype == lt::DType::kFloat16) {
      half[i] = det::half_from_float(logits[i]);
      logits[i] = det::to_float(half[i]);
    } else if (dtype == lt::DType::kBFloat16) {
      bf16[i] = det::bfloat16_from_float(logits[i]);
      logits[i] = det::to_float(bf16[i]);
    }
  }
  const void* input = dtype == lt::DType::kFloat16    ? static_cast<const void*>(half.data())
                      : dtype == lt::DType::kBFloat16 ? static_cast<const void*>(bf16.data())
                                                      : static_cast<const void*>(logits.data());
  auto weights = poisoned<float>(T * K);
  auto ids = poisoned<int32_t>(T * K);
  lt::cpu::moe_topk_softmax(input, dtype, T, E, K, renorm, weights.data(), ids.data());

  for (int64_t t = 0; t < T; ++t) {
    const float* row = &logits[t * E];
    double max_logit = row[0];
    for (int64_t e = 1; e < E; ++e) max_logit = std::fmax(max_logit, row[e]);
    double denominator = 0;
    for (int64_t e = 0; e < E; ++e) denominator += std::exp(row[e] - max_logit);
    // Selection: K times the largest logit not taken yet; strict '>' keeps the lower id.
    std::vector<bool> taken(E, false);
    std::vector<int32_t> want_id(K);
    std::vector<double> want_w(K);
    double selected = 0;
    for (int64_t j = 0; j < K; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || row[e] > row[best])) best = e;
      taken[best] = true;
      want_id[j] = static_cast<int32_t>(best);
      want_w[j] = std::exp(row[best] - max_logit) / denominator;
      selected += want_w[j];
    }
    for (int64_t j = 0; j < K; ++j) {
      const double w = renorm ? want_w[j] / selected : want_w[j];
      const int32_t got_id = ids[t * K + j];
      const float got_w = weights[t * K + j];
      CHECK(got_id == want_id[j], "t=%lld j=%lld: id %d, want %d", (ll)t, (ll)j, got_id, want_id[j]);
      CHECK(std::fabs(got_w - w) <= 2e-6 * w, "t=%lld j=%lld: weight %.9g, want %.9g", (ll)t,
            (ll)j, got_w, w);
    }
  }
  check_guard(weights, T * K, "topk_weights");
  check_guard(ids, T * K, "topk_ids");
}

// ----------------------------------------------------------------------- align
struct Routing {  // the outputs of moe_align
  std::vector<int32_t> sorted_ids, expert_offsets, block_experts, row_of_pair, tokens_per_expert;
  int32_t num_rows_padded = 0;
};

// K distinct experts per token, drawn from `pool`.
std::vector<int32_t> random_topk_ids(int64_t T, int64_t K, std::vector<int32_t> pool) {
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      std::swap(pool[j], pool[j + g_rng() % (pool.size() - j)]);
      ids.push_back(pool[j]);
    }
  }
  return ids;
}

// One scan over all pairs per expert; rows are appended, each segment padded.
Routing reference_align(const std::vector<int32_t>& ids, int64_t E, int64_t B, int32_t sentinel) {
  Routing r;
  std::vector<int32_t>& rows = r.sorted_ids;
  for (int64_t e = 0; e < E; ++e) {
    r.expert_offsets.push_back(static_cast<int32_t>(rows.size()));
    int32_t count = 0;
    for (size_t p = 0; p < ids.size(); ++p)
      if (ids[p] == e) rows.push_back(static_cast<int32_t>(p)), ++count;
    while (rows.size() % B != 0) rows.push_back(sentinel);
    r.tokens_per_expert.push_back(count);
  }
  r.expert_offsets.push_back(static_cast<int32_t>(rows.size()));
  r.num_rows_padded = static_cast<int32_t>(rows.size());
  for (int64_t b = 0; b * B < r.num_rows_padded; ++b)
    for (int64_t e = 0; e < E; ++e)
      if (r.expert_offsets[e] <= b * B && b * B < r.expert_offsets[e + 1])
        r.block_experts.push_back(static_cast<int32_t>(e));
  r.row_of_pair.assign(ids.size(), -1);
  for (size_t row = 0; row < rows.size(); ++row)
    if (rows[row] != sentinel) r.row_of_pair[rows[row]] = static_cast<int32_t>(row);
  return r;
}

template <typename T>
void check_equal(const std::vector<T>& got, const std::vector<int32_t>& want, int64_t n,
                 const char* name) {
  for (int64_t i = 0; i < n; ++i)
    CHECK(got[i] == want[i], "%s[%lld] = %d, want %d", name, (ll)i, (int)got[i], (int)want[i]);
  check_guard(got, n, name);
}

// Checks moe_align against the reference; returns the reference (padded to max_rows).
Routing test_align(int64_t T, int64_t E, int64_t K, int64_t B, const std::vector<int32_t>& ids) {
  const lt::MoeAlignShape shape = lt::moe_align_shape(T, K, E, B);
  const int64_t N = T * K;
  const int32_t sentinel = static_cast<int32_t>(N);
  Routing want = reference_align(ids, E, B, sentinel);
  CHECK(shape.num_pairs == N && shape.max_rows == shape.max_blocks * B &&
            want.num_rows_padded <= shape.max_rows,
        "shape {%lld, %lld, %lld} cannot hold %d rows", (ll)shape.num_pairs,
        (ll)shape.max_rows, (ll)shape.max_blocks, want.num_rows_padded);
  if (want.num_rows_padded > shape.max_rows) return want;
  want.sorted_ids.resize(shape.max_rows, sentinel);    // the tail is padding too
  want.block_experts.resize(shape.max_blocks, -1);

  auto sorted = poisoned<int32_t>(shape.max_rows);
  auto offsets = poisoned<int32_t>(E + 1);
  auto blocks = poisoned<int32_t>(shape.max_blocks);
  auto padded = poisoned<int32_t>(1);
  auto row_of_pair = poisoned<int32_t>(N);
  auto counts = poisoned<int32_t>(E);
  lt::cpu::moe_align(ids.data(), T, K, E, B, sorted.data(), offsets.data(), blocks.data(),
                     padded.data(), row_of_pair.data(), counts.data());
  check_equal(sorted, want.sorted_ids, shape.max_rows, "sorted_ids");
  check_equal(offsets, want.expert_offsets, E + 1, "expert_offsets");
  check_equal(blocks, want.block_experts, shape.max_blocks, "block_experts");
  check_equal(padded, {want.num_rows_padded}, 1, "num_rows_padded");
  check_equal(row_of_pair, want.row_of_pair, N, "row_of_pair");
  check_equal(counts, want.tokens_per_expert, E, "tokens_per_expert");

  // Properties, on the library's own outputs: inverse maps, stable segments.
  for (int64_t p = 0; p < N; ++p) {
    const int64_t r = row_of_pair[p];
    CHECK(r >= 0 && r < shape.max_rows && sorted[r] == p, "pair %lld -> row %lld -> pair %d",
          (ll)p, (ll)r, (r >= 0 && r < shape.max_rows) ? sorted[r] : -1);
  }
  for (int64_t r = 0; r < shape.max_rows; ++r) {
    const int64_t p = sorted[r];
    if (p >= 0 && p < N) CHECK(row_of_pair[p] == r, "row %lld -> pair %lld -> row %d", (ll)r, (ll)p, row_of_pair[p]);
    else CHECK(p == N, "row %lld holds %lld: neither a pair nor the sentinel", (ll)r, (ll)p);
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = offsets[e], end = begin + counts[e];
    for (int64_t r = std::max<int64_t>(begin, 0); r + 1 < end && r + 1 < shape.max_rows; ++r)
      CHECK(sorted[r] < sorted[r + 1], "expert %lld: rows %lld, %lld hold pairs %d, %d (unstable)",
            (ll)e, (ll)r, (ll)r + 1, sorted[r], sorted[r + 1]);
  }
  return want;
}

// ------------------------------------------------- permute, unpermute, pair_dot
template <typename S>
void test_data(int64_t T, int64_t K, int64_t H, bool weighted, const Routing& route) {
  constexpr bool f64 = std::is_same<S, double>::value;
  const lt::DType dtype = f64 ? lt::DType::kFloat64 : lt::DType::kFloat32;
  const double u = f64 ? 1e-12 : std::ldexp(1.0, -24);  // f64: the 1e-12 budget
  const int64_t N = T * K, R = static_cast<int64_t>(route.sorted_ids.size());
  std::snprintf(g_case + std::strlen(g_case), 40, " %s H=%lld w=%d", f64 ? "f64" : "f32", (ll)H,
                (int)weighted);
  std::vector<S> x(T * H), y(R * H), w(N);  // y: every row random, padding included
  // float64 data gets low-order bits a float cannot hold.
  auto random = [](float lo, float hi) { return S(uniform(lo, hi)) + (f64 ? S(1e-9) * S(uniform(0.f, 1.f)) : S(0)); };
  for (S& v : x) v = random(-2.f, 2.f);
  for (S& v : y) v = random(-2.f, 2.f);
  for (S& v : w) v = random(0.05f, 1.f);
  const S* wp = weighted ? w.data() : nullptr;
  auto weight = [&](int64_t p) { return weighted ? double(w[p]) : 1.0; };

  // permute: one product per element, so the result must be exactly the product
  // rounded once (a product of two floats is exact in double).
  auto rows = poisoned<S>(R * H);
  lt::cpu::moe_permute(x.data(), dtype, T, H, K, route.sorted_ids.data(), R, wp, rows.data());
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p = route.sorted_ids[r];
    for (int64_t h = 0; h < H; ++h) {
      const S want = p == N ? S(0) : S(weight(p) * double(x[(p / K) * H + h]));
      CHECK(rows[r * H + h] == want, "permute row %lld h %lld: %.17g, want %.17g", (ll)r, (ll)h,
            double(rows[r * H + h]), double(want));
    }
  }
  check_guard(rows, R * H, "permute rows");

  // unpermute: K terms summed in S; error within (K + 1) u sum|terms|.
  auto out = poisoned<S>(T * H);
  lt::cpu::moe_unpermute(y.data(), dtype, R, H, T, K, route.row_of_pair.data(), wp, out.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0, magnitude = 0;
      for (int64_t j = 0; j < K; ++j) {
        const double term = weight(t * K + j) * double(y[route.row_of_pair[t * K + j] * H + h]);
        sum += term;
        magnitude += std::fabs(term);
      }
      const double got = out[t * H + h];
      CHECK(std::fabs(got - sum) <= (f64 ? 1.0 : double(K + 1)) * u * magnitude,
            "unpermute t %lld h %lld: %.17g, want %.17g", (ll)t, (ll)h, got, sum);
    }
  }
  check_guard(out, T * H, "unpermute out");

  // pair_dot: H terms summed in S; error within (H + 1) u sum|terms|.
  auto dots = poisoned<S>(N);
  lt::cpu::moe_pair_dot(x.data(), y.data(), dtype, T, R, H, K, route.row_of_pair.data(),
                        dots.data());
  for (int64_t p = 0; p < N; ++p) {
    double sum = 0, magnitude = 0;
    for (int64_t h = 0; h < H; ++h) {
      const double term = double(x[(p / K) * H + h]) * double(y[route.row_of_pair[p] * H + h]);
      sum += term;
      magnitude += std::fabs(term);
    }
    CHECK(std::fabs(double(dots[p]) - sum) <= (f64 ? 1.0 : double(H + 1)) * u * magnitude,
          "pair_dot p %lld: %.17g, want %.17g", (ll)p, double(dots[p]), sum);
  }
  check_guard(dots, N, "pair_dot out");
}

void test_routing_case(int64_t T, int64_t E, int64_t K, int64_t B, bool two_experts, int64_t H) {
  std::snprintf(g_case, sizeof g_case, "align T=%lld E=%lld K=%lld B=%lld two_experts=%d",
                (ll)T, (ll)E, (ll)K, (ll)B, (int)two_experts);
  std::vector<int32_t> pool;
  if (two_experts) pool = {1, static_cast<int32_t>(E - 3)};
  else for (int32_t e = 0; e < E; ++e) pool.push_back(e);
  const Routing route = test_align(T, E, K, B, random_topk_ids(T, K, pool));
  if (route.num_rows_padded > static_cast<int64_t>(route.sorted_ids.size())) return;
  const std::string base = g_case;
  for (bool weighted : {false, true}) {
    std::snprintf(g_case, sizeof g_case, "%s", base.c_str());
    test_data<float>(T, K, H, weighted, route);
    std::snprintf(g_case, sizeof g_case, "%s", base.c_str());
    test_data<double>(T, K, H, weighted, route);
  }
}

// ------------------------------------------------------------ invalid arguments
void test_invalid_arguments() {
  std::snprintf(g_case, sizeof g_case, "invalid arguments");
  using lt::DType;
  std::vector<float> f(4096, 1.f);
  std::vector<double> d(4096, 1.0);
  std::vector<int32_t> i(4096, 0), o1(4096), o2(4096), o3(4096), o4(4096), o5(4096), o6(4096);
  // topk_softmax: top_k outside [1, num_experts], no experts, float64 logits.
  CHECK_THROWS(lt::cpu::moe_topk_softmax(f.data(), DType::kFloat32, 2, 8, 9, false, f.data(), o1.data()));
  CHECK_THROWS(lt::cpu::moe_topk_softmax(f.data(), DType::kFloat32, 2, 8, 0, false, f.data(), o1.data()));
  CHECK_THROWS(lt::cpu::moe_topk_softmax(f.data(), DType::kFloat32, 2, 0, 1, false, f.data(), o1.data()));
  CHECK_THROWS(lt::cpu::moe_topk_softmax(d.data(), DType::kFloat64, 2, 8, 2, false, f.data(), o1.data()));
  // align: top_k > num_experts, block_size 0 or >= 2^31, an expert id out of range
  // (either side), negative or zero sizes.
  auto align = [&](int64_t T, int64_t K, int64_t E, int64_t B) {
    lt::cpu::moe_align(i.data(), T, K, E, B, o1.data(), o2.data(), o3.data(), o4.data(),
                       o5.data(), o6.data());
  };
  CHECK_THROWS(align(4, 9, 8, 16));
  CHECK_THROWS(align(4, 2, 8, 0));
  CHECK_THROWS(align(4, 2, 8, int64_t{1} << 31));
  i[5] = 8;
  CHECK_THROWS(align(4, 2, 8, 16));
  i[5] = -1;
  CHECK_THROWS(align(4, 2, 8, 16));
  i[5] = 0;
  CHECK_THROWS(align(-1, 2, 8, 16));
  CHECK_THROWS(align(4, 0, 8, 16));
  CHECK_THROWS(align(4, 2, 0, 16));
  // permute / unpermute / pair_dot: an index past the sentinel / past num_rows.
  i.assign(4096, 0);
  i[3] = 9;  // num_tokens 4 * top_k 2 = sentinel 8
  CHECK_THROWS(lt::cpu::moe_permute(f.data(), DType::kFloat32, 4, 2, 2, i.data(), 16, nullptr, f.data() + 64));
  i[3] = -1;
  CHECK_THROWS(lt::cpu::moe_permute(f.data(), DType::kFloat32, 4, 2, 2, i.data(), 16, nullptr, f.data() + 64));
  i[3] = 16;  // num_rows 16
  CHECK_THROWS(lt::cpu::moe_unpermute(f.data(), DType::kFloat32, 16, 2, 4, 2, i.data(), nullptr, f.data() + 64));
  CHECK_THROWS(lt::cpu::moe_pair_dot(f.data(), f.data() + 64, DType::kFloat32, 4, 16, 2, 2, i.data(), f.data() + 128));
}

}  // namespace

int main() {
  const lt::DType dtypes[] = {lt::DType::kFloat32, lt::DType::kFloat16, lt::DType::kBFloat16};
  for (int64_t T : {0, 1, 7, 97})
    for (int64_t E : {8, 60, 128})
      for (int64_t K : {1, 2, 8})
        for (lt::DType dtype : dtypes)
          for (bool renorm : {false, true})
            for (bool ties : {false, true}) test_topk(T, E, K, dtype, renorm, ties);

  const int64_t hiddens[] = {13, 1, 64, 0};
  int n = 0;
  for (int64_t T : {0, 1, 7, 97})
    for (int64_t E : {8, 60, 128})
      for (int64_t K : {1, 2, 8})
        for (int64_t B : {1, 16, 64}) test_routing_case(T, E, K, B, false, hiddens[n++ % 4]);
  for (int64_t E : {8, 60, 128})  // all the tokens on two experts
    for (int64_t K : {1, 2})
      for (int64_t B : {1, 16, 64}) test_routing_case(97, E, K, B, true, hiddens[n++ % 4]);

  test_invalid_arguments();

  std::printf("%ld passed, %ld failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
