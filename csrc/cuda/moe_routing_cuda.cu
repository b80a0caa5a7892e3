// CUDA implementations of the MoE routing API (livethinking/moe_routing.h).
//
// Pure CUDA C++ (no torch): built by the torch extension and by plain CMake alike.
// Entry points check their arguments on the host (std::invalid_argument), enqueue
// kernels on the given stream, never synchronise and never allocate; a bad index
// met on the device prints a message and traps. Results are deterministic: no
// output depends on scheduling, and every reduction has a fixed shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "livethinking/moe_routing.h"

namespace livethinking::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kThreads = 256;  // block size of every kernel but align_scan
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // grid-stride loops cover the rest
constexpr int kPairsPerWarp = 512;              // moe_align: pairs a warp ranks per chunk
constexpr int64_t kChunk = int64_t{kPairsPerWarp} * kWarpsPerBlock;  // pairs per chunk
constexpr int kScanThreads = 1024;              // align_scan: one block, a thread per expert
static_assert(kScanThreads >= kMaxExperts, "align_scan needs a thread per expert");
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Prints a fixed message (no arguments: no stack frame) and aborts the kernel; the
// code after it is unreachable, so nothing stays live across the printf call.
#define LT_DEVICE_FAIL(msg) \
  do { printf("livethinking CUDA error: " msg "\n"); __trap(); __builtin_unreachable(); } while (0)

// ---------------------------------------------------------------- device helpers

// Accumulation (and weight) type of a storage type: float, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
// Rounds to the storage type: to nearest, ties to even.
__device__ __forceinline__ void store(float v, float& out) { out = v; }
__device__ __forceinline__ void store(double v, double& out) { out = v; }
__device__ __forceinline__ void store(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void store(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
// Uncontracted multiply and add (no FMA), rounding like the CPU's `acc += w * y`.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// V consecutive elements, moved as one access (16 bytes when vectorised).
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

// Xor butterflies: every lane ends with the same value (a + b == b + a exactly).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>  // float (no NaN inputs here) or unsigned long long
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// ------------------------------------------------------------- moe_topk_softmax

// Ranking key of expert e with logit v; a larger key ranks first. High word: the
// float order (-0 == +0, NaN below -inf); low word: ~e, so equal logits prefer the
// lower expert. 0 means "no candidate".
__device__ __forceinline__ unsigned long long rank_key(float v, int e) {
  unsigned key = 0u;  // NaN
  if (!isnan(v)) {
    const unsigned bits = __float_as_uint(v == 0.0f ? 0.0f : v);
    key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(~e);
}

// Best key among the lane's experts e = lane + 32 * i whose bit i of `taken` is clear.
__device__ __forceinline__ unsigned long long lane_best(const float* s, int num_experts, int lane,
                                                        unsigned taken) {
  unsigned long long best = 0ull;
  for (int i = 0, e = lane; e < num_experts; ++i, e += kWarp) {
    const unsigned long long key = ((taken >> i) & 1u) ? 0ull : rank_key(s[e], e);
    best = key > best ? key : best;
  }
  return best;
}

// logits: (num_tokens, E) of T; weights: (num_tokens, K) float; ids: (num_tokens, K) int32.
// Warp per token (grid-stride; 8 warps a block). The warp stages the token's logits
// as float in its slice of shared memory (dynamic: 8 * E floats), reduces the max and
// sum(exp), then runs K rounds of warp argmax over rank keys: each lane caches its
// best untaken key, only the winner's lane rescans. Lane j % 32 writes output j and
// renormalises it (it only reads back its own writes).
template <typename T>
__global__ void __launch_bounds__(kThreads)
topk_softmax_kernel(const T* __restrict__ logits, int64_t num_tokens, int num_experts, int top_k,
                    bool renormalize, float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ float smem_logits[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* s = smem_logits + warp * num_experts;
  for (int64_t t = int64_t{blockIdx.x} * kWarpsPerBlock + warp; t < num_tokens;
       t += int64_t{gridDim.x} * kWarpsPerBlock) {
    float mx = -INFINITY;
    for (int e = lane; e < num_experts; e += kWarp) {
      s[e] = to_acc(logits[t * num_experts + e]);
      mx = fmaxf(mx, s[e]);  // ignores NaN, like the CPU's std::max
    }
    mx = warp_max(mx);
    __syncwarp();  // s[] complete before lanes read each other's logits
    float sum = 0.0f;
    for (int e = lane; e < num_experts; e += kWarp) sum += expf(s[e] - mx);
    sum = warp_sum(sum);

    unsigned taken = 0u;
    unsigned long long best = lane_best(s, num_experts, lane, taken);
    float selected = 0.0f;  // sum of the k weights, j ascending (same on every lane)
    float* w_out = weights + t * top_k;
    int32_t* id_out = ids + t * top_k;
    for (int j = 0; j < top_k; ++j) {
      const int e = static_cast<int>(~static_cast<unsigned>(warp_max(best)));
      if (e % kWarp == lane) {
        taken |= 1u << (e / kWarp);
        best = lane_best(s, num_experts, lane, taken);
      }
      const float w = expf(s[e] - mx) / sum;
      selected += w;
      if (j % kWarp == lane) {
        w_out[j] = w;
        id_out[j] = e;
      }
    }
    if (renormalize) {
      for (int j = lane; j < top_k; j += kWarp) w_out[j] = w_out[j] / selected;
    }
    __syncwarp();  // all lanes done with s[] before the next token overwrites it
  }
}

// ------------------------------------------------------------------- moe_align
//
// The N = num_tokens * top_k pairs are cut into chunks of kChunk = 4096 (the last
// may be short). Chunk c goes to one block of 8 warps, warp w owning the 512 pairs
// from c * 4096 + w * 512. Workspace: counts (num_chunks, E) int32, per-chunk pair
// counts of each expert, which align_scan turns into each chunk's first rank within
// the expert. Every step is order-independent, so the result is deterministic.

// topk_ids: (N,); counts: (num_chunks, E); sorted_ids: (max_rows,).
// Block per chunk (grid-stride); thread i takes pairs i, i + 256, ... of the chunk.
// Lanes with the same expert pool via __match_any_sync and their leader adds to the
// block's shared counters (dynamic: E ints). Also fills sorted_ids with the sentinel
// N (grid-stride over all threads); align_place then overwrites the real rows.
__global__ void __launch_bounds__(kThreads)
align_count_kernel(const int32_t* __restrict__ topk_ids, int64_t num_pairs, int num_experts,
                   int num_chunks, int64_t max_rows, int32_t* __restrict__ counts,
                   int32_t* __restrict__ sorted_ids) {
  extern __shared__ int smem_count[];
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < max_rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    sorted_ids[r] = static_cast<int32_t>(num_pairs);
  }
  for (int c = static_cast<int>(blockIdx.x); c < num_chunks; c += static_cast<int>(gridDim.x)) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) smem_count[e] = 0;
    __syncthreads();
    const int64_t begin = c * kChunk, end = begin + kChunk < num_pairs ? begin + kChunk : num_pairs;
    for (int64_t base = begin; base < end; base += blockDim.x) {  // uniform over the block
      const int64_t p = base + threadIdx.x;
      const int e = p < end ? topk_ids[p] : -1;
      if (p < end && (e < 0 || e >= num_experts)) {
        LT_DEVICE_FAIL("moe_align: a topk_ids value is outside [0, num_experts)");
      }
      const unsigned group = __match_any_sync(kFullMask, e);
      const bool leader = (group & lanemask_lt(lane)) == 0u;  // lowest lane of the group
      if (e >= 0 && leader) atomicAdd(&smem_count[e], __popc(group));
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      counts[int64_t{c} * num_experts + e] = smem_count[e];
    }
    __syncthreads();  // counters read before the next chunk zeroes them
  }
}

// counts: (num_chunks, E) in/out; tokens_per_expert: (E,); expert_offsets: (E + 1,);
// num_rows_padded: (1,). One block of 1024 threads. With P = 1024 / E parts, thread
// tid < P * E owns expert tid % E over part tid / E of the chunks: it sums them, thread
// e scans expert e's P partial sums (total n_e), then each owner rewrites its chunks
// as an exclusive scan. A block scan (warp shuffles, then the 32 warp totals) of the
// padded lengths ceil(n_e / block_size) * block_size gives expert_offsets.
__global__ void __launch_bounds__(kScanThreads)
align_scan_kernel(int32_t* __restrict__ counts, int num_chunks, int num_experts,
                  unsigned block_size, int32_t* __restrict__ tokens_per_expert,
                  int32_t* __restrict__ expert_offsets, int32_t* __restrict__ num_rows_padded) {
  __shared__ int partial[kScanThreads];
  __shared__ int warp_total[kScanThreads / kWarp];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int parts = kScanThreads / num_experts;  // num_experts >= 1
  const bool owner = tid < parts * num_experts;
  const int e = tid % num_experts, part = tid / num_experts;
  // num_chunks * parts <= 2^19 * 1024 fits int.
  const int c_begin = num_chunks * part / parts, c_end = num_chunks * (part + 1) / parts;
  if (owner) {
    int sum = 0;
    for (int c = c_begin; c < c_end; ++c) sum += counts[int64_t{c} * num_experts + e];
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
    for (int c = c_begin; c < c_end; ++c) {
      const int v = counts[int64_t{c} * num_experts + e];
      counts[int64_t{c} * num_experts + e] = rank;
      rank += v;
    }
  }
  // n_e + block_size - 1 < 2^32; each padded length is <= max_rows <= INT32_MAX.
  const int padded =
      tid < num_experts ? static_cast<int>((n_e + block_size - 1u) / block_size * block_size) : 0;
  int incl = padded;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == kWarp - 1) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {  // kScanThreads / kWarp == 32 warp totals
    int w = warp_total[lane];
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
  if (tid == kScanThreads - 1) {  // every expert precedes the last thread
    expert_offsets[num_experts] = incl;
    num_rows_padded[0] = incl;
  }
}

// topk_ids: (N,); ranks: (num_chunks, E) from align_scan; expert_offsets: (E + 1,);
// sorted_ids: (max_rows,); row_of_pair: (N,); block_experts: (max_blocks,).
// Block per chunk (grid-stride), warp per 512 pairs. Shared (dynamic): offsets[E + 1]
// and next[8][E], each warp's next free row per expert. Pass 1: each warp counts its
// pairs per expert (ids kept in registers); thread e then sets next[w][e] to
// offsets[e] + ranks[c][e] + the counts of warps < w. Pass 2: each warp walks its
// pairs 32 at a time; a pair's row is next[w][e] + its same-expert lanes below it,
// so rows ascend with p. block_experts: grid-stride, binary search of offsets.
__global__ void __launch_bounds__(kThreads)
align_place_kernel(const int32_t* __restrict__ topk_ids, int64_t num_pairs, int num_experts,
                   int num_chunks, int64_t block_size, int64_t max_blocks,
                   const int32_t* __restrict__ ranks, const int32_t* __restrict__ expert_offsets,
                   int32_t* __restrict__ sorted_ids, int32_t* __restrict__ row_of_pair,
                   int32_t* __restrict__ block_experts) {
  extern __shared__ int smem_place[];
  int* offsets = smem_place;                 // [E + 1]
  int* next = smem_place + num_experts + 1;  // [kWarpsPerBlock][E]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int i = threadIdx.x; i <= num_experts; i += blockDim.x) offsets[i] = expert_offsets[i];
  __syncthreads();

  for (int64_t b = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; b < max_blocks;
       b += int64_t{gridDim.x} * blockDim.x) {
    int expert = -1;
    if (b * block_size < offsets[num_experts]) {
      int lo = 0, hi = num_experts;  // offsets[lo] <= b * block_size < offsets[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= b * block_size) lo = mid; else hi = mid;
      }
      expert = lo;
    }
    block_experts[b] = expert;
  }

  int* my_next = next + warp * num_experts;
  for (int c = static_cast<int>(blockIdx.x); c < num_chunks; c += static_cast<int>(gridDim.x)) {
    for (int i = threadIdx.x; i < kWarpsPerBlock * num_experts; i += blockDim.x) next[i] = 0;
    __syncthreads();
    const int64_t begin = c * kChunk + int64_t{warp} * kPairsPerWarp;
    const int64_t left = num_pairs - begin;  // this warp has min(left, 512) pairs, if left > 0
    const int count =
        left <= 0 ? 0 : (left < kPairsPerWarp ? static_cast<int>(left) : kPairsPerWarp);
    int ev[kPairsPerWarp / kWarp];  // expert of pair begin + it * 32 + lane, -1 past the end
#pragma unroll
    for (int it = 0; it < kPairsPerWarp / kWarp; ++it) {
      ev[it] = -1;
      if (it * kWarp >= count) continue;  // warp-uniform
      if (it * kWarp + lane < count) {
        ev[it] = topk_ids[begin + it * kWarp + lane];
        if (ev[it] < 0 || ev[it] >= num_experts) {
          LT_DEVICE_FAIL("moe_align: a topk_ids value is outside [0, num_experts)");
        }
      }
      const unsigned group = __match_any_sync(kFullMask, ev[it]);
      const bool leader = (group & lanemask_lt(lane)) == 0u;
      if (ev[it] >= 0 && leader) my_next[ev[it]] += __popc(group);
      __syncwarp();  // the next leader of this expert may be another lane
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int row = offsets[e] + ranks[int64_t{c} * num_experts + e];
      for (int w = 0; w < kWarpsPerBlock; ++w) {
        const int n = next[w * num_experts + e];
        next[w * num_experts + e] = row;
        row += n;
      }
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kPairsPerWarp / kWarp; ++it) {
      if (it * kWarp >= count) continue;  // warp-uniform
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
      __syncwarp();  // every lane has read my_next[e] before the leader advances it
      if (e >= 0 && rank == 0) my_next[e] = base + __popc(group);
      __syncwarp();
    }
    __syncthreads();  // next[] read before the next chunk zeroes it
  }
}

// ------------------------------------------------- permute / unpermute / pair_dot
//
// V is the vector width: 16 / sizeof(T) when every row of the tensors is 16-byte
// aligned, else 1. permute / unpermute give each row a group of G = 2^log2_group
// threads (32..256, ~4 vectors a thread; 256 / G groups a block), pair_dot a warp.

// x: (num_tokens, hidden); sorted_ids: (num_rows,); weights: (num_tokens * top_k,) of
// Acc<T> or null; rows: (num_rows, hidden). Group per routed row (grid-stride), each
// thread moving vectors G apart; no weights: a bit-exact copy; sentinel: zeros.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
permute_kernel(const T* __restrict__ x, int64_t hidden, int top_k, int64_t num_pairs,
               const int32_t* __restrict__ sorted_ids, int64_t num_rows,
               const typename Acc<T>::type* __restrict__ weights, T* __restrict__ rows,
               int log2_group) {
  using A = typename Acc<T>::type;
  using VT = Vec<T, V>;
  const int group_size = 1 << log2_group, groups = kThreads >> log2_group;
  const int g = threadIdx.x >> log2_group, gl = threadIdx.x & (group_size - 1);
  const int64_t nvec = hidden / V;
  for (int64_t r = int64_t{blockIdx.x} * groups + g; r < num_rows;
       r += int64_t{gridDim.x} * groups) {
    const int p = sorted_ids[r];
    if (p < 0 || p > num_pairs) {
      LT_DEVICE_FAIL("moe_permute: a sorted_ids value is outside [0, num_tokens * top_k]");
    }
    VT* dst = reinterpret_cast<VT*>(rows + r * hidden);
    const VT* src = reinterpret_cast<const VT*>(x + int64_t{p / top_k} * hidden);
    if (p == num_pairs) {
      VT zero;
#pragma unroll
      for (int k = 0; k < V; ++k) store(A(0), zero.v[k]);
      for (int64_t i = gl; i < nvec; i += group_size) dst[i] = zero;
    } else if (weights == nullptr) {
      for (int64_t i = gl; i < nvec; i += group_size) dst[i] = src[i];
    } else {
      const A w = weights[p];
      for (int64_t i = gl; i < nvec; i += group_size) {
        const VT in = src[i];
        VT out;
#pragma unroll
        for (int k = 0; k < V; ++k) store(mul_rn(w, to_acc(in.v[k])), out.v[k]);
        dst[i] = out;
      }
    }
  }
}

// y: (num_rows, hidden); row_of_pair, weights (Acc<T> or null): (num_tokens, top_k);
// out: (num_tokens, hidden). Group per token (grid-stride); for each of its vectors
// a thread sums w * y over the token's routed rows, j ascending, then rounds once.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
unpermute_kernel(const T* __restrict__ y, int64_t num_rows, int64_t hidden, int64_t num_tokens,
                 int top_k, const int32_t* __restrict__ row_of_pair,
                 const typename Acc<T>::type* __restrict__ weights, T* __restrict__ out,
                 int log2_group) {
  using A = typename Acc<T>::type;
  using VT = Vec<T, V>;
  const int group_size = 1 << log2_group, groups = kThreads >> log2_group;
  const int g = threadIdx.x >> log2_group, gl = threadIdx.x & (group_size - 1);
  const int64_t nvec = hidden / V;
  for (int64_t t = int64_t{blockIdx.x} * groups + g; t < num_tokens;
       t += int64_t{gridDim.x} * groups) {
    const int32_t* rop = row_of_pair + t * top_k;
    const A* wt = weights != nullptr ? weights + t * top_k : nullptr;
    VT* dst = reinterpret_cast<VT*>(out + t * hidden);
    for (int64_t i = gl; i < nvec; i += group_size) {
      A acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = A(0);
      for (int j = 0; j < top_k; ++j) {
        const int r = rop[j];
        if (r < 0 || r >= num_rows) {
          LT_DEVICE_FAIL("moe_unpermute: a row_of_pair value is outside [0, num_rows)");
        }
        const A w = wt != nullptr ? wt[j] : A(1);
        const VT in = reinterpret_cast<const VT*>(y + int64_t{r} * hidden)[i];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = add_rn(acc[k], mul_rn(w, to_acc(in.v[k])));
      }
      VT res;
#pragma unroll
      for (int k = 0; k < V; ++k) store(acc[k], res.v[k]);
      dst[i] = res;
    }
  }
}

// a: (num_tokens, hidden); b: (num_rows, hidden); row_of_pair: (num_tokens * top_k,);
// out: (num_tokens * top_k,) of Acc<T>. Warp per pair (grid-stride, warp-uniform): each
// lane fma-accumulates its vectors (32 apart), then a xor butterfly; lane 0 writes.
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
    const int r = row_of_pair[q];
    if (r < 0 || r >= num_rows) {
      LT_DEVICE_FAIL("moe_pair_dot: a row_of_pair value is outside [0, num_rows)");
    }
    const VT* lhs = reinterpret_cast<const VT*>(a + int64_t{static_cast<int>(q) / top_k} * hidden);
    const VT* rhs = reinterpret_cast<const VT*>(b + int64_t{r} * hidden);
    A acc = A(0);
    for (int64_t i = lane; i < nvec; i += kWarp) {
      const VT u = lhs[i], v = rhs[i];
#pragma unroll
      for (int k = 0; k < V; ++k) acc = fma(to_acc(u.v[k]), to_acc(v.v[k]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[q] = acc;
  }
}

// ------------------------------------------------------------------ host helpers

void check(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("livethinking::cuda::") + fn + ": " + what);
}

std::string str(int64_t v) { return std::to_string(v); }

void check_min(const char* fn, const char* name, int64_t value, int64_t min) {
  check(value >= min, fn, std::string(name) + " must be >= " + str(min) + ", got " + str(value));
}

// Checks num_tokens >= 0, top_k >= 1 and num_tokens * top_k <= INT32_MAX; returns it.
int64_t checked_pairs(const char* fn, int64_t num_tokens, int64_t top_k) {
  check_min(fn, "num_tokens", num_tokens, 0);
  check_min(fn, "top_k", top_k, 1);
  check(top_k <= kInt32Max && num_tokens <= kInt32Max / top_k, fn,
        "num_tokens * top_k must fit in int32, got " + str(num_tokens) + " * " + str(top_k));
  return num_tokens * top_k;
}

void check_experts(const char* fn, int64_t num_experts, int64_t top_k) {
  check_min(fn, "num_experts", num_experts, 1);
  check(num_experts <= kMaxExperts, fn, "num_experts must be <= " + str(kMaxExperts) +
                                            " on CUDA, got " + str(num_experts));
  check(top_k <= num_experts, fn, "top_k (" + str(top_k) + ") must be <= num_experts (" +
                                      str(num_experts) + ")");
}

void check_dtype(const char* fn, DType dtype, bool allow_fp64) {
  const int d = static_cast<int>(dtype);
  const bool known = d >= 0 && d <= static_cast<int>(DType::kFloat64);
  check(known && (allow_fp64 || dtype != DType::kFloat64), fn,
        "dtype: unsupported DType " + str(d) +
            (allow_fp64 ? "" : " (router_logits must be float32, float16 or bfloat16)"));
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGrid));
}

// log2 of the threads per row for rows of nvec vectors: ~4 vectors a thread, 32..256.
int log2_group_for(int64_t nvec) {
  int log2 = 5;
  while (log2 < 8 && (int64_t{4} << log2) < nvec) ++log2;
  return log2;
}

template <typename T> struct Tag { using type = T; };

// Calls launch(Tag<T>{}, std::integral_constant<int, V>{}) for the storage type T of
// dtype (already checked): V = 16 / sizeof(T) when every row of every pointer is
// 16-byte aligned (aligned bases and hidden * sizeof(T) % 16 == 0), else 1.
template <typename Fn>
void dispatch(DType dtype, int64_t hidden, std::initializer_list<const void*> ptrs, Fn&& launch) {
  auto go = [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool vec = hidden * static_cast<int64_t>(sizeof(T)) % 16 == 0;
    for (const void* p : ptrs) vec = vec && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    if (vec) {
      launch(tag, std::integral_constant<int, 16 / sizeof(T)>{});
    } else {
      launch(tag, std::integral_constant<int, 1>{});
    }
  };
  switch (dtype) {
    case DType::kFloat32: go(Tag<float>{}); break;
    case DType::kFloat16: go(Tag<__half>{}); break;
    case DType::kBFloat16: go(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat64: go(Tag<double>{}); break;
  }
}

}  // namespace

// ------------------------------------------------------------------- entry points

int moe_topk_softmax(const void* router_logits, DType dtype, int64_t num_tokens,
                     int64_t num_experts, int64_t top_k, bool renormalize, float* topk_weights,
                     int32_t* topk_ids, void* stream) {
  constexpr const char* fn = "moe_topk_softmax";
  check_min(fn, "num_tokens", num_tokens, 0);
  check_min(fn, "top_k", top_k, 1);
  check_experts(fn, num_experts, top_k);
  check_dtype(fn, dtype, /*allow_fp64=*/false);
  if (num_tokens == 0) return 0;
  const size_t smem = sizeof(float) * kWarpsPerBlock * static_cast<size_t>(num_experts);
  dispatch(dtype, 0, {}, [&](auto tag, auto) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {  // rejected above
      topk_softmax_kernel<T><<<grid_for(num_tokens, kWarpsPerBlock), kThreads, smem,
                               static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(router_logits), num_tokens, static_cast<int>(num_experts),
          static_cast<int>(top_k), renormalize, topk_weights, topk_ids);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

size_t moe_align_workspace_bytes(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  if (num_tokens <= 0 || top_k <= 0 || top_k > kInt32Max || num_tokens > kInt32Max / top_k ||
      num_experts <= 0 || num_experts > kMaxExperts) {
    return 0;  // no pairs, or sizes moe_align rejects
  }
  const int64_t num_chunks = (num_tokens * top_k + kChunk - 1) / kChunk;
  return static_cast<size_t>(num_chunks * num_experts) * sizeof(int32_t);
}

int moe_align(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k, int64_t num_experts,
              int64_t block_size, int32_t* sorted_ids, int32_t* expert_offsets,
              int32_t* block_experts, int32_t* num_rows_padded, int32_t* row_of_pair,
              int32_t* tokens_per_expert, void* workspace, void* stream) {
  constexpr const char* fn = "moe_align";
  const int64_t num_pairs = checked_pairs(fn, num_tokens, top_k);
  check_experts(fn, num_experts, top_k);
  check_min(fn, "block_size", block_size, 1);
  // block_size <= INT32_MAX first, so that moe_align_shape cannot overflow.
  check(block_size <= kInt32Max &&
            moe_align_shape(num_tokens, top_k, num_experts, block_size).max_rows <= kInt32Max,
        fn, "num_tokens * top_k + num_experts * (block_size - 1) must fit in int32 (block_size = " +
                str(block_size) + ")");
  const MoeAlignShape shape = moe_align_shape(num_tokens, top_k, num_experts, block_size);
  const size_t ws_bytes = moe_align_workspace_bytes(num_tokens, top_k, num_experts);
  check(ws_bytes == 0 || workspace != nullptr, fn,
        "workspace is null but moe_align_workspace_bytes() = " + str(ws_bytes));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int experts = static_cast<int>(num_experts);
  const int num_chunks = static_cast<int>((num_pairs + kChunk - 1) / kChunk);
  int32_t* counts = static_cast<int32_t*>(workspace);
  if (num_pairs > 0) {  // enough blocks for the sentinel fill too (~16 rows a thread)
    const unsigned grid =
        std::max(grid_for(num_chunks, 1), grid_for(shape.max_rows, 16 * kThreads));
    align_count_kernel<<<grid, kThreads, sizeof(int) * experts, s>>>(
        topk_ids, num_pairs, experts, num_chunks, shape.max_rows, counts, sorted_ids);
  }
  // Always launched: expert_offsets, tokens_per_expert and num_rows_padded are never empty.
  align_scan_kernel<<<1, kScanThreads, 0, s>>>(counts, num_chunks, experts,
                                               static_cast<unsigned>(block_size),
                                               tokens_per_expert, expert_offsets, num_rows_padded);
  if (num_pairs > 0) {
    const size_t smem = sizeof(int) * (experts + 1 + size_t{kWarpsPerBlock} * experts);
    align_place_kernel<<<grid_for(num_chunks, 1), kThreads, smem, s>>>(
        topk_ids, num_pairs, experts, num_chunks, block_size, shape.max_blocks, counts,
        expert_offsets, sorted_ids, row_of_pair, block_experts);
  }
  return static_cast<int>(cudaGetLastError());
}

int moe_permute(const void* x, DType dtype, int64_t num_tokens, int64_t hidden, int64_t top_k,
                const int32_t* sorted_ids, int64_t num_rows, const void* topk_weights, void* rows,
                void* stream) {
  constexpr const char* fn = "moe_permute";
  const int64_t num_pairs = checked_pairs(fn, num_tokens, top_k);
  check_min(fn, "hidden", hidden, 0);
  check_min(fn, "num_rows", num_rows, 0);
  check_dtype(fn, dtype, /*allow_fp64=*/true);
  if (num_rows == 0 || hidden == 0) return 0;  // rows is empty
  dispatch(dtype, hidden, {x, rows}, [&](auto tag, auto vec) {
    using T = typename decltype(tag)::type;
    const int log2_group = log2_group_for(hidden / vec);
    permute_kernel<T, vec><<<grid_for(num_rows, kThreads >> log2_group), kThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), hidden, static_cast<int>(top_k), num_pairs, sorted_ids,
        num_rows, static_cast<const typename Acc<T>::type*>(topk_weights), static_cast<T*>(rows),
        log2_group);
  });
  return static_cast<int>(cudaGetLastError());
}

int moe_unpermute(const void* y, DType dtype, int64_t num_rows, int64_t hidden,
                  int64_t num_tokens, int64_t top_k, const int32_t* row_of_pair,
                  const void* topk_weights, void* out, void* stream) {
  constexpr const char* fn = "moe_unpermute";
  checked_pairs(fn, num_tokens, top_k);
  check_min(fn, "num_rows", num_rows, 0);
  check_min(fn, "hidden", hidden, 0);
  check_dtype(fn, dtype, /*allow_fp64=*/true);
  if (num_tokens == 0 || hidden == 0) return 0;  // out is empty
  dispatch(dtype, hidden, {y, out}, [&](auto tag, auto vec) {
    using T = typename decltype(tag)::type;
    const int log2_group = log2_group_for(hidden / vec);
    unpermute_kernel<T, vec><<<grid_for(num_tokens, kThreads >> log2_group), kThreads, 0,
                               static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(y), num_rows, hidden, num_tokens, static_cast<int>(top_k),
        row_of_pair, static_cast<const typename Acc<T>::type*>(topk_weights),
        static_cast<T*>(out), log2_group);
  });
  return static_cast<int>(cudaGetLastError());
}

int moe_pair_dot(const void* a, const void* b, DType dtype, int64_t num_tokens, int64_t num_rows,
                 int64_t hidden, int64_t top_k, const int32_t* row_of_pair, void* out,
                 void* stream) {
  constexpr const char* fn = "moe_pair_dot";
  const int64_t num_pairs = checked_pairs(fn, num_tokens, top_k);
  check_min(fn, "num_rows", num_rows, 0);
  check_min(fn, "hidden", hidden, 0);
  check_dtype(fn, dtype, /*allow_fp64=*/true);
  if (num_pairs == 0) return 0;  // out is empty; hidden == 0 still launches (out = 0)
  dispatch(dtype, hidden, {a, b}, [&](auto tag, auto vec) {
    using T = typename decltype(tag)::type;
    pair_dot_kernel<T, vec><<<grid_for(num_pairs, kWarpsPerBlock), kThreads, 0,
                              static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), num_rows, hidden,
        static_cast<int>(top_k), num_pairs, row_of_pair, static_cast<typename Acc<T>::type*>(out));
  });
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace livethinking::cuda
