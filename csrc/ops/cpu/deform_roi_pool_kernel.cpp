// CPU loops of the deformable RoI pooling, and the CPU registration.
// The sample corners of a bin are computed once and reused for every channel. Forward and the offset
// gradient: one task per (roi, bin). Input gradient: tasks own channel ranges (no atomics,
// deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deform_math.h"
#include "../deform_roi_pool.h"

namespace dcnv2 {
namespace {

template <typename T>
RoiBin<T> bin_of(const T* rois, const T* offset, const RoiPoolGeometry& g, int64_t k, int64_t ph, int64_t pw) {
  const int64_t bins = g.pooled_h * g.pooled_w;
  const T dx = offset ? offset[(k * 2) * bins + ph * g.pooled_w + pw] : T(0);
  const T dy = offset ? offset[(k * 2 + 1) * bins + ph * g.pooled_w + pw] : T(0);
  return roi_bin<T>(rois + k * 5, static_cast<T>(g.spatial_scale), int(g.pooled_h), int(g.pooled_w), int(ph), int(pw),
                    int(g.sampling_ratio), static_cast<T>(g.gamma), dx, dy);
}

// The bilinear corners of every sample of one bin (valid ones only): computed once, shared by all
// channels.
template <typename T>
void bin_samples(const RoiBin<T>& bin, int H, int W, std::vector<Corners<T>>& out) {
  out.clear();
  Corners<T> c;
  for (int iy = 0; iy < bin.grid_h; ++iy) {
    const T y = roi_bin_sample_y(bin, iy);
    for (int ix = 0; ix < bin.grid_w; ++ix) {
      if (roi_sample(y, roi_bin_sample_x(bin, ix), H, W, c)) {
        out.push_back(c);
      }
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output) {
  const T* in = input.data_ptr<T>();
  const T* roi = rois.data_ptr<T>();
  const T* off = offset.defined() ? offset.data_ptr<T>() : nullptr;
  T* out = output.data_ptr<T>();
  const int64_t plane = g.height * g.width, bins = g.pooled_h * g.pooled_w;
  at::parallel_for(0, g.num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    std::vector<Corners<T>> samples;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t k = n / bins, bin_index = n % bins;
      const RoiBin<T> bin = bin_of(roi, off, g, k, bin_index / g.pooled_w, bin_index % g.pooled_w);
      bin_samples(bin, int(g.height), int(g.width), samples);
      const T* src = in + static_cast<int64_t>(roi[k * 5]) * g.channels * plane;
      for (int64_t c = 0; c < g.channels; ++c, src += plane) {
        T sum = T(0);
        for (const Corners<T>& s : samples) {
          sum += s.value(src);
        }
        out[(k * g.channels + c) * bins + bin_index] = sum * bin.inv_count;
      }
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
  // Input gradient: tasks own disjoint channel ranges (no two write one element); each task computes
  // the corners of a bin once for all of its channels.
  const int64_t tasks = std::min<int64_t>(g.channels, 2 * at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Corners<T>> samples;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = g.channels * task / tasks, c1 = g.channels * (task + 1) / tasks;
      for (int64_t k = 0; k < g.num_rois; ++k) {
        const int64_t b = static_cast<int64_t>(roi[k * 5]);
        for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
          const RoiBin<T> bin = bin_of(roi, off, g, k, bin_index / g.pooled_w, bin_index % g.pooled_w);
          bin_samples(bin, int(g.height), int(g.width), samples);
          for (int64_t c = c0; c < c1; ++c) {
            T* dst = gin + (b * g.channels + c) * plane;
            const T grad = gout[(k * g.channels + c) * bins + bin_index] * bin.inv_count;
            for (const Corners<T>& s : samples) {
              for (int t = 0; t < 4; ++t) {
                dst[s.idx[t]] += s.w[t] * grad;
              }
            }
          }
        }
      }
    }
  });
  if (off == nullptr) {
    return;
  }
  // Offset gradient: one task per (roi, bin), a sum over channels.
  T* goff = grad_offset.data_ptr<T>();
  const T gamma = static_cast<T>(g.gamma);
  at::parallel_for(0, g.num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    std::vector<Corners<T>> samples;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t k = n / bins, bin_index = n % bins;
      const RoiBin<T> bin = bin_of(roi, off, g, k, bin_index / g.pooled_w, bin_index % g.pooled_w);
      bin_samples(bin, int(g.height), int(g.width), samples);
      const T* src = in + static_cast<int64_t>(roi[k * 5]) * g.channels * plane;
      T gy = T(0), gx = T(0);
      for (int64_t c = 0; c < g.channels; ++c, src += plane) {
        const T grad = gout[(k * g.channels + c) * bins + bin_index];
        T sy = T(0), sx = T(0);
        for (const Corners<T>& s : samples) {
          for (int t = 0; t < 4; ++t) {
            sy += s.wy[t] * src[s.idx[t]];
            sx += s.wx[t] * src[s.idx[t]];
          }
        }
        gy += grad * sy;
        gx += grad * sx;
      }
      // the bin start moves by gamma * roi size * offset
      goff[(k * 2) * bins + bin_index] = gamma * bin.roi_w * gx * bin.inv_count;
      goff[(k * 2 + 1) * bins + bin_index] = gamma * bin.roi_h * gy * bin.inv_count;
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
                       int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, double gamma) {
  check_cpu_dtype(input);
  return deform_roi_pool_forward(kCpuPrimitives, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                 gamma);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                int64_t sampling_ratio, double gamma) {
  check_cpu_dtype(input);
  return deform_roi_pool_backward(kCpuPrimitives, grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                  sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_roi_pool", &forward_cpu);
  m.impl("_deform_roi_pool_backward", &backward_cpu);
}

}  // namespace dcnv2
