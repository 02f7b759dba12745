"""Deformable RoI pooling as used by DCNv2's mdpool in MMDetection (MMCV ``DeformRoIPool`` semantics).

Shape shorthand: N images, C channels, H x W feature map, K RoIs, P_h x P_w output bins.

Each bin is sampled like aligned RoIAlign (Detectron2's ROIAlignV2): RoI corners are scaled by
``spatial_scale`` and shifted by -0.5, each bin averages a grid of bilinear samples (``sampling_ratio``
per side, or ceil(bin size) when it is 0), with RoIAlign's border rule. With an offset, the whole bin
is translated by ``gamma * offset * RoI size``. Offset layout: (K, 2, P_h, P_w) with channel 0 the
horizontal shift (dx, in units of the RoI width) and channel 1 the vertical shift (dy, RoI height):
note this is (x, y), the opposite of the convolution's (dy, dx).
"""

from typing import Optional, Tuple, Union

import torch
from torch.nn.modules.utils import _pair

from .deform_conv import _check_device

__all__ = ["deform_roi_pool"]

_IntPair = Union[int, Tuple[int, int]]


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor],
    output_size: _IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling.

    Args:
        input: (N, C, H, W) feature map.
        rois: (K, 5) rows of [batch_index, x1, y1, x2, y2] in input-image pixels.
        offset: (K, 2, P_h, P_w) normalised bin shifts (dx, dy), or None for plain aligned RoIAlign.
        output_size: P or (P_h, P_w).
        spatial_scale: feature-map size / image size (1 / stride).
        sampling_ratio: samples per bin side; 0 chooses ceil(bin size) adaptively.
        gamma: offset scale (MMCV's default 0.1).

    Returns:
        (K, C, P_h, P_w).
    """
    _check_device(input, "deform_roi_pool")
    pooled_h, pooled_w = _pair(output_size)
    return torch.ops.dcnv2.deform_roi_pool(
        input,
        rois,
        offset,
        pooled_h,
        pooled_w,
        float(spatial_scale),
        int(sampling_ratio),
        float(gamma),
    )
