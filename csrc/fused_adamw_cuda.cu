// CUDA kernels of megatrain's fused AdamW + global-norm clipping (see adamw_math.h).
// Multi-tensor launches in the style of apex's multi_tensor_apply: each launch carries,
// in its kernel parameters, a table of up to kMaxTensors tensors and kMaxBlocks
// (tensor, chunk) work items, so no metadata is copied to the device and nothing waits
// for the host. The clip coefficient is computed on the device between the passes.
#include <cuda_bf16.h>

#include "fused_adamw_cuda.h"
#include "multi_tensor_plan.h"

namespace megatrain {
namespace cuda {

namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;

using Launch = LaunchPlan<TensorRef, kMaxTensors, kMaxBlocks>;  // travels in the kernel parameters (< 4 KB)

template <typename Fn>
void for_each_launch(const TensorRef* tensors, int n_tensors, Fn fn) {
  megatrain::for_each_launch<Launch>(tensors, n_tensors, kChunk, fn);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename G>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(Launch launch, float* partials) {
  const TensorRef& t = launch.tensors[launch.block_tensor[blockIdx.x]];
  const int64_t begin = (int64_t)launch.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  const G* g = static_cast<const G*>(t.grad);
  float acc = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float x = to_float<G>(g[i]);
    acc += x * x;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[launch.partial_offset + blockIdx.x] = acc;
}

// One block adds the partial sums in a fixed order.
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const float* partials, int64_t n, float* out) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

__global__ void add_kernel(const float* a, float* b) { b[0] += a[0]; }

__global__ void finalize_kernel(const float* norm_sq, float max_norm, float* step, int64_t* skipped, double beta1,
                                double beta2, StepScalars* scalars) {
  const StepScalars s = step_scalars(norm_sq[0], max_norm, (double)step[0] + 1.0, beta1, beta2);
  if (s.skip) {
    skipped[0] += 1;
  } else {
    step[0] += 1.0f;
  }
  *scalars = s;
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) update_kernel(Launch launch, Betas betas, const StepScalars* scalars) {
  const StepScalars s = *scalars;
  if (s.skip) return;
  const TensorRef& t = launch.tensors[launch.block_tensor[blockIdx.x]];
  const int64_t begin = (int64_t)launch.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  P* p = static_cast<P*>(t.param);
  const G* g = static_cast<const G*>(t.grad);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float pf = to_float<P>(p[i]);
    adamw_update(pf, to_float<G>(g[i]), t.exp_avg[i], t.exp_avg_sq[i], t.lr, t.weight_decay, betas, s);
    p[i] = from_float<P>(pf);
  }
}

}  // namespace

int64_t count_chunks(const TensorRef* tensors, int n_tensors) {
  int64_t n = 0;
  for (int t = 0; t < n_tensors; ++t) n += (tensors[t].numel + kChunk - 1) / kChunk;
  return n;
}

void launch_sum_squares(const TensorRef* tensors, int n_tensors, DType grad_dtype, float* partials,
                        float* out_norm_sq, cudaStream_t stream) {
  const int64_t total = count_chunks(tensors, n_tensors);
  if (total == 0) {
    cudaMemsetAsync(out_norm_sq, 0, sizeof(float), stream);
    return;
  }
  for_each_launch(tensors, n_tensors, [&](const Launch& launch, int n_blocks) {
    if (grad_dtype == BF16)
      sum_squares_kernel<__nv_bfloat16><<<n_blocks, kThreads, 0, stream>>>(launch, partials);
    else
      sum_squares_kernel<float><<<n_blocks, kThreads, 0, stream>>>(launch, partials);
  });
  reduce_partials_kernel<<<1, kThreads, 0, stream>>>(partials, total, out_norm_sq);
}

void launch_add(const float* a, float* b, cudaStream_t stream) { add_kernel<<<1, 1, 0, stream>>>(a, b); }

void launch_finalize(const float* norm_sq, float max_norm, float* step, int64_t* skipped, double beta1, double beta2,
                     StepScalars* scalars, cudaStream_t stream) {
  finalize_kernel<<<1, 1, 0, stream>>>(norm_sq, max_norm, step, skipped, beta1, beta2, scalars);
}

void launch_adamw_update(const TensorRef* tensors, int n_tensors, DType param_dtype, DType grad_dtype, Betas betas,
                         const StepScalars* scalars, cudaStream_t stream) {
  for_each_launch(tensors, n_tensors, [&](const Launch& launch, int n_blocks) {
    if (param_dtype == F32 && grad_dtype == F32)
      update_kernel<float, float><<<n_blocks, kThreads, 0, stream>>>(launch, betas, scalars);
    else if (param_dtype == F32)
      update_kernel<float, __nv_bfloat16><<<n_blocks, kThreads, 0, stream>>>(launch, betas, scalars);
    else if (grad_dtype == F32)
      update_kernel<__nv_bfloat16, float><<<n_blocks, kThreads, 0, stream>>>(launch, betas, scalars);
    else
      update_kernel<__nv_bfloat16, __nv_bfloat16><<<n_blocks, kThreads, 0, stream>>>(launch, betas, scalars);
  });
}

}  // namespace cuda
}  // namespace megatrain
