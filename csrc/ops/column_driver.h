// The column driver of the modulated deformable convolution, for the CUDA back-end: walks the output
// in column blocks (mdconv_column_blocks with the CUDA budget), fills a (C*kh*kw, columns) buffer per
// block with the im2col primitive and hands every GEMM to ATen (cuBLAS on the GPU); the backward pass
// scatters the column gradients with col2im and col2im_coord. Device-agnostic: ATen only, built with
// or without nvcc. The three primitives come in through MDConvPrimitives, from cuda/cuda_ops.cpp
// (the GPU kernels, or their host emulation when that file is compiled under emulated_cuda/).
// (The CPU back-end has its own, channels-last driver: cpu/modulated_deform_conv2d_loops.h.)
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "modulated_deform_conv2d.h"

namespace dcnv2 {

struct MDConvPrimitives {
  // columns (C*kh*kw, blk.nb*blk.np) <- mask * bilinear(input) for the block's columns
  void (*im2col)(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
                 const ColumnBlock& blk, at::Tensor& columns);
  // grad_input (N, C, H, W; float32 or float64) += d columns / d input applied to grad_columns
  void (*col2im)(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask,
                 const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_input);
  // grad_offset, grad_mask (N, ...; same dtype as offset) <- ... at the block's columns
  void (*col2im_coord)(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                       const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_offset,
                       at::Tensor& grad_mask);
};

at::Tensor column_driver_forward(const MDConvPrimitives& prim, const at::Tensor& input, const at::Tensor& offset,
                                 const at::Tensor& mask, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
                                 int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                                 int64_t deformable_groups);

// Returns grad_input, grad_offset, grad_mask, grad_weight, grad_bias (empty when bias is none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> column_driver_backward(
    const MDConvPrimitives& prim, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
    int64_t deformable_groups);

}  // namespace dcnv2
