// CUDA implementations of the MoE routing API (livethinking/moe_routing.h).
//
// Pure CUDA C++ (no torch), built both by the torch extension and by plain CMake.
// Every entry point checks its arguments on the host (std::invalid_argument),
// enqueues its kernels on the given stream, never synchronises and never
// allocates; bad indices found on the device print a message and __trap().
// Results are deterministic: no kernel depends on scheduling order, and every
// floating-point reduction has a fixed shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "livethinking/moe_routing.h"

namespace livethinking::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kThreads = 256;                    // block size of every kernel but align_scan
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxGrid = int64_t{1} << 20;   // grid-stride loops cover anything beyond
constexpr int kPairsPerWarp = 512;               // moe_align: pairs one warp ranks per chunk
constexpr int64_t kChunk = int64_t{kPairsPerWarp} * kWarpsPerBlock;  // pairs per chunk (4096)
constexpr int kScanThreads = 1024;               // align_scan: one block, >= kMaxExperts
static_assert(kScanThreads >= kMaxExperts, "align_scan needs a thread per expert");

#define LT_DEVICE_FAIL(msg)                          \
  do {                                               \
    printf("livethinking CUDA error: " msg "\n");    \
    __trap();                                        \
  } while (0)

// ---------------------------------------------------------------- device helpers

// Accumulation (and weight) type of a storage type: float, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds an accumulator to the storage type (to nearest, ties to even).
__device__ __forceinline__ void store_acc(float v, float& out) { out = v; }
__device__ __forceinline__ void store_acc(double v, double& out) { out = v; }
__device__ __forceinline__ void store_acc(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

// Uncontracted multiply / add, so sums round like the CPU's `acc += w * y`.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// V consecutive elements, loaded and stored as one access (16 bytes when vectorised).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;  // every lane holds the same value (a + b == b + a bit for bit)
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// ------------------------------------------------------------- moe_topk_softmax

// Ranking key of expert e with logit v: a larger key ranks first. The high word
// orders floats (-0 == +0, NaN below -inf), the low word is ~e so that equal
// logits prefer the lower expert; 0 means "no candidate".
__device__ __forceinline__ unsigned long long rank_key(float v, int e) {
  unsigned key = 0u;  // NaN
  if (!isnan(v)) {
    const unsigned bits = __float_as_uint(v == 0.0f ? 0.0f : v);
    key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(~e);
}

// Best untaken expert among lane's experts e = lane + 32 * i (bit i of taken).
__device__ __forceinline__ unsigned long long lane_best(const float* s, int num_experts, int lane,
                                                        unsigned taken) {
  unsigned long long best = 0ull;
  for (int i = 0, e = lane; e < num_experts; ++i, e += kWarp) {
    if ((taken >> i) & 1u) continue;
    const unsigned long long k = rank_key(s[e], e);
    best = k > best ? k : best;
  }
  return best;
}

// logits: (num_tokens, E) of T; weights: (num_tokens, K) float; ids: (num_tokens, K) int32.
// One warp per token (grid-stride over tokens, 8 warps per block). The warp stages
// the token's E logits as float in its slice of shared memory (dynamic, 8 * E floats),
// reduces max and sum(exp), then runs K rounds of warp argmax over 64-bit rank keys;
// each lane caches its best untaken key and only the winner's lane rescans.
// Output j is written by lane j % 32, which also renormalises it (own writes only).
template <typename T>
__global__ void __launch_bounds__(kThreads)
topk_softmax_kernel(const T* __restrict__ logits, int64_t num_tokens, int num_experts, int top_k,
                    bool renormalize, float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ float smem_logits[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* s = smem_logits + warp * num_experts;
  for (int64_t t = int64_t{blockIdx.x} * kWarpsPerBlock + warp; t < num_tokens;
       t += int64_t{gridDim.x} * kWarpsPerBlock) {
    const T* row = logits + t * num_experts;
    float mx = -INFINITY;
    for (int e = lane; e < num_experts; e += kWarp) {
      const float v = to_acc(row[e]);
      s[e] = v;
      mx = fmaxf(mx, v);
    }
    mx = warp_max(mx);
    __syncwarp();  // s[] complete before lanes read each other's logits
    float sum = 0.0f;
    for (int e = lane; e < num_experts; e += kWarp) sum += expf(s[e] - mx);
    sum = warp_sum(sum);

    unsigned taken = 0u;
    unsigned long long best = lane_best(s, num_experts, lane, taken);
    float selected = 0.0f;
    float* w_out = weights + t * top_k;
    int32_t* id_out = ids + t * top_k;
    for (int j = 0; j < top_k; ++j) {
      const unsigned long long win = warp_max(best);  // same on every lane
      const int e = static_cast<int>(~static_cast<unsigned>(win));
      if (e % kWarp == lane) {
        taken |= 1u << (e / kWarp);
        best = lane_best(s, num_experts, lane, taken);
      }
      const float w = expf(s[e] - mx) / sum;
      selected += w;  // identical on every lane: j ascending, like the CPU
      if (j % kWarp == lane) {
        w_out[j] = w;
        id_out[j] = e;
      }
    }
    if (renormalize) {
      for (int j = lane; j < top_k; j += kWarp) w_out[j] = w_out[j] / selected;
    }
    __syncwarp();  // every lane done with s[] before the next token overwrites it
  }
}

// ------------------------------------------------------------------- moe_align
//
// Pairs are cut into chunks of kChunk = 4096 (the last may be short); chunk c is
// handled by one block of 8 warps, warp w owning the sub-chunk of 512 pairs
// [c * 4096 + w * 512, +512). Workspace: counts (num_chunks, E) int32, turned by
// align_scan from per-chunk counts into each chunk's first rank inside its expert.

// topk_ids: (N,) with N = num_tokens * top_k; counts: (num_chunks, E); sorted_ids: (max_rows,).
// Block per chunk (grid-stride), 256 threads each taking pairs blockDim apart; lanes
// holding the same expert combine with __match_any_sync, their leader adds to the
// block's shared counters (E ints, dynamic). Also fills sorted_ids with the sentinel
// N (grid-stride over all threads); align_place later overwrites the real rows.
__global__ void __launch_bounds__(kThreads)
align_count_kernel(const int32_t* __restrict__ topk_ids, int64_t num_pairs, int num_experts,
                   int64_t num_chunks, int64_t max_rows, int32_t* __restrict__ counts,
                   int32_t* __restrict__ sorted_ids) {
  extern __shared__ int smem_count[];
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < max_rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    sorted_ids[r] = static_cast<int32_t>(num_pairs);
  }
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) smem_count[e] = 0;
    __syncthreads();
    const int64_t begin = c * kChunk;
    const int64_t end = begin + kChunk < num_pairs ? begin + kChunk : num_pairs;
    for (int64_t base = begin; base < end; base += blockDim.x) {  // uniform over the block
      const int64_t p = base + threadIdx.x;
      int e = -1;
      if (p < end) {
        e = topk_ids[p];
        if (e < 0 || e >= num_experts) LT_DEVICE_FAIL("moe_align: topk_ids value outside [0, num_experts)");
      }
      const unsigned group = __match_any_sync(kFullMask, e);
      const bool leader = (group & lanemask_lt(lane)) == 0u;  // lowest lane of its expert
      if (e >= 0 && leader) atomicAdd(&smem_count[e], __popc(group));
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      counts[c * num_experts + e] = smem_count[e];
    }
    __syncthreads();  // counters read before the next chunk zeroes them
  }
}

// counts: (num_chunks, E) in/out; tokens_per_expert: (E,); expert_offsets: (E + 1,);
// num_rows_padded: (1,). One block of 1024 threads. Thread tid < P * E (P = 1024 / E
// parts) owns expert tid % E over the contiguous chunk range number tid / E: it sums
// its range, thread e scans the P partial sums of expert e (giving n_e), then every
// owner rewrites its range as an exclusive scan (chunk's first rank in the expert).
// Finally a block-wide scan (warp shuffles + 32 warp totals) of the padded sizes
// ceil(n_e / block_size) * block_size gives expert_offsets.
__global__ void __launch_bounds__(kScanThreads)
align_scan_kernel(int32_t* __restrict__ counts, int64_t num_chunks, int num_experts,
                  int64_t block_size, int32_t* __restrict__ tokens_per_expert,
                  int32_t* __restrict__ expert_offsets, int32_t* __restrict__ num_rows_padded) {
  __shared__ int partial[kScanThreads];
  __shared__ int warp_total[kScanThreads / kWarp];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int parts = num_experts > 0 ? kScanThreads / num_experts : 1;
  const bool owner = num_experts > 0 && tid < parts * num_experts;
  const int e = owner ? tid % num_experts : 0, part = owner ? tid / num_experts : 0;
  const int64_t c_begin = num_chunks * part / parts, c_end = num_chunks * (part + 1) / parts;
  if (owner) {
    int sum = 0;
    for (int64_t c = c_begin; c < c_end; ++c) sum += counts[c * num_experts + e];
    partial[tid] = sum;
  }
  __syncthreads();
  int n_e = 0;
  if (tid < num_experts) {
    for (int q = 0; q < parts; ++q) {
      const int v = partial[q * num_experts + tid];
      partial[q * num_experts + tid] = n_e;
      n_e += v;
    }
    tokens_per_expert[tid] = n_e;
  }
  __syncthreads();
  if (owner) {
    int rank = partial[tid];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int v = counts[c * num_experts + e];
      counts[c * num_experts + e] = rank;
      rank += v;
    }
  }
  // Inclusive block scan of the padded segment lengths (0 for tid >= E).
  const int padded =
      tid < num_experts ? static_cast<int>((n_e + block_size - 1) / block_size * block_size) : 0;
  int incl = padded;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == kWarp - 1) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = warp_total[lane];  // kScanThreads / kWarp == 32 warps
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int v = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += v;
    }
    warp_total[lane] = w;
  }
  __syncthreads();
  if (warp > 0) incl += warp_total[warp - 1];
  if (tid < num_experts) expert_offsets[tid] = incl - padded;
  if (tid == kScanThreads - 1) {  // all experts lie before the last thread
    expert_offsets[num_experts] = incl;
    num_rows_padded[0] = incl;
  }
}

// topk_ids: (N,); ranks: (num_chunks, E) from align_scan; expert_offsets: (E + 1,);
// sorted_ids: (max_rows,); row_of_pair: (N,); block_experts: (max_blocks,).
// Block per chunk (grid-stride), warp per 512-pair sub-chunk. Shared memory (dynamic):
// offsets[E + 1] and next[8][E], the next free row of each expert for each warp.
// Pass 1: each warp counts its sub-chunk per expert (ids kept in registers);
// then thread e turns next[.][e] into rows: offsets[e] + ranks[c][e] + earlier warps.
// Pass 2: each warp walks its pairs 32 at a time in order; a pair's row is
// next[w][e] + (lanes below it with the same expert), so rows ascend with p.
// block_experts (grid-stride over all threads): binary search of offsets.
__global__ void __launch_bounds__(kThreads)
align_place_kernel(const int32_t* __restrict__ topk_ids, int64_t num_pairs, int num_experts,
                   int64_t num_chunks, int64_t block_size, int64_t max_blocks,
                   const int32_t* __restrict__ ranks, const int32_t* __restrict__ expert_offsets,
                   int32_t* __restrict__ sorted_ids, int32_t* __restrict__ row_of_pair,
                   int32_t* __restrict__ block_experts) {
  extern __shared__ int smem_place[];
  int* offsets = smem_place;                    // [E + 1]
  int* next = smem_place + num_experts + 1;     // [kWarpsPerBlock][E]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int i = threadIdx.x; i <= num_experts; i += blockDim.x) offsets[i] = expert_offsets[i];
  __syncthreads();

  const int64_t total_rows = offsets[num_experts];
  for (int64_t b = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; b < max_blocks;
       b += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = b * block_size;
    int expert = -1;
    if (row < total_rows) {  // the e with offsets[e] <= row < offsets[e + 1]
      int lo = 0, hi = num_experts;  // invariant: offsets[lo] <= row < offsets[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= row) lo = mid; else hi = mid;
      }
      expert = lo;
    }
    block_experts[b] = expert;
  }

  int* my_next = next + warp * num_experts;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    for (int i = threadIdx.x; i < kWarpsPerBlock * num_experts; i += blockDim.x) next[i] = 0;
    __syncthreads();
    const int64_t begin = c * kChunk + int64_t{warp} * kPairsPerWarp;
    const int64_t end = begin + kPairsPerWarp < num_pairs ? begin + kPairsPerWarp : num_pairs;
    int ev[kPairsPerWarp / kWarp];
#pragma unroll
    for (int it = 0; it < kPairsPerWarp / kWarp; ++it) {
      const int64_t p = begin + it * kWarp + lane;
      ev[it] = -1;
      if (begin + it * kWarp >= end) continue;  // warp-uniform
      if (p < end) {
        ev[it] = topk_ids[p];
        if (ev[it] < 0 || ev[it] >= num_experts) LT_DEVICE_FAIL("moe_align: topk_ids value outside [0, num_experts)");
      }
      const unsigned group = __match_any_sync(kFullMask, ev[it]);
      const bool leader = (group & lanemask_lt(lane)) == 0u;  // lowest lane of its expert
      if (ev[it] >= 0 && leader) my_next[ev[it]] += __popc(group);
      __syncwarp();  // next iteration's leader may be another lane
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int row = offsets[e] + ranks[c * num_experts + e];
      for (int w = 0; w < kWarpsPerBlock; ++w) {
        const int n = next[w * num_experts + e];
        next[w * num_experts + e] = row;
        row += n;
      }
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kPairsPerWarp / kWarp; ++it) {
      if (begin + it * kWarp >= end) continue;  // warp-uniform
      const int e = ev[it];
      const unsigned group = __match_any_sync(kFullMask, e);
      const int rank = __popc(group & lanemask_lt(lane));  // same-expert lanes below
      int base = 0;
      if (e >= 0) {
        const int64_t p = begin + it * kWarp + lane;
        base = my_next[e];
        sorted_ids[base + rank] = static_cast<int32_t>(p);
        row_of_pair[p] = base + rank;
      }
      __syncwarp();  // all lanes have read my_next[e] before the leader advances it
      if (e >= 0 && rank == 0) my_next[e] = base + __popc(group);
      __syncwarp();
    }
    __syncthreads();  // next[] read before the next chunk zeroes it
  }
}

// ------------------------------------------------- permute / unpermute / pair_dot
//
// A "group" of G threads (G in {32, 64, 128, 256}, a power of two chosen from the
// row length) handles one row; a 256-thread block holds 256 / G groups. V is the
// vector width: 16 / sizeof(T) when hidden * sizeof(T) % 16 == 0 and the pointers
// are 16-byte aligned, else 1. No shared memory, no block synchronisation.

// x: (num_tokens, hidden); sorted_ids: (num_rows,); weights: (num_tokens * top_k,)
// of Acc<T> or null; rows: (num_rows, hidden). Group per routed row (grid-stride),
// each thread takes vectors G apart.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
permute_kernel(const T* __restrict__ x, int64_t hidden, int top_k, int64_t num_pairs,
               const int32_t* __restrict__ sorted_ids, int64_t num_rows,
               const typename Acc<T>::type* __restrict__ weights, T* __restrict__ rows,
               int log2_group) {
  using A = typename Acc<T>::type;
  using VT = Vec<T, V>;
  const int group_size = 1 << log2_group;
  const int groups = blockDim.x >> log2_group;
  const int g = threadIdx.x >> log2_group, gl = threadIdx.x & (group_size - 1);
  const int64_t nvec = hidden / V;
  for (int64_t r = int64_t{blockIdx.x} * groups + g; r < num_rows; r += int64_t{gridDim.x} * groups) {
    const int64_t p = sorted_ids[r];
    if (p < 0 || p > num_pairs) LT_DEVICE_FAIL("moe_permute: sorted_ids value outside [0, num_tokens * top_k]");
    VT* dst = reinterpret_cast<VT*>(rows + r * hidden);
    if (p == num_pairs) {
      VT zero;
#pragma unroll
      for (int k = 0; k < V; ++k) store_acc(A(0), zero.v[k]);
      for (int64_t i = gl; i < nvec; i += group_size) dst[i] = zero;
      continue;
    }
    const VT* src = reinterpret_cast<const VT*>(x + (p / top_k) * hidden);
    if (weights == nullptr) {  // plain copy, bit for bit
      for (int64_t i = gl; i < nvec; i += group_size) dst[i] = src[i];
      continue;
    }
    const A w = weights[p];
    for (int64_t i = gl; i < nvec; i += group_size) {
      const VT in = src[i];
      VT out;
#pragma unroll
      for (int k = 0; k < V; ++k) store_acc(mul_rn(w, to_acc(in.v[k])), out.v[k]);
      dst[i] = out;
    }
  }
}

// y: (num_rows, hidden); row_of_pair: (num_tokens, top_k); weights: (num_tokens, top_k)
// of Acc<T> or null; out: (num_tokens, hidden). Group per token (grid-stride); for
// each of its vectors a thread sums the top_k routed rows in ascending j.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
unpermute_kernel(const T* __restrict__ y, int64_t num_rows, int64_t hidden, int64_t num_tokens,
                 int top_k, const int32_t* __restrict__ row_of_pair,
                 const typename Acc<T>::type* __restrict__ weights, T* __restrict__ out,
                 int log2_group) {
  using A = typename Acc<T>::type;
  using VT = Vec<T, V>;
  const int group_size = 1 << log2_group;
  const int groups = blockDim.x >> log2_group;
  const int g = threadIdx.x >> log2_group, gl = threadIdx.x & (group_size - 1);
  const int64_t nvec = hidden / V;
  for (int64_t t = int64_t{blockIdx.x} * groups + g; t < num_tokens; t += int64_t{gridDim.x} * groups) {
    const int32_t* rop = row_of_pair + t * top_k;
    const A* wt = weights != nullptr ? weights + t * top_k : nullptr;
    VT* dst = reinterpret_cast<VT*>(out + t * hidden);
    for (int64_t i = gl; i < nvec; i += group_size) {
      A acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = A(0);
      for (int j = 0; j < top_k; ++j) {
        const int64_t r = rop[j];
        if (r < 0 || r >= num_rows) LT_DEVICE_FAIL("moe_unpermute: row_of_pair value outside [0, num_rows)");
        const A w = wt != nullptr ? wt[j] : A(1);
        const VT in = reinterpret_cast<const VT*>(y + r * hidden)[i];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = add_rn(acc[k], mul_rn(w, to_acc(in.v[k])));
      }
      VT res;
#pragma unroll
      for (int k = 0; k < V; ++k) store_acc(acc[k], res.v[k]);
      dst[i] = res;
    }
  }
}

// a: (num_tokens, hidden); b: (num_rows, hidden); row_of_pair: (num_tokens * top_k,);
// out: (num_tokens * top_k,) of Acc<T>. Warp per pair (grid-stride, warp-uniform loop):
// lane sums its vectors (32 apart) with fma, then a fixed xor-butterfly; lane 0 writes.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
pair_dot_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t num_rows,
                int64_t hidden, int top_k, int64_t num_pairs,
                const int32_t* __restrict__ row_of_pair, typename Acc<T>::type* __restrict__ out) {
  using A = typename Acc<T>::type;
  using VT = Vec<T, V>;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t nvec = hidden / V;
  for (int64_t q = int64_t{blockIdx.x} * kWarpsPerBlock + warp; q < num_pairs;
       q += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t r = row_of_pair[q];
    if (r < 0 || r >= num_rows) LT_DEVICE_FAIL("moe_pair_dot: row_of_pair value outside [0, num_rows)");
    const VT* lhs = reinterpret_cast<const VT*>(a + (q / top_k) * hidden);
    const VT* rhs = reinterpret_cast<const VT*>(b + r * hidden);
    A acc = A(0);
    for (int64_t i = lane; i < nvec; i += kWarp) {
      const VT u = lhs[i], v = rhs[i];
#pragma unroll
      for (int k = 0; k < V; ++k) acc = fma_acc(to_acc(u.v[k]), to_acc(v.v[k]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[q] = acc;
  }
}

// ------------------------------------------------------------------ host helpers

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("livethinking::cuda::" + message);
}

void require_at_least(int64_t value, int64_t min, const char* fn, const char* name) {
  require(value >= min, std::string(fn) + ": " + name + " must be >= " + std::to_string(min) +
                            ", got " + std::to_string(value));
}

// num_tokens * top_k (with both already checked >= 0) must fit an int32 index.
int64_t checked_pairs(int64_t num_tokens, int64_t top_k, const char* fn) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  require(top_k <= kMax && (top_k == 0 || num_tokens <= kMax / top_k),
          std::string(fn) + ": num_tokens * top_k must fit in int32 (num_tokens = " +
              std::to_string(num_tokens) + ", top_k = " + std::to_string(top_k) + ")");
  return num_tokens * top_k;
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < kMaxGrid ? blocks : kMaxGrid));
}

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<T>{}) with T the device storage type of dtype.
template <typename Fn>
void dispatch_storage(DType dtype, const char* fn_name, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(Tag<float>{}); return;
    case DType::kFloat16: fn(Tag<__half>{}); return;
    case DType::kBFloat16: fn(Tag<__nv_bfloat16>{}); return;
    case DType::kFloat64: fn(Tag<double>{}); return;
  }
  require(false, std::string(fn_name) + ": dtype: unknown DType " +
                     std::to_string(static_cast<int>(dtype)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per row for a row of nvec vectors: about 4 vectors per thread, 32..256.
int log2_group_for(int64_t nvec) {
  int log2 = 5;
  while (log2 < 8 && (int64_t{1} << log2) * 4 < nvec) ++log2;
  return log2;
}

// Launches kernel<T, 16 / sizeof(T)> when all rows are 16-byte aligned, else <T, 1>.
template <typename T, typename Launch>
void launch_vectorised(bool can_vectorise, int64_t hidden, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  if (can_vectorise && (hidden * int64_t{sizeof(T)}) % 16 == 0) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

// ------------------------------------------------------------------- entry points

int moe_topk_softmax(const void* router_logits, DType dtype, int64_t num_tokens,
                     int64_t num_experts, int64_t top_k, bool renormalize, float* topk_weights,
                     int32_t* topk_ids, void* stream) {
  constexpr const char* fn = "moe_topk_softmax";
  require_at_least(num_tokens, 0, fn, "num_tokens");
  require_at_least(num_experts, 1, fn, "num_experts");
  require(num_experts <= kMaxExperts, std::string(fn) + ": num_experts must be <= " +
                                          std::to_string(kMaxExperts) + ", got " +
                                          std::to_string(num_experts));
  require(top_k >= 1 && top_k <= num_experts,
          std::string(fn) + ": top_k must be in [1, num_experts=" + std::to_string(num_experts) +
              "], got " + std::to_string(top_k));
  require(dtype != DType::kFloat64,
          std::string(fn) + ": dtype: router_logits must be float32, float16 or bfloat16");
  if (num_tokens == 0) {
    dispatch_storage(dtype, fn, [](auto) {});  // still reject an unknown dtype
    return 0;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = grid_for(num_tokens, kWarpsPerBlock);
  const size_t smem = sizeof(float) * kWarpsPerBlock * static_cast<size_t>(num_experts);
  dispatch_storage(dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {  // kFloat64 was rejected above
      topk_softmax_kernel<T><<<grid, kThreads, smem, s>>>(
          static_cast<const T*>(router_logits), num_tokens, static_cast<int>(num_experts),
          static_cast<int>(top_k), renormalize, topk_weights, topk_ids);
    }
  });
  return launch_status();
}

size_t moe_align_workspace_bytes(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  // Invalid sizes get 0: moe_align itself rejects them.
  if (num_tokens <= 0 || top_k <= 0 || num_experts <= 0 || num_experts > kMaxExperts ||
      top_k > std::numeric_limits<int32_t>::max() ||
      num_tokens > std::numeric_limits<int32_t>::max() / top_k) {
    return 0;
  }
  const int64_t num_chunks = (num_tokens * top_k + kChunk - 1) / kChunk;
  return static_cast<size_t>(num_chunks * num_experts) * sizeof(int32_t);
}

int moe_align(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k, int64_t num_experts,
              int64_t block_size, int32_t* sorted_ids, int32_t* expert_offsets,
              int32_t* block_experts, int32_t* num_rows_padded, int32_t* row_of_pair,
              int32_t* tokens_per_expert, void* workspace, void* stream) {
  constexpr const char* fn = "moe_align";
  require_at_least(num_tokens, 0, fn, "num_tokens");
  require_at_least(top_k, 1, fn, "top_k");
  require_at_least(num_experts, 1, fn, "num_experts");
  require_at_least(block_size, 1, fn, "block_size");
  require(num_experts <= kMaxExperts, std::string(fn) + ": num_experts must be <= " +
                                          std::to_string(kMaxExperts) + ", got " +
                                          std::to_string(num_experts));
  require(top_k <= num_experts, std::string(fn) + ": top_k (" + std::to_string(top_k) +
                                    ") must be <= num_experts (" + std::to_string(num_experts) + ")");
  const int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  require(block_size <= kInt32Max, std::string(fn) + ": block_size must fit in int32, got " +
                                       std::to_string(block_size));
  const int64_t num_pairs = checked_pairs(num_tokens, top_k, fn);
  const MoeAlignShape shape = moe_align_shape(num_tokens, top_k, num_experts, block_size);
  require(shape.max_rows <= kInt32Max,
          std::string(fn) + ": num_tokens * top_k + num_experts * (block_size - 1) (block_size = " +
              std::to_string(block_size) + ") must fit in int32");
  const size_t ws_bytes = moe_align_workspace_bytes(num_tokens, top_k, num_experts);
  require(ws_bytes == 0 || workspace != nullptr,
          std::string(fn) + ": workspace is null but " + std::to_string(ws_bytes) +
              " bytes are needed (moe_align_workspace_bytes)");

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int experts = static_cast<int>(num_experts);
  const int64_t num_chunks = (num_pairs + kChunk - 1) / kChunk;
  int32_t* counts = static_cast<int32_t*>(workspace);
  const unsigned grid = grid_for(num_chunks, 1);
  if (num_pairs > 0) {
    align_count_kernel<<<grid, kThreads, sizeof(int) * experts, s>>>(
        topk_ids, num_pairs, experts, num_chunks, shape.max_rows, counts, sorted_ids);
  }
  // Always: expert_offsets, tokens_per_expert and num_rows_padded are never empty.
  align_scan_kernel<<<1, kScanThreads, 0, s>>>(counts, num_chunks, experts, block_size,
                                               tokens_per_expert, expert_offsets, num_rows_padded);
  if (num_pairs > 0) {
    const size_t smem = sizeof(int) * (static_cast<size_t>(experts) + 1 +
                                       static_cast<size_t>(kWarpsPerBlock) * experts);
    align_place_kernel<<<grid, kThreads, smem, s>>>(topk_ids, num_pairs, experts, num_chunks,
                                                    block_size, shape.max_blocks, counts,
                                                    expert_offsets, sorted_ids, row_of_pair,
                                                    block_experts);
  }
  return launch_status();
}

int moe_permute(const void* x, DType dtype, int64_t num_tokens, int64_t hidden, int64_t top_k,
                const int32_t* sorted_ids, int64_t num_rows, const void* topk_weights, void* rows,
                void* stream) {
  constexpr const char* fn = "moe_permute";
  require_at_least(num_tokens, 0, fn, "num_tokens");
  require_at_least(top_k, 1, fn, "top_k");
  require_at_least(hidden, 0, fn, "hidden");
  require_at_least(num_rows, 0, fn, "num_rows");
  const int64_t num_pairs = checked_pairs(num_tokens, top_k, fn);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  bool launched = false;
  dispatch_storage(dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    if (num_rows == 0 || hidden == 0) return;  // rows is empty
    launch_vectorised<T>(aligned16(x) && aligned16(rows), hidden, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int log2_group = log2_group_for(hidden / V);
      const unsigned grid = grid_for(num_rows, kThreads >> log2_group);
      permute_kernel<T, V><<<grid, kThreads, 0, s>>>(
          static_cast<const T*>(x), hidden, static_cast<int>(top_k), num_pairs, sorted_ids,
          num_rows, static_cast<const A*>(topk_weights), static_cast<T*>(rows), log2_group);
    });
    launched = true;
  });
  return launched ? launch_status() : 0;
}

int moe_unpermute(const void* y, DType dtype, int64_t num_rows, int64_t hidden,
                  int64_t num_tokens, int64_t top_k, const int32_t* row_of_pair,
                  const void* topk_weights, void* out, void* stream) {
  constexpr const char* fn = "moe_unpermute";
  require_at_least(num_rows, 0, fn, "num_rows");
  require_at_least(hidden, 0, fn, "hidden");
  require_at_least(num_tokens, 0, fn, "num_tokens");
  require_at_least(top_k, 1, fn, "top_k");
  checked_pairs(num_tokens, top_k, fn);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  bool launched = false;
  dispatch_storage(dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    if (num_tokens == 0 || hidden == 0) return;  // out is empty
    launch_vectorised<T>(aligned16(y) && aligned16(out), hidden, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int log2_group = log2_group_for(hidden / V);
      const unsigned grid = grid_for(num_tokens, kThreads >> log2_group);
      unpermute_kernel<T, V><<<grid, kThreads, 0, s>>>(
          static_cast<const T*>(y), num_rows, hidden, num_tokens, static_cast<int>(top_k),
          row_of_pair, static_cast<const A*>(topk_weights), static_cast<T*>(out), log2_group);
    });
    launched = true;
  });
  return launched ? launch_status() : 0;
}

int moe_pair_dot(const void* a, const void* b, DType dtype, int64_t num_tokens, int64_t num_rows,
                 int64_t hidden, int64_t top_k, const int32_t* row_of_pair, void* out,
                 void* stream) {
  constexpr const char* fn = "moe_pair_dot";
  require_at_least(num_tokens, 0, fn, "num_tokens");
  require_at_least(num_rows, 0, fn, "num_rows");
  require_at_least(hidden, 0, fn, "hidden");
  require_at_least(top_k, 1, fn, "top_k");
  const int64_t num_pairs = checked_pairs(num_tokens, top_k, fn);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  bool launched = false;
  dispatch_storage(dtype, fn, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    if (num_pairs == 0) return;  // out is empty (hidden == 0 still writes zeros)
    launch_vectorised<T>(aligned16(a) && aligned16(b), hidden, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const unsigned grid = grid_for(num_pairs, kWarpsPerBlock);
      pair_dot_kernel<T, V><<<grid, kThreads, 0, s>>>(
          static_cast<const T*>(a), static_cast<const T*>(b), num_rows, hidden,
          static_cast<int>(top_k), num_pairs, row_of_pair, static_cast<A*>(out));
    });
    launched = true;
  });
  return launched ? launch_status() : 0;
}

const char* error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace livethinking::cuda
