// Argument checks and output allocation shared by the CPU and CUDA bindings of
// the routing ops, so both backends accept and reject exactly the same inputs.
// The Python wrappers in livethinking.ops check first with friendlier messages;
// these checks guard direct torch.ops.livethinking.* callers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "livethinking/moe_routing.h"

namespace livethinking::torch_ops {

inline DType storage_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64, got ",
                  t.scalar_type());
  }
}

inline at::ScalarType weight_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name,
              " is on ", b.device());
}

inline void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_weights(const std::optional<at::Tensor>& w, const at::Tensor& data,
                          int64_t num_tokens, int64_t top_k) {
  if (!w.has_value()) return;
  const at::ScalarType expected = weight_dtype(data.scalar_type());
  TORCH_CHECK(w->scalar_type() == expected, "topk_weights must be ", expected, " for ",
              data.scalar_type(), " data, got ", w->scalar_type());
  TORCH_CHECK(w->dim() == 2 && w->size(0) == num_tokens && w->size(1) == top_k,
              "topk_weights must have shape (", num_tokens, ", ", top_k, "), got ", w->sizes());
  check_same_device(*w, "topk_weights", data, "the data tensor");
}

// router_logits (T, E) -> (topk_weights (T, k) float32, topk_ids (T, k) int32)
inline std::tuple<at::Tensor, at::Tensor> topk_softmax_outputs(const at::Tensor& router_logits,
                                                               int64_t top_k) {
  TORCH_CHECK(router_logits.dim() == 2, "router_logits must be 2-D (tokens, experts), got shape ",
              router_logits.sizes());
  const auto dtype = router_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "router_logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t num_experts = router_logits.size(1);
  TORCH_CHECK(num_experts >= 1, "router_logits must have at least one expert column");
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, num_experts=",
              num_experts, "], got ", top_k);
  const auto opts = router_logits.options();
  const int64_t t = router_logits.size(0);
  return {at::empty({t, top_k}, opts.dtype(at::kFloat)), at::empty({t, top_k}, opts.dtype(at::kInt))};
}

struct AlignOutputs {
  at::Tensor sorted_ids, expert_offsets, block_experts, num_rows_padded, row_of_pair,
      tokens_per_expert;
};

inline AlignOutputs align_outputs(const at::Tensor& topk_ids, int64_t num_experts,
                                  int64_t block_size) {
  check_index(topk_ids, "topk_ids", 2);
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_size >= 1 && block_size <= INT32_MAX, "block_size must be in [1, 2^31 - 1], got ",
              block_size);
  const int64_t t = topk_ids.size(0), k = topk_ids.size(1);
  TORCH_CHECK(k >= 1, "topk_ids must have at least one column (top_k >= 1)");
  TORCH_CHECK(k <= num_experts, "top_k (topk_ids.shape[1] = ", k, ") must be <= num_experts (",
              num_experts, ")");
  TORCH_CHECK(t <= INT32_MAX / k, "moe_align: ", t, " tokens x top_k ", k, " overflow int32 pair indices");
  const MoeAlignShape shape = moe_align_shape(t, k, num_experts, block_size);
  TORCH_CHECK(shape.max_rows <= INT32_MAX, "moe_align: ", t, " tokens x top_k ", k,
              " with block_size ", block_size, " overflow int32 row indices");
  const auto opts = topk_ids.options().dtype(at::kInt);
  return AlignOutputs{at::empty({shape.max_rows}, opts), at::empty({num_experts + 1}, opts),
                      at::empty({shape.max_blocks}, opts), at::empty({1}, opts),
                      at::empty({t, k}, opts),           at::empty({num_experts}, opts)};
}

// sorted_ids (R,) and row_of_pair (T, k) are the two directions of one
// alignment; each op uses one of them and its gradient the other.
inline void check_alignment(const at::Tensor& sorted_ids, const at::Tensor& row_of_pair,
                            const at::Tensor& data, const char* data_name) {
  check_index(sorted_ids, "sorted_ids", 1);
  check_index(row_of_pair, "row_of_pair", 2);
  TORCH_CHECK(row_of_pair.size(1) >= 1, "row_of_pair must have at least one column (top_k >= 1)");
  check_same_device(sorted_ids, "sorted_ids", data, data_name);
  check_same_device(row_of_pair, "row_of_pair", data, data_name);
}

// x (T, H), sorted_ids (R,), row_of_pair (T, k) -> rows (R, H)
inline at::Tensor permute_output(const at::Tensor& x, const at::Tensor& sorted_ids,
                                 const at::Tensor& row_of_pair,
                                 const std::optional<at::Tensor>& topk_weights) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (tokens, hidden), got shape ", x.sizes());
  storage_dtype(x, "x");
  check_alignment(sorted_ids, row_of_pair, x, "x");
  TORCH_CHECK(row_of_pair.size(0) == x.size(0), "row_of_pair must have ", x.size(0),
              " rows (one per token of x), got ", row_of_pair.size(0));
  check_weights(topk_weights, x, x.size(0), row_of_pair.size(1));
  return at::empty({sorted_ids.size(0), x.size(1)}, x.options());
}

// y (R, H), sorted_ids (R,), row_of_pair (T, k) -> out (T, H)
inline at::Tensor unpermute_output(const at::Tensor& y, const at::Tensor& sorted_ids,
                                   const at::Tensor& row_of_pair,
                                   const std::optional<at::Tensor>& topk_weights) {
  TORCH_CHECK(y.dim() == 2, "y must be 2-D (rows, hidden), got shape ", y.sizes());
  storage_dtype(y, "y");
  check_alignment(sorted_ids, row_of_pair, y, "y");
  TORCH_CHECK(sorted_ids.size(0) == y.size(0), "y must have one row per entry of sorted_ids (",
              sorted_ids.size(0), "), got ", y.size(0));
  check_weights(topk_weights, y, row_of_pair.size(0), row_of_pair.size(1));
  return at::empty({row_of_pair.size(0), y.size(1)}, y.options());
}

// a (T, H), b (R, H), row_of_pair (T, k) -> out (T, k)
inline at::Tensor pair_dot_output(const at::Tensor& a, const at::Tensor& b,
                                  const at::Tensor& row_of_pair) {
  TORCH_CHECK(a.dim() == 2, "a must be 2-D (tokens, hidden), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(1) == a.size(1), "b must be 2-D (rows, ", a.size(1),
              "), got shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  storage_dtype(a, "a");
  check_index(row_of_pair, "row_of_pair", 2);
  TORCH_CHECK(row_of_pair.size(0) == a.size(0), "row_of_pair must have ", a.size(0),
              " rows (one per token of a), got ", row_of_pair.size(0));
  check_same_device(b, "b", a, "a");
  check_same_device(row_of_pair, "row_of_pair", a, "a");
  return at::empty({a.size(0), row_of_pair.size(1)}, a.options().dtype(weight_dtype(a.scalar_type())));
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace livethinking::torch_ops
