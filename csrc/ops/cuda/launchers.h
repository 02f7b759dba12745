// What the .cu files export: one launcher per kernel. Launchers take raw device pointers and a
// stream and return the launch status, so the .cu files include no ATen header (nvcc time on them
// stays small); the tensor wrappers around them are in cuda_ops.cpp. Declared in dcnv2::cuda, or in
// dcnv2::emulated_cuda for the host emulation of the same sources (launch.h).
//
// S is the storage type (float, double, c10::Half, c10::BFloat16); A = acc_type<S>::type is the
// accumulation type (float, or double for double).
#pragma once

#include <cstdint>

#include "../deform_math.h"
#include "launch.h"

namespace dcnv2 {
namespace DCN_CUDA_NAMESPACE {

template <typename S>
cudaError_t mdconv_im2col(const S* input, const S* offset, const S* mask, const ConvGeometry& g, const ColumnBlock& blk,
                          S* columns, cudaStream_t stream);

template <typename S>
cudaError_t mdconv_col2im(const S* grad_columns, const S* offset, const S* mask, const ConvGeometry& g,
                          const ColumnBlock& blk, typename acc_type<S>::type* grad_input, cudaStream_t stream);

template <typename S>
cudaError_t mdconv_col2im_coord(const S* grad_columns, const S* input, const S* offset, const S* mask,
                                const ConvGeometry& g, const ColumnBlock& blk, S* grad_offset, S* grad_mask,
                                cudaStream_t stream);

template <typename S>
cudaError_t roi_pool_forward(const S* input, const S* rois, const S* offset, const RoiPoolGeometry& g, S* output,
                             cudaStream_t stream);

template <typename S>
cudaError_t roi_pool_backward(const S* grad_output, const S* input, const S* rois, const S* offset,
                              const RoiPoolGeometry& g, typename acc_type<S>::type* grad_input, S* grad_offset,
                              cudaStream_t stream);

}  // namespace DCN_CUDA_NAMESPACE
}  // namespace dcnv2
