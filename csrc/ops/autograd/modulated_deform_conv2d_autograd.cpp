// Autograd kernel of dcnv2::modulated_deform_conv2d: the forward runs below the autograd key and saves
// its inputs; the backward calls dcnv2::_modulated_deform_conv2d_backward. That operator's own
// autograd kernel refuses a second derivative with a clear error instead of returning a silently wrong
// (disconnected) graph.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dcnv2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                        int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                        int64_t deformable_groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dcnv2::modulated_deform_conv2d", "")
                             .typed<decltype(call_forward)>();
  return op.call(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                 deformable_groups);
}

Grads call_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                    const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                    int64_t groups, int64_t deformable_groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dcnv2::_modulated_deform_conv2d_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_output, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                 deformable_groups);
}

constexpr int kParams = 8;  // stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, deformable_groups

class MDConvFunction : public torch::autograd::Function<MDConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                            int64_t dil_w, int64_t groups, int64_t deformable_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = call_forward(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                     groups, deformable_groups);
    ctx->save_for_backward({input, offset, mask, weight, bias.value_or(at::Tensor())});
    const int64_t params[kParams] = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, deformable_groups};
    for (int i = 0; i < kParams; ++i) {
      ctx->saved_data[std::to_string(i)] = params[i];
    }
    return output;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    int64_t p[kParams];
    for (int i = 0; i < kParams; ++i) {
      p[i] = ctx->saved_data[std::to_string(i)].toInt();
    }
    const bool has_bias = saved[4].defined();
    const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    auto [grad_input, grad_offset, grad_mask, grad_weight, grad_bias] = call_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3], bias, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    variable_list grads{grad_input, grad_offset, grad_mask, grad_weight, has_bias ? grad_bias : at::Tensor()};
    grads.resize(5 + kParams);  // no gradient for the integer parameters
    return grads;
  }
};

// The backward operator as a differentiable call: its result is exact, but its own derivative (a
// double backward through the convolution) is not implemented.
class MDConvBackwardFunction : public torch::autograd::Function<MDConvBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                               int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, go, gm, gw, gb] = call_backward(grad_output, input, offset, mask, weight, bias, stride_h, stride_w, pad_h,
                                              pad_w, dil_h, dil_w, groups, deformable_groups);
    return {gi, go, gm, gw, gb};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false,
                "dcnv2.modulated_deform_conv2d: double backward (a derivative of its gradients, e.g. "
                "torch.autograd.grad(..., create_graph=True) followed by a second backward) is not supported");
  }
};

at::Tensor forward_autograd(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                            int64_t groups, int64_t deformable_groups) {
  return MDConvFunction::apply(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                               groups, deformable_groups);
}

Grads backward_autograd(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                        const at::Tensor& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                        int64_t groups, int64_t deformable_groups) {
  const variable_list g =
      MDConvBackwardFunction::apply(grad_output, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
                                    dil_h, dil_w, groups, deformable_groups);
  return {g[0], g[1], g[2], g[3], g[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, Autograd, m) {
  m.impl("modulated_deform_conv2d", &forward_autograd);
  m.impl("_modulated_deform_conv2d_backward", &backward_autograd);
}

}  // namespace dcnv2
