// Launch geometry shared by the kernels: 1-D blocks of kThreads threads, grid-stride loops, and the
// launch written through one macro so that nvcc and the host emulation both compile it:
//   const auto kernel = some_kernel<S, A>;
//   DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(args...);
#pragma once

#include <cstdint>

#include "runtime.h"

namespace dcnv2 {
namespace DCN_CUDA_NAMESPACE {

constexpr int kThreads = 256;

// Enough blocks for one element per thread, capped: the grid-stride loops cover the rest.
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace DCN_CUDA_NAMESPACE
}  // namespace dcnv2

#define DCN_KERNEL_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

#ifdef DCNV2_EMULATE_CUDA
#define DCN_LAUNCH(kernel, blocks, threads, stream) ::dcnv2::emulation::launch((kernel), (blocks), (threads))
#else
#define DCN_LAUNCH(kernel, blocks, threads, stream) kernel<<<(blocks), (threads), 0, (stream)>>>
#endif
