// CPU kernels of megatrain's fused AdamW + global-norm clipping, and the op schemas.
//
//   torch.ops.megatrain.sum_squares(Tensor[] tensors) -> Tensor
//     pass 1: sum of squares of every element, as a 1-element fp32 tensor
//   torch.ops.megatrain.adamw_clip_step_(params, grads, exp_avgs, exp_avg_sqs, lrs,
//       weight_decays, beta1, beta2, eps, norm_sq, max_norm, step, skipped) -> ()
//     pass 2: clip coefficient from norm_sq, then the AdamW update of every element;
//     a non-finite norm skips the update and counts it in `skipped`; `step` counts
//     the applied steps (it sets the bias corrections).
//
// Work is cut into chunks of CHUNK elements across all tensors and spread over OpenMP
// threads; the fp32 loops are compiled for AVX-512, AVX2 and a baseline, chosen at run
// time (target_clones), so one build runs on any x86-64.
#include <torch/extension.h>

#include <omp.h>

#include <vector>

#include "adamw_math.h"

namespace {

constexpr int64_t CHUNK = 1 << 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MT_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define MT_CLONES
#endif

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunk_tensors(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < (int64_t)sizes.size(); ++t)
    for (int64_t b = 0; b < sizes[t]; b += CHUNK) chunks.push_back({t, b, std::min(sizes[t], b + CHUNK)});
  return chunks;
}

// Squares summed in double: the pass is memory-bound, so the wider accumulator is free,
// and a float accumulator over 64K elements would cost ~1e-5 relative accuracy.
MT_CLONES double sum_squares_f32(const float* __restrict__ x, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += (double)x[i] * (double)x[i];
  return acc;
}

double sum_squares_bf16(const at::BFloat16* x, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<float>(x[i]);
    acc += v * v;
  }
  return acc;
}

MT_CLONES void update_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                          float* __restrict__ v, int64_t n, float lr, float wd, megatrain::Betas b,
                          megatrain::StepScalars s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) megatrain::adamw_update(p[i], g[i], m[i], v[i], lr, wd, b, s);
}

// bf16 parameters and/or gradients: the same math in fp32, rounded back on store.
template <typename P, typename G>
void update_mixed(P* p, const G* g, float* m, float* v, int64_t n, float lr, float wd, megatrain::Betas b,
                  megatrain::StepScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    megatrain::adamw_update(pf, static_cast<float>(g[i]), m[i], v[i], lr, wd, b, s);
    p[i] = static_cast<P>(pf);
  }
}

void check_list(const at::TensorList& list, const char* name) {
  for (const auto& t : list) {
    TORCH_CHECK(t.device().is_cpu(), "megatrain fused AdamW (CPU): ", name, " must be CPU tensors");
    TORCH_CHECK(t.is_contiguous(), "megatrain fused AdamW: ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                "megatrain fused AdamW: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  }
}

at::Tensor sum_squares_cpu(at::TensorList tensors) {
  check_list(tensors, "tensors");
  std::vector<int64_t> sizes;
  for (const auto& t : tensors) sizes.push_back(t.numel());
  const auto chunks = chunk_tensors(sizes);
  std::vector<double> partial(chunks.size(), 0.0);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
    const auto& ch = chunks[c];
    const auto& t = tensors[ch.tensor];
    const int64_t n = ch.end - ch.begin;
    partial[c] = t.scalar_type() == at::kFloat ? sum_squares_f32(t.data_ptr<float>() + ch.begin, n)
                                               : sum_squares_bf16(t.data_ptr<at::BFloat16>() + ch.begin, n);
  }
  double total = 0.0;  // summed in chunk order: the same result for any thread count
  for (double x : partial) total += x;
  return at::full({1}, (float)total, at::TensorOptions().dtype(at::kFloat));
}

void adamw_clip_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays,
                         double beta1, double beta2, double eps, const at::Tensor& norm_sq, double max_norm,
                         at::Tensor& step, at::Tensor& skipped) {
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && lrs.size() == n &&
                  weight_decays.size() == n,
              "megatrain fused AdamW: every list must have one entry per parameter tensor");
  check_list(params, "params");
  check_list(grads, "grads");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].numel() == params[i].numel() && exp_avgs[i].numel() == params[i].numel() &&
                    exp_avg_sqs[i].numel() == params[i].numel(),
                "megatrain fused AdamW: tensor ", i, " has mismatched sizes");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat &&
                    exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous(),
                "megatrain fused AdamW: moments must be contiguous float32");
  }
  const double next_step = step.item<double>() + 1.0;
  const auto s = megatrain::step_scalars(norm_sq.item<float>(), (float)max_norm, next_step, beta1, beta2);
  if (s.skip) {
    skipped.add_(1);
    return;
  }
  const auto betas = megatrain::make_betas(beta1, beta2, eps);
  std::vector<int64_t> sizes;
  for (const auto& t : params) sizes.push_back(t.numel());
  const auto chunks = chunk_tensors(sizes);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
    const auto& ch = chunks[c];
    const int64_t t = ch.tensor, b = ch.begin, len = ch.end - ch.begin;
    const float lr = (float)lrs[t], wd = (float)weight_decays[t];
    float* m = exp_avgs[t].data_ptr<float>() + b;
    float* v = exp_avg_sqs[t].data_ptr<float>() + b;
    const bool p32 = params[t].scalar_type() == at::kFloat, g32 = grads[t].scalar_type() == at::kFloat;
    if (p32 && g32) {
      update_f32(params[t].data_ptr<float>() + b, grads[t].data_ptr<float>() + b, m, v, len, lr, wd, betas, s);
    } else if (p32) {
      update_mixed(params[t].data_ptr<float>() + b, grads[t].data_ptr<at::BFloat16>() + b, m, v, len, lr, wd, betas, s);
    } else if (g32) {
      update_mixed(params[t].data_ptr<at::BFloat16>() + b, grads[t].data_ptr<float>() + b, m, v, len, lr, wd, betas, s);
    } else {
      update_mixed(params[t].data_ptr<at::BFloat16>() + b, grads[t].data_ptr<at::BFloat16>() + b, m, v, len, lr, wd, betas, s);
    }
  }
  step.fill_(next_step);
}

}  // namespace

TORCH_LIBRARY(megatrain, m) {
  m.def("sum_squares(Tensor[] tensors) -> Tensor");
  m.def(
      "adamw_clip_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float[] lrs, float[] weight_decays, float beta1, float beta2, float eps, Tensor norm_sq, float max_norm, "
      "Tensor(d!) step, Tensor(e!) skipped) -> ()");
}

TORCH_LIBRARY_IMPL(megatrain, CPU, m) {
  m.impl("sum_squares", &sum_squares_cpu);
  m.impl("adamw_clip_step_", &adamw_clip_step_cpu);
}

// Importing the extension module registers the ops above (torch.ops.megatrain.*).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
