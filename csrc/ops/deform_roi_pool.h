// Modulated deformable RoI pooling (MMCV RoIAlign-style deform_roi_pool): device-agnostic driver
// and the per-device primitives.
//
// Shapes: input (N, C, H, W); rois (K, 5) [batch_index, x1, y1, x2, y2] in image pixels;
// offset (K, 2, PH, PW) with channel 0 = dx (width) and channel 1 = dy (height), or none;
// output (K, C, PH, PW). The modulation mask of DCNv2's mdpool is applied outside the op (a product).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "deform_math.h"

namespace dcnv2 {

// The operators' signatures (what follows the name in the schema), shared by the public operators and
// their emulated-CUDA twins (emulated_cuda/).
constexpr const char* kRoiPoolSignature =
    "(Tensor input, Tensor rois, Tensor? offset, int pooled_h, int pooled_w, float spatial_scale, "
    "int sampling_ratio, float gamma) -> Tensor";
constexpr const char* kRoiPoolBackwardSignature =
    "(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, int pooled_h, int pooled_w, "
    "float spatial_scale, int sampling_ratio, float gamma) -> (Tensor, Tensor)";

struct RoiPoolPrimitives {
  // output (K, C, PH, PW) <- bin averages; offset is undefined when there is none
  void (*forward)(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output);
  // grad_input (float32 or float64) += ...; grad_offset (dtype of offset) <- ... when offset is defined
  void (*backward)(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input, at::Tensor& grad_offset);
};

at::Tensor deform_roi_pool_forward(const RoiPoolPrimitives& prim, const at::Tensor& input, const at::Tensor& rois,
                                   const std::optional<at::Tensor>& offset, int64_t pooled_h, int64_t pooled_w,
                                   double spatial_scale, int64_t sampling_ratio, double gamma);

// Returns grad_input and grad_offset (an empty tensor when offset is none).
std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward(const RoiPoolPrimitives& prim,
                                                            const at::Tensor& grad_output, const at::Tensor& input,
                                                            const at::Tensor& rois,
                                                            const std::optional<at::Tensor>& offset, int64_t pooled_h,
                                                            int64_t pooled_w, double spatial_scale,
                                                            int64_t sampling_ratio, double gamma);

}  // namespace dcnv2
