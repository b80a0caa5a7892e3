// The livethinking op library: schemas and CPU implementations.
//
// Schemas are declared once here; torch_bindings_cuda.cpp adds CUDA kernels for
// the same ops, and livethinking/ops registers the fake (meta) kernels and the
// autograd formulas from Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "livethinking/moe_routing.h"
#include "livethinking/paged_attention.h"
#include "livethinking/rms_norm.h"
#include "livethinking/skinny_gemm.h"
#include "routing_op_args.h"

namespace livethinking::torch_ops {
namespace {

// Rows of work per parallel chunk so that each chunk touches ~64 KB.
int64_t grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes));
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& router_logits,
                                                    int64_t top_k, bool renormalize) {
  auto [weights, ids] = topk_softmax_outputs(router_logits, top_k);
  const at::Tensor logits = router_logits.contiguous();
  const int64_t num_experts = logits.size(1);
  const DType dtype = storage_dtype(logits, "router_logits");
  const auto* base = static_cast<const char*>(logits.data_ptr());
  const int64_t row_bytes = num_experts * logits.element_size();
  at::parallel_for(0, logits.size(0), grain(row_bytes), [&](int64_t begin, int64_t end) {
    cpu::moe_topk_softmax(base + begin * row_bytes, dtype, end - begin, num_experts, top_k,
                          renormalize, weights.data_ptr<float>() + begin * top_k,
                          ids.data_ptr<int32_t>() + begin * top_k);
  });
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> align_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  AlignOutputs out = align_outputs(topk_ids, num_experts, block_size);
  const at::Tensor ids = topk_ids.contiguous();
  // A counting sort is one pass over T * k ints: serial is faster than splitting it.
  cpu::moe_align(ids.data_ptr<int32_t>(), ids.size(0), ids.size(1), num_experts, block_size,
                 out.sorted_ids.data_ptr<int32_t>(), out.expert_offsets.data_ptr<int32_t>(),
                 out.block_experts.data_ptr<int32_t>(), out.num_rows_padded.data_ptr<int32_t>(),
                 out.row_of_pair.data_ptr<int32_t>(), out.tokens_per_expert.data_ptr<int32_t>());
  return {out.sorted_ids, out.expert_offsets, out.block_experts, out.num_rows_padded,
          out.row_of_pair, out.tokens_per_expert};
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& sorted_ids_in,
                       const at::Tensor& row_of_pair, 
                       const std::optional<at::Tensor>& weights_in) {
  at::Tensor rows = permute_output(x_in, sorted_ids_in, row_of_pair, weights_in);
  const int64_t top_k = row_of_pair.size(1);
  const at::Tensor x = x_in.contiguous(), sorted_ids = sorted_ids_in.contiguous();
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  const int64_t hidden = x.size(1), row_bytes = hidden * x.element_size();
  const DType dtype = storage_dtype(x, "x");
  auto* out = static_cast<char*>(rows.data_ptr());
  at::parallel_for(0, rows.size(0), grain(row_bytes), [&](int64_t begin, int64_t end) {
    cpu::moe_permute(x.data_ptr(), dtype, x.size(0), hidden, top_k,
                     sorted_ids.data_ptr<int32_t>() + begin, end - begin, data_or_null(weights),
                     out + begin * row_bytes);
  });
  return rows;
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& sorted_ids,
                         const at::Tensor& row_of_pair_in,
                         const std::optional<at::Tensor>& weights_in) {
  at::Tensor out = unpermute_output(y_in, sorted_ids, row_of_pair_in, weights_in);
  const at::Tensor y = y_in.contiguous(), row_of_pair = row_of_pair_in.contiguous();
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  const int64_t hidden = y.size(1), top_k = row_of_pair.size(1);
  const int64_t row_bytes = hidden * y.element_size();
  const int64_t weight_bytes = weights.defined() ? weights.element_size() : 0;
  const DType dtype = storage_dtype(y, "y");
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, out.size(0), grain(row_bytes * top_k), [&](int64_t begin, int64_t end) {
    const void* w = weights.defined()
                        ? static_cast<const char*>(weights.data_ptr()) + begin * top_k * weight_bytes
                        : nullptr;
    cpu::moe_unpermute(y.data_ptr(), dtype, y.size(0), hidden, end - begin, top_k,
                       row_of_pair.data_ptr<int32_t>() + begin * top_k, w, dst + begin * row_bytes);
  });
  return out;
}

at::Tensor pair_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                        const at::Tensor& row_of_pair_in) {
  at::Tensor out = pair_dot_output(a_in, b_in, row_of_pair_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(),
                   row_of_pair = row_of_pair_in.contiguous();
  const int64_t hidden = a.size(1), top_k = row_of_pair.size(1);
  const int64_t row_bytes = hidden * a.element_size();
  const DType dtype = storage_dtype(a, "a");
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, a.size(0), grain(row_bytes * top_k), [&](int64_t begin, int64_t end) {
    cpu::moe_pair_dot(static_cast<const char*>(a.data_ptr()) + begin * row_bytes, b.data_ptr(),
                      dtype, end - begin, b.size(0), hidden, top_k,
                      row_of_pair.data_ptr<int32_t>() + begin * top_k,
                      dst + begin * top_k * out.element_size());
  });
  return out;
}

// Decode attention read in place from the paged pool (no gather); q (B, Hq, D), pools
// (blocks, BS, Hkv, D) of q's dtype, block_tables (B, max_blocks) and context_lens (B,)
// int32/int64. Inference only: no autograd formula.
at::Tensor paged_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_pool_in,
                                      const at::Tensor& v_pool_in,
                                      const at::Tensor& block_tables_in,
                                      const at::Tensor& context_lens_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "q must be 3-D (rows, heads, head_dim), got shape ", q_in.sizes());
  TORCH_CHECK(k_pool_in.dim() == 4 && k_pool_in.sizes() == v_pool_in.sizes(),
              "k_pool and v_pool must be 4-D (blocks, block_size, kv_heads, head_dim) of one "
              "shape, got ", k_pool_in.sizes(), " and ", v_pool_in.sizes());
  TORCH_CHECK(k_pool_in.scalar_type() == q_in.scalar_type() &&
                  v_pool_in.scalar_type() == q_in.scalar_type(),
              "q, k_pool and v_pool must share a dtype, got ", q_in.scalar_type(), ", ",
              k_pool_in.scalar_type(), ", ", v_pool_in.scalar_type());
  const int64_t rows = q_in.size(0), heads = q_in.size(1), dim = q_in.size(2);
  const int64_t kv_heads = k_pool_in.size(2);
  TORCH_CHECK(k_pool_in.size(3) == dim, "k_pool's head_dim ", k_pool_in.size(3),
              " differs from q's ", dim);
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "q's heads (", heads,
              ") must be a multiple of the pools' kv_heads (", kv_heads, ")");
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.size(0) == rows,
              "block_tables must be (rows=", rows, ", max_blocks), got ", block_tables_in.sizes());
  TORCH_CHECK(context_lens_in.dim() == 1 && context_lens_in.size(0) == rows,
              "context_lens must be (rows=", rows, ",), got ", context_lens_in.sizes());
  for (const at::Tensor* t : {&block_tables_in, &context_lens_in}) {
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "block_tables and context_lens must be int32 or int64, got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&k_pool_in, &v_pool_in, &block_tables_in, &context_lens_in}) {
    check_same_device(q_in, "q", *t, "a paged attention input");
  }
  const DType dtype = storage_dtype(q_in, "q");
  const at::Tensor q = q_in.contiguous(), k_pool = k_pool_in.contiguous(),
                   v_pool = v_pool_in.contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(q);
  if (rows == 0 || heads == 0) return out;
  const int64_t items = rows * kv_heads, group = heads / kv_heads;
  // ~64 KB of keys and values per chunk of items, at the longest context
  const int64_t longest = lens.max().item<int64_t>();
  const int64_t item_bytes = 2 * std::max<int64_t>(1, longest) * dim * q.element_size() * group;
  try {
    at::parallel_for(0, items, grain(item_bytes), [&](int64_t begin, int64_t end) {
      cpu::paged_decode_attention(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), dtype,
                                  rows, heads, kv_heads, dim, k_pool.size(0), k_pool.size(1),
                                  tables.data_ptr<int64_t>(), tables.size(1),
                                  lens.data_ptr<int64_t>(), scale, begin, end, out.data_ptr());
    });
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return out;
}

// RMSNorm over the last dimension of x (any leading shape), weight (size,) of x's dtype.
// Inference only: no autograd formula (training takes torch's rms_norm).
at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.dim() >= 1, "x must have at least one dimension");
  const int64_t size = x_in.size(-1);
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == size, "weight must be (", size,
              ",) like x's last dimension, got ", weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "x and weight must share a dtype, got ",
              x_in.scalar_type(), " and ", weight_in.scalar_type());
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  check_same_device(x_in, "x", weight_in, "weight");
  const DType dtype = storage_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = size == 0 ? 0 : x.numel() / size;
  at::parallel_for(0, rows, grain(size * x.element_size() * 2), [&](int64_t begin, int64_t end) {
    cpu::rms_norm(x.data_ptr(), weight.data_ptr(), dtype, rows, size, eps, begin, end,
                  out.data_ptr());
  });
  return out;
}

// Up to this many rows a group goes to the skinny GEMM; more, to at::mm (MKL), which is
// as fast from there on (benchmarks/RESULTS.md, issue 19).
constexpr int64_t kSkinnyMaxRows = 64;

// out rows [starts[g], starts[g] + counts[g]) = x's same rows · weight[g]ᵀ for each group g.
// x (T, K) float32 with unit stride along K; weight (G, N, K) float32 with unit stride
// along K; out (T, N) contiguous.
void skinny_groups(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& counts, at::Tensor& out) {
  const int64_t n_cols = weight.size(1), depth = weight.size(2);
  struct Task { int64_t group, n_begin, n_end; };
  std::vector<Task> tasks;
  for (size_t g = 0; g < counts.size(); ++g) {
    if (counts[g] == 0) continue;
    if (counts[g] > kSkinnyMaxRows) {
      at::Tensor slice = out.narrow(0, starts[g], counts[g]);
      at::mm_out(slice, x.narrow(0, starts[g], counts[g]), weight.select(0, g).t());
      continue;
    }
    const int64_t tile = cpu::skinny_gemm_tile(counts[g]);
    for (int64_t n = 0; n < n_cols; n += tile) {
      tasks.push_back({static_cast<int64_t>(g), n, std::min(n_cols, n + tile)});
    }
  }
  const float* x_base = x.data_ptr<float>();
  const float* w_base = weight.data_ptr<float>();
  float* out_base = out.data_ptr<float>();
  const int64_t task_bytes = 24 * depth * 4;  // at most a tile of weight rows
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain(task_bytes),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      // a task's columns are one tile: the kernel prefetches within [n_begin, n_end) only,
      // so a run of a thread's tasks of one group is passed as one range where it can be
      int64_t j = i;
      while (j + 1 < end && tasks[j + 1].group == task.group) ++j;
      const int64_t g = task.group;
      cpu::SkinnyGemm gemm{x_base + starts[g] * x.stride(0), counts[g], depth, x.stride(0),
                           w_base + g * weight.stride(0), weight.stride(1),
                           out_base + starts[g] * n_cols, n_cols};
      cpu::skinny_gemm(gemm, task.n_begin, tasks[j].n_end);
      i = j;
    }
  });
}

at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_float32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

// out (M, N) = x (M, K) · weight (N, K)ᵀ, float32: the skinny GEMM up to 64 rows, at::mm above.
at::Tensor skinny_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be (rows, in_features), got shape ", x_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1),
                    "weight must be (out_features, ", x_in.size(1), "), got shape ", weight_in.sizes());
  check_float32_cpu(x_in, "x");
  check_float32_cpu(weight_in, "weight");
  check_same_device(x_in, "x", weight_in, "weight");
  const at::Tensor x = unit_stride_rows(x_in), weight = unit_stride_rows(weight_in).unsqueeze(0);
  at::Tensor out = at::empty({x.size(0), weight.size(1)}, x.options());
  skinny_groups(x, weight, {0}, {x.size(0)}, out);
  return out;
}

// out (T, N): rows of group g (ends[g-1] <= t < ends[g]) times weight[g]ᵀ, as
// torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends); float32.
at::Tensor grouped_skinny_linear_cpu(const at::Tensor& rows_in, const at::Tensor& weight_in,
                                     const at::Tensor& ends_in) {
  TORCH_CHECK_VALUE(rows_in.dim() == 2, "rows must be (T, in_features), got shape ", rows_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 3 && weight_in.size(2) == rows_in.size(1),
                    "weight must be (groups, out_features, ", rows_in.size(1), "), got shape ",
                    weight_in.sizes());
  TORCH_CHECK_VALUE(ends_in.dim() == 1 && ends_in.size(0) == weight_in.size(0) &&
                        (ends_in.scalar_type() == at::kInt || ends_in.scalar_type() == at::kLong),
                    "ends must be int32 or int64 of shape (", weight_in.size(0), ",), got ",
                    ends_in.scalar_type(), " of shape ", ends_in.sizes());
  check_float32_cpu(rows_in, "rows");
  check_float32_cpu(weight_in, "weight");
  check_same_device(rows_in, "rows", weight_in, "weight");
  check_same_device(rows_in, "rows", ends_in, "ends");
  const at::Tensor ends = ends_in.to(at::kLong).contiguous();
  const int64_t groups = ends.size(0), total = rows_in.size(0);
  std::vector<int64_t> starts(groups), counts(groups);
  int64_t previous = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = ends.data_ptr<int64_t>()[g];
    TORCH_CHECK_VALUE(previous <= end && end <= total, "ends must be non-decreasing within [0, ",
                      total, "], got ", end, " after ", previous, " at group ", g);
    starts[g] = previous;
    counts[g] = end - previous;
    previous = end;
  }
  TORCH_CHECK_VALUE(previous == total, "ends must end at rows' length ", total, ", got ", previous);
  const at::Tensor rows = unit_stride_rows(rows_in), weight = unit_stride_rows(weight_in);
  at::Tensor out = at::empty({total, weight.size(1)}, rows.options());
  skinny_groups(rows, weight, starts, counts, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(livethinking, m) {
  m.def(
      "moe_topk_softmax(Tensor router_logits, int top_k, bool renormalize=True)"
      " -> (Tensor topk_weights, Tensor topk_ids)");
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_size)"
      " -> (Tensor sorted_ids, Tensor expert_offsets, Tensor block_experts,"
      " Tensor num_rows_padded, Tensor row_of_pair, Tensor tokens_per_expert)");
  // Both directions of the alignment go to both ops: each op's gradient is the other op.
  m.def(
      "moe_permute(Tensor x, Tensor sorted_ids, Tensor row_of_pair, Tensor? topk_weights=None)"
      " -> Tensor");
  m.def(
      "moe_unpermute(Tensor y, Tensor sorted_ids, Tensor row_of_pair, Tensor? topk_weights=None)"
      " -> Tensor");
  m.def("moe_pair_dot(Tensor a, Tensor b, Tensor row_of_pair) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables,"
      " Tensor context_lens, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("grouped_skinny_linear(Tensor rows, Tensor weight, Tensor ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(livethinking, CPU, m) {
  m.impl("moe_topk_softmax", &topk_softmax_cpu);
  m.impl("moe_align", &align_cpu);
  m.impl("moe_permute", &permute_cpu);
  m.impl("moe_unpermute", &unpermute_cpu);
  m.impl("moe_pair_dot", &pair_dot_cpu);
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("skinny_linear", &skinny_linear_cpu);
  m.impl("grouped_skinny_linear", &grouped_skinny_linear_cpu);
}

}  // namespace livethinking::torch_ops
