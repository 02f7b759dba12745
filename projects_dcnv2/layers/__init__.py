"""Functional DCNv2 operators and their modules (no config code here)."""
from .deform_conv import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    modulated_deform_conv2d,
    upgrade_legacy_offset_keys,
)
from .deform_roi_pool import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool

__all__ = [k for k in globals().keys() if not k.startswith("_")]
