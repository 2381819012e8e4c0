// Host-side interface of the CUDA kernels (fused_adamw_cuda.cu): raw pointers and a
// stream, no torch types, so the .cu file compiles with nvcc alone. The torch binding
// (fused_adamw_cuda_binding.cpp) fills these in.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "adamw_math.h"

namespace megatrain {
namespace cuda {

enum DType : int { F32 = 0, BF16 = 1 };

// One tensor of a multi-tensor launch. For sum_squares only `grad` and `numel` are read.
struct TensorRef {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  float lr;
  float weight_decay;
};

// Elements per block-sized chunk of work.
constexpr int64_t kChunk = 1 << 14;

// Number of chunks the tensors split into: the size of the `partials` buffer.
int64_t count_chunks(const TensorRef* tensors, int n_tensors);

// Pass 1: out_norm_sq[0] = sum of squares of every gradient element. `partials` holds
// count_chunks() floats; the reduction order is fixed, so the result is deterministic.
void launch_sum_squares(const TensorRef* tensors, int n_tensors, DType grad_dtype, float* partials,
                        float* out_norm_sq, cudaStream_t stream);

// Adds the per-tensor sums of several launch_sum_squares calls (one per dtype group).
void launch_add(const float* a, float* b, cudaStream_t stream);

// Between the passes, one thread: clip coefficient and bias corrections from the
// (all-reduced) norm and the step count, into `scalars`; step += 1, or skipped += 1
// when the norm is not finite.
void launch_finalize(const float* norm_sq, float max_norm, float* step, int64_t* skipped, double beta1, double beta2,
                     StepScalars* scalars, cudaStream_t stream);

// Pass 2: the AdamW update of every element, reading `scalars` from device memory.
void launch_adamw_update(const TensorRef* tensors, int n_tensors, DType param_dtype, DType grad_dtype, Betas betas,
                         const StepScalars* scalars, cudaStream_t stream);

}  // namespace cuda
}  // namespace megatrain
