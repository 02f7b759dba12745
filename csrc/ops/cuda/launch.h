// The runtime and the launch for the kernels of this folder, in one switch. Normally the CUDA runtime
// and the namespace dcnv2::cuda; when a translation unit defines DCNV2_EMULATE_CUDA before including
// this, the host emulation (../emulated_cuda/emulation.h) and the namespace dcnv2::emulated_cuda, so
// that both builds of the same sources can be linked into one library.
//
// Launch geometry: 1-D blocks of kThreads threads, grid-stride loops, and the launch written through
// one macro that nvcc and the host compiler both accept:
//   const auto kernel = some_kernel<S, A>;
//   DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(args...);
#pragma once

#include <cstdint>

#ifdef DCNV2_EMULATE_CUDA
#include "../emulated_cuda/emulation.h"
#define DCN_CUDA_NAMESPACE emulated_cuda
#define DCN_LAUNCH(kernel, blocks, threads, stream) ::dcnv2::emulation::launch((kernel), (blocks), (threads))
#else
#include <cuda_runtime_api.h>
#define DCN_CUDA_NAMESPACE cuda
#define DCN_LAUNCH(kernel, blocks, threads, stream) kernel<<<(blocks), (threads), 0, (stream)>>>
#endif

#define DCN_KERNEL_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

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
