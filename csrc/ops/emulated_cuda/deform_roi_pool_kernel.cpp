// The CUDA RoI pooling kernels, compiled by the host compiler over the emulation (see emulation.h).
// Not a copy: this includes the very .cu source.
#define DCNV2_EMULATE_CUDA
#include "../cuda/deform_roi_pool_kernel.cu"
