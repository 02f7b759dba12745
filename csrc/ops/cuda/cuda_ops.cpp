// The CUDA back-end of both operators, on the tensors' side: the primitives the drivers take (tensor
// wrappers around the kernel launchers: dtype dispatch, the stream, the launch check), the operators
// (device check, device guard, determinism alert) and their registration. The kernels are in the .cu
// files.
//
// Compiled twice, as the kernels are: here for the GPU, registering the CUDA kernels of the public
// operators; and in ../emulated_cuda/cuda_ops.cpp under
// DCNV2_EMULATE_CUDA (launch.h), over the host build of the same kernels, as the test-only operators
// dcnv2::_emulated_cuda_<op>[_backward] on CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>

#include "../column_driver.h"
#include "../deform_roi_pool.h"
#include "launchers.h"

#ifndef DCNV2_EMULATE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace dcnv2 {
namespace {

namespace kernels = ::dcnv2::DCN_CUDA_NAMESPACE;

// ----- what differs between the two builds -----
#ifdef DCNV2_EMULATE_CUDA
// CPU tensors; the grid runs serially on the calling thread: no device, no stream, no atomics race.
constexpr const char* kOpPrefix = "dcnv2._emulated_cuda_";

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

void check_device(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), kOpPrefix, op, ": input: expected a CPU tensor (the emulated CUDA kernels ",
              "run on the host), got one on ", input.device());
}

cudaStream_t launch_stream() { return nullptr; }

void alert_not_deterministic(const char*) {}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dcnv2: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}
#else
constexpr const char* kOpPrefix = "dcnv2.";

using DeviceGuard = c10::cuda::CUDAGuard;

void check_device(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), kOpPrefix, op, ": input: expected a CUDA tensor (another argument is on CUDA), ",
              "got one on ", input.device());
}

cudaStream_t launch_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The input gradients are accumulated with float atomics: the standard error under
// torch.use_deterministic_algorithms(True) (a warning with warn_only=True).
void alert_not_deterministic(const char* op) { at::globalContext().alertNotDeterministic(op); }

void check_launch(cudaError_t err, const char* what) {
  if (err == cudaErrorNoKernelImageForDevice) {
    // The card is newer (or older) than every architecture this extension was compiled for.
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "dcnv2: CUDA kernel ", what, ": projects_dcnv2 was built without code for this GPU (",
                prop->name, ", compute capability ", prop->major, ".", prop->minor, "): rebuild it with ",
                "TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor, "\" (or a list that includes it), e.g. ",
                "TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor, "\" pip install -e . --no-build-isolation (",
                cudaGetErrorString(err), ")");
  }
  TORCH_CHECK(err == cudaSuccess, "dcnv2: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}
#endif

#define DCN_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ----- the convolution's primitives (column_driver.h) -----
void im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& columns) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_im2col_cuda", [&] {
    check_launch(kernels::mdconv_im2col<scalar_t>(input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                                                  mask.const_data_ptr<scalar_t>(), g, blk, columns.data_ptr<scalar_t>(),
                                                  launch_stream()),
                 "mdconv_im2col");
  });
}

void col2im(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
            const ColumnBlock& blk, at::Tensor& grad_input) {
  DCN_DISPATCH(grad_columns.scalar_type(), "dcnv2_col2im_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(kernels::mdconv_col2im<scalar_t>(grad_columns.const_data_ptr<scalar_t>(),
                                                  offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), g,
                                                  blk, grad_input.data_ptr<acc_t>(), launch_stream()),
                 "mdconv_col2im");
  });
}

void col2im_coord(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_offset,
                  at::Tensor& grad_mask) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_col2im_coord_cuda", [&] {
    check_launch(kernels::mdconv_col2im_coord<scalar_t>(
                     grad_columns.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                     offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), g, blk,
                     grad_offset.data_ptr<scalar_t>(), grad_mask.data_ptr<scalar_t>(), launch_stream()),
                 "mdconv_col2im_coord");
  });
}

constexpr MDConvPrimitives kConvPrimitives{im2col, col2im, col2im_coord};

// ----- the RoI pooling's primitives (deform_roi_pool.h) -----
void pool_forward(const at::Tensor& input, const at::Tensor& rois, const at::Tensor& offset, const RoiPoolGeometry& g,
                  at::Tensor& output) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_cuda", [&] {
    check_launch(kernels::roi_pool_forward<scalar_t>(input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
                                                     offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr, g,
                                                     output.data_ptr<scalar_t>(), launch_stream()),
                 "deform_roi_pool_forward");
  });
}

void pool_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& offset, const RoiPoolGeometry& g, at::Tensor& grad_input,
                   at::Tensor& grad_offset) {
  DCN_DISPATCH(input.scalar_type(), "dcnv2_deform_roi_pool_backward_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    check_launch(
        kernels::roi_pool_backward<scalar_t>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
            offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr, g, grad_input.data_ptr<acc_t>(),
            offset.defined() ? grad_offset.data_ptr<scalar_t>() : nullptr, launch_stream()),
        "deform_roi_pool_backward");
  });
}

constexpr RoiPoolPrimitives kPoolPrimitives{pool_forward, pool_backward};

#undef DCN_DISPATCH

// ----- the operators -----
at::Tensor mdconv_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                          int64_t deformable_groups) {
  check_device("modulated_deform_conv2d", input);
  const DeviceGuard guard(input.device());
  return column_driver_forward(kConvPrimitives, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w,
                               dil_h, dil_w, groups, deformable_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mdconv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  check_device("modulated_deform_conv2d_backward", input);
  alert_not_deterministic("dcnv2::_modulated_deform_conv2d_backward (CUDA)");
  const DeviceGuard guard(input.device());
  return column_driver_backward(kConvPrimitives, grad_output, input, offset, mask, weight, bias, stride_h, stride_w,
                                pad_h, pad_w, dil_h, dil_w, groups, deformable_groups);
}

at::Tensor pool_forward_op(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                           int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                           double gamma) {
  check_device("deform_roi_pool", input);
  const DeviceGuard guard(input.device());
  return deform_roi_pool_forward(kPoolPrimitives, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> pool_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                                    const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                    int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                                    int64_t sampling_ratio, double gamma) {
  check_device("deform_roi_pool_backward", input);
  alert_not_deterministic("dcnv2::_deform_roi_pool_backward (CUDA)");
  const DeviceGuard guard(input.device());
  return deform_roi_pool_backward(kPoolPrimitives, grad_output, input, rois, offset, pooled_h, pooled_w, spatial_scale,
                                  sampling_ratio, gamma);
}

}  // namespace

// ----- the registration -----
#ifdef DCNV2_EMULATE_CUDA
TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  m.def((std::string("_emulated_cuda_modulated_deform_conv2d") + kMDConvSignature).c_str());
  m.def((std::string("_emulated_cuda_modulated_deform_conv2d_backward") + kMDConvBackwardSignature).c_str());
  m.def((std::string("_emulated_cuda_deform_roi_pool") + kRoiPoolSignature).c_str());
  m.def((std::string("_emulated_cuda_deform_roi_pool_backward") + kRoiPoolBackwardSignature).c_str());
}

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("_emulated_cuda_modulated_deform_conv2d", &mdconv_forward);
  m.impl("_emulated_cuda_modulated_deform_conv2d_backward", &mdconv_backward);
  m.impl("_emulated_cuda_deform_roi_pool", &pool_forward_op);
  m.impl("_emulated_cuda_deform_roi_pool_backward", &pool_backward_op);
}
#else
// The public operators' CUDA kernels (schemas in ../modulated_deform_conv2d.cpp and ../deform_roi_pool.cpp).
TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) {
  m.impl("modulated_deform_conv2d", &mdconv_forward);
  m.impl("_modulated_deform_conv2d_backward", &mdconv_backward);
  m.impl("deform_roi_pool", &pool_forward_op);
  m.impl("_deform_roi_pool_backward", &pool_backward_op);
}
#endif

}  // namespace dcnv2
