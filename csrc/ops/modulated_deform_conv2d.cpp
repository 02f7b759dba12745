// Modulated deformable convolution: operator schemas and the device-agnostic driver.
// The device kernels (cpu/, cuda/) provide the column primitives and register the backends.
#include "modulated_deform_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

namespace dcnv2 {

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  m.def(
      "modulated_deform_conv2d(Tensor input, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, "
      "int deformable_groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_modulated_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, "
      "Tensor weight, Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w, int groups, int deformable_groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

namespace {

constexpr const char* kOp = "dcnv2.modulated_deform_conv2d: ";

void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_same_device_and_dtype(kOp, t, name, input);
}

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == 4, kOp, name, ": expected a 4-D tensor ", layout, ", got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

}  // namespace

ConvGeometry mdconv_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                           int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                           int64_t groups, int64_t deformable_groups) {
  check_4d(input, "input", "(N, C, H, W)");
  check_4d(weight, "weight", "(C_out, C_in / groups, kh, kw)");
  check_4d(offset, "offset", "(N, 2 * deformable_groups * kh * kw, H_out, W_out)");
  check_4d(mask, "mask", "(N, deformable_groups * kh * kw, H_out, W_out)");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), kOp,
              "input: expected a floating-point tensor, got dtype ", input.scalar_type());
  check_same(offset, "offset", input);
  check_same(mask, "mask", input);
  check_same(weight, "weight", input);
  if (bias.has_value()) {
    check_same(*bias, "bias", input);
  }
  TORCH_CHECK(stride_h > 0 && stride_w > 0, kOp, "stride: expected positive values, got (", stride_h, ", ",
              stride_w, ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, kOp, "padding: expected non-negative values, got (", pad_h, ", ",
              pad_w, ")");
  TORCH_CHECK(dil_h > 0 && dil_w > 0, kOp, "dilation: expected positive values, got (", dil_h, ", ", dil_w,
              ")");
  TORCH_CHECK(groups > 0, kOp, "groups: expected a positive value, got ", groups);
  TORCH_CHECK(deformable_groups > 0, kOp, "deformable_groups: expected a positive value, got ",
              deformable_groups);

  ConvGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dil_h = dil_h;
  g.dil_w = dil_w;
  g.groups = groups;
  g.deformable_groups = deformable_groups;
  TORCH_CHECK(g.channels % groups == 0, kOp, "input: expected a channel count divisible by groups=", groups,
              ", got ", g.channels, " channels");
  TORCH_CHECK(g.channels % deformable_groups == 0, kOp,
              "input: expected a channel count divisible by deformable_groups=", deformable_groups, ", got ",
              g.channels, " channels");
  TORCH_CHECK(g.out_channels % groups == 0, kOp, "weight: expected an output channel count divisible by groups=",
              groups, ", got ", g.out_channels);
  TORCH_CHECK(weight.size(1) * groups == g.channels, kOp, "weight: expected shape (C_out, ", g.channels / groups,
              ", kh, kw) for ", g.channels, " input channels and groups=", groups, ", got ", weight.sizes());
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0, kOp, "weight: expected a non-empty kernel, got shape ",
              weight.sizes());
  g.out_h = (g.height + 2 * pad_h - (dil_h * (g.kernel_h - 1) + 1)) / stride_h + 1;
  g.out_w = (g.width + 2 * pad_w - (dil_w * (g.kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, kOp, "input: expected a padded spatial size of at least the dilated ",
              "kernel (", dil_h * (g.kernel_h - 1) + 1, ", ", dil_w * (g.kernel_w - 1) + 1, "), got ",
              input.sizes(), " with padding (", pad_h, ", ", pad_w, ")");
  const int64_t taps = g.kernel_h * g.kernel_w;
  const std::vector<int64_t> offset_shape{g.batch, 2 * deformable_groups * taps, g.out_h, g.out_w};
  const std::vector<int64_t> mask_shape{g.batch, deformable_groups * taps, g.out_h, g.out_w};
  TORCH_CHECK(offset.sizes() == at::IntArrayRef(offset_shape), kOp,
              "offset: expected shape (N, 2 * deformable_groups * kh * kw, H_out, W_out) = ",
              at::IntArrayRef(offset_shape), ", got ", offset.sizes());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef(mask_shape), kOp,
              "mask: expected shape (N, deformable_groups * kh * kw, H_out, W_out) = ", at::IntArrayRef(mask_shape),
              ", got ", mask.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels, kOp, "bias: expected shape (",
                g.out_channels, "), got ", bias->sizes());
  }
  return g;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& g) {
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), kOp, "grad_output: expected shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output.sizes());
  check_same(grad_output, "grad_output", input);
}

// Column blocks: tiles of at most `budget / (C*kh*kw)` columns, either a range of one image's output
// positions or several whole images. Small tiles keep the column buffer in cache on CPU; on CUDA
// larger blocks give cuBLAS larger GEMMs. DCNV2_MAX_COLUMN_ELEMENTS overrides the budget (tests use
// it to exercise the block loop).
std::vector<ColumnBlock> mdconv_column_blocks(const ConvGeometry& g, bool cuda) {
  int64_t budget = cuda ? (int64_t(1) << 25) : (int64_t(1) << 21);
  if (const char* env = std::getenv("DCNV2_MAX_COLUMN_ELEMENTS")) {
    budget = std::max<int64_t>(1, std::atoll(env));
  }
  const int64_t hw = g.out_h * g.out_w;
  const int64_t max_cols = std::max<int64_t>(1, budget / (g.channels * g.kernel_h * g.kernel_w));
  std::vector<ColumnBlock> blocks;
  if (max_cols < hw) {
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t p0 = 0; p0 < hw; p0 += max_cols) {
        blocks.push_back({b, 1, p0, std::min(max_cols, hw - p0)});
      }
    }
  } else {
    const int64_t step = std::min<int64_t>(g.batch, max_cols / hw);
    for (int64_t b0 = 0; b0 < g.batch; b0 += step) {
      blocks.push_back({b0, std::min(step, g.batch - b0), 0, hw});
    }
  }
  return blocks;
}

int64_t mdconv_max_block_columns(const std::vector<ColumnBlock>& blocks) {
  int64_t m = 0;
  for (const ColumnBlock& blk : blocks) {
    m = std::max(m, blk.nb * blk.np);
  }
  return m;
}

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

at::Tensor mdconv_forward(const MDConvPrimitives& prim, const at::Tensor& input_, const at::Tensor& offset_,
                          const at::Tensor& mask_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
                          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                          int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  const ConvGeometry g = mdconv_geometry(input_, offset_, mask_, weight_, bias, stride_h, stride_w, pad_h, pad_w,
                                       dil_h, dil_w, groups, deformable_groups);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  const int64_t hw = g.out_h * g.out_w, taps = g.kernel_h * g.kernel_w;
  const int64_t rows_g = g.channels / g.groups * taps;
  const at::Tensor weight = weight_.contiguous().view({g.groups, g.out_channels / g.groups, rows_g});

  at::Tensor output = at::zeros({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (mdconv_has_work(g)) {
    const auto blocks = mdconv_column_blocks(g, input.is_cuda());
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
            .copy_(at::bmm(weight, cols_g).view({g.groups, g.out_channels / g.groups, blk.nb, hw}).permute({2, 0, 1, 3}));
      }
    }
  }
  if (bias.has_value() && g.out_channels > 0) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mdconv_backward(
    const MDConvPrimitives& prim, const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_,
    const at::Tensor& mask_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
    int64_t deformable_groups) {
  const ConvGeometry g = mdconv_geometry(input_, offset_, mask_, weight_, bias, stride_h, stride_w, pad_h, pad_w,
                                       dil_h, dil_w, groups, deformable_groups);
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
    const auto blocks = mdconv_column_blocks(g, input.is_cuda());
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
