// The loops of the CPU modulated deformable convolution: a channels-last column driver. Compiled once
// per instruction set: modulated_deform_conv2d_kernel.cpp includes this file for the portable build
// (namespace cpu_generic) and modulated_deform_conv2d_kernel_avx2.cpp for AVX2+FMA (cpu_avx2), after
// including the headers below themselves, so that only the code of this file takes the AVX2 target.
//
// A column is the row of one output position: kh*kw*C values laid out [conv group][tap][channel of
// the group]. The bilinear corners of a (position, deformable group, tap) are found once, for 8
// positions at a time in a vectorised loop (the branch-free dcn_sample of deform_math.h), and blended
// over the contiguous channels of the channels-last input, in loops the compiler vectorises. The GEMMs
// go to ATen (MKL). Work is split so that no two threads write the same element: im2col and the
// offset/mask gradients by position, col2im by channel slice (a slice owns its channels of every input
// pixel). No atomics: every result is deterministic.
//
// Defines DCNV2_CPU_ISA::mdconv_forward / mdconv_backward (see modulated_deform_conv2d_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../deform_math.h"
#include "../modulated_deform_conv2d.h"
#include "modulated_deform_conv2d_cpu.h"

#ifndef DCNV2_CPU_ISA
#error "define DCNV2_CPU_ISA (the namespace of this instance) before including this file"
#endif

namespace dcnv2 {
namespace DCNV2_CPU_ISA {
namespace {

// A run of channels [c0, c0 + len) inside one deformable group and one conv group.
struct Run {
  int64_t c0, len, dgrp, cgrp;
};

struct Layout {
  const ConvGeometry& g;
  int64_t K, C, cg, row, plane, hw;
  std::vector<Run> runs;
  std::vector<int64_t> group_first;  // runs of deformable group d: [group_first[d], group_first[d + 1])

  explicit Layout(const ConvGeometry& geometry)
      : g(geometry),
        K(geometry.kernel_h * geometry.kernel_w),
        C(geometry.channels),
        cg(geometry.channels / geometry.groups),
        row(geometry.kernel_h * geometry.kernel_w * geometry.channels),
        plane(geometry.height * geometry.width),
        hw(geometry.out_h * geometry.out_w) {
    const int64_t cd = C / g.deformable_groups;
    group_first.assign(g.deformable_groups + 1, 0);
    for (int64_t c = 0; c < C;) {
      const int64_t end = std::min((c / cg + 1) * cg, (c / cd + 1) * cd);
      runs.push_back({c, end - c, c / cd, c / cg});
      group_first[c / cd + 1] = int64_t(runs.size());
      c = end;
    }
  }

  // where run r's channels of tap k start inside a column
  int64_t column_offset(const Run& r, int64_t k) const { return (r.cgrp * K + k) * cg + (r.c0 - r.cgrp * cg); }
};

// dst[c] = sum_n w[n] * src_n[c]
template <typename T>
inline void blend4(T* __restrict dst, const T* __restrict s0, const T* __restrict s1, const T* __restrict s2,
                   const T* __restrict s3, T w0, T w1, T w2, T w3, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = w0 * s0[c] + w1 * s1[c] + w2 * s2[c] + w3 * s3[c];
  }
}

template <typename T>
inline void axpy(T* __restrict dst, const T* __restrict src, T w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c] += w * src[c];
  }
}

// out[n] += sum_c g[c] * s_n[c], in fixed-width lanes (vectorised, same order on every run)
template <typename T>
inline void dot4(const T* __restrict g, const T* __restrict s0, const T* __restrict s1, const T* __restrict s2,
                 const T* __restrict s3, int64_t n, T out[4]) {
  constexpr int kLanes = 8;
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = g[c + l];
      a0[l] += v * s0[c + l];
      a1[l] += v * s1[c + l];
      a2[l] += v * s2[c + l];
      a3[l] += v * s3[c + l];
    }
  }
  for (; c < n; ++c) {
    a0[0] += g[c] * s0[c];
    a1[0] += g[c] * s1[c];
    a2[0] += g[c] * s2[c];
    a3[0] += g[c] * s3[c];
  }
  for (int l = 0; l < kLanes; ++l) {
    out[0] += a0[l];
    out[1] += a1[l];
    out[2] += a2[l];
    out[3] += a3[l];
  }
}

// The corners and mask values of one (deformable group, tap) at up to kLanes consecutive positions
// of one image, as structure-of-arrays: the loop that fills them runs the branch-free dcn_sample and
// vectorises.
template <typename T>
struct TapLanes {
  static constexpr int kLanes = 8;
  int idx[4][kLanes];
  T w[4][kLanes], wy[4][kLanes], wx[4][kLanes];
  T mask[kLanes];

  // tap_y/x: the tap's integer step; base_ys/xs: tap 0's integer coordinate at each position
  void fill(T tap_y, T tap_x, const T* __restrict base_ys, const T* __restrict base_xs, const T* __restrict dy,
            const T* __restrict dx, const T* __restrict m, int n, int H, int W) {
    for (int l = 0; l < n; ++l) {
      Corners<T> c;
      dcn_sample(base_ys[l] + tap_y + dy[l], base_xs[l] + tap_x + dx[l], H, W, c);
      for (int q = 0; q < 4; ++q) {
        idx[q][l] = c.idx[q];
        w[q][l] = c.w[q];
        wy[q][l] = c.wy[q];
        wx[q][l] = c.wx[q];
      }
      mask[l] = m[l];
    }
  }

  Corners<T> at(int l) const {
    Corners<T> c;
    for (int q = 0; q < 4; ++q) {
      c.idx[q] = idx[q][l];
      c.w[q] = w[q][l];
      c.wy[q] = wy[q][l];
      c.wx[q] = wx[q][l];
    }
    return c;
  }
};

// how far ahead (in positions) for_each_tap prefetches the offset and mask planes
constexpr int64_t kPrefetch = 64;

inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#endif
}

// Calls fn(j, b, pos, grp, k, corners, mask value) for every (column j, deformable group, tap) of the
// block; columns are split across threads, so fn may write anything owned by column j. The corners of
// kLanes positions are found first, then each column is visited tap by tap, group by group: in
// column order, so that im2col writes each column row front to back.
// The sample coordinate is conv_tap_y/x split as (tap 0's integer coordinate + the tap's integer step)
// + the offset: the integer sum is exact in T, so the float is the same.
template <typename T, typename Fn>
void for_each_tap(const T* offset, const T* mask, const Layout& L, const ColumnBlock& blk, const Fn& fn) {
  const ConvGeometry& g = L.g;
  constexpr int kLanes = TapLanes<T>::kLanes;
  const int64_t dg = g.deformable_groups;
  at::parallel_for(0, blk.nb * blk.np, 2 * kLanes, [&](int64_t begin, int64_t end) {
    std::vector<TapLanes<T>> lanes(dg * L.K);  // [group][tap]
    T base_ys[kLanes], base_xs[kLanes];
    for (int64_t j0 = begin; j0 < end;) {
      const int64_t b = blk.b0 + j0 / blk.np, pos0 = blk.p0 + j0 % blk.np;
      const int n = int(std::min<int64_t>({int64_t(kLanes), end - j0, blk.np - j0 % blk.np}));
      for (int l = 0; l < n; ++l) {
        base_ys[l] = conv_tap_y(g, (pos0 + l) / g.out_w, 0, T(0));
        base_xs[l] = conv_tap_x(g, (pos0 + l) % g.out_w, 0, T(0));
      }
      for (int64_t grp = 0; grp < dg; ++grp) {
        const int64_t base = (b * dg + grp) * L.K;  // tap 0 of (b, grp)
        for (int64_t i = 0, k = 0; i < g.kernel_h; ++i) {
          for (int64_t jj = 0; jj < g.kernel_w; ++jj, ++k) {
            const T* dy = offset + 2 * (base + k) * L.hw + pos0;  // planes dy, dx of tap k
            const T* m = mask + (base + k) * L.hw + pos0;
            // dg * K * 3 planes are read side by side, more streams than the hardware prefetcher follows
            const int64_t ahead = std::min<int64_t>(kPrefetch, L.hw - 1 - pos0);
            prefetch(dy + ahead);
            prefetch(dy + L.hw + ahead);
            prefetch(m + ahead);
            lanes[grp * L.K + k].fill(T(i * g.dil_h), T(jj * g.dil_w), base_ys, base_xs, dy, dy + L.hw, m, n,
                                      int(g.height), int(g.width));
          }
        }
      }
      for (int l = 0; l < n; ++l) {
        for (int64_t k = 0; k < L.K; ++k) {
          for (int64_t grp = 0; grp < dg; ++grp) {
            const TapLanes<T>& t = lanes[grp * L.K + k];
            fn(j0 + l, b, pos0 + l, grp, k, t.at(l), t.mask[l]);
          }
        }
      }
      j0 += n;
    }
  });
}

// columns (cols, row) <- mask * bilinear(x) for the block; x is (N, H, W, C)
template <typename T>
void im2col(const T* x, const T* offset, const T* mask, const Layout& L, const ColumnBlock& blk, T* columns) {
  for_each_tap(
      offset, mask, L, blk, [&](int64_t j, int64_t b, int64_t, int64_t grp, int64_t k, const Corners<T>& c, T m) {
        const T* img = x + b * L.plane * L.C;
        for (int64_t r = L.group_first[grp]; r < L.group_first[grp + 1]; ++r) {
          const Run& run = L.runs[r];
          const T* src = img + run.c0;
          blend4(columns + j * L.row + L.column_offset(run, k), src + c.idx[0] * L.C, src + c.idx[1] * L.C,
                 src + c.idx[2] * L.C, src + c.idx[3] * L.C, c.w[0] * m, c.w[1] * m, c.w[2] * m, c.w[3] * m, run.len);
        }
      });
}

template <typename T>
struct Tap {
  int idx[4];
  T w[4];  // bilinear weight times mask
};

// grad_x (N, H, W, C) += d columns / d x applied to grad_columns (cols, row)
template <typename T>
void col2im(const T* grad_columns, const T* offset, const T* mask, const Layout& L, const ColumnBlock& blk, T* grad_x) {
  const int64_t cols = blk.nb * blk.np, dg = L.g.deformable_groups;
  // [column][group][tap], every entry written by for_each_tap below
  const int64_t bytes = cols * dg * L.K * int64_t(sizeof(Tap<T>));
  Tap<T>* taps = reinterpret_cast<Tap<T>*>(cpu_scratch(CpuScratch::kTaps, bytes, at::kByte).data_ptr());
  for_each_tap(offset, mask, L, blk,
               [&](int64_t j, int64_t, int64_t, int64_t grp, int64_t k, const Corners<T>& c, T m) {
                 Tap<T>& t = taps[(j * dg + grp) * L.K + k];
                 for (int n = 0; n < 4; ++n) {
                   t.idx[n] = c.idx[n];
                   t.w[n] = c.w[n] * m;
                 }
               });
  // Slices of the channel runs, at least two per thread where the channels allow; multiples of 16
  // channels keep the loops vectorised.
  struct Slice {
    const Run* run;
    int64_t c0, len;
  };
  std::vector<Slice> slices;
  const int64_t want = std::max<int64_t>(1, 2 * at::get_num_threads() / int64_t(L.runs.size()));
  for (const Run& run : L.runs) {
    const int64_t step = std::max<int64_t>(16, (run.len / want + 15) / 16 * 16);
    for (int64_t c = run.c0; c < run.c0 + run.len; c += step) {
      slices.push_back({&run, c, std::min(step, run.c0 + run.len - c)});
    }
  }
  at::parallel_for(0, int64_t(slices.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const Slice& sl = slices[s];
      const Run& run = *sl.run;
      for (int64_t j = 0; j < cols; ++j) {
        T* img = grad_x + (blk.b0 + j / blk.np) * L.plane * L.C + sl.c0;
        const Tap<T>* tap = taps + (j * dg + run.dgrp) * L.K;
        const T* src_row = grad_columns + j * L.row + (sl.c0 - run.c0);
        for (int64_t k = 0; k < L.K; ++k) {
          const T* src = src_row + L.column_offset(run, k);
          for (int n = 0; n < 4; ++n) {
            axpy(img + tap[k].idx[n] * L.C, src, tap[k].w[n], sl.len);
          }
        }
      }
    }
  });
}

// grad_offset, grad_mask at the block's positions, from grad_columns (cols, row) and x (N, H, W, C)
template <typename T>
void col2im_coord(const T* grad_columns, const T* x, const T* offset, const T* mask, const Layout& L,
                  const ColumnBlock& blk, T* grad_offset, T* grad_mask) {
  for_each_tap(offset, mask, L, blk,
               [&](int64_t j, int64_t b, int64_t pos, int64_t grp, int64_t k, const Corners<T>& c, T m) {
                 const T* img = x + b * L.plane * L.C;
                 T d[4] = {T(0), T(0), T(0), T(0)};  // d[n] = sum_c grad_column[c] * x(corner n)[c]
                 for (int64_t r = L.group_first[grp]; r < L.group_first[grp + 1]; ++r) {
                   const Run& run = L.runs[r];
                   const T* src = img + run.c0;
                   dot4(grad_columns + j * L.row + L.column_offset(run, k), src + c.idx[0] * L.C, src + c.idx[1] * L.C,
                        src + c.idx[2] * L.C, src + c.idx[3] * L.C, run.len, d);
                 }
                 T gm = T(0), gy = T(0), gx = T(0);
                 for (int n = 0; n < 4; ++n) {
                   gm += c.w[n] * d[n];
                   gy += c.wy[n] * d[n];
                   gx += c.wx[n] * d[n];
                 }
                 const int64_t base = (b * L.g.deformable_groups + grp) * L.K + k;
                 grad_offset[2 * base * L.hw + pos] = gy * m;
                 grad_offset[(2 * base + 1) * L.hw + pos] = gx * m;
                 grad_mask[base * L.hw + pos] = gm;
               });
}

// weight (C_out, C/groups, kh, kw) as (groups, C_out/groups, kh*kw*C/groups) rows in column order
at::Tensor weight_rows(const at::Tensor& weight, const Layout& L) {
  const ConvGeometry& g = L.g;
  return weight.reshape({g.groups, g.out_channels / g.groups, L.cg, L.K})
      .permute({0, 1, 3, 2})
      .contiguous()
      .view({g.groups, g.out_channels / g.groups, L.K * L.cg});
}

// The block's (C_out/groups, columns) slice of a (N, C_out, Ho, Wo) tensor for conv group grp: a view
// when the block lies in one image, a copy otherwise.
at::Tensor block_of(const at::Tensor& t, const Layout& L, const ColumnBlock& blk, int64_t grp) {
  const ConvGeometry& g = L.g;
  const int64_t og = g.out_channels / g.groups;
  if (blk.nb == 1) {
    return t[blk.b0].view({g.groups, og, L.hw})[grp].narrow(1, blk.p0, blk.np);
  }
  return t.narrow(0, blk.b0, blk.nb)
      .view({blk.nb, g.groups, og, L.hw})
      .select(1, grp)
      .permute({1, 0, 2})
      .reshape({og, blk.nb * L.hw});
}

// output (N, C_out, Ho, Wo), conv group grp, at the block's columns <- res (columns, C_out/groups): a
// transpose in 16 x 16 tiles (a strided ATen copy of the same took about half as long as im2col).
template <typename T>
void store_block_result(const T* res, const Layout& L, const ColumnBlock& blk, int64_t grp, T* output) {
  constexpr int64_t kTile = 16;
  const int64_t og = L.g.out_channels / L.g.groups;
  const int64_t tiles_per_image = (blk.np + kTile - 1) / kTile;
  at::parallel_for(0, blk.nb * tiles_per_image, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / tiles_per_image, j0 = (t % tiles_per_image) * kTile;
      const int64_t nj = std::min(kTile, blk.np - j0);
      const T* src = res + (bi * blk.np + j0) * og;
      T* dst = output + ((blk.b0 + bi) * L.g.out_channels + grp * og) * L.hw + blk.p0 + j0;
      for (int64_t c0 = 0; c0 < og; c0 += kTile) {
        const int64_t c1 = std::min(og, c0 + kTile);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t j = 0; j < nj; ++j) {
            dst[c * L.hw + j] = src[j * og + c];
          }
        }
      }
    }
  });
}

template <typename T>
void forward_impl(const Layout& L, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                  const at::Tensor& weight, at::Tensor& output) {
  const ConvGeometry& g = L.g;
  const at::Tensor x = input.permute({0, 2, 3, 1}).contiguous();  // (N, H, W, C)
  const at::Tensor rows = weight_rows(weight, L);
  const int64_t kcg = L.K * L.cg, og = g.out_channels / g.groups;
  const auto blocks = mdconv_column_blocks(g, /*cuda=*/false);
  const int64_t max_cols = mdconv_max_block_columns(blocks);
  at::Tensor buffer = cpu_scratch(CpuScratch::kColumns, max_cols * L.row, input.options());
  at::Tensor result = cpu_scratch(CpuScratch::kResult, max_cols * og, input.options());
  for (const ColumnBlock& blk : blocks) {
    const int64_t cols = blk.nb * blk.np;
    at::Tensor columns = buffer.narrow(0, 0, cols * L.row).view({cols, L.row});
    im2col(x.data_ptr<T>(), offset.data_ptr<T>(), mask.data_ptr<T>(), L, blk, columns.data_ptr<T>());
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      // (columns, C_out/groups): MKL splits the long column dimension across threads, which scales
      // better than the transposed product with its short C_out side; a transpose follows.
      at::Tensor res = result.narrow(0, 0, cols * og).view({cols, og});
      at::mm_out(res, columns.narrow(1, grp * kcg, kcg), rows[grp].t());
      store_block_result(res.data_ptr<T>(), L, blk, grp, output.data_ptr<T>());
    }
  }
}

template <typename T>
void backward_impl(const Layout& L, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                   const at::Tensor& mask, const at::Tensor& weight, at::Tensor& grad_x, at::Tensor& grad_offset,
                   at::Tensor& grad_mask, at::Tensor& grad_rows_t) {
  const ConvGeometry& g = L.g;
  const at::Tensor x = input.permute({0, 2, 3, 1}).contiguous();  // (N, H, W, C)
  const at::Tensor rows = weight_rows(weight, L);
  const int64_t kcg = L.K * L.cg;
  const auto blocks = mdconv_column_blocks(g, /*cuda=*/false);
  const int64_t max_numel = mdconv_max_block_columns(blocks) * L.row;
  at::Tensor col_buffer = cpu_scratch(CpuScratch::kColumns, max_numel, input.options());
  at::Tensor grad_col_buffer = cpu_scratch(CpuScratch::kGradColumns, max_numel, input.options());
  const T *xp = x.data_ptr<T>(), *op = offset.data_ptr<T>(), *mp = mask.data_ptr<T>();
  for (const ColumnBlock& blk : blocks) {
    const int64_t cols = blk.nb * blk.np;
    std::vector<at::Tensor> grad_out(g.groups);
    at::Tensor grad_columns = grad_col_buffer.narrow(0, 0, cols * L.row).view({cols, L.row});
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      grad_out[grp] = block_of(grad_output, L, blk, grp);  // (C_out/groups, cols)
      at::Tensor part = grad_columns.narrow(1, grp * kcg, kcg);
      at::mm_out(part, grad_out[grp].t(), rows[grp]);
    }
    const T* gcol = grad_columns.data_ptr<T>();
    col2im(gcol, op, mp, L, blk, grad_x.data_ptr<T>());
    col2im_coord(gcol, xp, op, mp, L, blk, grad_offset.data_ptr<T>(), grad_mask.data_ptr<T>());

    at::Tensor columns = col_buffer.narrow(0, 0, cols * L.row).view({cols, L.row});
    im2col(xp, op, mp, L, blk, columns.data_ptr<T>());
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      // accumulated transposed, (kh*kw*C/groups, C_out/groups): the long side first scales better
      grad_rows_t[grp].addmm_(columns.narrow(1, grp * kcg, kcg).t(), grad_out[grp].t());
    }
  }
}

}  // namespace

void mdconv_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                    const at::Tensor& weight, at::Tensor& output) {
  const Layout L(g);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_mdconv_forward_cpu",
                             [&] { forward_impl<scalar_t>(L, input, offset, mask, weight, output); });
}

void mdconv_backward(const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight, at::Tensor& grad_x,
                     at::Tensor& grad_offset, at::Tensor& grad_mask, at::Tensor& grad_rows_t) {
  const Layout L(g);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv2_mdconv_backward_cpu", [&] {
    backward_impl<scalar_t>(L, grad_output, input, offset, mask, weight, grad_x, grad_offset, grad_mask, grad_rows_t);
  });
}

}  // namespace DCNV2_CPU_ISA
}  // namespace dcnv2
