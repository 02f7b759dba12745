"""Modulated deformable convolution (DCNv2, Zhu et al. 2018): the functional operator.

Shape shorthand: N batch, C input channels, H x W input size, Ho x Wo output size, kh x kw kernel,
dg deformable groups, K = kh * kw kernel taps.

Offset layout (the same as ``torchvision.ops.deform_conv2d`` and MMCV): ``offset`` has 2 * dg * K
channels, ordered per deformable group, then per kernel tap (row-major, tap = i * kw + j), then
(dy, dx): channel ``g * 2K + 2 * tap + 0`` is the vertical shift and ``+ 1`` the horizontal shift.
``mask`` has dg * K channels, ordered per group then per tap. Tap (i, j) of output (ho, wo) samples
the input at ``(ho * stride - pad + i * dilation + dy, wo * stride - pad + j * dilation + dx)``
bilinearly; samples outside (-1, H) x (-1, W) are zero and pixels outside the map count as zero.
"""

from typing import Optional, Tuple, Union

import torch
from torch.nn.modules.utils import _pair

from . import _extension

__all__ = ["modulated_deform_conv2d"]

_IntPair = Union[int, Tuple[int, int]]


def _check_device(input: torch.Tensor, op: str) -> None:
    if input.is_cuda and not _extension.WITH_CUDA:
        raise RuntimeError(
            f"{op}: input is on {input.device} but projects_dcnv2 was built without CUDA kernels; "
            "reinstall with nvcc available (DCNV2_WITH_CUDA=1)"
        )


def _ones_mask(offset: torch.Tensor) -> torch.Tensor:
    """The all-ones mask of DCNv1 for ``offset`` (N, 2 * dg * K, Ho, Wo)."""
    if offset.dim() != 4:
        raise ValueError(f"offset: expected a 4-D tensor, got shape {tuple(offset.shape)}")
    n, c, h, w = offset.shape
    return offset.new_ones((n, c // 2, h, w))


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    groups: int = 1,
    deformable_groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable 2-D convolution.

    Args:
        input: (N, C, H, W).
        offset: (N, 2 * dg * kh * kw, Ho, Wo), layout in the module docstring.
        mask: (N, dg * kh * kw, Ho, Wo) modulation scalars (DCNv2 uses sigmoid outputs), or None
            for all ones (DCNv1).
        weight: (C_out, C / groups, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (h, w) pair.
        groups: convolution groups.
        deformable_groups: dg, groups of input channels that share one offset and mask field.

    Returns:
        (N, C_out, Ho, Wo).
    """
    if input.is_cuda:
        _check_device(input, "modulated_deform_conv2d")
    stride_h, stride_w = (stride, stride) if type(stride) is int else _pair(stride)
    pad_h, pad_w = (padding, padding) if type(padding) is int else _pair(padding)
    dil_h, dil_w = (dilation, dilation) if type(dilation) is int else _pair(dilation)
    if mask is None:
        mask = _ones_mask(offset)
    return torch.ops.dcnv2.modulated_deform_conv2d(
        input,
        offset,
        mask,
        weight,
        bias,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        groups,
        deformable_groups,
    )
