// Python bindings of grape's CUDA MoE kernels (module grape_kernels._C).
//
// Compiled by the host compiler against torch's headers only; all device code lives in
// moe_kernels.cu behind the plain C++ API of moe_kernels.h. That is why this file takes the
// CUDA stream as an integer (torch.cuda.current_stream().cuda_stream) instead of asking
// c10::cuda for it: no CUDA header is needed here. Output tensors are allocated by the Python
// wrapper (grape_kernels/cuda_ops.py), which also validates user input with clear messages;
// the checks below are the last line of defence against writing out of bounds.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>

#include "moe_kernels.h"

namespace {

grape::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return grape::DType::kFloat32;
    case at::kHalf:
      return grape::DType::kFloat16;
    case at::kBFloat16:
      return grape::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "router logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_output(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void route_topk(const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias, const at::Tensor& ids,
                const at::Tensor& weights, int64_t top_k, int64_t mode, bool renormalize, double scaling,
                int64_t n_group, int64_t topk_group, int64_t stream) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "logits must be a 2-D CUDA tensor");
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  TORCH_CHECK(experts >= 1 && experts <= INT32_MAX, "invalid expert count ", experts);
  TORCH_CHECK(top_k >= 1 && top_k <= experts && top_k <= grape::kMaxTopK, "invalid top_k ", top_k);
  TORCH_CHECK(mode >= 0 && mode <= 2, "invalid routing mode code ", mode);
  TORCH_CHECK(n_group >= 1 && n_group <= grape::kMaxGroups && experts % n_group == 0, "invalid n_group ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "invalid topk_group ", topk_group);
  check_output(ids, logits, at::kInt, "ids");
  check_output(weights, logits, at::kFloat, "weights");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == tokens && ids.size(1) == top_k, "ids must be (tokens, top_k)");
  TORCH_CHECK(weights.sizes() == ids.sizes(), "weights must be (tokens, top_k)");
  const float* bias = nullptr;
  if (correction_bias.has_value()) {
    check_output(*correction_bias, logits, at::kFloat, "correction_bias");
    TORCH_CHECK(correction_bias->dim() == 1 && correction_bias->size(0) == experts, "correction_bias must be (E,)");
    bias = correction_bias->const_data_ptr<float>();
  }

  grape::RouteArgs args{};
  args.logits = logits.const_data_ptr();
  args.logits_dtype = dtype_of(logits);
  args.stride_t = logits.stride(0);
  args.stride_e = logits.stride(1);
  args.bias = bias;
  args.ids = ids.mutable_data_ptr<int32_t>();
  args.weights = weights.mutable_data_ptr<float>();
  args.num_tokens = tokens;
  args.num_experts = static_cast<int32_t>(experts);
  args.top_k = static_cast<int32_t>(top_k);
  args.n_group = static_cast<int32_t>(n_group);
  args.topk_group = static_cast<int32_t>(topk_group);
  args.mode = static_cast<grape::RouteMode>(mode);
  args.renormalize = renormalize;
  args.scaling = static_cast<float>(scaling);
  const int err = grape::route_topk(args, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "grape route_topk launch failed: ", grape::error_string(err));
}

void align_block_size(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m, const at::Tensor& sorted_ids,
                      const at::Tensor& expert_ids, const at::Tensor& num_tokens_post_padded,
                      const at::Tensor& workspace, int64_t stream) {
  TORCH_CHECK(topk_ids.is_cuda() && topk_ids.dim() == 2, "topk_ids must be a 2-D CUDA tensor");
  const bool ids_int64 = topk_ids.scalar_type() == at::kLong;
  TORCH_CHECK(ids_int64 || topk_ids.scalar_type() == at::kInt, "topk_ids must be int32 or int64");
  TORCH_CHECK(num_experts >= 1 && block_m >= 1, "num_experts and block_m must be positive");
  const int64_t numel = topk_ids.numel();
  const int64_t capacity = numel + num_experts * (block_m - 1);
  const int64_t num_blocks = (capacity + block_m - 1) / block_m;
  TORCH_CHECK(capacity < INT32_MAX, "too many routed slots for int32 row indices: ", capacity);
  check_output(sorted_ids, topk_ids, at::kInt, "sorted_ids");
  check_output(expert_ids, topk_ids, at::kInt, "expert_ids");
  check_output(num_tokens_post_padded, topk_ids, at::kInt, "num_tokens_post_padded");
  check_output(workspace, topk_ids, at::kInt, "workspace");
  TORCH_CHECK(sorted_ids.numel() == capacity, "sorted_ids must hold ", capacity, " rows");
  TORCH_CHECK(expert_ids.numel() == num_blocks, "expert_ids must hold ", num_blocks, " tiles");
  TORCH_CHECK(num_tokens_post_padded.numel() == 1, "num_tokens_post_padded must hold one value");
  TORCH_CHECK(workspace.numel() >= 2 * num_experts, "workspace must hold 2 * num_experts int32");

  grape::AlignArgs args{};
  args.topk_ids = topk_ids.const_data_ptr();
  args.ids_int64 = ids_int64;
  args.stride_t = topk_ids.stride(0);
  args.stride_k = topk_ids.stride(1);
  args.num_tokens = topk_ids.size(0);
  args.top_k = static_cast<int32_t>(topk_ids.size(1));
  args.num_experts = static_cast<int32_t>(num_experts);
  args.block_m = static_cast<int32_t>(block_m);
  args.sorted_ids = sorted_ids.mutable_data_ptr<int32_t>();
  args.capacity = capacity;
  args.expert_ids = expert_ids.mutable_data_ptr<int32_t>();
  args.num_blocks = num_blocks;
  args.num_tokens_post_padded = num_tokens_post_padded.mutable_data_ptr<int32_t>();
  args.workspace = workspace.mutable_data_ptr<int32_t>();
  const int err = grape::align_block_size(args, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "grape align_block_size launch failed: ", grape::error_string(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grape CUDA MoE kernels: router top-k and align-block-size";
  m.def("route_topk", &route_topk, "Router top-k into preallocated (ids, weights)", pybind11::arg("logits"),
        pybind11::arg("correction_bias"), pybind11::arg("ids"), pybind11::arg("weights"), pybind11::arg("top_k"),
        pybind11::arg("mode"), pybind11::arg("renormalize"), pybind11::arg("scaling"), pybind11::arg("n_group"),
        pybind11::arg("topk_group"), pybind11::arg("stream"));
  m.def("align_block_size", &align_block_size, "Expert-sorted, block-padded slot order into preallocated outputs",
        pybind11::arg("topk_ids"), pybind11::arg("num_experts"), pybind11::arg("block_m"),
        pybind11::arg("sorted_ids"), pybind11::arg("expert_ids"), pybind11::arg("num_tokens_post_padded"),
        pybind11::arg("workspace"), pybind11::arg("stream"));
}
