// CUDA backend of both operators: device checks, the device guard, the determinism alert, and the
// dispatcher registration. The tensor wrappers are in primitives.h, the kernels in the .cu files.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "primitives.h"

namespace dcnv2 {
namespace {

at::Tensor mdconv_forward_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                               int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                               int64_t groups, int64_t deformable_groups) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.modulated_deform_conv2d: input: expected a CUDA tensor (another argument is ",
              "on CUDA), got one on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  return column_driver_forward(kConvPrimitives, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
                               dil_h, dil_w, groups, deformable_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mdconv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.modulated_deform_conv2d: input: expected a CUDA tensor, got one on ",
              input.device());
  // the input gradient is accumulated with atomics: the standard error under
  // torch.use_deterministic_algorithms(True) (a warning with warn_only=True)
  at::globalContext().alertNotDeterministic("dcnv2::_modulated_deform_conv2d_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(input.device());
  return column_driver_backward(kConvPrimitives, grad_output, input, offset, mask, weight, bias, stride_h, stride_w,
                                pad_h, pad_w, dil_h, dil_w, groups, deformable_groups);
}

at::Tensor pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                             int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                             double gamma) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.deform_roi_pool: input: expected a CUDA tensor (another argument is on CUDA), ",
              "got one on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  return deform_roi_pool_forward(kPoolPrimitives, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> pool_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                      const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                      int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                      int64_t sampling_ratio, double gamma) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.deform_roi_pool: input: expected a CUDA tensor, got one on ", input.device());
  at::globalContext().alertNotDeterministic("dcnv2::_deform_roi_pool_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(input.device());
  return deform_roi_pool_backward(kPoolPrimitives, grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                  sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) {
  // The public modulated_deform_conv2d ops get their CUDA kernels from Python (_ops.py), which calls these.
  m.impl("_cuda_modulated_deform_conv2d", &mdconv_forward_cuda);
  m.impl("_cuda_modulated_deform_conv2d_backward", &mdconv_backward_cuda);
  m.impl("deform_roi_pool", &pool_forward_cuda);
  m.impl("_deform_roi_pool_backward", &pool_backward_cuda);
}

}  // namespace dcnv2
