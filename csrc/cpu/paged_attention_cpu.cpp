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
// and the next block is prefetched into L2 (a sequence's blocks lie anywhere in the
// pool), as is the next run's first keys while this run's values stream past.
// float32 with head_dim % 8 == 0 takes an AVX2 + FMA path (attend_items_avx2) on CPUs
// that have it: the same passes with the products blocked in registers.
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
// sequential addresses) cannot see the next block coming. Into L2 (locality 2, T1), not
// L1: a block of keys or values is as large as L1 itself (16 KiB for 4 kv heads of 64),
// and asking for L1 evicted the block being read (from memory that took 1.1-1.4x as long).
template <typename T>
void prefetch_block(const T* first_slot, int64_t slots, int64_t slot_stride, int64_t dim) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < slots; ++i) {
    const char* p = reinterpret_cast<const char*>(first_slot + i * slot_stride);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
  }
#else
  (void)first_slot, (void)slots, (void)slot_stride, (void)dim;
#endif
}

// The first keys of the run that starts at `item` (if it is before `item_end`), up to
// kNextRunBytes of them, asked for while the current run's values are summed: a row's
// first block is otherwise fetched only when its score pass reaches it.
constexpr int64_t kNextRunBytes = 96 * 1024;  // within L2 (1 MiB or more) with the blocks in use

template <typename T>
void prefetch_next_run(const T* k_pool, int64_t num_kv_heads, int64_t dim, int64_t block_size,
                       const int64_t* block_tables, int64_t max_blocks,
                       const int64_t* context_lens, int64_t item, int64_t item_end) {
  if (item >= item_end) return;
  const int64_t row = item / num_kv_heads, first_head = item % num_kv_heads;
  const int64_t kv_heads = std::min(num_kv_heads, first_head + (item_end - item)) - first_head;
  const int64_t slot_stride = num_kv_heads * dim, ctx = context_lens[row];
  const int64_t block_bytes = block_size * kv_heads * dim * static_cast<int64_t>(sizeof(T));
  const int64_t blocks = std::max<int64_t>(1, kNextRunBytes / std::max<int64_t>(block_bytes, 1));
  const int64_t* table = block_tables + row * max_blocks;  // ids checked before the sweep
  for (int64_t b = 0, first = 0; b < blocks && first < ctx; ++b, first += block_size) {
    prefetch_block(k_pool + table[b] * block_size * slot_stride + first_head * dim,
                   std::min(block_size, ctx - first), slot_stride, kv_heads * dim);
  }
}

[[noreturn]] void block_error(int64_t row, int64_t index, int64_t value, int64_t num_blocks) {
  throw std::invalid_argument("block_tables[" + std::to_string(row) + ", " +
                              std::to_string(index) + "] = " + std::to_string(value) +
                              " must lie in [0, " + std::to_string(num_blocks) + ")");
}

// Scratch of one call over items [begin, end): the run's scaled queries and weighted sums
// (num_heads × dim), its scores (num_heads × the longest context among the items) and
// per-head softmax normalisers.
template <typename Acc>
struct RunBuffers {
  std::vector<Acc> queries, sums, scores, normaliser;

  RunBuffers(int64_t num_heads, int64_t num_kv_heads, int64_t dim, const int64_t* context_lens,
             int64_t item_begin, int64_t item_end) {
    int64_t longest = 0;
    for (int64_t item = item_begin; item < item_end; ++item) {
      longest = std::max(longest, context_lens[item / num_kv_heads]);
    }
    queries.resize(static_cast<size_t>(num_heads * dim));
    sums.resize(static_cast<size_t>(num_heads * dim));
    scores.resize(static_cast<size_t>(num_heads * longest));
    normaliser.resize(static_cast<size_t>(num_heads));
  }
};

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
  RunBuffers<Acc> buffers(num_heads, num_kv_heads, dim, context_lens, item_begin, item_end);
  std::vector<Acc>&queries = buffers.queries, &sums = buffers.sums, &scores = buffers.scores,
                  &normaliser = buffers.normaliser;
  std::vector<Acc> row_buffer(static_cast<size_t>(slot_stride));
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
    prefetch_next_run(k_pool, num_kv_heads, dim, block_size, block_tables, max_blocks,
                      context_lens, item, item_end);
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

#ifdef LT_HAVE_AVX2_PATH
// The float32 path for head_dim % 8 == 0 on CPUs with AVX2 + FMA, items in runs of one
// row as in attend_items. Scores: four keys against up to two query heads at once, eight
// accumulators of eight lanes, the four keys' lanes reduced together (three horizontal
// adds for four scores). Weighted sum: the output of up to two heads, 32 columns at a
// time, held in eight registers while the keys' values stream past. The same two
// passes and softmax as attend_items; fused multiply-adds, so the last bits differ.
using detail::lane_sum;

// The four sums of a0..a3's lanes, in order.
LT_AVX2 inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// scores[h * stride + j] = <q_h, key_j> for HB heads (q rows dim apart) and four keys.
template <int HB>
LT_AVX2 inline void score_four(const float* q, const float* key, int64_t key_stride,
                               int64_t dim, float* scores, int64_t stride) {
  __m256 acc[HB][4];
  for (int h = 0; h < HB; ++h) {
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < dim; c += 8) {
    __m256 k[4];
    for (int j = 0; j < 4; ++j) k[j] = _mm256_loadu_ps(key + j * key_stride + c);
    for (int h = 0; h < HB; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * dim + c);
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_fmadd_ps(qv, k[j], acc[h][j]);
    }
  }
  for (int h = 0; h < HB; ++h) {
    _mm_storeu_ps(scores + h * stride, sum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
  }
}

template <int HB>
LT_AVX2 inline void score_one(const float* q, const float* key, int64_t dim, float* scores,
                              int64_t stride) {
  __m256 acc[HB];
  for (int h = 0; h < HB; ++h) acc[h] = _mm256_setzero_ps();
  for (int64_t c = 0; c < dim; c += 8) {
    const __m256 k = _mm256_loadu_ps(key + c);
    for (int h = 0; h < HB; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * dim + c), k, acc[h]);
  }
  for (int h = 0; h < HB; ++h) scores[h * stride] = lane_sum(acc[h]);
}

// sums[h, c0 : c0 + 8·DV] += Σ_i weights[h, i] v_i[c0 : ...] over a block's n slots, for
// HB heads (weights rows stride apart, sums rows dim apart): the sums stay in registers
// across the block.
template <int HB, int DV>
LT_AVX2 inline void weigh_block(const float* weights, int64_t stride, const float* values,
                                int64_t n, int64_t slot_stride, int64_t dim, float* sums) {
  __m256 acc[HB][DV];
  for (int h = 0; h < HB; ++h) {
    for (int d = 0; d < DV; ++d) acc[h][d] = _mm256_loadu_ps(sums + h * dim + 8 * d);
  }
  for (int64_t i = 0; i < n; ++i) {
    __m256 v[DV];
    for (int d = 0; d < DV; ++d) v[d] = _mm256_loadu_ps(values + i * slot_stride + 8 * d);
    for (int h = 0; h < HB; ++h) {
      const __m256 w = _mm256_broadcast_ss(weights + h * stride + i);
      for (int d = 0; d < DV; ++d) acc[h][d] = _mm256_fmadd_ps(w, v[d], acc[h][d]);
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int d = 0; d < DV; ++d) _mm256_storeu_ps(sums + h * dim + 8 * d, acc[h][d]);
  }
}

// The scores of HB query heads (q rows dim apart) against a block's n keys of one kv head.
template <int HB>
LT_AVX2 inline void score_block(const float* q, const float* keys, int64_t n,
                                int64_t slot_stride, int64_t dim, float* scores, int64_t ctx) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) score_four<HB>(q, keys + i * slot_stride, slot_stride, dim, scores + i, ctx);
  for (; i < n; ++i) score_one<HB>(q, keys + i * slot_stride, dim, scores + i, ctx);
}

template <int HB>
LT_AVX2 inline void weigh_heads(const float* weights, int64_t stride, const float* values,
                                int64_t n, int64_t slot_stride, int64_t dim, float* sums) {
  int64_t c0 = 0;
  for (; c0 + 32 <= dim; c0 += 32) {
    weigh_block<HB, 4>(weights, stride, values + c0, n, slot_stride, dim, sums + c0);
  }
  for (; c0 < dim; c0 += 8) {
    weigh_block<HB, 1>(weights, stride, values + c0, n, slot_stride, dim, sums + c0);
  }
}

// Items in runs of one row, as attend_items: each pass sweeps the row's blocks once,
// every kv head of the run within a block before the next block (a slot's heads are one
// contiguous stretch, so the sweep reads each block sequentially).
LT_AVX2 void attend_items_avx2(const float* q, const float* k_pool, const float* v_pool,
                               int64_t num_heads, int64_t num_kv_heads, int64_t dim,
                               int64_t block_size, const int64_t* block_tables,
                               int64_t max_blocks, const int64_t* context_lens, double scale,
                               int64_t item_begin, int64_t item_end, float* out) {
  const int64_t group = num_heads / num_kv_heads, slot_stride = num_kv_heads * dim;
  RunBuffers<float> buffers(num_heads, num_kv_heads, dim, context_lens, item_begin, item_end);
  std::vector<float>&queries = buffers.queries, &sums = buffers.sums, &scores = buffers.scores,
                    &normaliser = buffers.normaliser;
  const __m256 scale8 = _mm256_set1_ps(static_cast<float>(scale));
  for (int64_t item = item_begin; item < item_end;) {
    const int64_t row = item / num_kv_heads, first_head = item % num_kv_heads;
    const int64_t last_head = std::min(num_kv_heads, first_head + (item_end - item));  // excl.
    item += last_head - first_head;
    const int64_t kv_heads = last_head - first_head, heads = kv_heads * group;
    const int64_t ctx = context_lens[row];
    const int64_t* table = block_tables + row * max_blocks;
    const int64_t offset = first_head * dim;  // of the run's first kv head within a slot
    const float* q_run = q + (row * num_heads + first_head * group) * dim;
    for (int64_t i = 0; i < heads * dim; i += 8) {
      _mm256_storeu_ps(queries.data() + i, _mm256_mul_ps(_mm256_loadu_ps(q_run + i), scale8));
    }
    // Pass 1: scores[h, s] = <q_h, k_s>.
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const float* keys = k_pool + table[b] * block_size * slot_stride + offset;
      const int64_t n = std::min(block_size, ctx - first);
      if (first + block_size < ctx) {  // ids checked before the sweep
        prefetch_block(k_pool + table[b + 1] * block_size * slot_stride + offset,
                       std::min(block_size, ctx - first - block_size), slot_stride, kv_heads * dim);
      }
      // this block's values, for pass 2 (a row of 64 tokens has only 4 blocks)
      prefetch_block(v_pool + table[b] * block_size * slot_stride + offset, n, slot_stride,
                     kv_heads * dim);
      for (int64_t kh = 0; kh < kv_heads; ++kh) {
        int64_t h = kh * group;
        for (; h + 2 <= (kh + 1) * group; h += 2) {
          score_block<2>(queries.data() + h * dim, keys + kh * dim, n, slot_stride, dim,
                         scores.data() + h * ctx + first, ctx);
        }
        if (h < (kh + 1) * group) {
          score_block<1>(queries.data() + h * dim, keys + kh * dim, n, slot_stride, dim,
                         scores.data() + h * ctx + first, ctx);
        }
      }
    }
    // Softmax over s per query head: weights exp(score - max), normaliser their sum.
    for (int64_t h = 0; h < heads; ++h) {
      float* sh = scores.data() + h * ctx;
      const float top = max_of(sh, ctx);
      for (int64_t s = 0; s < ctx; ++s) sh[s] = exp_nonpositive(sh[s] - top);
      normaliser[h] = sum(sh, ctx);
    }
    // Pass 2: sums[h] = Σ_s weight[h, s] v_s.
    prefetch_next_run(k_pool, num_kv_heads, dim, block_size, block_tables, max_blocks,
                      context_lens, item, item_end);
    std::fill(sums.begin(), sums.begin() + heads * dim, 0.0f);
    for (int64_t b = 0, first = 0; first < ctx; ++b, first += block_size) {
      const float* values = v_pool + table[b] * block_size * slot_stride + offset;
      const int64_t n = std::min(block_size, ctx - first);
      for (int64_t kh = 0; kh < kv_heads; ++kh) {
        int64_t h = kh * group;
        for (; h + 2 <= (kh + 1) * group; h += 2) {
          weigh_heads<2>(scores.data() + h * ctx + first, ctx, values + kh * dim, n, slot_stride,
                         dim, sums.data() + h * dim);
        }
        if (h < (kh + 1) * group) {
          weigh_heads<1>(scores.data() + h * ctx + first, ctx, values + kh * dim, n, slot_stride,
                         dim, sums.data() + h * dim);
        }
      }
    }
    float* out_run = out + (row * num_heads + first_head * group) * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const __m256 total = _mm256_set1_ps(normaliser[h]);
      for (int64_t c = 0; c < dim; c += 8) {
        _mm256_storeu_ps(out_run + h * dim + c,
                         _mm256_div_ps(_mm256_loadu_ps(sums.data() + h * dim + c), total));
      }
    }
  }
}
#endif

void check_and_attend(const void* q, const void* k_pool, const void* v_pool, DType dtype,
                      int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t num_blocks, int64_t block_size,
                      const int64_t* block_tables, int64_t max_blocks,
                      const int64_t* context_lens, double scale, int64_t item_begin,
                      int64_t item_end, void* out, bool vectorised) {
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
#ifdef LT_HAVE_AVX2_PATH
  if (vectorised && dtype == DType::kFloat32 && head_dim % 8 == 0) {
    attend_items_avx2(static_cast<const float*>(q), static_cast<const float*>(k_pool),
                      static_cast<const float*>(v_pool), num_heads, num_kv_heads, head_dim,
                      block_size, block_tables, max_blocks, context_lens, scale, item_begin,
                      item_end, static_cast<float*>(out));
    return;
  }
#else
  (void)vectorised;
#endif
  detail::dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    attend_items(static_cast<const T*>(q), static_cast<const T*>(k_pool),
                 static_cast<const T*>(v_pool), num_heads, num_kv_heads, head_dim, block_size,
                 block_tables, max_blocks, context_lens, scale, item_begin, item_end,
                 static_cast<T*>(out));
  });
}

}  // namespace

bool paged_attention_vectorised() { return detail::has_avx2_fma(); }

void paged_decode_attention(const void* q, const void* k_pool, const void* v_pool, DType dtype,
                            int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t num_blocks, int64_t block_size,
                            const int64_t* block_tables, int64_t max_blocks,
                            const int64_t* context_lens, double scale, int64_t item_begin,
                            int64_t item_end, void* out) {
  check_and_attend(q, k_pool, v_pool, dtype, num_rows, num_heads, num_kv_heads, head_dim,
                   num_blocks, block_size, block_tables, max_blocks, context_lens, scale,
                   item_begin, item_end, out, paged_attention_vectorised());
}

void paged_decode_attention_portable(const void* q, const void* k_pool, const void* v_pool,
                                     DType dtype, int64_t num_rows, int64_t num_heads,
                                     int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks,
                                     int64_t block_size, const int64_t* block_tables,
                                     int64_t max_blocks, const int64_t* context_lens,
                                     double scale, int64_t item_begin, int64_t item_end,
                                     void* out) {
  check_and_attend(q, k_pool, v_pool, dtype, num_rows, num_heads, num_kv_heads, head_dim,
                   num_blocks, block_size, block_tables, max_blocks, context_lens, scale,
                   item_begin, item_end, out, false);
}

}  // namespace livethinking::cpu
