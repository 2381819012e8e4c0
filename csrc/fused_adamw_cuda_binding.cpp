// CUDA implementations of torch.ops.megatrain.sum_squares and adamw_clip_step_ (schemas
// in fused_adamw_cpu.cpp). Tensors are grouped by dtype and handed to the kernels in
// fused_adamw_cuda.cu on the current stream of their device (a guard makes it current: the
// caller's current device may be another); nothing here waits for the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <map>
#include <vector>

#include "fused_adamw_cuda.h"

namespace {

using megatrain::cuda::DType;
using megatrain::cuda::TensorRef;

DType dtype_of(const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "megatrain fused AdamW: tensors must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "megatrain fused AdamW (CUDA): tensors must be contiguous CUDA tensors");
  TORCH_CHECK(t.device() == device, "megatrain fused AdamW (CUDA): every tensor must be on one device, got ",
              t.device(), " and ", device);
  return t.scalar_type() == at::kFloat ? megatrain::cuda::F32 : megatrain::cuda::BF16;
}

at::Tensor sum_squares_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "megatrain fused AdamW: sum_squares needs at least one tensor");
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = tensors[0].options().dtype(at::kFloat);
  std::map<DType, std::vector<TensorRef>> groups;
  for (const auto& t : tensors) groups[dtype_of(t, device)].push_back({nullptr, t.data_ptr(), nullptr, nullptr, t.numel(), 0, 0});
  at::Tensor total = at::zeros({1}, opts);
  for (auto& [dtype, refs] : groups) {
    const auto n = megatrain::cuda::count_chunks(refs.data(), (int)refs.size());
    at::Tensor partials = at::empty({std::max<int64_t>(n, 1)}, opts);
    at::Tensor part = at::empty({1}, opts);
    megatrain::cuda::launch_sum_squares(refs.data(), (int)refs.size(), dtype, partials.data_ptr<float>(),
                                        part.data_ptr<float>(), stream);
    megatrain::cuda::launch_add(part.data_ptr<float>(), total.data_ptr<float>(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

void adamw_clip_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays,
                          double beta1, double beta2, double eps, const at::Tensor& norm_sq, double max_norm,
                          at::Tensor& step, at::Tensor& skipped) {
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && lrs.size() == n &&
                  weight_decays.size() == n,
              "megatrain fused AdamW: every list must have one entry per parameter tensor");
  TORCH_CHECK(n > 0, "megatrain fused AdamW: adamw_clip_step_ needs at least one tensor");
  const at::Device device = params[0].device();
  TORCH_CHECK(step.device() == device && skipped.device() == device && norm_sq.device() == device &&
                  step.scalar_type() == at::kFloat && skipped.scalar_type() == at::kLong,
              "megatrain fused AdamW (CUDA): step (float32), skipped (int64) and norm_sq must be on the parameters' "
              "device ", device);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor scalars = at::empty({(int64_t)sizeof(megatrain::StepScalars)}, norm_sq.options().dtype(at::kByte));
  auto* s = reinterpret_cast<megatrain::StepScalars*>(scalars.data_ptr());
  megatrain::cuda::launch_finalize(norm_sq.data_ptr<float>(), (float)max_norm, step.data_ptr<float>(),
                                   skipped.data_ptr<int64_t>(), beta1, beta2, s, stream);
  std::map<std::pair<DType, DType>, std::vector<TensorRef>> groups;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat,
                "megatrain fused AdamW: moments must be float32");
    TORCH_CHECK(grads[i].numel() == params[i].numel() && exp_avgs[i].numel() == params[i].numel() &&
                    exp_avg_sqs[i].numel() == params[i].numel(),
                "megatrain fused AdamW: tensor ", i, " has mismatched sizes");
    TORCH_CHECK(exp_avgs[i].device() == device && exp_avg_sqs[i].device() == device,
                "megatrain fused AdamW (CUDA): moments must be on the parameters' device ", device);
    groups[{dtype_of(params[i], device), dtype_of(grads[i], device)}].push_back(
        {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
         params[i].numel(), (float)lrs[i], (float)weight_decays[i]});
  }
  const auto betas = megatrain::make_betas(beta1, beta2, eps);
  for (auto& [dtypes, refs] : groups)
    megatrain::cuda::launch_adamw_update(refs.data(), (int)refs.size(), dtypes.first, dtypes.second, betas, s, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(megatrain, CUDA, m) {
  m.impl("sum_squares", &sum_squares_cuda);
  m.impl("adamw_clip_step_", &adamw_clip_step_cuda);
}
