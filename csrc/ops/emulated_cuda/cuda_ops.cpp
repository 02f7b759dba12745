// The CUDA back-end's operators over the host build of the kernels: the test-only
// dcnv2::_emulated_cuda_<op>[_backward] on CPU tensors (see ../cuda/cuda_ops.cpp and emulation.h).
// Not a copy: this includes the very source. Built only when DCNV2_BUILD_EMULATED_CUDA=1 (setup.py).
#define DCNV2_EMULATE_CUDA
#include "../cuda/cuda_ops.cpp"
