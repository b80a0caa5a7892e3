// CUDA implementations of the livethinking routing ops: argument checks and
// allocation here (on the caching allocator, no host synchronisation), kernels in
// csrc/cuda/moe_routing_cuda.cu, launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "livethinking/moe_routing.h"
#include "routing_op_args.h"

namespace livethinking::torch_ops {
namespace {

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

void check_status(int status, const char* op) {
  TORCH_CHECK(status == 0, "livethinking::", op, " CUDA launch failed: ",
              cuda::error_string(status));
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& router_logits,
                                                     int64_t top_k, bool renormalize) {
  const c10::cuda::CUDAGuard guard(router_logits.device());
  TORCH_CHECK(router_logits.size(1) <= kMaxExperts, "router_logits: at most ", kMaxExperts,
              " experts are supported on CUDA, got ", router_logits.size(1));
  auto [weights, ids] = topk_softmax_outputs(router_logits, top_k);
  const at::Tensor logits = router_logits.contiguous();
  check_status(cuda::moe_topk_softmax(logits.data_ptr(), storage_dtype(logits, "router_logits"),
                                      logits.size(0), logits.size(1), top_k, renormalize,
                                      weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                      current_stream(logits)),
               "moe_topk_softmax");
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> align_cuda(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  TORCH_CHECK(num_experts <= kMaxExperts, "num_experts: at most ", kMaxExperts,
              " experts are supported on CUDA, got ", num_experts);
  AlignOutputs out = align_outputs(topk_ids, num_experts, block_size);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t t = ids.size(0), k = ids.size(1);
  const auto workspace_bytes = static_cast<int64_t>(cuda::moe_align_workspace_bytes(t, k, num_experts));
  at::Tensor workspace = at::empty({workspace_bytes}, ids.options().dtype(at::kByte));
  check_status(
      cuda::moe_align(ids.data_ptr<int32_t>(), t, k, num_experts, block_size,
                      out.sorted_ids.data_ptr<int32_t>(), out.expert_offsets.data_ptr<int32_t>(),
                      out.block_experts.data_ptr<int32_t>(), out.num_rows_padded.data_ptr<int32_t>(),
                      out.row_of_pair.data_ptr<int32_t>(), out.tokens_per_expert.data_ptr<int32_t>(),
                      workspace_bytes > 0 ? workspace.data_ptr() : nullptr, current_stream(ids)),
      "moe_align");
  return {out.sorted_ids, out.expert_offsets, out.block_experts, out.num_rows_padded,
          out.row_of_pair, out.tokens_per_expert};
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& sorted_ids_in,
                       const at::Tensor& row_of_pair, 
                        const std::optional<at::Tensor>& weights_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor rows = permute_output(x_in, sorted_ids_in, row_of_pair, weights_in);
  const int64_t top_k = row_of_pair.size(1);
  const at::Tensor x = x_in.contiguous(), sorted_ids = sorted_ids_in.contiguous();
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  check_status(cuda::moe_permute(x.data_ptr(), storage_dtype(x, "x"), x.size(0), x.size(1), top_k,
                                 sorted_ids.data_ptr<int32_t>(), sorted_ids.size(0),
                                 data_or_null(weights), rows.data_ptr(), current_stream(x)),
               "moe_permute");
  return rows;
}

at::Tensor unpermute_cuda(const at::Tensor& y_in, const at::Tensor& sorted_ids,
                          const at::Tensor& row_of_pair_in,
                          const std::optional<at::Tensor>& weights_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  at::Tensor out = unpermute_output(y_in, sorted_ids, row_of_pair_in, weights_in);
  const at::Tensor y = y_in.contiguous(), row_of_pair = row_of_pair_in.contiguous();
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  check_status(cuda::moe_unpermute(y.data_ptr(), storage_dtype(y, "y"), y.size(0), y.size(1),
                                   row_of_pair.size(0), row_of_pair.size(1),
                                   row_of_pair.data_ptr<int32_t>(), data_or_null(weights),
                                   out.data_ptr(), current_stream(y)),
               "moe_unpermute");
  return out;
}

at::Tensor pair_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                         const at::Tensor& row_of_pair_in) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor out = pair_dot_output(a_in, b_in, row_of_pair_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(),
                   row_of_pair = row_of_pair_in.contiguous();
  check_status(cuda::moe_pair_dot(a.data_ptr(), b.data_ptr(), storage_dtype(a, "a"), a.size(0),
                                  b.size(0), a.size(1), row_of_pair.size(1),
                                  row_of_pair.data_ptr<int32_t>(), out.data_ptr(),
                                  current_stream(a)),
               "moe_pair_dot");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(livethinking, CUDA, m) {
  m.impl("moe_topk_softmax", &topk_softmax_cuda);
  m.impl("moe_align", &align_cuda);
  m.impl("moe_permute", &permute_cuda);
  m.impl("moe_unpermute", &unpermute_cuda);
  m.impl("moe_pair_dot", &pair_dot_cuda);
}

}  // namespace livethinking::torch_ops
