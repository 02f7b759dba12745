// The CPU modulated deformable convolution's loops, compiled once per instruction set, and the choice
// between them. modulated_deform_conv2d_loops.h holds the loops; each instance defines a table below.
#pragma once

#include <ATen/core/Tensor.h>

#include "../deform_math.h"

// x86-64 builds with GCC also compile the loops for AVX2+FMA (modulated_deform_conv2d_kernel_avx2.cpp);
// other compilers and architectures build the portable instance only.
#if (defined(__x86_64__) || defined(__amd64__)) && defined(__GNUC__) && !defined(__clang__)
#define DCNV2_CPU_AVX2 1
#endif

namespace dcnv2 {

struct MDConvCpuKernels {
  const char* name;
  // output (N, C_out, Ho, Wo) zero-initialised; offset and mask contiguous; float32 or float64
  void (*forward)(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                  const at::Tensor& weight, at::Tensor& output);
  // grad_x (N, H, W, C) and grad_rows_t (groups, kh*kw*C/groups, C_out/groups) accumulate; grad_output,
  // offset and mask contiguous
  void (*backward)(const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                   const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight, at::Tensor& grad_x,
                   at::Tensor& grad_offset, at::Tensor& grad_mask, at::Tensor& grad_rows_t);
};

extern const MDConvCpuKernels mdconv_cpu_generic;
#ifdef DCNV2_CPU_AVX2
extern const MDConvCpuKernels mdconv_cpu_avx2;
#endif

// Scratch buffers of the CPU loops, kept per calling thread from one call to the next: the column
// buffers are megabytes, and a fresh allocation that size (glibc maps it anew) costs one page fault per
// 4 KB page on every call. They are bounded by the column block budget (mdconv_column_blocks): at most
// about 2 x 8 MB (float32) or 2 x 16 MB (float64) per thread that ran a backward pass, plus the
// backward's tap table (32 bytes per column, deformable group and tap).
enum class CpuScratch { kColumns = 0, kGradColumns, kResult, kTaps, kCount };
at::Tensor cpu_scratch(CpuScratch slot, int64_t numel, const at::TensorOptions& options);

// The instance the CPU ops run: AVX2 where this build has it, the processor supports AVX2 and FMA, and
// PyTorch's own CPU capability is not DEFAULT (ATEN_CPU_CAPABILITY=default forces both to the
// portable code); the portable one otherwise.
const MDConvCpuKernels& mdconv_cpu_kernels();

}  // namespace dcnv2
