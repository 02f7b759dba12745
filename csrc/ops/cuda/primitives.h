// Tensor wrappers around the launchers (dtype dispatch, the stream, the launch check), as the
// MDConvPrimitives and RoiPoolPrimitives the drivers take. Included by exactly two translation units:
// cuda_ops.cpp (the CUDA kernels, on the current CUDA stream) and ../emulated_cuda/emulated_cuda_ops.cpp
// (the host emulation of the same kernels, which defines DCNV2_EMULATE_CUDA first). Everything here has
// internal linkage, so the two instances do not clash.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../deform_roi_pool.h"
#include "column_driver.h"
#include "launchers.h"

#ifndef DCNV2_EMULATE_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace dcnv2 {
namespace {

namespace kernels = ::dcnv2::DCN_CUDA_NAMESPACE;

cudaStream_t launch_stream() {
#ifdef DCNV2_EMULATE_CUDA
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dcnv2: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

#define DCN_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ----- modulated deformable convolution -----
void im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& columns) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_im2col_cuda", [&] {
    check_launch(kernels::mdconv_im2col<scalar_t>(input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                                                  mask.const_data_ptr<scalar_t>(), g, blk, columns.data_ptr<scalar_t>(),
                                                  launch_stream()),
                 "mdconv_im2col");
  });
}

void col2im(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& grad_input) {
  DCN_DISPATCH(grad_columns.scalar_type(), "dcnv2_col2im_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(kernels::mdconv_col2im<scalar_t>(grad_columns.const_data_ptr<scalar_t>(),
                                                  offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), g,
                                                  blk, grad_input.data_ptr<acc_t>(), launch_stream()),
                 "mdconv_col2im");
  });
}

void col2im_coord(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_offset,
                  at::Tensor& grad_mask) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_col2im_coord_cuda", [&] {
    check_launch(kernels::mdconv_col2im_coord<scalar_t>(
                     grad_columns.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                     offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), g, blk,
                     grad_offset.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>(), launch_stream()),
                 "mdconv_col2im_coord");
  });
}

constexpr MDConvPrimitives kConvPrimitives{im2col, col2im, col2im_coord};

// ----- deformable RoI pooling -----
void pool_forward(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_cuda", [&] {
    check_launch(kernels::roi_pool_forward<scalar_t>(input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
                                                     offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr, g,
                                                     output.data_ptr<scalar_t>(), launch_stream()),
                 "deform_roi_pool_forward");
  });
}

void pool_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input,
                   at::Tensor& grad_offset) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_backward_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(
        kernels::roi_pool_backward<scalar_t>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
            offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr, g, grad_input.data_ptr<acc_t>(),
            offset.defined() ? grad_offset.data_ptr<scalar_t>() : nullptr, launch_stream()),
        "deform_roi_pool_backward");
  });
}

constexpr RoiPoolPrimitives kPoolPrimitives{pool_forward, pool_backward};

#undef DCN_DISPATCH

}  // namespace
}  // namespace dcnv2
