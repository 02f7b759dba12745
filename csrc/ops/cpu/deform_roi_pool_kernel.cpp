// CPU loops of the deformable RoI pooling, and the CPU registration.
// Forward: one task per output element. Backward: the input gradient is split by channel (each
// channel owns its gradient planes: no atomics, deterministic), the offset gradient by output bin
// (a sum over channels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../deform_math.h"
#include "../deform_roi_pool.h"

namespace dcnv2 {
namespace {

template <typename T>
RoiBin<T> bin_of(const T* rois, const T* offset, const RoiPoolGeometry& g, int64_t k, int64_t ph, int64_t pw) {
  const int64_t bins = g.pooled_h * g.pooled_w;
  const T dx = offset ? offset[(k * 2) * bins + ph * g.pooled_w + pw] : T(0);
  const T dy = offset ? offset[(k * 2 + 1) * bins + ph * g.pooled_w + pw] : T(0);
  return roi_bin<T>(rois + k * 5, static_cast<T>(g.spatial_scale), int(g.pooled_h), int(g.pooled_w), int(ph),
                    int(pw), int(g.sampling_ratio), static_cast<T>(g.gamma), dx, dy);
}

template <typename T>
void forward_impl(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output) {
  const T* in = input.data_ptr<T>();
  const T* roi = rois.data_ptr<T>();
  const T* off = offset.defined() ? offset.data_ptr<T>() : nullptr;
  T* out = output.data_ptr<T>();
  const int64_t plane = g.height * g.width;
  at::parallel_for(0, output.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t pw = n % g.pooled_w, ph = (n / g.pooled_w) % g.pooled_h;
      const int64_t c = (n / (g.pooled_w * g.pooled_h)) % g.channels, k = n / (g.pooled_w * g.pooled_h * g.channels);
      const int64_t b = static_cast<int64_t>(roi[k * 5]);
      const RoiBin<T> bin = bin_of(roi, off, g, k, ph, pw);
      out[n] = roi_bin_average(bin, in + (b * g.channels + c) * plane, int(g.height), int(g.width));
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input,
                   at::Tensor& grad_offset) {
  const T* gout = grad_output.data_ptr<T>();
  const T* in = input.data_ptr<T>();
  const T* roi = rois.data_ptr<T>();
  const T* off = offset.defined() ? offset.data_ptr<T>() : nullptr;
  T* gin = grad_input.data_ptr<T>();
  const int64_t plane = g.height * g.width, bins = g.pooled_h * g.pooled_w;
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < g.num_rois; ++k) {
        T* dst = gin + (static_cast<int64_t>(roi[k * 5]) * g.channels + c) * plane;
        const T* src = gout + (k * g.channels + c) * bins;
        for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
          for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
            const RoiBin<T> bin = bin_of(roi, off, g, k, ph, pw);
            roi_bin_input_grad(bin, int(g.height), int(g.width), src[ph * g.pooled_w + pw],
                               [dst](int idx, T v) { dst[idx] += v; });
          }
        }
      }
    }
  });
  if (off == nullptr) {
    return;
  }
  T* goff = grad_offset.data_ptr<T>();
  const T gamma = static_cast<T>(g.gamma);
  at::parallel_for(0, g.num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t k = n / bins, bin_index = n % bins, ph = bin_index / g.pooled_w, pw = bin_index % g.pooled_w;
      const int64_t b = static_cast<int64_t>(roi[k * 5]);
      const RoiBin<T> bin = bin_of(roi, off, g, k, ph, pw);
      T gy = T(0), gx = T(0);
      for (int64_t c = 0; c < g.channels; ++c) {
        roi_bin_coord_grad(bin, in + (b * g.channels + c) * plane, int(g.height), int(g.width),
                           gout[(k * g.channels + c) * bins + bin_index], gy, gx);
      }
      // the bin start moves by gamma * roi size * offset
      goff[(k * 2) * bins + bin_index] = gamma * bin.roi_w * gx;
      goff[(k * 2 + 1) * bins + bin_index] = gamma * bin.roi_h * gy;
    }
  });
}

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "dcnv2.deform_roi_pool: input: expected float32 or float64 on CPU, got ", input.scalar_type(),
              " (run reduced precision under torch.autocast, which computes this op in float32)");
}

void forward_cpu_kernel(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset,
                        const RoiPoolGeometry& g, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_deform_roi_pool_cpu",
                             [&] { forward_impl<scalar_t>(input, rois, offset, g, output); });
}

void backward_cpu_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                         const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input,
                         at::Tensor& grad_offset) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_deform_roi_pool_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_output, input, rois, offset, g, grad_input, grad_offset);
  });
}

constexpr RoiPoolPrimitives kCpuPrimitives{forward_cpu_kernel, backward_cpu_kernel};

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                       int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                       double gamma) {
  check_cpu_dtype(input);
  return deform_roi_pool_forward(kCpuPrimitives, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                int64_t sampling_ratio, double gamma) {
  check_cpu_dtype(input);
  return deform_roi_pool_backward(kCpuPrimitives, grad_output, input, rois, offset, pooled_h, pooled_w,
                                  spatial_scale, sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_roi_pool", &forward_cpu);
  m.impl("_deform_roi_pool_backward", &backward_cpu);
}

}  // namespace dcnv2
