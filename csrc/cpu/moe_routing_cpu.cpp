// CPU implementations of the MoE routing API (livethinking/moe_routing.h).
//
// Plain C++17, no torch: the torch bindings split work across threads by
// calling these on disjoint ranges of rows or tokens, which they allow because
// every output row depends only on its own inputs.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_convert.h"
#include "kernel_support.h"
#include "livethinking/moe_routing.h"

namespace livethinking::cpu {
namespace {

using detail::BFloat16;
using detail::dispatch_storage;
using detail::Half;
using detail::require;

// For checks inside loops: the message is only built when the check fails.
[[noreturn]] void index_error(const char* name, int64_t at, int64_t value, int64_t low,
                              int64_t high, bool inclusive) {
  throw std::invalid_argument(std::string(name) + "[" + std::to_string(at) + "] = " +
                              std::to_string(value) + " is outside [" + std::to_string(low) +
                              ", " + std::to_string(high) + (inclusive ? "]" : ")"));
}

void require_sizes(int64_t num_tokens, int64_t top_k, int64_t hidden) {
  require(num_tokens >= 0, "num_tokens must be >= 0, got " + std::to_string(num_tokens));
  require(top_k >= 1, "top_k must be >= 1, got " + std::to_string(top_k));
  require(hidden >= 0, "hidden must be >= 0, got " + std::to_string(hidden));
  // Checked by division: the product itself may overflow int64.
  require(num_tokens <= std::numeric_limits<int32_t>::max() / top_k,
          "num_tokens * top_k must fit in int32, got " + std::to_string(num_tokens) + " x " +
              std::to_string(top_k));
}

template <typename T>
void topk_softmax_rows(const T* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                       bool renormalize, float* topk_weights, int32_t* topk_ids) {
  std::vector<float> row(static_cast<size_t>(num_experts));
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* in = logits + t * num_experts;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < num_experts; ++e) {
      row[e] = detail::to_float(in[e]);
      max_logit = std::max(max_logit, row[e]);
    }
    float denominator = 0.f;
    for (int64_t e = 0; e < num_experts; ++e) denominator += std::exp(row[e] - max_logit);
    // Highest logit first; equal logits keep ascending expert order.
    for (int64_t e = 0; e < num_experts; ++e) order[e] = static_cast<int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&row](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    float* weights = topk_weights + t * top_k;
    int32_t* ids = topk_ids + t * top_k;
    float selected = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      ids[j] = order[j];
      weights[j] = std::exp(row[order[j]] - max_logit) / denominator;
      selected += weights[j];
    }
    if (renormalize) {
      for (int64_t j = 0; j < top_k; ++j) weights[j] /= selected;
    }
  }
}

template <typename T, typename W>
void permute_rows(const T* x, int64_t num_tokens, int64_t hidden, int64_t top_k,
                  const int32_t* sorted_ids, int64_t num_rows, const W* weights, T* rows) {
  using C = typename detail::Compute<T>::type;
  const int64_t num_pairs = num_tokens * top_k;
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t p = sorted_ids[r];
    if (p < 0 || p > num_pairs) index_error("sorted_ids", r, p, 0, num_pairs, true);
    T* out = rows + r * hidden;
    if (p == num_pairs) {
      std::fill(out, out + hidden, detail::from_compute<T>(C(0)));
      continue;
    }
    const T* in = x + (p / top_k) * hidden;
    if (weights == nullptr) {
      std::copy(in, in + hidden, out);
    } else {
      const C w = static_cast<C>(weights[p]);
      for (int64_t h = 0; h < hidden; ++h) out[h] = detail::from_compute<T>(w * detail::load(in[h]));
    }
  }
}

template <typename T, typename W>
void unpermute_tokens(const T* y, int64_t num_rows, int64_t hidden, int64_t num_tokens,
                      int64_t top_k, const int32_t* row_of_pair, const W* weights, T* out) {
  using C = typename detail::Compute<T>::type;
  std::vector<C> acc(static_cast<size_t>(hidden));
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), C(0));
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      const int64_t r = row_of_pair[p];
      if (r < 0 || r >= num_rows) index_error("row_of_pair", p, r, 0, num_rows, false);
      const T* in = y + r * hidden;
      const C w = weights == nullptr ? C(1) : static_cast<C>(weights[p]);
      for (int64_t h = 0; h < hidden; ++h) acc[h] += w * detail::load(in[h]);
    }
    T* dst = out + t * hidden;
    for (int64_t h = 0; h < hidden; ++h) dst[h] = detail::from_compute<T>(acc[h]);
  }
}

template <typename T>
void pair_dot_tokens(const T* a, const T* b, int64_t num_tokens, int64_t num_rows, int64_t hidden,
                     int64_t top_k, const int32_t* row_of_pair,
                     typename detail::Compute<T>::type* out) {
  using C = typename detail::Compute<T>::type;
  for (int64_t p = 0; p < num_tokens * top_k; ++p) {
    const int64_t r = row_of_pair[p];
    if (r < 0 || r >= num_rows) index_error("row_of_pair", p, r, 0, num_rows, false);
    const T* lhs = a + (p / top_k) * hidden;
    const T* rhs = b + r * hidden;
    C sum = 0;
    for (int64_t h = 0; h < hidden; ++h) sum += detail::load(lhs[h]) * detail::load(rhs[h]);
    out[p] = sum;
  }
}

}  // namespace

void moe_topk_softmax(const void* router_logits, DType dtype, int64_t num_tokens,
                      int64_t num_experts, int64_t top_k, bool renormalize, float* topk_weights,
                      int32_t* topk_ids) {
  require(num_tokens >= 0, "num_tokens must be >= 0, got " + std::to_string(num_tokens));
  require(num_experts >= 1, "num_experts must be >= 1, got " + std::to_string(num_experts));
  require(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, num_experts=" +
                                                  std::to_string(num_experts) + "], got " +
                                                  std::to_string(top_k));
  require(dtype != DType::kFloat64, "router_logits: dtype must be float32, float16 or bfloat16");
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    topk_softmax_rows(static_cast<const T*>(router_logits), num_tokens, num_experts, top_k,
                      renormalize, topk_weights, topk_ids);
  });
}

void moe_align(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k, int64_t num_experts,
               int64_t block_size, int32_t* sorted_ids, int32_t* expert_offsets,
               int32_t* block_experts, int32_t* num_rows_padded, int32_t* row_of_pair,
               int32_t* tokens_per_expert) {
  require_sizes(num_tokens, top_k, 0);
  require(num_experts >= 1, "num_experts must be >= 1, got " + std::to_string(num_experts));
  require(top_k <= num_experts, "top_k must be in [1, num_experts=" + std::to_string(num_experts) +
                                    "], got " + std::to_string(top_k));
  require(block_size >= 1 && block_size <= std::numeric_limits<int32_t>::max(),
          "block_size must be in [1, 2^31 - 1], got " + std::to_string(block_size));
  const MoeAlignShape shape = moe_align_shape(num_tokens, top_k, num_experts, block_size);
  require(shape.max_rows <= std::numeric_limits<int32_t>::max(),
          "num_tokens * top_k + num_experts * (block_size - 1) must fit in int32");

  // Count, then exclusive scan of the padded segment lengths.
  std::fill(tokens_per_expert, tokens_per_expert + num_experts, 0);
  for (int64_t p = 0; p < shape.num_pairs; ++p) {
    const int32_t e = topk_ids[p];
    if (e < 0 || e >= num_experts) {
      throw std::invalid_argument("topk_ids[" + std::to_string(p / top_k) + ", " +
                                  std::to_string(p % top_k) + "] = " + std::to_string(e) +
                                  " is outside [0, num_experts=" + std::to_string(num_experts) +
                                  ")");
    }
    ++tokens_per_expert[e];
  }
  expert_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (tokens_per_expert[e] + block_size - 1) / block_size * block_size;
    expert_offsets[e + 1] = static_cast<int32_t>(expert_offsets[e] + padded);
  }
  const int32_t total = expert_offsets[num_experts];
  num_rows_padded[0] = total;

  // Stable scatter: pairs visited in ascending order land in ascending rows.
  std::fill(sorted_ids, sorted_ids + shape.max_rows, static_cast<int32_t>(shape.num_pairs));
  std::vector<int32_t> next_row(expert_offsets, expert_offsets + num_experts);
  for (int64_t p = 0; p < shape.num_pairs; ++p) {
    const int32_t row = next_row[topk_ids[p]]++;
    sorted_ids[row] = static_cast<int32_t>(p);
    row_of_pair[p] = row;
  }

  std::fill(block_experts, block_experts + shape.max_blocks, -1);
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t b = expert_offsets[e] / block_size; b < expert_offsets[e + 1] / block_size; ++b) {
      block_experts[b] = static_cast<int32_t>(e);
    }
  }
}

void moe_permute(const void* x, DType dtype, int64_t num_tokens, int64_t hidden, int64_t top_k,
                 const int32_t* sorted_ids, int64_t num_rows, const void* topk_weights,
                 void* rows) {
  require_sizes(num_tokens, top_k, hidden);
  require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    using W = typename detail::Compute<T>::type;
    permute_rows(static_cast<const T*>(x), num_tokens, hidden, top_k, sorted_ids, num_rows,
                 static_cast<const W*>(topk_weights), static_cast<T*>(rows));
  });
}

void moe_unpermute(const void* y, DType dtype, int64_t num_rows, int64_t hidden,
                   int64_t num_tokens, int64_t top_k, const int32_t* row_of_pair,
                   const void* topk_weights, void* out) {
  require_sizes(num_tokens, top_k, hidden);
  require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    using W = typename detail::Compute<T>::type;
    unpermute_tokens(static_cast<const T*>(y), num_rows, hidden, num_tokens, top_k, row_of_pair,
                     static_cast<const W*>(topk_weights), static_cast<T*>(out));
  });
}

void moe_pair_dot(const void* a, const void* b, DType dtype, int64_t num_tokens, int64_t num_rows,
                  int64_t hidden, int64_t top_k, const int32_t* row_of_pair, void* out) {
  require_sizes(num_tokens, top_k, hidden);
  require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    using W = typename detail::Compute<T>::type;
    pair_dot_tokens(static_cast<const T*>(a), static_cast<const T*>(b), num_tokens, num_rows,
                    hidden, top_k, row_of_pair, static_cast<W*>(out));
  });
}

}  // namespace livethinking::cpu
