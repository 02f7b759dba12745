// The CUDA runtime for the kernels and launchers of this folder: the real one, or, when a translation
// unit defines DCNV2_EMULATE_CUDA before including it, the host emulation
// (../emulated_cuda/emulation.h). The two builds live in different namespaces (dcnv2::cuda and
// dcnv2::emulated_cuda) so that both can be linked into one library.
#pragma once

#ifdef DCNV2_EMULATE_CUDA
#include "../emulated_cuda/emulation.h"
#define DCN_CUDA_NAMESPACE emulated_cuda
#else
#include <cuda_runtime_api.h>
#define DCN_CUDA_NAMESPACE cuda
#endif
