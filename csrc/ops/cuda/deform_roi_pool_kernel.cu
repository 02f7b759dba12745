// CUDA kernels of the deformable RoI pooling. The per-bin math is in ../deform_math.h (shared with
// the CPU loops); here are only thread mappings and launches.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace dcnv2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

#define POOL_KERNEL_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

template <typename S, typename A>
__device__ RoiBin<A> bin_of(const S* rois, const S* offset, const RoiPoolArgs& a, int64_t k, int64_t ph, int64_t pw) {
  const int64_t bins = a.pooled_h * a.pooled_w, bin = ph * a.pooled_w + pw;
  const A dx = offset ? static_cast<A>(offset[(k * 2) * bins + bin]) : A(0);
  const A dy = offset ? static_cast<A>(offset[(k * 2 + 1) * bins + bin]) : A(0);
  return roi_bin<A>(rois + k * 5, static_cast<A>(a.spatial_scale), int(a.pooled_h), int(a.pooled_w), int(ph), int(pw),
                    a.sampling_ratio, static_cast<A>(a.gamma), dx, dy);
}

// One thread per output element (roi, channel, bin).
template <typename S, typename A>
__global__ void forward_kernel(const S* __restrict__ input, const S* __restrict__ rois, const S* __restrict__ offset,
                               RoiPoolArgs a, S* __restrict__ output) {
  POOL_KERNEL_LOOP(n, a.num_rois * a.channels * a.pooled_h * a.pooled_w) {
    const int64_t pw = n % a.pooled_w, ph = (n / a.pooled_w) % a.pooled_h;
    const int64_t c = (n / (a.pooled_w * a.pooled_h)) % a.channels, k = n / (a.pooled_w * a.pooled_h * a.channels);
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, a, k, ph, pw);
    output[n] = static_cast<S>(
        roi_bin_average(bin, input + (b * a.channels + c) * a.height * a.width, int(a.height), int(a.width)));
  }
}

// One thread per output element: scatters into the input gradient (float accumulation, atomics).
template <typename S, typename A>
__global__ void input_grad_kernel(const S* __restrict__ grad_output, const S* __restrict__ rois,
                                  const S* __restrict__ offset, RoiPoolArgs a, A* __restrict__ grad_input) {
  POOL_KERNEL_LOOP(n, a.num_rois * a.channels * a.pooled_h * a.pooled_w) {
    const int64_t pw = n % a.pooled_w, ph = (n / a.pooled_w) % a.pooled_h;
    const int64_t c = (n / (a.pooled_w * a.pooled_h)) % a.channels, k = n / (a.pooled_w * a.pooled_h * a.channels);
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, a, k, ph, pw);
    A* plane = grad_input + (b * a.channels + c) * a.height * a.width;
    roi_bin_input_grad(bin, int(a.height), int(a.width), static_cast<A>(grad_output[n]),
                       [plane](int idx, A v) {
                         if (v != A(0)) atomicAdd(plane + idx, v);
                       });
  }
}

// One thread per (roi, bin): sums the offset gradient over channels, no atomics.
template <typename S, typename A>
__global__ void offset_grad_kernel(const S* __restrict__ grad_output, const S* __restrict__ input,
                                   const S* __restrict__ rois, const S* __restrict__ offset, RoiPoolArgs a,
                                   S* __restrict__ grad_offset) {
  const int64_t bins = a.pooled_h * a.pooled_w, plane = a.height * a.width;
  POOL_KERNEL_LOOP(n, a.num_rois * bins) {
    const int64_t k = n / bins, bin_index = n % bins;
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, a, k, bin_index / a.pooled_w, bin_index % a.pooled_w);
    A gy = A(0), gx = A(0);
    for (int64_t c = 0; c < a.channels; ++c) {
      roi_bin_coord_grad(bin, input + (b * a.channels + c) * plane, int(a.height), int(a.width),
                         static_cast<A>(grad_output[(k * a.channels + c) * bins + bin_index]), gy, gx);
    }
    const A gamma = static_cast<A>(a.gamma);
    grad_offset[(k * 2) * bins + bin_index] = static_cast<S>(gamma * bin.roi_w * gx);
    grad_offset[(k * 2 + 1) * bins + bin_index] = static_cast<S>(gamma * bin.roi_h * gy);
  }
}

}  // namespace

template <typename S>
cudaError_t roi_pool_forward(const S* input, const S* rois, const S* offset, const RoiPoolArgs& a, S* output,
                             cudaStream_t stream) {
  const int64_t n = a.num_rois * a.channels * a.pooled_h * a.pooled_w;
  if (n > 0) {
    forward_kernel<S, typename acc_type<S>::type><<<blocks_for(n), kThreads, 0, stream>>>(input, rois, offset, a,
                                                                                           output);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t roi_pool_backward(const S* grad_output, const S* input, const S* rois, const S* offset,
                              const RoiPoolArgs& a, typename acc_type<S>::type* grad_input, S* grad_offset,
                              cudaStream_t stream) {
  using A = typename acc_type<S>::type;
  const int64_t n = a.num_rois * a.channels * a.pooled_h * a.pooled_w;
  if (n == 0) {
    return cudaGetLastError();
  }
  input_grad_kernel<S, A><<<blocks_for(n), kThreads, 0, stream>>>(grad_output, rois, offset, a, grad_input);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || offset == nullptr) {
    return err;
  }
  const int64_t m = a.num_rois * a.pooled_h * a.pooled_w;
  offset_grad_kernel<S, A><<<blocks_for(m), kThreads, 0, stream>>>(grad_output, input, rois, offset, a, grad_offset);
  return cudaGetLastError();
}

#define POOL_INSTANTIATE(S)                                                                                 \
  template cudaError_t roi_pool_forward<S>(const S*, const S*, const S*, const RoiPoolArgs&, S*, cudaStream_t); \
  template cudaError_t roi_pool_backward<S>(const S*, const S*, const S*, const S*, const RoiPoolArgs&,          \
                                            acc_type<S>::type*, S*, cudaStream_t);

POOL_INSTANTIATE(float)
POOL_INSTANTIATE(double)
POOL_INSTANTIATE(c10::Half)
POOL_INSTANTIATE(c10::BFloat16)

}  // namespace cuda
}  // namespace dcnv2
