// CPU backend of the modulated deformable convolution: argument checks, the choice of instruction set
// and the registration. The loops live in modulated_deform_conv2d_loops.h, compiled here for any CPU
// (cpu_generic) and in modulated_deform_conv2d_kernel_avx2.cpp for AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../deform_math.h"
#include "../modulated_deform_conv2d.h"
#include "modulated_deform_conv2d_cpu.h"

#define DCNV2_CPU_ISA cpu_generic
#include "modulated_deform_conv2d_loops.h"
#undef DCNV2_CPU_ISA

namespace dcnv2 {

const MDConvCpuKernels mdconv_cpu_generic = {"generic", &cpu_generic::mdconv_forward, &cpu_generic::mdconv_backward};

const MDConvCpuKernels& mdconv_cpu_kernels() {
#ifdef DCNV2_CPU_AVX2
  static const bool avx2 = [] {
    // "DEFAULT", "AVX2", "AVX512", ...: DEFAULT when ATEN_CPU_CAPABILITY=default or the CPU lacks AVX2
    const std::string torch_capability = at::get_cpu_capability();
    return torch_capability != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (avx2) {
    return mdconv_cpu_avx2;
  }
#endif
  return mdconv_cpu_generic;
}

at::Tensor cpu_scratch(CpuScratch slot, int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor cache[int(CpuScratch::kCount)];
  at::Tensor& buffer = cache[int(slot)];
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype().toScalarType()) {
    buffer = at::Tensor();  // frees the old one first
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel);
}

std::string mdconv_cpu_kernel_name() { return mdconv_cpu_kernels().name; }

namespace {

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "dcnv2.modulated_deform_conv2d: input: expected float32 or float64 on CPU, got ", input.scalar_type(),
              " (run reduced precision under torch.autocast, which computes this op in float32)");
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& offset_, const at::Tensor& mask_,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                       int64_t deformable_groups) {
  check_cpu_dtype(input);
  const ConvGeometry g = mdconv_geometry(input, offset_, mask_, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                         dil_w, groups, deformable_groups);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  at::Tensor output;
  if (mdconv_has_work(g)) {
    output = at::empty(out_shape, input.options());  // the loops write every element
    mdconv_cpu_kernels().forward(g, input, offset_.contiguous(), mask_.contiguous(), weight, output);
  } else {
    output = at::zeros(out_shape, input.options());
  }
  if (bias.has_value() && g.out_channels > 0) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input, const at::Tensor& offset_, const at::Tensor& mask_,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  check_cpu_dtype(input);
  const ConvGeometry g = mdconv_geometry(input, offset_, mask_, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                         dil_w, groups, deformable_groups);
  check_grad_output(grad_output_, input, g);
  const at::Tensor offset = offset_.contiguous(), mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t K = g.kernel_h * g.kernel_w, cg = g.channels / g.groups;
  at::Tensor grad_x = at::zeros({g.batch, g.height, g.width, g.channels}, input.options());
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = at::zeros_like(mask);
  at::Tensor grad_rows_t = at::zeros({g.groups, K * cg, g.out_channels / g.groups}, input.options());
  if (mdconv_has_work(g)) {
    mdconv_cpu_kernels().backward(g, grad_output, input, offset, mask, weight, grad_x, grad_offset, grad_mask,
                                  grad_rows_t);
  }
  at::Tensor grad_weight = grad_rows_t.view({g.groups, K, cg, g.out_channels / g.groups})
                               .permute({0, 3, 2, 1})
                               .reshape(weight.sizes())
                               .contiguous();
  at::Tensor grad_bias = bias.has_value() ? grad_output.sum({0, 2, 3}) : at::empty({0}, input.options());
  return {grad_x.permute({0, 3, 1, 2}).contiguous(), grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  // which instance of the CPU loops the op runs: "avx2" or "generic"
  m.def("_cpu_kernels", &mdconv_cpu_kernel_name);
}

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("modulated_deform_conv2d", &forward_cpu);
  m.impl("_modulated_deform_conv2d_backward", &backward_cpu);
}

}  // namespace dcnv2
