// Autograd kernel of dcnv2::deform_roi_pool: the forward runs below the autograd key and saves its
// inputs; the backward calls dcnv2::_deform_roi_pool_backward (gradients for input and offset; none for
// the RoI boxes). A double backward is a clear error (the backward operator's own autograd kernel).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dcnv2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                        int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                        double gamma) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dcnv2::deform_roi_pool", "").typed<decltype(call_forward)>();
  return op.call(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                 const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                 int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                 int64_t sampling_ratio, double gamma) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dcnv2::_deform_roi_pool_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
}

class RoiPoolFunction : public torch::autograd::Function<RoiPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& rois,
                            const std::optional<at::Tensor>& offset, int64_t pooled_h, int64_t pooled_w,
                            double spatial_scale, int64_t sampling_ratio, double gamma) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = call_forward(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
    ctx->save_for_backward({input, rois, offset.value_or(at::Tensor())});
    ctx->saved_data["pooled_h"] = pooled_h;
    ctx->saved_data["pooled_w"] = pooled_w;
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["sampling_ratio"] = sampling_ratio;
    ctx->saved_data["gamma"] = gamma;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_offset = saved[2].defined();
    const std::optional<at::Tensor> offset = has_offset ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto [grad_input, grad_offset] =
        call_backward(grad_outputs[0], saved[0], saved[1], offset, ctx->saved_data["pooled_h"].toInt(),
                      ctx->saved_data["pooled_w"].toInt(), ctx->saved_data["spatial_scale"].toDouble(),
                      ctx->saved_data["sampling_ratio"].toInt(), ctx->saved_data["gamma"].toDouble());
    // input, rois, offset, then five non-tensor parameters
    return {grad_input,   at::Tensor(), has_offset ? grad_offset : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

class RoiPoolBackwardFunction : public torch::autograd::Function<RoiPoolBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& rois, const std::optional<at::Tensor>& offset, int64_t pooled_h,
                               int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, double gamma) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_offset] =
        call_backward(grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
    return {grad_input, grad_offset};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false,
                "dcnv2.deform_roi_pool: double backward (a derivative of its gradients, e.g. "
                "torch.autograd.grad(..., create_graph=True) followed by a second backward) is not supported");
  }
};

at::Tensor forward_autograd(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                            int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                            double gamma) {
  return RoiPoolFunction::apply(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                     int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                     int64_t sampling_ratio, double gamma) {
  const variable_list g = RoiPoolBackwardFunction::apply(grad_output, input, rois, offset, pooled_h, pooled_w,
                                                         spatial_scale, sampling_ratio, gamma);
  return {g[0], g[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, Autograd, m) {
  m.impl("deform_roi_pool", &forward_autograd);
  m.impl("_deform_roi_pool_backward", &backward_autograd);
}

}  // namespace dcnv2
