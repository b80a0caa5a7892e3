// Decode attention over a paged KV pool: the standalone C++ API of livethinking.
//
// One new query per sequence; its keys and values are read in place through the
// sequence's block table (no gather into a contiguous copy):
//
//   out[b, h, :] = sum_{s < ctx_b} softmax_s(scale * <q[b, h, :], k_s>) * v_s
//   k_s = k_pool[slot(b, s), h / (num_heads / num_kv_heads), :]       (v_s likewise)
//   slot(b, s) = block_tables[b, s / block_size] * block_size + s % block_size
//
// Conventions: every buffer is contiguous and row-major; q and out are
// (num_rows, num_heads, head_dim), the pools (num_blocks * block_size,
// num_kv_heads, head_dim), all of one dtype; block_tables (num_rows, max_blocks)
// and context_lens (num_rows,) int64. Scores, softmax and the weighted sum are in
// float (double for kFloat64), in a fixed order: results do not depend on the
// thread count. float32 with head_dim % 8 == 0 runs an AVX2 + FMA path where the CPU
// has it (fused multiply-adds: its last bits differ from the portable loops'). Table entries at or past a row's context are never read, nor are
// the pool slots they name, so stale or NaN values there never reach the output.
//
// Errors: invalid sizes, a context length outside [1, max_blocks * block_size] or
// a block id outside [0, num_blocks) within a row's context throw
// std::invalid_argument.
#pragma once

#include <cstdint>

#include "livethinking/dtype.h"

namespace livethinking::cpu {

// Computes the (row, kv head) items [item_begin, item_end) of out, item =
// row * num_kv_heads + kv_head: the num_heads / num_kv_heads query heads that
// share a kv head. Threads split the items; each writes only its own rows of out.
void paged_decode_attention(const void* q, const void* k_pool, const void* v_pool, DType dtype,
                            int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t num_blocks, int64_t block_size,
                            const int64_t* block_tables, int64_t max_blocks,
                            const int64_t* context_lens, double scale, int64_t item_begin,
                            int64_t item_end, void* out);

// The loops every CPU runs (what CPUs without AVX2 + FMA run; tests check both paths).
void paged_decode_attention_portable(const void* q, const void* k_pool, const void* v_pool,
                                     DType dtype, int64_t num_rows, int64_t num_heads,
                                     int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks,
                                     int64_t block_size, const int64_t* block_tables,
                                     int64_t max_blocks, const int64_t* context_lens,
                                     double scale, int64_t item_begin, int64_t item_end,
                                     void* out);

// Whether float32 with head_dim % 8 == 0 runs the AVX2 + FMA path on this CPU.
bool paged_attention_vectorised();

}  // namespace livethinking::cpu
