// The arithmetic of megatrain's fused AdamW + global-norm clipping, shared by the CPU
// kernel (fused_adamw_cpu.cpp) and the CUDA kernel (fused_adamw_cuda.cu), so the CPU
// tests exercise exactly what the GPU runs. fp32 math whatever the storage type.
//
// One optimizer step is two passes over the gradients:
//   pass 1: norm_sq = sum of g^2 over every gradient (all-reduced across ranks by the caller)
//   then    step_scalars(): clip coefficient and bias corrections, once per step
//   pass 2: adamw_update() per element, with the gradient scaled by the clip coefficient
// AdamW as in torch.optim.AdamW (Loshchilov & Hutter): decoupled weight decay,
// bias-corrected moments, eps added outside the square root.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define MT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MT_HOST_DEVICE inline
#endif

namespace megatrain {

// Per-step scalars, computed once from the squared global norm and the step count.
struct StepScalars {
  float clip_coef;    // min(1, max_norm / (norm + 1e-6)); 1 when clipping is off
  float bc1;          // 1 - beta1^step
  float bc2_sqrt;     // sqrt(1 - beta2^step)
  int skip;           // 1 when the norm is not finite: no update this step
};

// `step` is the count after this step (1 for the first). The bias corrections are
// computed in double, as torch computes them from a Python float.
MT_HOST_DEVICE StepScalars step_scalars(float norm_sq, float max_norm, double step, double beta1, double beta2) {
  StepScalars s;
  const float norm = sqrtf(norm_sq);
  s.skip = isfinite(norm) ? 0 : 1;
  s.clip_coef = 1.0f;
  if (max_norm > 0.0f && !s.skip) {
    const float coef = max_norm / (norm + 1e-6f);
    s.clip_coef = coef < 1.0f ? coef : 1.0f;
  }
  s.bc1 = (float)(1.0 - pow(beta1, step));
  s.bc2_sqrt = (float)sqrt(1.0 - pow(beta2, step));
  return s;
}

// The step's constants. 1 - beta is computed in double before rounding to float:
// 1 - (float)0.999 in float loses four digits to cancellation.
struct Betas {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
};

MT_HOST_DEVICE Betas make_betas(double beta1, double beta2, double eps) {
  return Betas{(float)beta1, (float)beta2, (float)(1.0 - beta1), (float)(1.0 - beta2), (float)eps};
}

// One element: p, m, v updated in place. lr and weight_decay are per tensor.
MT_HOST_DEVICE void adamw_update(float& p, float g, float& m, float& v, float lr, float weight_decay, const Betas& b,
                                 const StepScalars& s) {
  g *= s.clip_coef;
  p *= 1.0f - lr * weight_decay;                    // decoupled weight decay
  m += b.one_minus_beta1 * (g - m);                 // torch: exp_avg.lerp_(grad, 1 - beta1)
  v = b.beta2 * v + b.one_minus_beta2 * (g * g);    // torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  const float denom = sqrtf(v) / s.bc2_sqrt + b.eps;
  p -= (lr / s.bc1) * (m / denom);                  // torch: param.addcdiv_(exp_avg, denom, -lr / bc1)
}

}  // namespace megatrain
