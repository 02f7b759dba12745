// Modulated deformable convolution (DCNv2): the device-agnostic driver and the per-device primitives.
//
// Shapes: input (N, C, H, W); offset (N, 2*dg*kh*kw, Ho, Wo) laid out [group][tap i*kw+j][dy, dx];
// mask (N, dg*kh*kw, Ho, Wo) laid out [group][tap]; weight (Cout, C/groups, kh, kw); bias (Cout) or none.
//
// The driver (modulated_deform_conv2d.cpp) checks arguments, walks the output in column blocks (a tile
// of one image's positions, or several whole images) whose column buffer stays under a fixed budget,
// and hands every GEMM to ATen (MKL / cuBLAS). The CUDA kernels (cuda/) plug the three column
// primitives below into it. The CPU backend (cpu/) shares the argument checks and the column blocks
// but has its own channels-last driver: its columns are (positions, kh*kw*C) rows, so the bilinear
// corners of a tap are found once and then blended over contiguous channels (vectorised loops).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "deform_math.h"

namespace dcnv2 {

// Checks every argument (shapes, dtypes, devices, conv parameters) and returns the geometry.
ConvGeometry mdconv_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                             int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                             int64_t groups, int64_t deformable_groups);

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& g);

// Column blocks of at most a fixed number of column elements (C*kh*kw per column; env
// DCNV2_MAX_COLUMN_ELEMENTS overrides): a range of one image's positions, or several whole images.
std::vector<ColumnBlock> mdconv_column_blocks(const ConvGeometry& g, bool cuda);

// The largest block's column count (sizes the column buffer).
int64_t mdconv_max_block_columns(const std::vector<ColumnBlock>& blocks);

// Whether there is anything to sample and multiply (otherwise the output is the bias, or zeros).
// An input of height or width 0 (with enough padding for a non-empty output) has no pixel to read:
// every sample is outside the map and reads 0, so the output is the bias and every gradient is 0.
// The kernels read plane[0] with weight 0 for such samples, which an empty plane does not have.
inline bool mdconv_has_work(const ConvGeometry& g) {
  return g.batch > 0 && g.channels > 0 && g.out_channels > 0 && g.height > 0 && g.width > 0;
}

struct MDConvPrimitives {
  // columns (C*kh*kw, blk.nb*blk.np) <- mask * bilinear(input) for the block's columns
  void (*im2col)(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                 const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& columns);
  // grad_input (N, C, H, W; float32 or float64) += d columns / d input applied to grad_columns
  void (*col2im)(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask,
                 const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_input);
  // grad_offset, grad_mask (N, ...; same dtype as offset) <- ... at the block's columns
  void (*col2im_coord)(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                       const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk,
                       at::Tensor& grad_offset, at::Tensor& grad_mask);
};

at::Tensor mdconv_forward(const MDConvPrimitives& prim, const at::Tensor& input, const at::Tensor& offset,
                          const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                          int64_t dil_w, int64_t groups, int64_t deformable_groups);

// Returns grad_input, grad_offset, grad_mask, grad_weight, grad_bias (empty when bias is none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mdconv_backward(
    const MDConvPrimitives& prim, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
    int64_t deformable_groups);

}  // namespace dcnv2
