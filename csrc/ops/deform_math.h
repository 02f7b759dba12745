// Per-sample math of the two DCNv2 operators, written once and shared by the CPU loops
// (csrc/ops/cpu/) and the CUDA kernels (csrc/ops/cuda/).
//
// Two bilinear rules live here and must not be mixed:
//  * dcn_sample:  deformable convolution (DCNv2 paper; MMCV/torchvision rule). A sample is zero unless
//                 -1 < y < H and -1 < x < W; neighbours outside the map contribute zero, so the value
//                 fades linearly to zero within one pixel of the border.
//  * roi_sample:  RoIAlign rule (used by deformable RoI pooling). A sample is zero if y < -1, y > H,
//                 x < -1 or x > W; otherwise the coordinate is clamped into the map (border replication).
//
// Both return the four neighbour indices (into one H*W plane) with weights for the value and for its
// derivatives d/dy and d/dx. Invalid neighbours get index 0 and weight 0, so callers never branch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCN_HOST_DEVICE inline
#endif

namespace dcnv2 {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

// (arithmetic rather than a select, so that loops over positions vectorise)
template <typename T>
DCN_HOST_DEVICE int floor_to_int(T v) {
  const int i = static_cast<int>(v);
  return i - static_cast<int>(v < static_cast<T>(i));
}

template <typename T>
DCN_HOST_DEVICE int ceil_to_int(T v) {
  int i = static_cast<int>(v);
  return (v > static_cast<T>(i)) ? i + 1 : i;
}

// Four neighbours (y0,x0) (y0,x1) (y1,x0) (y1,x1) of a sample and the weights of its value (w),
// of d value / d y (wy) and of d value / d x (wx).
template <typename T>
struct Corners {
  int idx[4];
  T w[4];
  T wy[4];
  T wx[4];

  template <typename V>
  DCN_HOST_DEVICE T value(const V* plane) const {
    return w[0] * static_cast<T>(plane[idx[0]]) + w[1] * static_cast<T>(plane[idx[1]]) +
           w[2] * static_cast<T>(plane[idx[2]]) + w[3] * static_cast<T>(plane[idx[3]]);
  }
};

template <typename T>
DCN_HOST_DEVICE void set_empty(Corners<T>& c) {
  for (int n = 0; n < 4; ++n) {
    c.idx[n] = 0;
    c.w[n] = c.wy[n] = c.wx[n] = T(0);
  }
}

// A sample that reads nothing: zero, or NaN when a coordinate is NaN (so that a NaN offset gives a
// NaN result and NaN gradients instead of a silent zero). Returns whether the sample must be used.
template <typename T>
DCN_HOST_DEVICE bool set_outside(T y, T x, Corners<T>& c) {
  set_empty(c);
  if (y != y || x != x) {
    const T nan = y + x;
    for (int n = 0; n < 4; ++n) {
      c.w[n] = c.wy[n] = c.wx[n] = nan;
    }
    return true;
  }
  return false;
}

// Fills the corner weights for fractional weights (ly, lx) inside the cell whose top-left is (y0, x0);
// dy_scale / dx_scale are 0 where the coordinate does not influence the value (clamped borders), and
// every weight is 0 unless `inside`. Branch-free, so that a CPU loop over positions vectorises it.
template <typename T>
DCN_HOST_DEVICE void set_cell(Corners<T>& c, bool inside, int y0, int x0, int y1, int x1, T ly, T lx, int H, int W,
                              T dy_scale, T dx_scale) {
  const T hy = T(1) - ly, hx = T(1) - lx;
  const int ys[4] = {y0, y0, y1, y1};
  const int xs[4] = {x0, x1, x0, x1};
  const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T wy[4] = {-hx, -lx, hx, lx};
  const T wx[4] = {-hy, hy, -ly, ly};
  for (int n = 0; n < 4; ++n) {
    // 0 <= ys[n] < H and 0 <= xs[n] < W, as unsigned comparisons
    const bool valid = inside & (static_cast<unsigned>(ys[n]) < static_cast<unsigned>(H)) &
                       (static_cast<unsigned>(xs[n]) < static_cast<unsigned>(W));
    c.idx[n] = valid ? ys[n] * W + xs[n] : 0;
    c.w[n] = valid ? w[n] : T(0);
    c.wy[n] = valid ? wy[n] * dy_scale : T(0);
    c.wx[n] = valid ? wx[n] * dx_scale : T(0);
  }
}

// Deformable-convolution rule (MMCV modulated_deform_conv / torchvision deform_conv2d forward).
// Returns false when the sample is outside (-1, H) x (-1, W): value and gradients are zero there.
// A NaN coordinate returns true with NaN weights (a NaN offset gives NaN, not a silent zero).
// Branch-free (selects only), so that the CPU kernel's loop over positions vectorises it.
template <typename T>
DCN_HOST_DEVICE bool dcn_sample(T y, T x, int H, int W, Corners<T>& c) {
  // false for NaN coordinates
  const bool inside = (y > T(-1)) & (y < static_cast<T>(H)) & (x > T(-1)) & (x < static_cast<T>(W));
  const T yc = inside ? y : T(0), xc = inside ? x : T(0);  // keeps the integer conversion defined
  const int y0 = floor_to_int(yc), x0 = floor_to_int(xc);
  set_cell(c, inside, y0, x0, y0 + 1, x0 + 1, yc - static_cast<T>(y0), xc - static_cast<T>(x0), H, W, T(1), T(1));
  const bool nan = (y != y) | (x != x);
  const T poison = y + x;
  for (int n = 0; n < 4; ++n) {
    c.w[n] = nan ? poison : c.w[n];
    c.wy[n] = nan ? poison : c.wy[n];
    c.wx[n] = nan ? poison : c.wx[n];
  }
  return inside | nan;
}

// RoIAlign rule (torchvision roi_align / MMCV deform_roi_pool). The derivatives are those of this
// clamped function: zero along an axis where the coordinate was clamped. (MMCV's deform_roi_pool
// backward instead uses the unclamped coordinate there; the two differ only within one pixel of the
// border.)
template <typename T>
DCN_HOST_DEVICE bool roi_sample(T y, T x, int H, int W, Corners<T>& c) {
  // written so that NaN coordinates also take this branch
  if (!(y >= T(-1) && y <= static_cast<T>(H) && x >= T(-1) && x <= static_cast<T>(W))) {
    return set_outside(y, x, c);
  }
  T dy_scale = T(1), dx_scale = T(1);
  if (y <= T(0)) {
    y = T(0);
    dy_scale = T(0);
  }
  if (x <= T(0)) {
    x = T(0);
    dx_scale = T(0);
  }
  int y0 = floor_to_int(y), x0 = floor_to_int(x), y1, x1;
  if (y0 >= H - 1) {
    y0 = y1 = H - 1;
    y = static_cast<T>(y0);
    dy_scale = T(0);
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= W - 1) {
    x0 = x1 = W - 1;
    x = static_cast<T>(x0);
    dx_scale = T(0);
  } else {
    x1 = x0 + 1;
  }
  set_cell(c, true, y0, x0, y1, x1, y - static_cast<T>(y0), x - static_cast<T>(x0), H, W, dy_scale, dx_scale);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Modulated deformable convolution: where kernel tap (i, j) of output (ho, wo) samples the input
// (DCNv2 paper eq. 3): y = ho*stride - pad + i*dilation + dy.
struct ConvGeometry {
  int64_t batch, channels, height, width;  // input
  int64_t out_h, out_w;                    // output spatial size
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, deformable_groups;
  int64_t out_channels;
};

// A block of im2col columns: images [b0, b0 + nb) and output positions [p0, p0 + np) of each image
// (flattened ho * Wo + wo); column j is image b0 + j / np, position p0 + j % np.
struct ColumnBlock {
  int64_t b0, nb, p0, np;
};

template <typename T>
DCN_HOST_DEVICE T conv_tap_y(const ConvGeometry& g, int64_t ho, int64_t i, T dy) {
  return static_cast<T>(ho * g.stride_h - g.pad_h + i * g.dil_h) + dy;
}

template <typename T>
DCN_HOST_DEVICE T conv_tap_x(const ConvGeometry& g, int64_t wo, int64_t j, T dx) {
  return static_cast<T>(wo * g.stride_w - g.pad_w + j * g.dil_w) + dx;
}

// ---------------------------------------------------------------------------------------------
// Modulated deformable RoI pooling (MMCV RoIAlign-style deform_roi_pool semantics).
struct RoiPoolGeometry {
  int64_t batch, channels, height, width;  // input
  int64_t num_rois, pooled_h, pooled_w;
  int64_t sampling_ratio;  // samples per bin side; <= 0: adaptive (ceil of the bin size)
  double spatial_scale, gamma;
};

// The sampling grid of one output bin (ph, pw). The whole bin is translated by gamma * offset * RoI size
// (offset channel 0 = dx, channel 1 = dy).
template <typename T>
struct RoiBin {
  T y_start, x_start;  // top-left of the bin, offset applied
  T bin_h, bin_w;
  T roi_h, roi_w;  // size of the unshifted RoI (scales the offset gradient)
  int grid_h, grid_w;
  T inv_count;  // 1 / max(grid_h * grid_w, 1)
};

// roi: [batch_index, x1, y1, x2, y2] in image pixels; offset_dx/dy already read for this bin (0 if none).
template <typename T, typename V>
DCN_HOST_DEVICE RoiBin<T> roi_bin(const V* roi, T spatial_scale, int pooled_h, int pooled_w, int ph, int pw,
                                  int sampling_ratio, T gamma, T offset_dx, T offset_dy) {
  RoiBin<T> b;
  // aligned=True: pixel centres at integer + 0.5 (Detectron2's ROIAlignV2, MMCV aligned RoIAlign)
  const T x1 = static_cast<T>(roi[1]) * spatial_scale - T(0.5);
  const T y1 = static_cast<T>(roi[2]) * spatial_scale - T(0.5);
  const T x2 = static_cast<T>(roi[3]) * spatial_scale - T(0.5);
  const T y2 = static_cast<T>(roi[4]) * spatial_scale - T(0.5);
  b.roi_w = x2 - x1;
  b.roi_h = y2 - y1;
  b.bin_w = b.roi_w / static_cast<T>(pooled_w);
  b.bin_h = b.roi_h / static_cast<T>(pooled_h);
  // adaptive grid: ceil(roi size / output size) samples per bin side when sampling_ratio <= 0
  b.grid_h = sampling_ratio > 0 ? sampling_ratio : ceil_to_int(b.bin_h);
  b.grid_w = sampling_ratio > 0 ? sampling_ratio : ceil_to_int(b.bin_w);
  const int count = b.grid_h * b.grid_w;
  b.inv_count = T(1) / static_cast<T>(count > 1 ? count : 1);
  b.x_start = x1 + static_cast<T>(pw) * b.bin_w + gamma * b.roi_w * offset_dx;
  b.y_start = y1 + static_cast<T>(ph) * b.bin_h + gamma * b.roi_h * offset_dy;
  return b;
}

template <typename T>
DCN_HOST_DEVICE T roi_bin_sample_y(const RoiBin<T>& b, int iy) {
  return b.y_start + (static_cast<T>(iy) + T(0.5)) * b.bin_h / static_cast<T>(b.grid_h);
}

template <typename T>
DCN_HOST_DEVICE T roi_bin_sample_x(const RoiBin<T>& b, int ix) {
  return b.x_start + (static_cast<T>(ix) + T(0.5)) * b.bin_w / static_cast<T>(b.grid_w);
}

}  // namespace dcnv2
