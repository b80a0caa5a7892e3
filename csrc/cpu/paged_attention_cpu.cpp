// CPU implementation of paged decode attention (livethinking/paged_attention.h).
//
// Plain C++17, no torch. Per row, the run of its kv heads in the item range is swept
// together (each slot holds its kv heads as one contiguous stretch, read sequentially
// within a block): the run's queries are loaded once (scaled, in the compute type); each
// key of the row's context is read in place from its pool slot and scored against the
// queries sharing its kv head; a max-subtracted softmax per query head; then the values
// are summed with those weights. Two passes over the context instead of an online
// softmax: the scores fit in a small buffer (heads * context) and each pass is a simple,
// vectorisable loop. The dot products keep eight independent partial sums, which the
// compiler turns into vector lanes without any reassociation flag (the order is fixed),
// and the next block is prefetched (a sequence's blocks lie anywhere in the pool).
#include <algorithm>
#include <cmath>
#include <cstring>
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
Acc sum(const Acc* a, int64_t n) {
  Acc lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[i + j];
  }
  Acc total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
              ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) total += a[i];
  return total;
}

template <typename Acc>
Acc max_of(const Acc* a, int64_t n) {  // n >= 1
  Acc lanes[8];
  for (int j = 0; j < 8; ++j) lanes[j] = a[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] = a[i + j] > lanes[j] ? a[i + j] : lanes[j];
  }
  Acc top = a[0];
  for (int j = 0; j < 8; ++j) top = lanes[j] > top ? lanes[j] : top;
  for (; i < n; ++i) top = a[i] > top ? a[i] : top;
  return top;
}

// exp(x) for x <= 0 (a score less the row's maximum), branch-free so that loops over it
// vectorise (with -fno-trapping-math, as setup.py and CMakeLists.txt compile): x = n·ln 2 + r, |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (about 1 ulp),
// 2^n from the exponent bits. Below −87 (e^x < 1.7e-38, nothing next to the maximum's 1)
// x is held at −87 so 2^n stays a normal float. NaN scores (NaN queries or keys) stay NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;  // ln 2 in two parts: r exact to ~2^-32
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename Acc>
LT_ALWAYS_INLINE void axpy(Acc* y, Acc alpha, const Acc* x, int64_t n) {
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

// Items [item_begin, item_end) in runs of one row each: a run of consecutive kv heads of
// a row is done in one sweep over the row's blocks, reading each slot's heads as one
// contiguous stretch (sequential within a block, which the hardware prefetcher follows).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// AVX2 clone picked at load time where the CPU has it: the same operations in the same
// order on 8 lanes instead of SSE's 4 (no FMA: a fused multiply-add would round
// differently), so results do not depend on the clone that runs.
#define LT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LT_VECTOR_CLONES
#endif
template <typename T>
LT_VECTOR_CLONES void attend_items(const T* q, const T* k_pool, const T* v_pool,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t block_size, const int64_t* block_tables,
                                    int64_t max_blocks, const int64_t* context_lens,
                                    double scale, int64_t item_begin, int64_t item_end, T* out) {
  using Acc = typename detail::Compute<T>::type;
  const int64_t group = num_heads / num_kv_heads, dim = head_dim;
  const int64_t slot_stride = num_kv_heads * dim;  // elements between consecutive pool slots
  int64_t longest = 0;
  for (int64_t item = item_begin; item < item_end; ++item) {
    longest = std::max(longest, context_lens[item / num_kv_heads]);
  }
  std::vector<Acc> queries(static_cast<size_t>(num_heads * dim));
  std::vector<Acc> sums(static_cast<size_t>(num_heads * dim));
  std::vector<Acc> scores(static_cast<size_t>(num_heads * longest));
  std::vector<Acc> row_buffer(static_cast<size_t>(slot_stride));
  std::vector<Acc> normaliser(static_cast<size_t>(num_heads));
  for (int64_t item = item_begin; item < item_end;) {
    const int64_t row = item / num_kv_heads, first_head = item % num_kv_heads;
    const int64_t last_head = std::min(num_kv_heads, first_head + (item_end - item));  // excl.
    item += last_head - first_head;
    const int64_t heads = (last_head - first_head) * group;  // query heads of this run
    const int64_t width = (last_head - first_head) * dim;  // elements of a slot read
    const int64_t ctx = context_lens[row];
    const int64_t* table = block_tables + row * max_blocks;
    const T* q_run = q + (row * num_heads + first_head * group) * dim;
    for (int64_t i = 0; i < heads * dim; ++i) {
      queries[i] = detail::load(q_run[i]) * static_cast<Acc>(scale);
    }
    // Pass 1: scores[h, s] = <q_h, k_s> for the run's query heads h.
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const int64_t block = table[b];  // checked before the sweep (paged_decode_attention)
      const T* keys = k_pool + block * block_size * slot_stride + first_head * dim;
      const int64_t n = std::min(block_size, ctx - first);
      if (first + block_size < ctx) {  // the next block's keys (ids checked before the sweep)
        prefetch_block(k_pool + table[b + 1] * block_size * slot_stride + first_head * dim,
                       std::min(block_size, ctx - first - block_size), slot_stride, width);
      }
      for (int64_t i = 0; i < n; ++i) {
        const Acc* key = load_row<T, Acc>(keys + i * slot_stride, width, row_buffer.data());
        for (int64_t h = 0; h < heads; ++h) {
          scores[h * ctx + first + i] =
              detail::lane_dot(queries.data() + h * dim, key + (h / group) * dim, dim);
        }
      }
    }
    // Softmax over s per query head: weights exp(score - max), normaliser their sum.
    for (int64_t h = 0; h < heads; ++h) {
      Acc* sh = scores.data() + h * ctx;
      const Acc top = max_of(sh, ctx);
      for (int64_t s = 0; s < ctx; ++s) sh[s] = exp_nonpositive(sh[s] - top);
      normaliser[h] = sum(sh, ctx);
    }
    // Pass 2: sums[h] = sum_s weight[h, s] v_s.
    std::fill(sums.begin(), sums.begin() + heads * dim, Acc{0});
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const T* values = v_pool + table[b] * block_size * slot_stride + first_head * dim;
      const int64_t n = std::min(block_size, ctx - first);
      if (first + block_size < ctx) {  // ids checked before the sweep
        prefetch_block(v_pool + table[b + 1] * block_size * slot_stride + first_head * dim,
                       std::min(block_size, ctx - first - block_size), slot_stride, width);
      }
      for (int64_t i = 0; i < n; ++i) {
        const Acc* value = load_row<T, Acc>(values + i * slot_stride, width, row_buffer.data());
        for (int64_t h = 0; h < heads; ++h) {
          axpy(sums.data() + h * dim, scores[h * ctx + first + i], value + (h / group) * dim, dim);
        }
      }
    }
    T* out_run = out + (row * num_heads + first_head * group) * dim;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < dim; ++i) {
        out_run[h * dim + i] = detail::from_compute<T>(sums[h * dim + i] / normaliser[h]);
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
    // Every block the row reads, here rather than in the sweep: nothing may throw from
    // inside attend_items (a throw out of its target_clones clone aborted the process,
    // GCC 12).
    for (int64_t b = 0; b * block_size < ctx; ++b) {
      const int64_t block = block_tables[row * max_blocks + b];
      if (block < 0 || block >= num_blocks) block_error(row, b, block, num_blocks);
    }
  }
  detail::dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    attend_items(static_cast<const T*>(q), static_cast<const T*>(k_pool),
                 static_cast<const T*>(v_pool), num_heads, num_kv_heads, head_dim, block_size,
                 block_tables, max_blocks, context_lens, scale, item_begin, item_end,
                 static_cast<T*>(out));
  });
}

}  // namespace livethinking::cpu
