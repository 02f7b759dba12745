// Autocast kernels of dcnv2::deform_roi_pool: float32 on both devices, whatever the autocast dtype (as
// MMDetection's fp32 RoI extractors); callers get a float32 result, which the next autocast op casts.
// float64 tensors are left alone.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace dcnv2 {
namespace {

at::Tensor call(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, double gamma) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dcnv2::deform_roi_pool", "").typed<decltype(call)>();
  return op.call(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor autocast_float32(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                            int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                            double gamma) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  using at::autocast::cached_cast;
  return call(cached_cast(at::kFloat, input, device), cached_cast(at::kFloat, rois, device),
              cached_cast(at::kFloat, offset, device), pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, AutocastCUDA, m) {
  m.impl("deform_roi_pool", &autocast_float32<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(dcnv2, AutocastCPU, m) {
  m.impl("deform_roi_pool", &autocast_float32<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace dcnv2
