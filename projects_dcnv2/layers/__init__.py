"""The DCNv2 modules, with the functional operators and WITH_CUDA / CUDA_VERSION of
``projects_dcnv2.ops`` re-exported (no config code here)."""

from ..ops import CUDA_VERSION, WITH_CUDA
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
