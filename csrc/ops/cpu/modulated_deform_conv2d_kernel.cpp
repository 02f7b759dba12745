// CPU column primitives of the modulated deformable convolution, and the CPU registration.
//
// The bilinear corners of every (deformable group, kernel tap, output position) are computed once per
// column block (with the mask folded in) and reused by all channels of that group. Work is split so
// that no two threads write the same element: im2col by column row, col2im by input channel (each
// channel owns its gradient plane: no atomics, deterministic), col2im_coord by (group, tap, positions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deform_math.h"
#include "../modulated_deform_conv2d.h"

namespace dcnv2 {
namespace {

template <typename T>
struct Tap {
  int idx[4];
  T w[4];  // bilinear weight times mask
};

// Corners of taps (group, k) for the block's columns: table[(group * K + k) * columns + j].
template <typename T>
std::vector<Tap<T>> build_taps(const T* offset, const T* mask, const ConvGeometry& g, const ColumnBlock& blk) {
  const int64_t K = g.kernel_h * g.kernel_w, HW = g.out_h * g.out_w, cols = blk.nb * blk.np;
  std::vector<Tap<T>> table(g.deformable_groups * K * cols);
  at::parallel_for(0, g.deformable_groups * K * blk.nb, 1, [&](int64_t begin, int64_t end) {
    Corners<T> c;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t bl = e % blk.nb, gk = e / blk.nb, k = gk % K, grp = gk / K, b = blk.b0 + bl;
      const T* off_y = offset + ((b * g.deformable_groups + grp) * 2 * K + 2 * k) * HW;
      const T* off_x = off_y + HW;
      const T* m = mask + ((b * g.deformable_groups + grp) * K + k) * HW;
      Tap<T>* out = table.data() + gk * cols + bl * blk.np;
      const int64_t i = k / g.kernel_w, j = k % g.kernel_w;
      for (int64_t t = 0; t < blk.np; ++t) {
        const int64_t pos = blk.p0 + t, ho = pos / g.out_w, wo = pos % g.out_w;
        dcn_sample(conv_tap_y(g, ho, i, off_y[pos]), conv_tap_x(g, wo, j, off_x[pos]), int(g.height), int(g.width),
                   c);
        for (int n = 0; n < 4; ++n) {
          out[t].idx[n] = c.idx[n];
          out[t].w[n] = c.w[n] * m[pos];
        }
      }
    }
  });
  return table;
}

// Positions are processed in chunks small enough that a chunk's taps stay in L1 while every channel
// of the group reads them; a channel's input lines are reused across the kernel taps.
constexpr int64_t kPositionChunk = 64;

template <typename T>
void im2col_cpu_impl(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
                     const ColumnBlock& blk, at::Tensor& columns) {
  const auto table = build_taps(offset.data_ptr<T>(), mask.data_ptr<T>(), g, blk);
  const int64_t K = g.kernel_h * g.kernel_w, cols = blk.nb * blk.np;
  const int64_t plane = g.height * g.width, group_channels = g.channels / g.deformable_groups;
  const int64_t chunks = (blk.np + kPositionChunk - 1) / kPositionChunk;  // per image
  const T* in = input.data_ptr<T>();
  T* col = columns.data_ptr<T>();
  // one task per (deformable group, image, chunk of positions): tasks write disjoint column ranges
  at::parallel_for(0, g.deformable_groups * blk.nb * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t grp = unit / (blk.nb * chunks), bl = (unit / chunks) % blk.nb;
      const int64_t t0 = (unit % chunks) * kPositionChunk, n = std::min(kPositionChunk, blk.np - t0);
      const int64_t j0 = bl * blk.np + t0;
      for (int64_t c = grp * group_channels; c < (grp + 1) * group_channels; ++c) {
        const T* src = in + ((blk.b0 + bl) * g.channels + c) * plane;
        for (int64_t k = 0; k < K; ++k) {
          const Tap<T>* taps = table.data() + (grp * K + k) * cols + j0;
          T* dst = col + (c * K + k) * cols + j0;
          for (int64_t t = 0; t < n; ++t) {
            const Tap<T>& tap = taps[t];
            dst[t] = tap.w[0] * src[tap.idx[0]] + tap.w[1] * src[tap.idx[1]] + tap.w[2] * src[tap.idx[2]] +
                tap.w[3] * src[tap.idx[3]];
          }
        }
      }
    }
  });
}

template <typename T>
void col2im_cpu_impl(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask,
                     const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_input) {
  const auto table = build_taps(offset.data_ptr<T>(), mask.data_ptr<T>(), g, blk);
  const int64_t K = g.kernel_h * g.kernel_w, cols = blk.nb * blk.np;
  const int64_t plane = g.height * g.width, group_channels = g.channels / g.deformable_groups;
  const T* gcol = grad_columns.data_ptr<T>();
  T* gin = grad_input.data_ptr<T>();
  // Tasks own disjoint channel ranges inside one deformable group (each channel owns its gradient
  // planes: no atomics, deterministic).
  const int64_t per_group = std::max<int64_t>(
      1, std::min<int64_t>(group_channels, 2 * at::get_num_threads() / g.deformable_groups));
  at::parallel_for(0, g.deformable_groups * per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t grp = unit / per_group, part = unit % per_group;
      const int64_t c0 = grp * group_channels + group_channels * part / per_group;
      const int64_t c1 = grp * group_channels + group_channels * (part + 1) / per_group;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t bl = 0; bl < blk.nb; ++bl) {
          T* dst = gin + ((blk.b0 + bl) * g.channels + c) * plane;
          for (int64_t k = 0; k < K; ++k) {
            const Tap<T>* taps = table.data() + (grp * K + k) * cols + bl * blk.np;
            const T* src = gcol + (c * K + k) * cols + bl * blk.np;
            for (int64_t t = 0; t < blk.np; ++t) {
              const Tap<T>& tap = taps[t];
              const T v = src[t];
              dst[tap.idx[0]] += tap.w[0] * v;
              dst[tap.idx[1]] += tap.w[1] * v;
              dst[tap.idx[2]] += tap.w[2] * v;
              dst[tap.idx[3]] += tap.w[3] * v;
            }
          }
        }
      }
    }
  });
}

template <typename T>
void col2im_coord_cpu_impl(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                           const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk,
                           at::Tensor& grad_offset, at::Tensor& grad_mask) {
  const int64_t K = g.kernel_h * g.kernel_w, HW = g.out_h * g.out_w, cols = blk.nb * blk.np;
  const int64_t plane = g.height * g.width, group_channels = g.channels / g.deformable_groups;
  const int64_t chunks = (blk.np + kPositionChunk - 1) / kPositionChunk;  // per image
  const T* in = input.data_ptr<T>();
  const T* off = offset.data_ptr<T>();
  const T* msk = mask.data_ptr<T>();
  const T* gcol = grad_columns.data_ptr<T>();
  T* goff = grad_offset.data_ptr<T>();
  T* gmask = grad_mask.data_ptr<T>();
  // one task per (group, tap, image, chunk of positions), summing over the group's channels
  at::parallel_for(0, g.deformable_groups * K * blk.nb * chunks, 1, [&](int64_t begin, int64_t end) {
    Corners<T> corners[kPositionChunk];
    T gy[kPositionChunk], gx[kPositionChunk], gm[kPositionChunk];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % chunks, bl = (unit / chunks) % blk.nb, gk = unit / (chunks * blk.nb);
      const int64_t k = gk % K, grp = gk / K, b = blk.b0 + bl;
      const int64_t i = k / g.kernel_w, j = k % g.kernel_w;
      const int64_t t0 = chunk * kPositionChunk, n = std::min(kPositionChunk, blk.np - t0);
      const int64_t j0 = bl * blk.np + t0, p0 = blk.p0 + t0;
      const T* off_y = off + ((b * g.deformable_groups + grp) * 2 * K + 2 * k) * HW + p0;
      const T* off_x = off_y + HW;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = p0 + t;
        dcn_sample(conv_tap_y(g, pos / g.out_w, i, off_y[t]), conv_tap_x(g, pos % g.out_w, j, off_x[t]),
                   int(g.height), int(g.width), corners[t]);
        gy[t] = gx[t] = gm[t] = T(0);
      }
      for (int64_t c = grp * group_channels; c < (grp + 1) * group_channels; ++c) {
        const T* src = in + (b * g.channels + c) * plane;
        const T* src_col = gcol + (c * K + k) * cols + j0;
        for (int64_t t = 0; t < n; ++t) {
          const Corners<T>& cr = corners[t];
          const T v[4] = {src[cr.idx[0]], src[cr.idx[1]], src[cr.idx[2]], src[cr.idx[3]]};
          const T gc = src_col[t];
          gm[t] += gc * (cr.w[0] * v[0] + cr.w[1] * v[1] + cr.w[2] * v[2] + cr.w[3] * v[3]);
          gy[t] += gc * (cr.wy[0] * v[0] + cr.wy[1] * v[1] + cr.wy[2] * v[2] + cr.wy[3] * v[3]);
          gx[t] += gc * (cr.wx[0] * v[0] + cr.wx[1] * v[1] + cr.wx[2] * v[2] + cr.wx[3] * v[3]);
        }
      }
      T* goff_y = goff + ((b * g.deformable_groups + grp) * 2 * K + 2 * k) * HW + p0;
      T* goff_x = goff_y + HW;
      const int64_t om = ((b * g.deformable_groups + grp) * K + k) * HW + p0;
      for (int64_t t = 0; t < n; ++t) {
        goff_y[t] = gy[t] * msk[om + t];
        goff_x[t] = gx[t] * msk[om + t];
        gmask[om + t] = gm[t];
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "dcnv2.modulated_deform_conv2d: input: expected float32 or float64 on CPU, got ", input.scalar_type(),
              " (run reduced precision under torch.autocast, which computes this op in float32)");
}

void im2col_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const ConvGeometry& g,
                const ColumnBlock& blk, at::Tensor& columns) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_im2col_cpu",
                             [&] { im2col_cpu_impl<scalar_t>(input, offset, mask, g, blk, columns); });
}

void col2im_cpu(const at::Tensor& grad_columns, const at::Tensor& offset, const at::Tensor& mask,
                const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES(grad_columns.scalar_type(), "dcnv2_col2im_cpu",
                             [&] { col2im_cpu_impl<scalar_t>(grad_columns, offset, mask, g, blk, grad_input); });
}

void col2im_coord_cpu(const at::Tensor& grad_columns, const at::Tensor& input, const at::Tensor& offset,
                      const at::Tensor& mask, const ConvGeometry& g, const ColumnBlock& blk, at::Tensor& grad_offset,
                      at::Tensor& grad_mask) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_col2im_coord_cpu", [&] {
    col2im_coord_cpu_impl<scalar_t>(grad_columns, input, offset, mask, g, blk, grad_offset, grad_mask);
  });
}

constexpr MDConvPrimitives kCpuPrimitives{im2col_cpu, col2im_cpu, col2im_coord_cpu};

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups,
                       int64_t deformable_groups) {
  check_cpu_dtype(input);
  return mdconv_forward(kCpuPrimitives, input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                        dil_w, groups, deformable_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t deformable_groups) {
  check_cpu_dtype(input);
  return mdconv_backward(kCpuPrimitives, grad_output, input, offset, mask, weight, bias, stride_h, stride_w, pad_h,
                         pad_w, dil_h, dil_w, groups, deformable_groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("modulated_deform_conv2d", &forward_cpu);
  m.impl("_modulated_deform_conv2d_backward", &backward_cpu);
}

}  // namespace dcnv2
