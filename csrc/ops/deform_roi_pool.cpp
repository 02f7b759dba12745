// Deformable RoI pooling: operator schemas and the device-agnostic driver.
#include "deform_roi_pool.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

#include <string>

namespace dcnv2 {

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  m.def((std::string("deform_roi_pool") + kRoiPoolSignature).c_str(), {at::Tag::pt2_compliant_tag});
  m.def((std::string("_deform_roi_pool_backward") + kRoiPoolBackwardSignature).c_str(), {at::Tag::pt2_compliant_tag});
}

namespace {

constexpr const char* kOp = "dcnv2.deform_roi_pool: ";
// 2^20 samples per bin: a bin of 1024 x 1024 feature-map pixels (a 7 x 7 output of a RoI 7168 pixels wide).
constexpr int64_t kMaxAdaptiveSamples = int64_t(1) << 20;

void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_same_device_and_dtype(kOp, t, name, input);
}

RoiPoolGeometry make_geometry(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                              int64_t pooled_h, int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                              double gamma) {
  TORCH_CHECK(input.dim() == 4, kOp, "input: expected a 4-D tensor (N, C, H, W), got a ", input.dim(),
              "-D tensor of shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), kOp, "input: expected a floating-point tensor, got dtype ",
              input.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, kOp,
              "rois: expected a 2-D tensor (K, 5) of [batch_index, x1, y1, x2, y2], got shape ", rois.sizes());
  check_same(rois, "rois", input);
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, kOp, "output_size: expected positive values, got (", pooled_h, ", ",
              pooled_w, ")");
  TORCH_CHECK(spatial_scale > 0, kOp, "spatial_scale: expected a positive value, got ", spatial_scale);
  const int64_t num_rois = rois.size(0);
  if (offset.has_value()) {
    check_same(*offset, "offset", input);
    const std::vector<int64_t> shape{num_rois, 2, pooled_h, pooled_w};
    TORCH_CHECK(offset->sizes() == at::IntArrayRef(shape), kOp,
                "offset: expected shape (K, 2, out_h, out_w) = ", at::IntArrayRef(shape), ", got ", offset->sizes());
  }
  if (num_rois > 0) {
    // Checked here so that a bad RoI is an error, never an out-of-bounds read or an endless grid. The
    // three verdicts are fetched together: one device sync on CUDA per call.
    const at::Tensor index = rois.select(1, 0);
    // The adaptive grid has ceil(RoI size / output size) samples per bin side: a huge RoI would take
    // hours (and past 2^31 pixels overflow the grid size), so it is an error instead.
    const at::Tensor size = (rois.narrow(1, 3, 2) - rois.narrow(1, 1, 2)).to(at::kDouble).clamp_min(0) * spatial_scale;
    const at::Tensor samples = sampling_ratio > 0 ? at::zeros({1}, size.options())
                                                  : (size.select(1, 0) / double(pooled_w)).ceil() *
                                                        (size.select(1, 1) / double(pooled_h)).ceil();
    const at::Tensor verdicts = at::stack({at::logical_and(index >= 0, index < input.size(0)).all().to(at::kDouble),
                                           at::isfinite(rois).all().to(at::kDouble), samples.max()})
                                    .cpu();
    const double* v = verdicts.const_data_ptr<double>();
    TORCH_CHECK(v[0] != 0, kOp, "rois: expected batch indices (column 0) in [0, ", input.size(0), "), got values in [",
                index.min().item<double>(), ", ", index.max().item<double>(), "]");
    TORCH_CHECK(v[1] != 0, kOp, "rois: expected finite coordinates, got NaN or inf");
    TORCH_CHECK(v[2] <= double(kMaxAdaptiveSamples), kOp, "rois: expected RoIs whose adaptive sampling grid ",
                "(sampling_ratio=0) has at most ", kMaxAdaptiveSamples, " samples per bin, got one with ", v[2],
                " (RoI of ", size.select(1, 0).max().item<double>(), " x ", size.select(1, 1).max().item<double>(),
                " feature-map pixels at most); pass a positive sampling_ratio for such RoIs");
  }
  RoiPoolGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.num_rois = num_rois;
  g.pooled_h = pooled_h;
  g.pooled_w = pooled_w;
  g.sampling_ratio = sampling_ratio;
  g.spatial_scale = spatial_scale;
  g.gamma = gamma;
  return g;
}

}  // namespace

at::Tensor deform_roi_pool_forward(const RoiPoolPrimitives& prim, const at::Tensor& input_, const at::Tensor& rois_,
                                   const std::optional<at::Tensor>& offset_, int64_t pooled_h, int64_t pooled_w,
                                   double spatial_scale, int64_t sampling_ratio, double gamma) {
  const RoiPoolGeometry g =
      make_geometry(input_, rois_, offset_, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
  const at::Tensor input = input_.contiguous(), rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  at::Tensor output = at::zeros({g.num_rois, g.channels, pooled_h, pooled_w}, input.options());
  if (output.numel() > 0 && g.height > 0 && g.width > 0) {
    prim.forward(input, rois, offset, g, output);
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward(const RoiPoolPrimitives& prim,
                                                            const at::Tensor& grad_output_, const at::Tensor& input_,
                                                            const at::Tensor& rois_,
                                                            const std::optional<at::Tensor>& offset_, int64_t pooled_h,
                                                            int64_t pooled_w, double spatial_scale,
                                                            int64_t sampling_ratio, double gamma) {
  const RoiPoolGeometry g =
      make_geometry(input_, rois_, offset_, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
  const std::vector<int64_t> out_shape{g.num_rois, g.channels, pooled_h, pooled_w};
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef(out_shape), kOp, "grad_output: expected shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output_.sizes());
  check_same(grad_output_, "grad_output", input_);
  const at::Tensor input = input_.contiguous(), rois = rois_.contiguous(), grad_output = grad_output_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_offset = offset.defined() ? at::zeros_like(offset) : at::empty({0}, input.options());
  if (grad_output.numel() > 0 && g.height > 0 && g.width > 0) {
    prim.backward(grad_output, input, rois, offset, g, grad_input, grad_offset);
  }
  return {grad_input.to(input.scalar_type()), grad_offset};
}

}  // namespace dcnv2
