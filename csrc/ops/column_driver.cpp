// The column driver of the modulated deformable convolution (see column_driver.h).
#include "column_driver.h"

#include <ATen/ATen.h>

namespace dcnv2 {

namespace {

// The block's part of a (N, C_out, Ho, Wo) tensor as (groups, C_out/groups, columns): a strided view
// when the block lies in one image, a copy otherwise.
at::Tensor block_of(const at::Tensor& t, const ConvGeometry& g, const ColumnBlock& blk) {
  const int64_t hw = g.out_h * g.out_w, cg = g.out_channels / g.groups;
  if (blk.nb == 1) {
    return t[blk.b0].view({g.groups, cg, hw}).narrow(2, blk.p0, blk.np);
  }
  return t.narrow(0, blk.b0, blk.nb)
      .view({blk.nb, g.groups, cg, hw})
      .permute({1, 2, 0, 3})
      .reshape({g.groups, cg, blk.nb * hw});
}

}  // namespace

at::Tensor column_driver_forward(const MDConvPrimitives& prim, const at::Tensor& input_, const at::Tensor& offset_,
                                 const at::Tensor& mask_, const at::Tensor& weight_,
                                 const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
                                 int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                                 int64_t deformable_groups) {
  const ConvGeometry g = mdconv_geometry(input_, offset_, mask_, weight_, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                         dil_w, groups, deformable_groups);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  const int64_t hw = g.out_h * g.out_w, taps = g.kernel_h * g.kernel_w;
  const int64_t rows_g = g.channels / g.groups * taps;
  const at::Tensor weight = weight_.contiguous().view({g.groups, g.out_channels / g.groups, rows_g});

  at::Tensor output = at::zeros({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (mdconv_has_work(g)) {
    const auto blocks = mdconv_column_blocks(g, /*cuda=*/true);
    at::Tensor buffer = at::empty({g.channels * taps * mdconv_max_block_columns(blocks)}, input.options());
    for (const ColumnBlock& blk : blocks) {
      const int64_t cols = blk.nb * blk.np;
      at::Tensor columns = buffer.narrow(0, 0, g.channels * taps * cols).view({g.channels * taps, cols});
      prim.im2col(input, offset, mask, g, blk, columns);
      const at::Tensor cols_g = columns.view({g.groups, rows_g, cols});
      if (blk.nb == 1) {
        at::Tensor out_b = block_of(output, g, blk);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_g = out_b[grp];
          at::mm_out(out_g, weight[grp], cols_g[grp]);
        }
      } else {
        output.narrow(0, blk.b0, blk.nb)
            .view({blk.nb, g.groups, g.out_channels / g.groups, hw})
            .copy_(
                at::bmm(weight, cols_g).view({g.groups, g.out_channels / g.groups, blk.nb, hw}).permute({2, 0, 1, 3}));
      }
    }
  }
  if (bias.has_value() && g.out_channels > 0) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> column_driver_backward(
    const MDConvPrimitives& prim, const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_,
    const at::Tensor& mask_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
    int64_t deformable_groups) {
  const ConvGeometry g = mdconv_geometry(input_, offset_, mask_, weight_, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                         dil_w, groups, deformable_groups);
  check_grad_output(grad_output_, input_, g);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t rows_g = g.channels / g.groups * taps;
  const at::Tensor weight = weight_.contiguous().view({g.groups, g.out_channels / g.groups, rows_g});
  const at::Tensor weight_t = weight.transpose(1, 2);

  // Reduced-precision inputs accumulate their input and weight gradients in float32.
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = at::zeros_like(mask);
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc_dtype));

  if (mdconv_has_work(g)) {
    const auto blocks = mdconv_column_blocks(g, /*cuda=*/true);
    const int64_t max_numel = g.channels * taps * mdconv_max_block_columns(blocks);
    at::Tensor col_buffer = at::empty({max_numel}, input.options());
    at::Tensor grad_col_buffer = at::empty({max_numel}, input.options());
    for (const ColumnBlock& blk : blocks) {
      const int64_t cols = blk.nb * blk.np, numel = g.channels * taps * cols;
      const at::Tensor grad_out_b = block_of(grad_output, g, blk);

      at::Tensor grad_columns = grad_col_buffer.narrow(0, 0, numel).view({g.groups, rows_g, cols});
      at::bmm_out(grad_columns, weight_t, grad_out_b);
      grad_columns = grad_columns.view({g.channels * taps, cols});
      prim.col2im(grad_columns, offset, mask, g, blk, grad_input);
      prim.col2im_coord(grad_columns, input, offset, mask, g, blk, grad_offset, grad_mask);

      at::Tensor columns = col_buffer.narrow(0, 0, numel).view({g.channels * taps, cols});
      prim.im2col(input, offset, mask, g, blk, columns);
      grad_weight.add_(at::bmm(grad_out_b, columns.view({g.groups, rows_g, cols}).transpose(1, 2)));
    }
  }
  at::Tensor grad_bias;
  if (bias.has_value()) {
    grad_bias = grad_output.sum({0, 2, 3}, /*keepdim=*/false, acc_dtype).to(input.scalar_type());
  } else {
    grad_bias = at::empty({0}, input.options());
  }
  return {grad_input.to(input.scalar_type()), grad_offset, grad_mask,
          grad_weight.view(weight_.sizes()).to(input.scalar_type()), grad_bias};
}

}  // namespace dcnv2
