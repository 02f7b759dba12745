"""Deformable RoI pooling as used by DCNv2's mdpool in MMDetection (MMCV ``DeformRoIPool`` semantics).

Shapes, the sampling rule and the offset layout ((dx, dy), the opposite of the convolution's):
``projects_dcnv2.ops.deform_roi_pool``'s docstring.
"""

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops.deform_roi_pool import deform_roi_pool
from .deform_conv import _check_int, _check_pair

__all__ = ["deform_roi_pool", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"]

_IntPair = Union[int, Tuple[int, int]]


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with externally given offsets (no parameters)."""

    def __init__(
        self,
        output_size: _IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ):
        super().__init__()
        self.output_size = _check_pair("output_size", output_size, 1)
        _check_int("sampling_ratio", sampling_ratio, 0)
        for name, value in (("spatial_scale", spatial_scale), ("gamma", gamma)):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if spatial_scale <= 0:
            raise ValueError(f"spatial_scale: expected a positive number, got {spatial_scale}")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(
        self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return deform_roi_pool(
            input,
            rois,
            offset,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


def _mlp(sizes, final=None) -> nn.Sequential:
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if final is not None:
        layers.append(final)
    last = layers[-2] if final is not None else layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its bin offsets from a first, plain pooling pass.

    ``offset_fc``: Linear(P_h*P_w*C -> fc), ReLU, Linear(fc -> fc), ReLU, Linear(fc -> 2*P_h*P_w), the
    last layer zero-initialised (MMCV's layer indices 0, 2, 4, so checkpoints map one to one).
    """

    def __init__(
        self,
        output_size: _IntPair = 7,
        output_channels: int = 256,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        _check_int("output_channels", output_channels, 1)
        _check_int("deform_fc_channels", deform_fc_channels, 1)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _mlp(
            [bins * output_channels, deform_fc_channels, deform_fc_channels, 2 * bins]
        )

    def _check_channels(self, input: torch.Tensor) -> None:
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(
                f"input: expected (N, {self.output_channels}, H, W) to match output_channels, "
                f"got shape {tuple(input.shape)}"
            )

    def _predict_offset(self, features: torch.Tensor) -> torch.Tensor:
        """(K, P_h*P_w*C) flattened first-pass features -> (K, 2, P_h, P_w) offsets."""
        return self.offset_fc(features).view(-1, 2, *self.output_size)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = super().forward(input, rois)
        return super().forward(input, rois, self._predict_offset(pooled.flatten(1)))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """DCNv2's mdpool: offsets and a per-bin modulation mask predicted from a plain pooling pass.

    Adds ``mask_fc``: Linear(P_h*P_w*C -> fc), ReLU, Linear(fc -> P_h*P_w), Sigmoid, index 2
    zero-initialised (mask 0.5 at init). Forward: pool without offset, predict offset and mask,
    pool again with the offset, multiply by the mask (broadcast over channels).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _mlp(
            [bins * self.output_channels, self.deform_fc_channels, bins], final=nn.Sigmoid()
        )

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = DeformRoIPool.forward(self, input, rois)
        features = pooled.flatten(1)
        offset = self._predict_offset(features)
        mask = self.mask_fc(features).view(-1, 1, *self.output_size)
        return DeformRoIPool.forward(self, input, rois, offset) * mask
