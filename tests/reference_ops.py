"""Slow, obviously-correct pure-PyTorch references for the two DCNv2 operators.

They are written from docs/semantics.md ("Border rules", "Deformable RoI pooling"), not from any kernel, and are
differentiable through autograd so that they also give reference gradients.

Shape shorthand: N batch, C channels, H x W input size, Ho x Wo output size, K = kh * kw kernel taps,
dg deformable groups, R RoIs, P = (Ph, Pw) pooled size.
"""

import math
from typing import Optional, Tuple, Union

import torch

IntPair = Union[int, Tuple[int, int]]

__all__ = ["mdconv2d_ref", "deform_roi_pool_ref", "conv_out_size", "pair", "assert_same"]


def pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# ------------------------------------------------------------------------------------------------
# Modulated deformable convolution
# ------------------------------------------------------------------------------------------------
def _dcn_bilinear(feat: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """DCN "zero fade" bilinear sampling (docs/semantics.md, "Border rules": the convolution rule).

    Args:
        feat: (B, c, H, W) feature map, one deformable group of one image per row of B.
        y, x: (B, M) sampling coordinates in pixels.
    Returns:
        (B, c, M): 0 unless -1 < y < H and -1 < x < W (strict); corners outside the map count as 0.
    """
    B, c, H, W = feat.shape
    flat = feat.reshape(B, c, H * W)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly = y - y0
    lx = x - x0
    y0i = y0.long()
    x0i = x0.long()
    out = feat.new_zeros((B, c, y.shape[1]))
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yi = y0i + dy
            xi = x0i + dx
            valid = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            idx = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).unsqueeze(1).expand(B, c, -1)
            val = torch.gather(flat, 2, idx)
            w = (wy * wx * valid.to(wy.dtype)).unsqueeze(1)
            out = out + w * val
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    return out * inside.to(out.dtype).unsqueeze(1)


def mdconv2d_ref(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deformable_groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution by explicit sampling (docs/semantics.md, "mdconv").

    Args:
        input: (N, C, H, W).
        offset: (N, 2*dg*K, Ho, Wo), per group, per tap (row-major), (dy, dx).
        mask: (N, dg*K, Ho, Wo) or None (all ones).
        weight: (Cout, C/groups, kh, kw); bias: (Cout,) or None.
    Returns:
        (N, Cout, Ho, Wo)
    """
    N, C, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    dg = deformable_groups
    K = kh * kw
    Ho = conv_out_size(H, kh, sh, ph, dh)
    Wo = conv_out_size(W, kw, sw, pw, dw)
    L = Ho * Wo
    dtype = input.dtype
    if mask is None:
        mask = input.new_ones((N, dg * K, Ho, Wo))

    off = offset.reshape(N, dg, K, 2, L)
    msk = mask.reshape(N, dg, K, L)
    base_y = (torch.arange(Ho, dtype=dtype) * sh - ph).view(Ho, 1).expand(Ho, Wo).reshape(L)
    base_x = (torch.arange(Wo, dtype=dtype) * sw - pw).view(1, Wo).expand(Ho, Wo).reshape(L)
    tap_y = (torch.arange(kh, dtype=dtype) * dh).view(kh, 1).expand(kh, kw).reshape(K)
    tap_x = (torch.arange(kw, dtype=dtype) * dw).view(1, kw).expand(kh, kw).reshape(K)
    y = base_y.view(1, 1, 1, L) + tap_y.view(1, 1, K, 1) + off[:, :, :, 0]  # (N, dg, K, L)
    x = base_x.view(1, 1, 1, L) + tap_x.view(1, 1, K, 1) + off[:, :, :, 1]

    feat = input.reshape(N * dg, C // dg, H, W)
    cols = _dcn_bilinear(feat, y.reshape(N * dg, K * L), x.reshape(N * dg, K * L))
    cols = cols.view(N, dg, C // dg, K, L) * msk.unsqueeze(2)
    cols = cols.reshape(N, groups, C // groups, K, L)
    wg = weight.reshape(groups, Cout // groups, Cg, K)
    out = torch.einsum("gock,ngckl->ngol", wg, cols).reshape(N, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, Cout, 1, 1)
    return out


# ------------------------------------------------------------------------------------------------
# Deformable RoI pooling (MMCV RoIAlign-style)
# ------------------------------------------------------------------------------------------------
def _roialign_bilinear(
    feat: torch.Tensor, y: torch.Tensor, x: torch.Tensor, offset_grad: str
) -> torch.Tensor:
    """RoIAlign-style bilinear sampling (docs/semantics.md, "Border rules") of feat (C, H, W) at M points y, x (M,).

    offset_grad selects the gradient w.r.t. y and x:
      "exact": the derivative of this (piecewise) function, as autograd sees it (what gradcheck checks);
      "mmcv":  MMCV's deform_roi_pool backward, which evaluates the corner differences at the
               *unclamped* coordinates (docs/semantics.md, "Where we differ"); identical to "exact" away from the border.
    The gradient w.r.t. feat is the same in both modes.
    Returns (C, M).
    """
    C, H, W = feat.shape
    flat = feat.reshape(C, H * W)
    valid = ~((y < -1) | (y > H) | (x < -1) | (x > W))
    yc = torch.where(y <= 0, torch.zeros_like(y), y)
    xc = torch.where(x <= 0, torch.zeros_like(x), x)
    y0 = torch.floor(yc).clamp(max=H - 1)
    x0 = torch.floor(xc).clamp(max=W - 1)
    yc = torch.where(y0 >= H - 1, torch.full_like(yc, H - 1), yc)
    xc = torch.where(x0 >= W - 1, torch.full_like(xc, W - 1), xc)
    y1 = (y0 + 1).clamp(max=H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    if offset_grad == "mmcv":
        yc, xc = yc.detach(), xc.detach()
    ly = yc - y0
    lx = xc - x0
    hy = 1 - ly
    hx = 1 - lx

    def g(yy, xx):
        idx = (yy.long() * W + xx.long()).unsqueeze(0).expand(C, -1)
        return torch.gather(flat, 1, idx)

    v00, v01, v10, v11 = g(y0, x0), g(y0, x1), g(y1, x0), g(y1, x1)  # v<row><col>
    val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
    if offset_grad == "mmcv":
        # d/dx = (v11 - v10)(y - y0) + (v01 - v00)(y1 - y), d/dy likewise, with the unclamped y, x.
        yd, xd = y.detach(), x.detach()
        gx = (v11 - v10) * (yd - y0) + (v01 - v00) * (y1 - yd)
        gy = (v11 - v01) * (xd - x0) + (v10 - v00) * (x1 - xd)
        sur = gx.detach() * x + gy.detach() * y
        val = val + (sur - sur.detach())
    elif offset_grad != "exact":
        raise ValueError(f"offset_grad: expected 'exact' or 'mmcv', got {offset_grad!r}")
    return val * valid.to(val.dtype)


def deform_roi_pool_ref(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor],
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    offset_grad: str = "exact",
) -> torch.Tensor:
    """MMCV RoIAlign-style deformable RoI pooling by explicit per-bin sampling (docs/semantics.md, "mdpool").

    Args:
        input: (N, C, H, W).
        rois: (R, 5) [batch_index, x1, y1, x2, y2] in input-image pixels (no gradient).
        offset: (R, 2, Ph, Pw) with channel 0 = dx (width), channel 1 = dy (height); or None.
        offset_grad: see `_roialign_bilinear`.
    Returns:
        (R, C, Ph, Pw)
    """
    N, C, H, W = input.shape
    Ph, Pw = pair(output_size)
    R = rois.shape[0]
    outs = []
    for r in range(R):
        b = int(rois[r, 0])
        # coordinates in the input dtype, as a kernel templated on the scalar type computes them
        roi = rois[r, 1:].detach().to(input.dtype)
        sx = roi[0] * spatial_scale - 0.5
        sy = roi[1] * spatial_scale - 0.5
        rw = roi[2] * spatial_scale - 0.5 - sx
        rh = roi[3] * spatial_scale - 0.5 - sy
        bw = rw / Pw
        bh = rh / Ph
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rh / Ph)))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rw / Pw)))
        if gh <= 0 or gw <= 0:
            outs.append(input.new_zeros((C, Ph, Pw)) + 0 * input[b].sum())
            continue
        dtype = input.dtype
        iy = torch.arange(Ph, dtype=dtype).view(Ph, 1, 1, 1)
        ix = torch.arange(Pw, dtype=dtype).view(1, Pw, 1, 1)
        sub_y = (torch.arange(gh, dtype=dtype) + 0.5).view(1, 1, gh, 1)
        sub_x = (torch.arange(gw, dtype=dtype) + 0.5).view(1, 1, 1, gw)
        start_y = sy + iy * bh
        start_x = sx + ix * bw
        if offset is not None:
            start_x = start_x + gamma * rw * offset[r, 0].view(Ph, Pw, 1, 1)
            start_y = start_y + gamma * rh * offset[r, 1].view(Ph, Pw, 1, 1)
        y = (start_y + sub_y * bh / gh).expand(Ph, Pw, gh, gw).reshape(-1)
        x = (start_x + sub_x * bw / gw).expand(Ph, Pw, gh, gw).reshape(-1)
        vals = _roialign_bilinear(input[b], y, x, offset_grad)  # (C, Ph*Pw*gh*gw)
        outs.append(vals.view(C, Ph, Pw, gh * gw).sum(-1) / (gh * gw))
    if R == 0:
        return input.new_zeros((0, C, Ph, Pw))
    return torch.stack(outs, 0)


# ------------------------------------------------------------------------------------------------
# Comparison helper shared by the op tests
# ------------------------------------------------------------------------------------------------
def assert_same(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str
) -> None:
    """Same shape and dtype, and close; the failure message names `what` and the max abs error."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max abs err {err:.3g}\n{m}"
    )
