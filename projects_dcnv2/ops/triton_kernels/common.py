"""Per-sample math of the fused kernels, written once as ``@triton.jit`` device functions and shared
by the forward (``mdconv_forward.py``) and the backward (``mdconv_backward.py``).

It is ``csrc/ops/deform_math.h``'s rule, element for element:

* ``tap_position``: where kernel tap (i, j) of output pixel (ho, wo) samples the input (DCNv2 paper
  eq. 3): y = ho * stride_h - pad_h + i * dil_h + dy, in float32 (``conv_tap_y`` / ``conv_tap_x``).
* ``dcn_cell`` + ``dcn_corner``: ``dcn_sample``. A sample is zero unless -1 < y < H and -1 < x < W;
  a corner outside the map weighs 0 (the value fades to zero within one pixel of the border); a NaN
  coordinate gives NaN weights, so that a NaN offset gives a NaN result instead of a silent zero.

All functions work elementwise on tensors of any (broadcastable) shape.
"""

import triton
import triton.language as tl


@triton.jit
def tap_position(ho, wo, i, j, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """Float32 input coordinates (y, x) sampled by tap (i, j) of output pixel (ho, wo), shifted by
    the offset (dy, dx); the integer part is computed exactly before the offset is added."""
    y = (ho * stride_h - pad_h + i * dil_h).to(tl.float32) + dy.to(tl.float32)
    x = (wo * stride_w - pad_w + j * dil_w).to(tl.float32) + dx.to(tl.float32)
    return y, x


@triton.jit
def dcn_cell(y, x, H, W):
    """The cell of a DCN sample at float32 coordinates (y, x): its top-left corner (y0, x0) as int32,
    the fractional parts (ly, lx), whether -1 < y < H and -1 < x < W (false for NaN), and whether a
    coordinate is NaN. Outside samples get the cell of (0, 0), so the integer conversion is defined
    for any coordinate (1e30, inf)."""
    inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
    yc = tl.where(inside, y, 0.0)
    xc = tl.where(inside, x, 0.0)
    y0f = tl.floor(yc)
    x0f = tl.floor(xc)
    nan = (y != y) | (x != x)
    return y0f.to(tl.int32), x0f.to(tl.int32), yc - y0f, xc - x0f, inside, nan


@triton.jit
def dcn_corner(y0, x0, ly, lx, inside, nan, H, W, DY: tl.constexpr, DX: tl.constexpr):
    """Corner (y0 + DY, x0 + DX) of a cell from ``dcn_cell``: its row and column (0 where it reads
    nothing, so a masked load's address stays in bounds), whether it lies in the map, and its weights
    for the value, for d value / dy and for d value / dx. A corner outside the map weighs 0; a NaN
    coordinate gives NaN weights (deform_math.h's set_cell and its NaN poison)."""
    yn = y0 + DY
    xn = x0 + DX
    valid = inside & (yn >= 0) & (yn < H) & (xn >= 0) & (xn < W)
    if DY:
        fy = ly
        sy = 1.0
    else:
        fy = 1.0 - ly
        sy = -1.0
    if DX:
        fx = lx
        sx = 1.0
    else:
        fx = 1.0 - lx
        sx = -1.0
    poison = float("nan")
    w = tl.where(nan, poison, tl.where(valid, fy * fx, 0.0))
    wy = tl.where(nan, poison, tl.where(valid, sy * fx, 0.0))
    wx = tl.where(nan, poison, tl.where(valid, fy * sx, 0.0))
    return tl.where(valid, yn, 0), tl.where(valid, xn, 0), valid, w, wy, wx
