// Self-contained test of the CPU paged decode attention (livethinking/paged_attention.h).
//
// Compared with a brute-force float64 reference written here another way (the row's
// keys gathered into a contiguous copy first, one softmax per query head) on fixed-seed
// pseudo-random inputs; pool slots past each row's context hold NaN, which must never
// reach the output; output buffers are poisoned (plus a guard tail that must stay
// untouched). Work split into item ranges must equal one call over all items.
// Prints one line per failure and, last, "N passed, M failed"; exits 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include "check.h"
#include "float_convert.h"
#include "livethinking/paged_attention.h"

namespace lt = livethinking;
namespace det = livethinking::cpu::detail;
using livethinking::test::g_case;

namespace {

using ll = long long;
std::mt19937 g_rng(20261204u);

float uniform(float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(g_rng() >> 8) * (1.0f / 16777216.0f);
}

// Values in the storage type and, for the reference, the same values as double.
struct Buffer {
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<det::Half> f16;
  std::vector<det::BFloat16> bf16;
  std::vector<double> exact;  // what the kernel reads, widened
};

Buffer make(size_t n, lt::DType dtype, float lo, float hi) {
  Buffer b;
  b.exact.resize(n);
  b.f32.resize(n), b.f64.resize(n), b.f16.resize(n), b.bf16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float v = uniform(lo, hi);
    b.f32[i] = v, b.f64[i] = v;
    b.f16[i] = det::half_from_float(v);
    b.bf16[i] = det::bfloat16_from_float(v);
    b.exact[i] = dtype == lt::DType::kFloat16    ? det::to_float(b.f16[i])
                 : dtype == lt::DType::kBFloat16 ? det::to_float(b.bf16[i])
                                                 : static_cast<double>(v);
  }
  return b;
}

void set_nan(Buffer& b, size_t i) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  b.f32[i] = nan, b.f64[i] = nan;
  b.f16[i] = det::half_from_float(nan), b.bf16[i] = det::bfloat16_from_float(nan);
  b.exact[i] = nan;
}

const void* data(const Buffer& b, lt::DType dtype) {
  switch (dtype) {
    case lt::DType::kFloat32: return b.f32.data();
    case lt::DType::kFloat64: return b.f64.data();
    case lt::DType::kFloat16: return b.f16.data();
    case lt::DType::kBFloat16: return b.bf16.data();
  }
  return nullptr;
}

size_t element_size(lt::DType dtype) {
  return dtype == lt::DType::kFloat64 ? 8 : dtype == lt::DType::kFloat32 ? 4 : 2;
}

double read(const std::vector<unsigned char>& out, lt::DType dtype, size_t i) {
  switch (dtype) {
    case lt::DType::kFloat32: { float v; std::memcpy(&v, &out[i * 4], 4); return v; }
    case lt::DType::kFloat64: { double v; std::memcpy(&v, &out[i * 8], 8); return v; }
    case lt::DType::kFloat16: { det::Half v; std::memcpy(&v, &out[i * 2], 2); return det::to_float(v); }
    case lt::DType::kBFloat16: { det::BFloat16 v; std::memcpy(&v, &out[i * 2], 2); return det::to_float(v); }
  }
  return 0;
}

double unit_roundoff(lt::DType dtype) {
  switch (dtype) {
    case lt::DType::kFloat32: return std::ldexp(1.0, -24);
    case lt::DType::kFloat64: return std::ldexp(1.0, -53);
    case lt::DType::kFloat16: return std::ldexp(1.0, -11);
    case lt::DType::kBFloat16: return std::ldexp(1.0, -8);
  }
  return 0;
}

using Attention = decltype(&lt::cpu::paged_decode_attention);

void test_case(int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
               std::vector<int64_t> contexts, lt::DType dtype,
               Attention attention = &lt::cpu::paged_decode_attention, const char* path = "auto") {
  std::snprintf(g_case, sizeof g_case, "%s rows=%lld heads=%lld/%lld dim=%lld bs=%lld dtype=%d",
                path, (ll)rows, (ll)heads, (ll)kv_heads, (ll)dim, (ll)block_size, (int)dtype);
  int64_t max_blocks = 1;
  for (int64_t c : contexts) max_blocks = std::max(max_blocks, (c + block_size - 1) / block_size + 1);
  const int64_t num_blocks = rows * max_blocks + 1;
  const int64_t slot_elems = kv_heads * dim;
  Buffer q = make(static_cast<size_t>(rows * heads * dim), dtype, -2.f, 2.f);
  Buffer k = make(static_cast<size_t>(num_blocks * block_size * slot_elems), dtype, -2.f, 2.f);
  Buffer v = make(static_cast<size_t>(num_blocks * block_size * slot_elems), dtype, -3.f, 3.f);
  // Each row's blocks: a shuffled, disjoint draw; table entries past the context name
  // block num_blocks + 5 (out of range: must never be read).
  std::vector<int64_t> ids(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), g_rng);
  std::vector<int64_t> tables(static_cast<size_t>(rows * max_blocks), num_blocks + 5);
  std::vector<bool> used(static_cast<size_t>(num_blocks * block_size), false);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b * block_size < contexts[r]; ++b) {
      tables[r * max_blocks + b] = ids[r * max_blocks + b];
      for (int64_t i = 0; i < block_size && b * block_size + i < contexts[r]; ++i) {
        used[ids[r * max_blocks + b] * block_size + i] = true;
      }
    }
  }
  for (int64_t slot = 0; slot < num_blocks * block_size; ++slot) {  // unread slots: NaN
    if (used[slot]) continue;
    for (int64_t e = 0; e < slot_elems; ++e) set_nan(k, slot * slot_elems + e), set_nan(v, slot * slot_elems + e);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  const size_t n_out = static_cast<size_t>(rows * heads * dim), es = element_size(dtype);
  std::vector<unsigned char> out((n_out + 8) * es, 0x7f), split((n_out + 8) * es, 0x7f);
  attention(data(q, dtype), data(k, dtype), data(v, dtype), dtype, rows, heads, kv_heads, dim,
            num_blocks, block_size, tables.data(), max_blocks, contexts.data(), scale, 0,
            rows * kv_heads, out.data());
  for (int64_t begin = 0; begin < rows * kv_heads; begin += 3) {  // ranges of 3 items
    attention(data(q, dtype), data(k, dtype), data(v, dtype), dtype, rows, heads, kv_heads, dim,
              num_blocks, block_size, tables.data(), max_blocks, contexts.data(), scale, begin,
              std::min(begin + 3, rows * kv_heads), split.data());
  }
  size_t guard_bad = 0;
  for (size_t i = n_out * es; i < out.size(); ++i) guard_bad += out[i] != 0x7f;
  CHECK(guard_bad == 0, "%zu guard bytes written", guard_bad);
  CHECK(std::memcmp(out.data(), split.data(), n_out * es) == 0, "item ranges change the result");

  const int64_t group = heads / kv_heads;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ctx = contexts[r];
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<double> keys, values, scores(static_cast<size_t>(ctx));
      for (int64_t s = 0; s < ctx; ++s) {  // gather the row's keys and values
        const int64_t slot = tables[r * max_blocks + s / block_size] * block_size + s % block_size;
        const size_t base = static_cast<size_t>(slot * slot_elems + (h / group) * dim);
        keys.insert(keys.end(), k.exact.begin() + base, k.exact.begin() + base + dim);
        values.insert(values.end(), v.exact.begin() + base, v.exact.begin() + base + dim);
      }
      double top = -INFINITY, total = 0, magnitude = 0;
      for (int64_t s = 0; s < ctx; ++s) {
        double d = 0;
        for (int64_t i = 0; i < dim; ++i) d += q.exact[(r * heads + h) * dim + i] * keys[s * dim + i];
        scores[s] = d * scale;
        top = std::max(top, scores[s]);
      }
      for (double& s : scores) total += (s = std::exp(s - top));
      for (int64_t i = 0; i < dim; ++i) {
        double want = 0;
        for (int64_t s = 0; s < ctx; ++s) want += scores[s] * values[s * dim + i];
        want /= total;
        magnitude = std::max(magnitude, std::fabs(want));
        const double got = read(out, dtype, static_cast<size_t>((r * heads + h) * dim + i));
        // fp32 sums over ctx·dim terms, then one rounding to the storage type
        const double budget = (std::fabs(want) + 3.0) * unit_roundoff(dtype) * 2 +
                              3.0 * (ctx + dim) * std::ldexp(1.0, -24) * 4;
        CHECK(std::isfinite(got) && std::fabs(got - want) <= budget,
              "row %lld head %lld [%lld]: got %.9g want %.9g (budget %.3g)", (ll)r, (ll)h,
              (ll)i, got, want, budget);
      }
    }
  }
}

void test_invalid_arguments() {
  std::snprintf(g_case, sizeof g_case, "invalid arguments");
  float q[16] = {0}, pool[2 * 4 * 2 * 4] = {0}, out[16];
  int64_t tables[2] = {0, 1}, ctx[2] = {3, 4};
  auto call = [&](int64_t heads, int64_t kv_heads, int64_t* t, int64_t* c) {
    lt::cpu::paged_decode_attention(q, pool, pool, lt::DType::kFloat32, 2, heads, kv_heads, 2, 2,
                                    4, t, 1, c, 0.5, 0, 2 * kv_heads, out);
  };
  call(2, 1, tables, ctx);  // valid: no throw
  ++livethinking::test::g_passed;
  CHECK_THROWS(call(3, 2, tables, ctx));  // heads not a multiple of kv heads
  int64_t bad_block[2] = {0, 2};
  CHECK_THROWS(call(2, 1, bad_block, ctx));  // block id 2 of 2 blocks
  int64_t zero_ctx[2] = {0, 4}, long_ctx[2] = {3, 5};
  CHECK_THROWS(call(2, 1, tables, zero_ctx));
  CHECK_THROWS(call(2, 1, tables, long_ctx));  // 5 > max_blocks * block_size = 4
}

}  // namespace

int main() {
  const lt::DType dtypes[] = {lt::DType::kFloat32, lt::DType::kFloat16, lt::DType::kBFloat16,
                              lt::DType::kFloat64};
  for (lt::DType dtype : dtypes) {
    test_case(1, 1, 1, 8, 4, {1}, dtype);
    test_case(3, 4, 2, 8, 4, {1, 5, 9}, dtype);
    test_case(2, 3, 1, 12, 16, {17, 33}, dtype);  // group 3, dim 12: the 8-lane tail
    test_case(4, 8, 2, 33, 16, {97, 1, 16, 200}, dtype);
    test_case(7, 2, 2, 8, 1, {7, 1, 3, 2, 5, 6, 4}, dtype);  // block size 1
    test_case(0, 4, 2, 8, 4, {}, dtype);  // no rows
  }
  // float32 with head_dim % 8 == 0: the AVX2 + FMA path where the CPU has it (pairs of
  // heads and a lone one, 4-key blocks and their tail, 32-column chunks and 8-column ones)
  // and the portable loops, each against the reference
  std::printf("paged attention: %s path\n",
              lt::cpu::paged_attention_vectorised() ? "AVX2+FMA" : "portable");
  const std::pair<Attention, const char*> paths[] = {
      {&lt::cpu::paged_decode_attention, "auto"},
      {&lt::cpu::paged_decode_attention_portable, "portable"}};
  for (const auto& [attention, path] : paths) {
    const lt::DType f32 = lt::DType::kFloat32;
    test_case(1, 1, 1, 8, 4, {1}, f32, attention, path);
    test_case(3, 4, 2, 32, 16, {1, 5, 97}, f32, attention, path);  // pairs of heads
    test_case(2, 3, 1, 40, 16, {17, 33}, f32, attention, path);  // a pair and a lone head
    test_case(4, 16, 2, 64, 16, {7, 64, 16, 130}, f32, attention, path);  // group 8
    test_case(2, 8, 4, 128, 8, {200, 3}, f32, attention, path);
    test_case(5, 2, 2, 16, 1, {7, 1, 3, 2, 5}, f32, attention, path);  // block size 1
  }
  test_invalid_arguments();
  return livethinking::test::report();
}
