// Launcher API of grape's CUDA MoE kernels (routing top-k, align-block-size).
//
// Deliberately free of torch and CUDA headers: the kernels in moe_kernels.cu are compiled by
// nvcc without torch's headers (so they build, and can be compile-checked, with any CUDA
// toolkit), and bindings.cpp, compiled by the host compiler against torch, only needs this
// plain C++ interface. Streams travel as void* (a cudaStream_t), errors as int (cudaError_t).
#pragma once

#include <cstdint>

namespace grape {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Same codes as grape_kernels.cuda_ops and the Triton router.
enum class RouteMode : int32_t { kSoftmaxTopk = 0, kTopkSoftmax = 1, kSigmoidGroup = 2 };

// One warp routes one token: lane j keeps the j-th winner, and the chosen groups of
// group-limited routing are the bits of a 32-bit mask, hence both limits.
constexpr int kMaxTopK = 32;
constexpr int kMaxGroups = 32;

struct RouteArgs {
  const void* logits;      // (num_tokens, num_experts), any strides
  DType logits_dtype;
  int64_t stride_t;        // elements between tokens
  int64_t stride_e;        // elements between experts
  const float* bias;       // (num_experts,) contiguous float32 correction bias, or nullptr
  int32_t* ids;            // (num_tokens, top_k) contiguous, output
  float* weights;          // (num_tokens, top_k) contiguous, output
  int64_t num_tokens;
  int32_t num_experts;     // runtime: one compiled kernel serves every layer
  int32_t top_k;           // 1..kMaxTopK, <= num_experts
  int32_t n_group;         // 1 = no group limit; divides num_experts; <= kMaxGroups
  int32_t topk_group;      // 1..n_group
  RouteMode mode;
  bool renormalize;
  float scaling;
};

struct AlignArgs {
  const void* topk_ids;    // (num_tokens, top_k) int32 or int64, any strides
  bool ids_int64;
  int64_t stride_t;
  int64_t stride_k;
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t block_m;
  int32_t* sorted_ids;     // (capacity,) output: capacity = T*k + E*(block_m - 1)
  int64_t capacity;
  int32_t* expert_ids;     // (num_blocks,) output: num_blocks = ceil(capacity / block_m)
  int64_t num_blocks;
  int32_t* num_tokens_post_padded;  // (1,) output
  int32_t* workspace;      // 2 * num_experts int32 scratch (counts, then run cursors)
};

// Enqueue the kernels on `stream`; return 0 (cudaSuccess) or the launch's cudaError_t.
int route_topk(const RouteArgs& args, void* stream);
int align_block_size(const AlignArgs& args, void* stream);

// cudaGetErrorString, exported so the torch binding needs no CUDA header.
const char* error_string(int code);

}  // namespace grape
