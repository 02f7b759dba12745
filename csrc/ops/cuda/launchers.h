// Kernel launchers of the CUDA backend. They take raw device pointers and a stream and return the
// launch status, so the .cu files include no ATen headers (nvcc time on them stays small); the tensor
// wrappers and the dispatcher registration are in cuda_ops.cpp.
//
// S is the storage type (float, double, c10::Half, c10::BFloat16); A = acc_type<S>::type is the
// accumulation type (float, or double for double).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../deform_math.h"

namespace dcnv2 {
namespace cuda {

template <typename S>
cudaError_t mdconv_im2col(const S* input, const S* offset, const S* mask, const ConvGeometry& g,
                          const ColumnBlock& blk, S* columns, cudaStream_t stream);

template <typename S>
cudaError_t mdconv_col2im(const S* grad_columns, const S* offset, const S* mask, const ConvGeometry& g,
                          const ColumnBlock& blk, typename acc_type<S>::type* grad_input, cudaStream_t stream);

template <typename S>
cudaError_t mdconv_col2im_coord(const S* grad_columns, const S* input, const S* offset, const S* mask,
                                const ConvGeometry& g, const ColumnBlock& blk, S* grad_offset, S* grad_mask,
                                cudaStream_t stream);

struct RoiPoolArgs {
  int64_t channels, height, width, num_rois, pooled_h, pooled_w;
  int sampling_ratio;
  double spatial_scale, gamma;
};

template <typename S>
cudaError_t roi_pool_forward(const S* input, const S* rois, const S* offset, const RoiPoolArgs& a, S* output,
                             cudaStream_t stream);

template <typename S>
cudaError_t roi_pool_backward(const S* grad_output, const S* input, const S* rois, const S* offset,
                              const RoiPoolArgs& a, typename acc_type<S>::type* grad_input, S* grad_offset,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace dcnv2
