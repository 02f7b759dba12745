// The CUDA convolution kernels, compiled by the host compiler over the emulation (see emulation.h).
// Not a copy: this includes the very .cu source.
#define DCNV2_EMULATE_CUDA
#include "../cuda/modulated_deform_conv2d_kernel.cu"
