// grape's CUDA MoE kernels: router top-k and align-block-size.
//
// The number of experts E is a runtime argument everywhere (one build serves every layer of a
// ragged, pruned model). No kernel reads anything back to the host.
//
// Router: one warp per token. Lanes stride over the row; each of the k passes is a warp
// arg-max over the experts strictly *after* the previous winner in the order (key
// descending, id ascending), so nothing has to remember which experts were taken and ties
// resolve to the lowest id, exactly like the Triton router. Semantics follow
// grape_kernels/routing.py `route` (softmax-then-top-k with optional renormalisation and
// optional group limit, groups scored by their best key; top-k-then-softmax; sigmoid +
// correction bias with group-limited top-k, group score = sum of the group's two best keys,
// weights from the un-biased sigmoid).
//
// Align: (1) histogram of expert ids per block in shared memory, flushed with atomics, plus
// the sentinel fill of the output; (2) one block scans the padded counts into each expert's
// first row, then labels every GEMM tile with its expert by binary search; (3) every slot
// claims a row of its expert's run with an atomic cursor. Within an expert the order of
// slots is therefore not deterministic; the grouped GEMM's result does not depend on it
// (each output row is computed from its own input row only). Ids outside [0, E) are dropped.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "moe_kernels.h"

namespace grape {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRouteWarpsPerBlock = 4;
constexpr int kAlignThreads = 256;
constexpr int kAlignMaxBlocks = 1024;
constexpr int kScanThreads = 1024;
constexpr int kSharedHistogramMaxExperts = 12288;  // 48 KiB of int32 counters

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Total order used for every selection: larger key first, then smaller id.
__device__ __forceinline__ bool precedes(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// Butterfly arg-max: afterwards every lane holds the warp's best (v, i).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float other_v = __shfl_xor_sync(kFullMask, v, offset);
    const int other_i = __shfl_xor_sync(kFullMask, i, offset);
    if (precedes(other_v, other_i, v, i)) {
      v = other_v;
      i = other_i;
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void route_topk_kernel(RouteArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kRouteWarpsPerBlock + threadIdx.x / kWarp;
  if (token >= a.num_tokens) return;  // the whole warp leaves together: shuffles stay full-mask

  // Plain locals captured by value: taking the address of the kernel parameter struct (a
  // by-reference capture) would force a local-memory copy of it.
  const T* row = static_cast<const T*>(a.logits) + token * a.stride_t;
  const int64_t stride_e = a.stride_e;
  const float* bias = a.bias;
  const int num_experts = a.num_experts;
  const bool sigmoid_mode = a.mode == RouteMode::kSigmoidGroup;
  auto logit = [=](int e) { return to_float(row[static_cast<int64_t>(e) * stride_e]); };
  // Selection key: the logit itself for the softmax modes (softmax is monotone), the biased
  // sigmoid score for DeepSeek-V3.
  auto key = [=](int e) {
    const float x = logit(e);
    if (!sigmoid_mode) return x;
    return sigmoid(x) + (bias != nullptr ? bias[e] : 0.0f);
  };

  float row_max = 0.0f;
  float denom = 1.0f;
  if (a.mode == RouteMode::kSoftmaxTopk) {
    float m = -INFINITY;
    for (int e = lane; e < num_experts; e += kWarp) m = fmaxf(m, logit(e));
    row_max = warp_max(m);
    float s = 0.0f;
    for (int e = lane; e < num_experts; e += kWarp) s += expf(logit(e) - row_max);
    denom = warp_sum(s);
  }

  // Group-limited routing: lane g scores group g, then topk_group warp arg-max passes over
  // the lanes pick the groups; the result is a bit mask every lane holds.
  const bool grouped = a.n_group > 1;
  const int per_group = num_experts / a.n_group;
  unsigned chosen_groups = kFullMask;
  if (grouped) {
    float my_group_score = -INFINITY;
    for (int g = 0; g < a.n_group; ++g) {
      float top1 = -INFINITY;
      float top2 = -INFINITY;
      for (int p = lane; p < per_group; p += kWarp) {
        const float v = key(g * per_group + p);
        if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
        const float o1 = __shfl_xor_sync(kFullMask, top1, offset);
        const float o2 = __shfl_xor_sync(kFullMask, top2, offset);
        top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
        top1 = fmaxf(top1, o1);
      }
      // DeepSeek-V3 scores a group by its best two keys, DeepSeek-V2 (softmax) by its best one.
      if (lane == g) my_group_score = (sigmoid_mode && per_group > 1) ? top1 + top2 : top1;
    }
    chosen_groups = 0u;
    for (int r = 0; r < a.topk_group; ++r) {
      const bool open = lane < a.n_group && ((chosen_groups >> lane) & 1u) == 0u;
      float v = open ? my_group_score : -INFINITY;
      int i = open ? lane : INT_MAX;
      warp_argmax(v, i);
      if (i < a.n_group) chosen_groups |= 1u << i;
    }
  }

  // k arg-max passes; lane j keeps winner j. Experts outside the chosen groups rank after every
  // eligible one (key -inf, ties to the lowest id): they fill slots only when top_k exceeds the
  // eligible experts, as in transformers.
  auto in_chosen = [=](int e) { return !grouped || ((chosen_groups >> (e / per_group)) & 1u) != 0u; };
  float prev_v = INFINITY;
  int prev_i = -1;
  float my_key = -INFINITY;
  int my_id = INT_MAX;
  for (int j = 0; j < a.top_k; ++j) {
    float best_v = -INFINITY;
    int best_i = INT_MAX;
    for (int e = lane; e < num_experts; e += kWarp) {
      const float v = in_chosen(e) ? key(e) : -INFINITY;
      const bool after_prev = v < prev_v || (v == prev_v && e > prev_i);
      if (after_prev && precedes(v, e, best_v, best_i)) {
        best_v = v;
        best_i = e;
      }
    }
    warp_argmax(best_v, best_i);
    if (lane == j) {
      my_key = best_v;
      my_id = best_i;
    }
    prev_v = best_v;
    prev_i = best_i;
  }

  // Weights of the k winners (lanes >= top_k hold nothing and contribute zero). A winner
  // can only be missing when the row holds NaNs; it is reported as id E (dropped).
  const bool holds = lane < a.top_k && my_id < num_experts;
  float w = 0.0f;
  if (a.mode == RouteMode::kSoftmaxTopk) {
    // DeepSeek-V2 zeroes the probabilities outside the chosen groups.
    if (holds && in_chosen(my_id)) w = expf(logit(my_id) - row_max) / denom;
  } else if (a.mode == RouteMode::kTopkSoftmax) {
    const float top = __shfl_sync(kFullMask, my_key, 0);
    if (holds) w = expf(my_key - top);
    w = w / warp_sum(w);
  } else if (holds) {
    w = sigmoid(logit(my_id));
  }
  if (a.renormalize && a.mode != RouteMode::kTopkSoftmax) w = w / (warp_sum(w) + 1e-20f);
  if (lane < a.top_k) {
    const int64_t out = token * a.top_k + lane;
    a.ids[out] = my_id < num_experts ? my_id : num_experts;
    a.weights[out] = w * a.scaling;
  }
}

// Expert id of flat slot t*k + j, or -1 when it lies outside [0, E) (dropped).
template <typename Id>
__device__ __forceinline__ int expert_of(const AlignArgs& a, int64_t flat) {
  const int64_t t = flat / a.top_k;
  const int64_t j = flat - t * a.top_k;
  const int64_t e = static_cast<int64_t>(static_cast<const Id*>(a.topk_ids)[t * a.stride_t + j * a.stride_k]);
  return (e >= 0 && e < a.num_experts) ? static_cast<int>(e) : -1;
}

template <typename Id>
__global__ void __launch_bounds__(kAlignThreads) align_count_kernel(AlignArgs a, bool shared_histogram) {
  extern __shared__ int32_t histogram[];
  int32_t* counts = a.workspace;
  const int64_t numel = a.num_tokens * a.top_k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  // Every row starts as padding; the scatter kernel overwrites the real ones.
  for (int64_t r = first; r < a.capacity; r += stride) a.sorted_ids[r] = static_cast<int32_t>(numel);

  if (shared_histogram) {
    for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) histogram[e] = 0;
    __syncthreads();
  }
  for (int64_t flat = first; flat < numel; flat += stride) {
    const int e = expert_of<Id>(a, flat);
    if (e < 0) continue;
    if (shared_histogram) {
      atomicAdd(&histogram[e], 1);
    } else {
      atomicAdd(&counts[e], 1);
    }
  }
  if (shared_histogram) {
    __syncthreads();
    for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) {
      if (histogram[e] != 0) atomicAdd(&counts[e], histogram[e]);
    }
  }
}

__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int32_t up = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Single block: run starts (exclusive scan of counts padded to block_m) into the cursor
// array, the padded total, and the expert of every GEMM tile.
__global__ void __launch_bounds__(kScanThreads) align_scan_kernel(AlignArgs a) {
  __shared__ int32_t warp_totals[kWarp];
  __shared__ int32_t carry;
  const int32_t* counts = a.workspace;
  int32_t* starts = a.workspace + a.num_experts;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  const int32_t block_m = a.block_m;

  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < a.num_experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t count = e < a.num_experts ? counts[e] : 0;
    const int32_t padded = (count + block_m - 1) / block_m * block_m;
    const int32_t inclusive = warp_inclusive_scan(padded, lane);
    if (lane == kWarp - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const int32_t total = lane < num_warps ? warp_totals[lane] : 0;
      warp_totals[lane] = warp_inclusive_scan(total, lane);
    }
    __syncthreads();
    const int32_t before_warp = warp > 0 ? warp_totals[warp - 1] : 0;
    if (e < a.num_experts) starts[e] = carry + before_warp + inclusive - padded;
    __syncthreads();  // everyone has read carry and warp_totals
    if (threadIdx.x == 0) carry += warp_totals[num_warps - 1];
    __syncthreads();
  }
  const int32_t total = carry;
  if (threadIdx.x == 0) *a.num_tokens_post_padded = total;

  // Tile b starts at row b*block_m; its expert is the last one whose run starts at or before
  // that row (empty experts share their start with the next expert, so "last" skips them).
  for (int64_t b = threadIdx.x; b < a.num_blocks; b += blockDim.x) {
    const int64_t row = b * block_m;
    int32_t owner = -1;
    if (row < total) {
      int lo = 0;
      int hi = a.num_experts;  // invariant: starts[lo] <= row < starts[hi] (starts[E] = total)
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (starts[mid] <= row) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      owner = lo;
    }
    a.expert_ids[b] = owner;
  }
}

template <typename Id>
__global__ void __launch_bounds__(kAlignThreads) align_scatter_kernel(AlignArgs a) {
  int32_t* cursors = a.workspace + a.num_experts;  // run starts, advanced as rows are claimed
  const int64_t numel = a.num_tokens * a.top_k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < numel; flat += stride) {
    const int e = expert_of<Id>(a, flat);
    if (e < 0) continue;
    a.sorted_ids[atomicAdd(&cursors[e], 1)] = static_cast<int32_t>(flat);
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kAlignThreads - 1) / kAlignThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kAlignMaxBlocks ? kAlignMaxBlocks : blocks));
}

template <typename Id>
int launch_align(const AlignArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(a.workspace, 0, sizeof(int32_t) * a.num_experts, stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t numel = a.num_tokens * a.top_k;
  const bool shared_histogram = a.num_experts <= kSharedHistogramMaxExperts;
  const size_t shared_bytes = shared_histogram ? sizeof(int32_t) * a.num_experts : 0;
  align_count_kernel<Id><<<grid_for(numel > a.capacity ? numel : a.capacity), kAlignThreads, shared_bytes, stream>>>(
      a, shared_histogram);
  if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
  align_scan_kernel<<<1, kScanThreads, 0, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
  if (numel > 0) {
    align_scatter_kernel<Id><<<grid_for(numel), kAlignThreads, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace

int route_topk(const RouteArgs& args, void* stream) {
  if (args.num_tokens == 0) return static_cast<int>(cudaSuccess);
  const int64_t blocks = (args.num_tokens + kRouteWarpsPerBlock - 1) / kRouteWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(kRouteWarpsPerBlock * kWarp);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.logits_dtype) {
    case DType::kFloat32:
      route_topk_kernel<float><<<grid, block, 0, s>>>(args);
      break;
    case DType::kFloat16:
      route_topk_kernel<__half><<<grid, block, 0, s>>>(args);
      break;
    case DType::kBFloat16:
      route_topk_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(args);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int align_block_size(const AlignArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return args.ids_int64 ? launch_align<int64_t>(args, s) : launch_align<int32_t>(args, s);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace grape
