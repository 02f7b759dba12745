// Modulated deformable convolution: operator schemas, argument checks and column blocks, shared by
// both back-ends (their drivers: cpu/modulated_deform_conv2d_loops.h and column_driver.cpp).
#include "modulated_deform_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace dcnv2 {

// The public operators. Their kernels: CPU (cpu/), CUDA (cuda/cuda_ops.cpp, the column path), Autograd
// (autograd/) and Autocast (autocast/), all in C++; the fake kernels are registered from Python
// (projects_dcnv2/_ops.py). _modulated_deform_conv2d_check runs the argument checks alone, for the
// opt-in Triton operators (projects_dcnv2/_triton_ops.py), which have the same arguments.
TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  m.def((std::string("modulated_deform_conv2d") + kMDConvSignature).c_str(), {at::Tag::pt2_compliant_tag});
  m.def((std::string("_modulated_deform_conv2d_backward") + kMDConvBackwardSignature).c_str(),
        {at::Tag::pt2_compliant_tag});
  m.def(
      "_modulated_deform_conv2d_check(Tensor? grad_output, Tensor input, Tensor offset, Tensor mask, Tensor weight, "
      "Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, "
      "int deformable_groups) -> ()",
      {at::Tag::pt2_compliant_tag});
}

namespace {

constexpr const char* kOp = "dcnv2.modulated_deform_conv2d: ";

void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_same_device_and_dtype(kOp, t, name, input);
}

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == 4, kOp, name, ": expected a 4-D tensor ", layout, ", got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
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
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), kOp, "input: expected a floating-point tensor, got dtype ",
              input.scalar_type());
  check_same(offset, "offset", input);
  check_same(mask, "mask", input);
  check_same(weight, "weight", input);
  if (bias.has_value()) {
    check_same(*bias, "bias", input);
  }
  TORCH_CHECK(stride_h > 0 && stride_w > 0, kOp, "stride: expected positive values, got (", stride_h, ", ", stride_w,
              ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, kOp, "padding: expected non-negative values, got (", pad_h, ", ", pad_w, ")");
  TORCH_CHECK(dil_h > 0 && dil_w > 0, kOp, "dilation: expected positive values, got (", dil_h, ", ", dil_w, ")");
  TORCH_CHECK(groups > 0, kOp, "groups: expected a positive value, got ", groups);
  TORCH_CHECK(deformable_groups > 0, kOp, "deformable_groups: expected a positive value, got ", deformable_groups);

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
  TORCH_CHECK(g.channels % groups == 0, kOp, "input: expected a channel count divisible by groups=", groups, ", got ",
              g.channels, " channels");
  TORCH_CHECK(g.channels % deformable_groups == 0, kOp,
              "input: expected a channel count divisible by deformable_groups=", deformable_groups, ", got ",
              g.channels, " channels");
  TORCH_CHECK(g.out_channels % groups == 0, kOp,
              "weight: expected an output channel count divisible by groups=", groups, ", got ", g.out_channels);
  TORCH_CHECK(weight.size(1) * groups == g.channels, kOp, "weight: expected shape (C_out, ", g.channels / groups,
              ", kh, kw) for ", g.channels, " input channels and groups=", groups, ", got ", weight.sizes());
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0, kOp, "weight: expected a non-empty kernel, got shape ", weight.sizes());
  // Checked before dividing: C++ division truncates a negative numerator toward zero, which would give
  // a 1-pixel output for an input smaller than the kernel whenever stride > 1.
  const int64_t span_h = g.height + 2 * pad_h - (dil_h * (g.kernel_h - 1) + 1);
  const int64_t span_w = g.width + 2 * pad_w - (dil_w * (g.kernel_w - 1) + 1);
  TORCH_CHECK(span_h >= 0 && span_w >= 0, kOp, "input: expected a padded spatial size of at least the dilated ",
              "kernel (", dil_h * (g.kernel_h - 1) + 1, ", ", dil_w * (g.kernel_w - 1) + 1, "), got ", input.sizes(),
              " with padding (", pad_h, ", ", pad_w, ")");
  g.out_h = span_h / stride_h + 1;
  g.out_w = span_w / stride_w + 1;
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
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels, kOp, "bias: expected shape (", g.out_channels,
                "), got ", bias->sizes());
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

// dcnv2::_modulated_deform_conv2d_check: mdconv_geometry (and check_grad_output when grad_output is
// given) without computing anything. Registered for CPU and CUDA tensors; its fake kernel (Python) is a
// no-op, since the operators' fake kernels check shapes themselves.
void check_op(const std::optional<at::Tensor>& grad_output, const at::Tensor& input, const at::Tensor& offset,
              const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
              int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
              int64_t deformable_groups) {
  const ConvGeometry g = mdconv_geometry(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                         dil_w, groups, deformable_groups);
  if (grad_output.has_value()) {
    check_grad_output(*grad_output, input, g);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) { m.impl("_modulated_deform_conv2d_check", &check_op); }

TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) { m.impl("_modulated_deform_conv2d_check", &check_op); }

}  // namespace dcnv2
