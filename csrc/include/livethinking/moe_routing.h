// MoE routing and token permutation: the standalone C++ API of livethinking.
//
// No Python and no torch: raw pointers, sizes and (for CUDA) a stream, so other
// stacks can vendor csrc/ as it is. The PyTorch ops in torch_bindings*.cpp are
// thin wrappers over exactly these functions.
//
// Conventions
//   * Every buffer is contiguous and row-major; sizes are element counts.
//   * A "pair" p = t * top_k + j is slot j of token t (0 <= j < top_k).
//   * Routed rows are the pairs grouped by expert (stable: ascending p within
//     an expert), each expert's segment padded up to a multiple of block_size.
//     Padding rows hold the sentinel p = num_tokens * top_k in sorted_ids.
//   * Index tensors are int32. Weights are float (double when dtype is kFloat64).
//   * Floating-point sums accumulate in float (double for kFloat64) in a fixed
//     order: results are deterministic and independent of thread count.
//
//   * Sizes: num_tokens >= 0, 1 <= top_k <= num_experts, 1 <= block_size < 2^31,
//     hidden >= 0. A null topk_weights means every weight is 1.
//   * NaN logits rank in an unspecified place (the CUDA kernels rank them last).
//
// Errors: invalid sizes throw std::invalid_argument (CPU and CUDA). Out-of-range
// indices read from device memory throw std::invalid_argument on the CPU and make
// the CUDA kernel trap (no host synchronisation is ever done to check them), which
// leaves the CUDA context unusable, as a device-side assert does. CUDA functions
// return cudaGetLastError() after their launches: cudaSuccess when all went well
// (an earlier, unrelated error still pending in the context is returned too).
#pragma once

#include <cstddef>
#include <cstdint>

#include "livethinking/dtype.h"

namespace livethinking {

// Largest expert count the CUDA kernels support (shared-memory counters).
constexpr int64_t kMaxExperts = 1024;

// Sizes of moe_align's outputs, all known from the input sizes alone, so the
// outputs can be allocated without a look at the routing (no host sync).
struct MoeAlignShape {
  int64_t num_pairs;   // num_tokens * top_k; also the padding sentinel value
  int64_t max_rows;    // capacity of sorted_ids; a multiple of block_size
  int64_t max_blocks;  // max_rows / block_size: length of block_experts
};

// max_rows bounds sum_e ceil(n_e / b) * b over at most min(E, N) non-empty
// experts holding N pairs in all: floor((N + min(E, N) * (b - 1)) / b) * b.
inline MoeAlignShape moe_align_shape(int64_t num_tokens, int64_t top_k, int64_t num_experts,
                                     int64_t block_size) {
  const int64_t n = num_tokens * top_k;
  const int64_t used = n < num_experts ? n : num_experts;
  const int64_t blocks = (n + used * (block_size - 1)) / block_size;
  return MoeAlignShape{n, blocks * block_size, blocks};
}

namespace cpu {

// topk_weights[t, :], topk_ids[t, :] = top_k of softmax(router_logits[t, :]) in
// float32, ranked by logit (ties go to the lower expert id), in descending
// order; with renormalize the k weights are divided by their sum.
// router_logits: (num_tokens, num_experts) of dtype kFloat32/kFloat16/kBFloat16.
void moe_topk_softmax(const void* router_logits, DType dtype, int64_t num_tokens,
                      int64_t num_experts, int64_t top_k, bool renormalize, float* topk_weights,
                      int32_t* topk_ids);

// Groups the pairs of topk_ids (num_tokens, top_k) by expert. Outputs:
//   sorted_ids        (max_rows,)         pair of each routed row, sentinel on padding
//   expert_offsets    (num_experts + 1,)  first row of each expert's padded segment
//   block_experts     (max_blocks,)       expert of each block of rows, -1 past the end
//   num_rows_padded   (1,)                expert_offsets[num_experts]
//   row_of_pair       (num_tokens, top_k) routed row of each pair (inverse of sorted_ids)
//   tokens_per_expert (num_experts,)      unpadded pair count of each expert
void moe_align(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k, int64_t num_experts,
               int64_t block_size, int32_t* sorted_ids, int32_t* expert_offsets,
               int32_t* block_experts, int32_t* num_rows_padded, int32_t* row_of_pair,
               int32_t* tokens_per_expert);

// rows[r, :] = w[p] * x[p / top_k, :] with p = sorted_ids[r] (w = 1 when
// topk_weights is null); rows with the sentinel (p == num_tokens * top_k) are 0.
// x: (num_tokens, hidden), rows: (num_rows, hidden), topk_weights: (num_tokens, top_k).
void moe_permute(const void* x, DType dtype, int64_t num_tokens, int64_t hidden, int64_t top_k,
                 const int32_t* sorted_ids, int64_t num_rows, const void* topk_weights,
                 void* rows);

// out[t, :] = sum_j w[t, j] * y[row_of_pair[t, j], :], j ascending, accumulated
// in float (double for kFloat64) and rounded once. y: (num_rows, hidden).
void moe_unpermute(const void* y, DType dtype, int64_t num_rows, int64_t hidden,
                   int64_t num_tokens, int64_t top_k, const int32_t* row_of_pair,
                   const void* topk_weights, void* out);

// out[t, j] = <a[t, :], b[row_of_pair[t, j], :]>: the gradient of the routing
// weights of both moe_permute (a = x, b = d rows) and moe_unpermute
// (a = d out, b = y). a: (num_tokens, hidden), b: (num_rows, hidden),
// out: (num_tokens, top_k) float (double for kFloat64).
void moe_pair_dot(const void* a, const void* b, DType dtype, int64_t num_tokens, int64_t num_rows,
                  int64_t hidden, int64_t top_k, const int32_t* row_of_pair, void* out);

}  // namespace cpu

#if defined(LIVETHINKING_WITH_CUDA)
namespace cuda {

// The same functions on device pointers, enqueued on `stream` (a cudaStream_t;
// nullptr is the legacy default stream). None synchronises with the host, so
// all can be captured in a CUDA graph. num_experts <= kMaxExperts.
int moe_topk_softmax(const void* router_logits, DType dtype, int64_t num_tokens,
                     int64_t num_experts, int64_t top_k, bool renormalize, float* topk_weights,
                     int32_t* topk_ids, void* stream);

// Bytes of scratch device memory moe_align needs (may be 0).
size_t moe_align_workspace_bytes(int64_t num_tokens, int64_t top_k, int64_t num_experts);

int moe_align(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k, int64_t num_experts,
              int64_t block_size, int32_t* sorted_ids, int32_t* expert_offsets,
              int32_t* block_experts, int32_t* num_rows_padded, int32_t* row_of_pair,
              int32_t* tokens_per_expert, void* workspace, void* stream);

int moe_permute(const void* x, DType dtype, int64_t num_tokens, int64_t hidden, int64_t top_k,
                const int32_t* sorted_ids, int64_t num_rows, const void* topk_weights, void* rows,
                void* stream);

int moe_unpermute(const void* y, DType dtype, int64_t num_rows, int64_t hidden,
                  int64_t num_tokens, int64_t top_k, const int32_t* row_of_pair,
                  const void* topk_weights, void* out, void* stream);

int moe_pair_dot(const void* a, const void* b, DType dtype, int64_t num_tokens, int64_t num_rows,
                 int64_t hidden, int64_t top_k, const int32_t* row_of_pair, void* out,
                 void* stream);

// Human-readable message for a status returned above.
const char* error_string(int status);

}  // namespace cuda
#endif

}  // namespace livethinking
