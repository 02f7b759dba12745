// Autocast kernels of dcnv2::modulated_deform_conv2d. On CUDA the op runs in the autocast dtype, as
// F.conv2d does (the CUDA kernels accumulate in float32); on CPU in float32 (the CPU kernels have no
// reduced-precision instance), as torchvision's deform_conv2d. float64 tensors are left alone in both,
// as autocast leaves them for conv2d. The backward needs no autocast kernel: autograd runs it on the
// dtypes the forward saw.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace dcnv2 {
namespace {

at::Tensor call(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dcnv2::modulated_deform_conv2d", "").typed<decltype(call)>();
  return op.call(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                 deformable_groups);
}

// The op on every floating tensor of `device` cast to `dtype` (float64 excluded), with this device's
// autocast key switched off for the call.
template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor autocast(at::ScalarType dtype, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
                    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                    int64_t deformable_groups) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  using at::autocast::cached_cast;
  return call(cached_cast(dtype, input, device), cached_cast(dtype, offset, device), cached_cast(dtype, mask, device),
              cached_cast(dtype, weight, device), cached_cast(dtype, bias, device), stride_h, stride_w, pad_h, pad_w,
              dil_h, dil_w, groups, deformable_groups);
}

at::Tensor autocast_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                         int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                         int64_t deformable_groups) {
  return autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>(
      at::autocast::get_autocast_dtype(at::kCUDA), input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
      dil_h, dil_w, groups, deformable_groups);
}

at::Tensor autocast_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                        int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                        int64_t deformable_groups) {
  return autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>(at::kFloat, input, offset, mask, weight, bias,
                                                                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                                                       groups, deformable_groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, AutocastCUDA, m) { m.impl("modulated_deform_conv2d", &autocast_cuda); }

TORCH_LIBRARY_IMPL(dcnv2, AutocastCPU, m) { m.impl("modulated_deform_conv2d", &autocast_cpu); }

}  // namespace dcnv2
