// How a multi-tensor CUDA launch is cut into batches (plain C++, so the tests compile
// and check it with g++ on machines without a GPU). Every (tensor, chunk) work item is
// visited exactly once, in order; each batch holds at most MaxTensors tensors and
// MaxBlocks items, and partial_offset numbers the items across batches.
#pragma once

#include <stdint.h>

namespace megatrain {

template <typename Ref, int MaxTensors, int MaxBlocks>
struct LaunchPlan {
  Ref tensors[MaxTensors];
  unsigned char block_tensor[MaxBlocks];  // index into tensors[] per block
  int block_chunk[MaxBlocks];             // chunk number within that tensor per block
  int partial_offset;                     // global index of this batch's first block
};

// Calls fn(plan, n_blocks) for each batch. Ref needs a `numel` member.
template <typename Plan, typename Ref, typename Fn>
void for_each_launch(const Ref* tensors, int n_tensors, int64_t chunk, Fn fn) {
  constexpr int kMaxTensors = sizeof(Plan::tensors) / sizeof(Plan::tensors[0]);
  constexpr int kMaxBlocks = sizeof(Plan::block_chunk) / sizeof(Plan::block_chunk[0]);
  Plan plan;
  plan.partial_offset = 0;
  int n_loaded = 0, n_blocks = 0;
  auto flush = [&]() {
    if (n_blocks > 0) fn(plan, n_blocks);
    plan.partial_offset += n_blocks;
    n_blocks = 0;
    n_loaded = 0;
  };
  for (int t = 0; t < n_tensors; ++t) {
    const int64_t chunks = (tensors[t].numel + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || n_loaded == 0) plan.tensors[n_loaded++] = tensors[t];  // t enters this batch's table
      plan.block_tensor[n_blocks] = (unsigned char)(n_loaded - 1);
      plan.block_chunk[n_blocks] = (int)c;
      if (++n_blocks == kMaxBlocks) flush();
    }
    if (n_loaded == kMaxTensors) flush();  // no room for the next tensor
  }
  flush();
}

}  // namespace megatrain
