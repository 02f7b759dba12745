// CUDA backend of both operators: tensor wrappers around the launchers (device guard, current
// stream, dtype dispatch, launch check) and the dispatcher registration. Compiled by the host
// compiler; the kernels are in the .cu files next to it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../deform_roi_pool.h"
#include "../modulated_deform_conv2d.h"
#include "launchers.h"

namespace dcnv2 {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dcnv2: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

#define DCN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ----- modulated deformable convolution -----
void im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& columns) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_im2col_cuda", [&] {
    check_launch(cuda::mdconv_im2col<scalar_t>(input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                                               mask.const_data_ptr<scalar_t>(), g, blk,
                                               columns.data_ptr<scalar_t>(), stream()),
                 "mdconv_im2col");
  });
}

void col2im(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& grad_input) {
  DCN_DISPATCH(grad_columns.scalar_type(), "dcnv2_col2im_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(cuda::mdconv_col2im<scalar_t>(grad_columns.const_data_ptr<scalar_t>(),
                                               offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
                                               g, blk, grad_input.data_ptr<acc_t>(), stream()),
                 "mdconv_col2im");
  });
}

void col2im_coord(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_offset,
                  at::Tensor& grad_mask) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_col2im_coord_cuda", [&] {
    check_launch(cuda::mdconv_col2im_coord<scalar_t>(
                     grad_columns.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                     offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), g, blk,
                     grad_offset.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>(), stream()),
                 "mdconv_col2im_coord");
  });
}

constexpr MDConvPrimitives kCudaConv{im2col, col2im, col2im_coord};

at::Tensor mdconv_forward_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                               int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                               int64_t groups, int64_t deformable_groups) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.modulated_deform_conv2d: input: expected a CUDA tensor (another argument is ",
              "on CUDA), got one on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  return mdconv_forward(kCudaConv, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        groups, deformable_groups);
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
  return mdconv_backward(kCudaConv, grad_output, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
                         dil_h, dil_w, groups, deformable_groups);
}

// ----- deformable RoI pooling -----
cuda::RoiPoolArgs pool_args(const RoiPoolGeometry& g) {
  return {g.channels, g.height,        g.width, g.num_rois, g.pooled_h, g.pooled_w, int(g.sampling_ratio),
          g.spatial_scale, g.gamma};
}

void pool_forward(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_cuda", [&] {
    check_launch(cuda::roi_pool_forward<scalar_t>(
                     input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
                     offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr, pool_args(g),
                     output.data_ptr<scalar_t>(), stream()),
                 "deform_roi_pool_forward");
  });
}

void pool_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input, at::Tensor& grad_offset) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_backward_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(cuda::roi_pool_backward<scalar_t>(
                     grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                     rois.const_data_ptr<scalar_t>(), offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr,
                     pool_args(g), grad_input.data_ptr<acc_t>(),
                     offset.defined() ? grad_offset.data_ptr<scalar_t>() : nullptr, stream()),
                 "deform_roi_pool_backward");
  });
}

constexpr RoiPoolPrimitives kCudaPool{pool_forward, pool_backward};

at::Tensor pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                             int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                             double gamma) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.deform_roi_pool: input: expected a CUDA tensor (another argument is on CUDA), ",
              "got one on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  return deform_roi_pool_forward(kCudaPool, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                 gamma);
}

std::tuple<at::Tensor, at::Tensor> pool_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                      const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                      int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                      int64_t sampling_ratio, double gamma) {
  TORCH_CHECK(input.is_cuda(), "dcnv2.deform_roi_pool: input: expected a CUDA tensor, got one on ", input.device());
  at::globalContext().alertNotDeterministic("dcnv2::_deform_roi_pool_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(input.device());
  return deform_roi_pool_backward(kCudaPool, grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                  sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) {
  m.impl("modulated_deform_conv2d", &mdconv_forward_cuda);
  m.impl("_modulated_deform_conv2d_backward", &mdconv_backward_cuda);
  m.impl("deform_roi_pool", &pool_forward_cuda);
  m.impl("_deform_roi_pool_backward", &pool_backward_cuda);
}

}  // namespace dcnv2
