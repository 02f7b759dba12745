// Host emulation of the little of CUDA that our kernels use, so that the very .cu sources compile with
// the host C++ compiler and run on CPU tensors (csrc/ops/emulated_cuda/*.cpp include them). Never used
// by the public operators, and built only when asked (DCNV2_BUILD_EMULATED_CUDA=1, as `make setup` and
// CI do): it exists so that `make test` executes the CUDA kernels and the CUDA driver on machines
// without a GPU.
//
// A launch runs its grid serially: every (block, thread) pair, in order, each through its own
// grid-stride loop, with blockIdx/threadIdx/blockDim/gridDim set as on the device. Serial execution
// makes atomicAdd a plain read-modify-write. DCNV2_EMULATED_MAX_BLOCKS caps the grid (the kernels'
// grid-stride loops must then cover the rest, as they do on a device whose grid is capped).
// What this cannot show: races between threads, the device's memory model, and device-only limits
// (registers, the 65535 grid-y bound); a real GPU run covers those.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// __restrict__ is a keyword of GCC and Clang already.

namespace dcnv2 {
namespace emulation {

struct Dim3 {
  unsigned int x, y, z;
};

}  // namespace emulation
}  // namespace dcnv2

// The built-in variables of the running CUDA thread (one thread runs at a time).
inline thread_local dcnv2::emulation::Dim3 blockIdx{0, 0, 0}, threadIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

// ----- the runtime API our launchers call -----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = struct CUstream_st*;

namespace dcnv2 {
namespace emulation {

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

// DCNV2_EMULATED_MAX_BLOCKS: the largest grid a launch runs (default: the grid asked for).
inline unsigned int max_blocks() {
  const char* env = std::getenv("DCNV2_EMULATED_MAX_BLOCKS");
  const long long cap = env ? std::atoll(env) : 0;
  return cap > 0 ? static_cast<unsigned int>(std::min<long long>(cap, UINT_MAX)) : UINT_MAX;
}

// kernel<<<blocks, threads>>>(args...) as launch(kernel, blocks, threads)(args...).
template <typename Kernel>
struct Launch {
  Kernel kernel;
  unsigned int blocks, threads;

  template <typename... Args>
  void operator()(const Args&... args) const {
    if (blocks == 0 || threads == 0 || threads > 1024) {  // the device's limits for a 1-D launch
      last_error() = cudaErrorInvalidConfiguration;
      return;
    }
    const unsigned int grid = std::min(blocks, max_blocks());
    gridDim = {grid, 1, 1};
    blockDim = {threads, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
      for (unsigned int t = 0; t < threads; ++t) {
        blockIdx = {b, 0, 0};
        threadIdx = {t, 0, 0};
        kernel(args...);  // arguments are copied, as a launch copies them to the device
      }
    }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, unsigned int blocks, unsigned int threads) {
  return {kernel, blocks, threads};
}

}  // namespace emulation
}  // namespace dcnv2

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = dcnv2::emulation::last_error();
  dcnv2::emulation::last_error() = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error (emulated CUDA)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated CUDA)";
    default:
      return "invalid argument (emulated CUDA)";
  }
}

// Serial execution: no other thread can interleave.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
