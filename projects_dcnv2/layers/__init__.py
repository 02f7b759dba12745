"""Functional DCNv2 operators and their modules (no config code here)."""

from .._ops import CUDA_VERSION, WITH_CUDA
from .deform_conv import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    modulated_deform_conv2d,
    upgrade_legacy_offset_keys,
)
from .deform_roi_pool import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
)

__all__ = [
    "CUDA_VERSION",
    "WITH_CUDA",
    "modulated_deform_conv2d",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "upgrade_legacy_offset_keys",
    "deform_roi_pool",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
]
