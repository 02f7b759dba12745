"""Detectron2 modules built on the DCNv2 ops. Importing this package registers
``build_dcnv2_resnet_backbone`` / ``build_dcnv2_resnet_fpn_backbone`` in ``BACKBONE_REGISTRY``
and ``MDPoolROIHeads`` in ``ROI_HEADS_REGISTRY``."""

from .backbone import (
    ModulatedDeformBasicBlock,
    ModulatedDeformBottleneckBlock,
    build_dcnv2_resnet_backbone,
    build_dcnv2_resnet_fpn_backbone,
)
from .poolers import MDPoolROIPooler
from .roi_heads import MDPoolROIHeads

__all__ = [
    "ModulatedDeformBasicBlock",
    "ModulatedDeformBottleneckBlock",
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
    "MDPoolROIPooler",
    "MDPoolROIHeads",
]
