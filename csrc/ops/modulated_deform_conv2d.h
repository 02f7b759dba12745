// Modulated deformable convolution (DCNv2): the operators' signatures, the argument checks and the
// column blocks, shared by both back-ends.
//
// Shapes: input (N, C, H, W); offset (N, 2*dg*kh*kw, Ho, Wo) laid out [group][tap i*kw+j][dy, dx];
// mask (N, dg*kh*kw, Ho, Wo) laid out [group][tap]; weight (Cout, C/groups, kh, kw); bias (Cout) or none.
//
// Column blocks: a tile of one image's positions, or several whole images, whose column buffer stays
// under a budget. Each back-end has its own driver over them: CUDA's (column_driver.h) builds
// (C*kh*kw, columns) buffers and hands every GEMM to ATen; the CPU's (cpu/modulated_deform_conv2d_loops.h)
// builds channels-last (columns, kh*kw*C) rows, so the bilinear corners of a tap are found once and
// blended over contiguous channels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "deform_math.h"

namespace dcnv2 {

// The operators' signatures (what follows the name in the schema), shared by the public operators, the
// private CUDA path (_cuda_*) and the emulated-CUDA twins (_emulated_cuda_*).
constexpr const char* kMDConvSignature =
    "(Tensor input, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, int stride_h, int stride_w, "
    "int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, int deformable_groups) -> Tensor";
constexpr const char* kMDConvBackwardSignature =
    "(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, int stride_h, "
    "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, int deformable_groups) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";

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

}  // namespace dcnv2
