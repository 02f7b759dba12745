// CUDA column primitives of the modulated deformable convolution. The per-sample math is in
// ../deform_math.h (shared with the CPU kernels); here are only thread mappings and launches.
// Reduced-precision inputs are read as S and computed in float (A).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace dcnv2 {
namespace DCN_CUDA_NAMESPACE {
namespace {

// One thread per (channel, image, output position); loops over the kernel taps.
template <typename S, typename A>
__global__ void im2col_kernel(const S* __restrict__ input, const S* __restrict__ offset, const S* __restrict__ mask,
                              ConvGeometry g, ColumnBlock blk, S* __restrict__ columns) {
  const int64_t K = g.kernel_h * g.kernel_w, HW = g.out_h * g.out_w, cols = blk.nb * blk.np;
  const int64_t group_channels = g.channels / g.deformable_groups;
  DCN_KERNEL_LOOP(n, g.channels * cols) {
    const int64_t j = n % cols, c = n / cols, b = blk.b0 + j / blk.np, pos = blk.p0 + j % blk.np;
    const int64_t grp = c / group_channels, ho = pos / g.out_w, wo = pos % g.out_w;
    const S* plane = input + (b * g.channels + c) * g.height * g.width;
    const S* off = offset + (b * g.deformable_groups + grp) * 2 * K * HW + pos;
    const S* msk = mask + (b * g.deformable_groups + grp) * K * HW + pos;
    Corners<A> corners;
    for (int64_t k = 0; k < K; ++k) {
      const A y = conv_tap_y(g, ho, k / g.kernel_w, static_cast<A>(off[2 * k * HW]));
      const A x = conv_tap_x(g, wo, k % g.kernel_w, static_cast<A>(off[(2 * k + 1) * HW]));
      dcn_sample(y, x, int(g.height), int(g.width), corners);
      columns[(c * K + k) * cols + j] = static_cast<S>(static_cast<A>(msk[k * HW]) * corners.value(plane));
    }
  }
}

// One thread per column element (channel, tap, image, position): scatters into the input gradient.
template <typename S, typename A>
__global__ void col2im_kernel(const S* __restrict__ grad_columns, const S* __restrict__ offset,
                              const S* __restrict__ mask, ConvGeometry g, ColumnBlock blk, A* __restrict__ grad_input) {
  const int64_t K = g.kernel_h * g.kernel_w, HW = g.out_h * g.out_w, cols = blk.nb * blk.np;
  const int64_t group_channels = g.channels / g.deformable_groups;
  DCN_KERNEL_LOOP(n, g.channels * K * cols) {
    const int64_t j = n % cols, row = n / cols, k = row % K, c = row / K;
    const int64_t b = blk.b0 + j / blk.np, pos = blk.p0 + j % blk.np, grp = c / group_channels;
    const int64_t oy = ((b * g.deformable_groups + grp) * 2 * K + 2 * k) * HW + pos;
    const A m = static_cast<A>(mask[((b * g.deformable_groups + grp) * K + k) * HW + pos]);
    Corners<A> corners;
    if (!dcn_sample(conv_tap_y(g, pos / g.out_w, k / g.kernel_w, static_cast<A>(offset[oy])),
                    conv_tap_x(g, pos % g.out_w, k % g.kernel_w, static_cast<A>(offset[oy + HW])), int(g.height),
                    int(g.width), corners)) {
      continue;
    }
    const A v = m * static_cast<A>(grad_columns[n]);
    A* plane = grad_input + (b * g.channels + c) * g.height * g.width;
    for (int t = 0; t < 4; ++t) {
      if (corners.w[t] != A(0)) {
        atomicAdd(plane + corners.idx[t], corners.w[t] * v);
      }
    }
  }
}

// One thread per (image, group, tap, position): sums over the group's channels, no atomics.
template <typename S, typename A>
__global__ void col2im_coord_kernel(const S* __restrict__ grad_columns, const S* __restrict__ input,
                                    const S* __restrict__ offset, const S* __restrict__ mask, ConvGeometry g,
                                    ColumnBlock blk, S* __restrict__ grad_offset, S* __restrict__ grad_mask) {
  const int64_t K = g.kernel_h * g.kernel_w, HW = g.out_h * g.out_w, cols = blk.nb * blk.np;
  const int64_t group_channels = g.channels / g.deformable_groups, plane = g.height * g.width;
  DCN_KERNEL_LOOP(n, g.deformable_groups * K * cols) {
    const int64_t j = n % cols, gk = n / cols, k = gk % K, grp = gk / K;
    const int64_t b = blk.b0 + j / blk.np, pos = blk.p0 + j % blk.np;
    const int64_t oy = ((b * g.deformable_groups + grp) * 2 * K + 2 * k) * HW + pos;
    const int64_t om = ((b * g.deformable_groups + grp) * K + k) * HW + pos;
    Corners<A> cr;
    A gy = A(0), gx = A(0), gm = A(0);
    if (dcn_sample(conv_tap_y(g, pos / g.out_w, k / g.kernel_w, static_cast<A>(offset[oy])),
                   conv_tap_x(g, pos % g.out_w, k % g.kernel_w, static_cast<A>(offset[oy + HW])), int(g.height),
                   int(g.width), cr)) {
      for (int64_t c = grp * group_channels; c < (grp + 1) * group_channels; ++c) {
        const S* src = input + (b * g.channels + c) * plane;
        const A v[4] = {static_cast<A>(src[cr.idx[0]]), static_cast<A>(src[cr.idx[1]]), static_cast<A>(src[cr.idx[2]]),
                        static_cast<A>(src[cr.idx[3]])};
        const A gc = static_cast<A>(grad_columns[(c * K + k) * cols + j]);
        gm += gc * (cr.w[0] * v[0] + cr.w[1] * v[1] + cr.w[2] * v[2] + cr.w[3] * v[3]);
        gy += gc * (cr.wy[0] * v[0] + cr.wy[1] * v[1] + cr.wy[2] * v[2] + cr.wy[3] * v[3]);
        gx += gc * (cr.wx[0] * v[0] + cr.wx[1] * v[1] + cr.wx[2] * v[2] + cr.wx[3] * v[3]);
      }
    }
    const A m = static_cast<A>(mask[om]);
    grad_offset[oy] = static_cast<S>(gy * m);
    grad_offset[oy + HW] = static_cast<S>(gx * m);
    grad_mask[om] = static_cast<S>(gm);
  }
}

}  // namespace

template <typename S>
cudaError_t mdconv_im2col(const S* input, const S* offset, const S* mask, const ConvGeometry& g, const ColumnBlock& blk,
                          S* columns, cudaStream_t stream) {
  const int64_t n = g.channels * blk.nb * blk.np;
  if (n > 0) {
    const auto kernel = im2col_kernel<S, typename acc_type<S>::type>;
    DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(input, offset, mask, g, blk, columns);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t mdconv_col2im(const S* grad_columns, const S* offset, const S* mask, const ConvGeometry& g,
                          const ColumnBlock& blk, typename acc_type<S>::type* grad_input, cudaStream_t stream) {
  const int64_t n = g.channels * g.kernel_h * g.kernel_w * blk.nb * blk.np;
  if (n > 0) {
    const auto kernel = col2im_kernel<S, typename acc_type<S>::type>;
    DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(grad_columns, offset, mask, g, blk, grad_input);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t mdconv_col2im_coord(const S* grad_columns, const S* input, const S* offset, const S* mask,
                                const ConvGeometry& g, const ColumnBlock& blk, S* grad_offset, S* grad_mask,
                                cudaStream_t stream) {
  const int64_t n = g.deformable_groups * g.kernel_h * g.kernel_w * blk.nb * blk.np;
  if (n > 0) {
    const auto kernel = col2im_coord_kernel<S, typename acc_type<S>::type>;
    DCN_LAUNCH(kernel, blocks_for(n), kThreads, stream)(grad_columns, input, offset, mask, g, blk, grad_offset,
                                                        grad_mask);
  }
  return cudaGetLastError();
}

#define DCN_INSTANTIATE(S)                                                                                         \
  template cudaError_t mdconv_im2col<S>(const S*, const S*, const S*, const ConvGeometry&, const ColumnBlock&, S*, \
                                        cudaStream_t);                                                             \
  template cudaError_t mdconv_col2im<S>(const S*, const S*, const S*, const ConvGeometry&, const ColumnBlock&,     \
                                        acc_type<S>::type*, cudaStream_t);                                         \
  template cudaError_t mdconv_col2im_coord<S>(const S*, const S*, const S*, const S*, const ConvGeometry&,         \
                                              const ColumnBlock&, S*, S*, cudaStream_t);

DCN_INSTANTIATE(float)
DCN_INSTANTIATE(double)
DCN_INSTANTIATE(c10::Half)
DCN_INSTANTIATE(c10::BFloat16)

}  // namespace DCN_CUDA_NAMESPACE
}  // namespace dcnv2
