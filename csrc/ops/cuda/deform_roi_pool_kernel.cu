// CUDA kernels of the deformable RoI pooling: thread mappings, the per-bin loops of one thread, and
// launches. The bin geometry and the bilinear rule are in ../deform_math.h (shared with the CPU
// loops, which instead compute a bin's corners once and reuse them across channels).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace dcnv2 {
namespace DCN_CUDA_NAMESPACE {
namespace {

template <typename S, typename A>
__device__ RoiBin<A> bin_of(const S* rois, const S* offset, const RoiPoolGeometry& g, int64_t k, int64_t ph,
                            int64_t pw) {
  const int64_t bins = g.pooled_h * g.pooled_w, bin = ph * g.pooled_w + pw;
  const A dx = offset ? static_cast<A>(offset[(k * 2) * bins + bin]) : A(0);
  const A dy = offset ? static_cast<A>(offset[(k * 2 + 1) * bins + bin]) : A(0);
  return roi_bin<A>(rois + k * 5, static_cast<A>(g.spatial_scale), int(g.pooled_h), int(g.pooled_w), int(ph), int(pw),
                    int(g.sampling_ratio), static_cast<A>(g.gamma), dx, dy);
}

// Average of the bin's samples in one channel plane.
template <typename T, typename V>
__device__ T bin_average(const RoiBin<T>& b, const V* plane, int H, int W) {
  T sum = T(0);
  Corners<T> c;
  for (int iy = 0; iy < b.grid_h; ++iy) {
    const T y = roi_bin_sample_y(b, iy);
    for (int ix = 0; ix < b.grid_w; ++ix) {
      if (roi_sample(y, roi_bin_sample_x(b, ix), H, W, c)) {
        sum += c.value(plane);
      }
    }
  }
  return sum * b.inv_count;
}

// grad * d(bin average) / d(bin start) in one channel plane, added to (gy, gx).
template <typename T, typename V>
__device__ void bin_coord_grad(const RoiBin<T>& b, const V* plane, int H, int W, T grad, T& gy, T& gx) {
  Corners<T> c;
  T sy = T(0), sx = T(0);
  for (int iy = 0; iy < b.grid_h; ++iy) {
    const T y = roi_bin_sample_y(b, iy);
    for (int ix = 0; ix < b.grid_w; ++ix) {
      if (roi_sample(y, roi_bin_sample_x(b, ix), H, W, c)) {
        for (int n = 0; n < 4; ++n) {
          const T v = static_cast<T>(plane[c.idx[n]]);
          sy += c.wy[n] * v;
          sx += c.wx[n] * v;
        }
      }
    }
  }
  gy += grad * sy * b.inv_count;
  gx += grad * sx * b.inv_count;
}

// Scatters grad * d(bin average) / d(input) into one gradient plane (float atomics).
template <typename T>
__device__ void bin_input_grad(const RoiBin<T>& b, int H, int W, T grad, T* plane) {
  Corners<T> c;
  const T g = grad * b.inv_count;
  for (int iy = 0; iy < b.grid_h; ++iy) {
    const T y = roi_bin_sample_y(b, iy);
    for (int ix = 0; ix < b.grid_w; ++ix) {
      if (roi_sample(y, roi_bin_sample_x(b, ix), H, W, c)) {
        for (int n = 0; n < 4; ++n) {
          const T v = g * c.w[n];
          if (v != T(0)) {  // NaN passes, as in the CPU loops
            atomicAdd(plane + c.idx[n], v);
          }
        }
      }
    }
  }
}

// One thread per output element (roi, channel, bin).
template <typename S, typename A>
__global__ void forward_kernel(const S* __restrict__ input, const S* __restrict__ rois, const S* __restrict__ offset,
                               RoiPoolGeometry g, S* __restrict__ output) {
  DCN_KERNEL_LOOP(n, g.num_rois * g.channels * g.pooled_h * g.pooled_w) {
    const int64_t pw = n % g.pooled_w, ph = (n / g.pooled_w) % g.pooled_h;
    const int64_t c = (n / (g.pooled_w * g.pooled_h)) % g.channels, k = n / (g.pooled_w * g.pooled_h * g.channels);
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, g, k, ph, pw);
    output[n] = static_cast<S>(
        bin_average(bin, input + (b * g.channels + c) * g.height * g.width, int(g.height), int(g.width)));
  }
}

// One thread per output element: scatters into the input gradient (float accumulation, atomics).
template <typename S, typename A>
__global__ void input_grad_kernel(const S* __restrict__ grad_output, const S* __restrict__ rois,
                                  const S* __restrict__ offset, RoiPoolGeometry g, A* __restrict__ grad_input) {
  DCN_KERNEL_LOOP(n, g.num_rois * g.channels * g.pooled_h * g.pooled_w) {
    const int64_t pw = n % g.pooled_w, ph = (n / g.pooled_w) % g.pooled_h;
    const int64_t c = (n / (g.pooled_w * g.pooled_h)) % g.channels, k = n / (g.pooled_w * g.pooled_h * g.channels);
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, g, k, ph, pw);
    bin_input_grad(bin, int(g.height), int(g.width), static_cast<A>(grad_output[n]),
                   grad_input + (b * g.channels + c) * g.height * g.width);
  }
}

// One thread per (roi, bin): sums the offset gradient over channels, no atomics.
template <typename S, typename A>
__global__ void offset_grad_kernel(const S* __restrict__ grad_output, const S* __restrict__ input,
                                   const S* __restrict__ rois, const S* __restrict__ offset, RoiPoolGeometry g,
                                   S* __restrict__ grad_offset) {
  const int64_t bins = g.pooled_h * g.pooled_w, plane = g.height * g.width;
  DCN_KERNEL_LOOP(n, g.num_rois * bins) {
    const int64_t k = n / bins, bin_index = n % bins;
    const int64_t b = static_cast<int64_t>(static_cast<A>(rois[k * 5]));
    const RoiBin<A> bin = bin_of<S, A>(rois, offset, g, k, bin_index / g.pooled_w, bin_index % g.pooled_w);
    A gy = A(0), gx = A(0);
    for (int64_t c = 0; c < g.channels; ++c) {
      bin_coord_grad(bin, input + (b * g.channels + c) * plane, int(g.height), int(g.width),
                     static_cast<A>(grad_output[(k * g.channels + c) * bins + bin_index]), gy, gx);
    }
    // the bin start moves by gamma * roi size * offset
    const A gamma = static_cast<A>(g.gamma);
    grad_offset[(k * 2) * bins + bin_index] = static_cast<S>(gamma * bin.roi_w * gx);
    grad_offset[(k * 2 + 1) * bins + bin_index] = static_cast<S>(gamma * bin.roi_h * gy);
  }
}

}  // namespace

template <typename S>
cudaError_t roi_pool_forward(const S* input, const S* rois, const S* offset, const RoiPoolGeometry& g, S* output,
                             cudaStream_t stream) {
  const int64_t n = g.num_rois * g.channels * g.pooled_h * g.pooled_w;
  if (n > 0) {
    const auto kernel = forward_kernel<S, typename acc_type<S>::type>;
    DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(input, rois, offset, g, output);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t roi_pool_backward(const S* grad_output, const S* input, const S* rois, const S* offset,
                              const RoiPoolGeometry& g, typename acc_type<S>::type* grad_input, S* grad_offset,
                              cudaStream_t stream) {
  using A = typename acc_type<S>::type;
  const int64_t n = g.num_rois * g.channels * g.pooled_h * g.pooled_w;
  if (n == 0) {
    return cudaGetLastError();
  }
  const auto input_grad = input_grad_kernel<S, A>;
  DCN_LAUNCH(input_grad, blocks_for(n), kThreads, stream)(grad_output, rois, offset, g, grad_input);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || offset == nullptr) {
    return err;
  }
  const int64_t m = g.num_rois * g.pooled_h * g.pooled_w;
  const auto offset_grad = offset_grad_kernel<S, A>;
  DCN_LAUNCH(offset_grad, blocks_for(m), kThreads, stream)(grad_output, input, rois, offset, g, grad_offset);
  return cudaGetLastError();
}

#define POOL_INSTANTIATE(S)                                                                                         \
  template cudaError_t roi_pool_forward<S>(const S*, const S*, const S*, const RoiPoolGeometry&, S*, cudaStream_t); \
  template cudaError_t roi_pool_backward<S>(const S*, const S*, const S*, const S*, const RoiPoolGeometry&,         \
                                            acc_type<S>::type*, S*, cudaStream_t);

POOL_INSTANTIATE(float)
POOL_INSTANTIATE(double)
POOL_INSTANTIATE(c10::Half)
POOL_INSTANTIATE(c10::BFloat16)

}  // namespace DCN_CUDA_NAMESPACE
}  // namespace dcnv2
