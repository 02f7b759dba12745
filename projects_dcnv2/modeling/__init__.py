"""Detectron2 modules built on the DCNv2 ops. Importing this package registers
``build_dcnv2_resnet_backbone`` / ``build_dcnv2_resnet_fpn_backbone`` in ``BACKBONE_REGISTRY``,
``MDPoolROIHeads`` and ``MimicROIHeads`` in ``ROI_HEADS_REGISTRY`` and ``MimicRCNN`` (R-CNN feature
mimicking) in ``META_ARCH_REGISTRY``."""

from .backbone import (
    ModulatedDeformBasicBlock,
    ModulatedDeformBottleneckBlock,
    build_dcnv2_resnet_backbone,
    build_dcnv2_resnet_fpn_backbone,
)
from .mimic import MimicRCNN, RCNNMimicBranch
from .poolers import MDPoolROIPooler
from .roi_heads import MDPoolROIHeads, MimicROIHeads

__all__ = [
    "ModulatedDeformBasicBlock",
    "ModulatedDeformBottleneckBlock",
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
    "MDPoolROIPooler",
    "MDPoolROIHeads",
    "MimicRCNN",
    "MimicROIHeads",
    "RCNNMimicBranch",
]
