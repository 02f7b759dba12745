// Private operators that run the CUDA backend on CPU tensors: the CUDA drivers (../cuda/column_driver,
// ../deform_roi_pool.cpp) over the host build of the CUDA kernels (emulation.h). Same schemas and
// results as the public operators; float32, float64, float16 and bfloat16 (float accumulation, as on
// the device). Tests and tools call them as torch.ops.dcnv2._emulated_cuda_<op>; the public operators
// never do. The grid runs serially on one thread: keep inputs small.
#define DCNV2_EMULATE_CUDA
#include <torch/library.h>

#include <string>

#include "../cuda/primitives.h"

namespace dcnv2 {
namespace {

constexpr const char* kPrefix = "_emulated_cuda_";

void check_cpu(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.device().is_cpu(), "dcnv2.", kPrefix, op, ": input: expected a CPU tensor (the emulated CUDA ",
              "kernels run on the host), got one on ", input.device());
}

at::Tensor emulated_mdconv_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                                   int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                                   int64_t groups, int64_t deformable_groups) {
  check_cpu(input, "modulated_deform_conv2d");
  return column_driver_forward(kConvPrimitives, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
                               dil_h, dil_w, groups, deformable_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_mdconv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  check_cpu(input, "modulated_deform_conv2d_backward");
  return column_driver_backward(kConvPrimitives, grad_output, input, offset, mask, weight, bias, stride_h, stride_w,
                                pad_h, pad_w, dil_h, dil_w, groups, deformable_groups);
}

at::Tensor emulated_pool_forward(const at::Tensor& input, const at::Tensor& rois,
                                 const std::optional<at::Tensor>& offset, int64_t pooled_h, int64_t pooled_w,
                                 double spatial_scale, int64_t sampling_ratio, double gamma) {
  check_cpu(input, "deform_roi_pool");
  return deform_roi_pool_forward(kPoolPrimitives, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> emulated_pool_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                          const at::Tensor& rois,
                                                          const std::optional<at::Tensor>& offset, int64_t pooled_h,
                                                          int64_t pooled_w, double spatial_scale,
                                                          int64_t sampling_ratio, double gamma) {
  check_cpu(input, "deform_roi_pool_backward");
  return deform_roi_pool_backward(kPoolPrimitives, grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                  sampling_ratio, gamma);
}

std::string name(const char* op, const char* signature) { return std::string(kPrefix) + op + signature; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  m.def(name("modulated_deform_conv2d", kMDConvSignature).c_str());
  m.def(name("modulated_deform_conv2d_backward", kMDConvBackwardSignature).c_str());
  m.def(name("deform_roi_pool", kRoiPoolSignature).c_str());
  m.def(name("deform_roi_pool_backward", kRoiPoolBackwardSignature).c_str());
}

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("_emulated_cuda_modulated_deform_conv2d", &emulated_mdconv_forward);
  m.impl("_emulated_cuda_modulated_deform_conv2d_backward", &emulated_mdconv_backward);
  m.impl("_emulated_cuda_deform_roi_pool", &emulated_pool_forward);
  m.impl("_emulated_cuda_deform_roi_pool_backward", &emulated_pool_backward);
}

}  // namespace dcnv2
