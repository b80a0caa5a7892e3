// CPU implementation of paged decode attention (livethinking/paged_attention.h).
//
// Plain C++17, no torch. Per (row, kv head) item: the group's queries are loaded
// once (scaled, in the compute type); each key of the row's context is read in
// place from its pool slot, its scores against the group's queries are kept; a
// max-subtracted softmax per query head; then the values are summed with those
// weights. Two passes over the context instead of an online softmax: the scores
// fit in a small buffer (group * context) and each pass is a simple, vectorisable
// loop. The dot products keep eight independent partial sums, which the compiler
// turns into vector lanes without any reassociation flag (the order is fixed).
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "float_convert.h"
#include "kernel_support.h"
#include "livethinking/paged_attention.h"

namespace livethinking::cpu {
namespace {

using detail::require;

template <typename Acc>
Acc dot(const Acc* a, const Acc* b, int64_t n) {
  Acc lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  Acc sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
            ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename Acc>
void axpy(Acc* y, Acc alpha, const Acc* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// The row of `src` (head_dim values) in the compute type: the storage itself when
// it is the compute type, else converted into `buffer`.
template <typename T, typename Acc>
const Acc* load_row(const T* src, int64_t n, Acc* buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    (void)n, (void)buffer;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = detail::load(src[i]);
    return buffer;
  }
}

// Asks for the cache lines of one kv head's part of a block's slots ahead of use: a
// sequence's blocks lie anywhere in the pool, so the hardware prefetcher (which follows
// sequential addresses) cannot see the next block coming.
template <typename T>
void prefetch_block(const T* first_slot, int64_t slots, int64_t slot_stride, int64_t dim) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < slots; ++i) {
    const char* p = reinterpret_cast<const char*>(first_slot + i * slot_stride);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 3);
  }
#else
  (void)first_slot, (void)slots, (void)slot_stride, (void)dim;
#endif
}

[[noreturn]] void block_error(int64_t row, int64_t index, int64_t value, int64_t num_blocks) {
  throw std::invalid_argument("block_tables[" + std::to_string(row) + ", " +
                              std::to_string(index) + "] = " + std::to_string(value) +
                              " must lie in [0, " + std::to_string(num_blocks) + ")");
}

template <typename T>
void attend_items(const T* q, const T* k_pool, const T* v_pool, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks, int64_t block_size,
                  const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                  double scale, int64_t item_begin, int64_t item_end, T* out) {
  using Acc = typename detail::Compute<T>::type;
  const int64_t group = num_heads / num_kv_heads, dim = head_dim;
  const int64_t slot_stride = num_kv_heads * dim;  // elements between consecutive pool slots
  int64_t longest = 0;
  for (int64_t item = item_begin; item < item_end; ++item) {
    longest = std::max(longest, context_lens[item / num_kv_heads]);
  }
  std::vector<Acc> queries(static_cast<size_t>(group * dim));
  std::vector<Acc> sums(static_cast<size_t>(group * dim));
  std::vector<Acc> scores(static_cast<size_t>(group * longest));
  std::vector<Acc> row_buffer(static_cast<size_t>(dim));
  std::vector<Acc> normaliser(static_cast<size_t>(group));
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t row = item / num_kv_heads, kv_head = item % num_kv_heads;
    const int64_t ctx = context_lens[row];
    const int64_t* table = block_tables + row * max_blocks;
    const T* q_group = q + (row * num_heads + kv_head * group) * dim;
    for (int64_t i = 0; i < group * dim; ++i) {
      queries[i] = detail::load(q_group[i]) * static_cast<Acc>(scale);
    }
    // Pass 1: scores[j, s] = <q_j, k_s>.
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const int64_t block = table[b];
      if (block < 0 || block >= num_blocks) block_error(row, b, block, num_blocks);
      const T* keys = k_pool + block * block_size * slot_stride + kv_head * dim;
      const int64_t n = std::min(block_size, ctx - first);
      if (first + block_size < ctx) {  // the next block's keys; its id is checked when used
        const int64_t next = table[b + 1];
        if (next >= 0 && next < num_blocks) {
          prefetch_block(k_pool + next * block_size * slot_stride + kv_head * dim,
                         std::min(block_size, ctx - first - block_size), slot_stride, dim);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const Acc* key = load_row<T, Acc>(keys + i * slot_stride, dim, row_buffer.data());
        for (int64_t j = 0; j < group; ++j) {
          scores[j * ctx + first + i] = dot(queries.data() + j * dim, key, dim);
        }
      }
    }
    // Softmax over s per query head: weights exp(score - max), normaliser their sum.
    for (int64_t j = 0; j < group; ++j) {
      Acc* sj = scores.data() + j * ctx;
      Acc top = -std::numeric_limits<Acc>::infinity();
      for (int64_t s = 0; s < ctx; ++s) top = std::max(top, sj[s]);
      Acc total = 0;
      for (int64_t s = 0; s < ctx; ++s) {
        sj[s] = std::exp(sj[s] - top);
        total += sj[s];
      }
      normaliser[j] = total;
    }
    // Pass 2: sums[j] = sum_s weight[j, s] v_s.
    std::fill(sums.begin(), sums.end(), Acc{0});
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const T* values = v_pool + table[b] * block_size * slot_stride + kv_head * dim;
      const int64_t n = std::min(block_size, ctx - first);
      if (first + block_size < ctx) {  // checked in pass 1
        prefetch_block(v_pool + table[b + 1] * block_size * slot_stride + kv_head * dim,
                       std::min(block_size, ctx - first - block_size), slot_stride, dim);
      }
      for (int64_t i = 0; i < n; ++i) {
        const Acc* value = load_row<T, Acc>(values + i * slot_stride, dim, row_buffer.data());
        for (int64_t j = 0; j < group; ++j) {
          axpy(sums.data() + j * dim, scores[j * ctx + first + i], value, dim);
        }
      }
    }
    T* out_group = out + (row * num_heads + kv_head * group) * dim;
    for (int64_t j = 0; j < group; ++j) {
      for (int64_t i = 0; i < dim; ++i) {
        out_group[j * dim + i] = detail::from_compute<T>(sums[j * dim + i] / normaliser[j]);
      }
    }
  }
}

}  // namespace

void paged_decode_attention(const void* q, const void* k_pool, const void* v_pool, DType dtype,
                            int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t num_blocks, int64_t block_size,
                            const int64_t* block_tables, int64_t max_blocks,
                            const int64_t* context_lens, double scale, int64_t item_begin,
                            int64_t item_end, void* out) {
  require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
  require(num_kv_heads >= 1 && num_heads >= num_kv_heads && num_heads % num_kv_heads == 0,
          "num_heads (" + std::to_string(num_heads) + ") must be a positive multiple of "
          "num_kv_heads (" + std::to_string(num_kv_heads) + ")");
  require(head_dim >= 1, "head_dim must be >= 1, got " + std::to_string(head_dim));
  require(num_blocks >= 0 && block_size >= 1 && max_blocks >= 0,
          "num_blocks, max_blocks must be >= 0 and block_size >= 1");
  require(scale > 0, "scale must be > 0");
  require(item_begin >= 0 && item_begin <= item_end && item_end <= num_rows * num_kv_heads,
          "items [" + std::to_string(item_begin) + ", " + std::to_string(item_end) +
              ") must lie within [0, num_rows * num_kv_heads]");
  const int64_t limit = max_blocks * block_size;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t row = item / num_kv_heads, ctx = context_lens[row];
    if (ctx < 1 || ctx > limit) {
      throw std::invalid_argument("context_lens[" + std::to_string(row) + "] = " +
                                  std::to_string(ctx) + " must lie in [1, max_blocks * block_size = " +
                                  std::to_string(limit) + "]");
    }
  }
  detail::dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    attend_items(static_cast<const T*>(q), static_cast<const T*>(k_pool),
                 static_cast<const T*>(v_pool), num_heads, num_kv_heads, head_dim, num_blocks,
                 block_size, block_tables, max_blocks, context_lens, scale, item_begin, item_end,
                 static_cast<T*>(out));
  });
}

}  // namespace livethinking::cpu
