// The AVX2+FMA instance of the CPU modulated deformable convolution loops (chosen at run time, see
// modulated_deform_conv2d_cpu.h). Every header is included before the target pragma, so only the code
// of modulated_deform_conv2d_loops.h (its own namespace, cpu_avx2) is compiled for AVX2: inline
// functions and templates shared with the rest of the library keep the portable target.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../deform_math.h"
#include "../modulated_deform_conv2d.h"
#include "modulated_deform_conv2d_cpu.h"

#ifdef DCNV2_CPU_AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DCNV2_CPU_ISA cpu_avx2
#include "modulated_deform_conv2d_loops.h"
#undef DCNV2_CPU_ISA
#pragma GCC pop_options

namespace dcnv2 {
const MDConvCpuKernels mdconv_cpu_avx2 = {"avx2", &cpu_avx2::mdconv_forward, &cpu_avx2::mdconv_backward};
}  // namespace dcnv2

#endif  // DCNV2_CPU_AVX2
