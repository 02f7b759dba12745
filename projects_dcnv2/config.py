"""Config keys that Detectron2 does not already have.

Modulated deformable convolution reuses Detectron2's own keys:
``MODEL.RESNETS.DEFORM_ON_PER_STAGE``, ``MODEL.RESNETS.DEFORM_MODULATED`` (must be True: this
project implements DCNv2 only) and ``MODEL.RESNETS.DEFORM_NUM_GROUPS``.

The deformable RoI pooler (``MDPoolROIHeads``) reuses ``MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION``
(7) and ``MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO`` (0 = adaptive, as MMCV); its own knobs are
below.
"""

from detectron2.config import CfgNode as CN


def add_dcnv2_config(cfg):
    """Add the DCNv2 keys to a Detectron2 config, in place. Existing keys are left untouched."""
    cfg.MODEL.ROI_BOX_HEAD.MDPOOL = CN()
    # Bin offsets are predicted in units of the RoI size and multiplied by GAMMA (MMCV's gamma).
    cfg.MODEL.ROI_BOX_HEAD.MDPOOL.GAMMA = 0.1
    # Hidden width of the offset_fc and mask_fc branches (MMCV's deform_fc_channels).
    cfg.MODEL.ROI_BOX_HEAD.MDPOOL.DEFORM_FC_DIM = 1024

    # R-CNN feature mimicking (DCNv2 paper, Section 3.3), training only; see docs/mimic.md.
    cfg.MODEL.ROI_BOX_HEAD.MIMIC = CN()
    # On/off (needs META_ARCHITECTURE "MimicRCNN" and ROI heads "MDPoolROIHeads"/"MimicROIHeads").
    cfg.MODEL.ROI_BOX_HEAD.MIMIC.ENABLED = False
    # Foreground RoIs sampled per image for the R-CNN branch (the paper's 32).
    cfg.MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE = 32
    # Side in pixels of the square crop each RoI is resized to (the paper's 224).
    cfg.MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE = 224
    # Weight of loss_mimic, the cosine mimic loss (the paper's 0.1).
    cfg.MODEL.ROI_BOX_HEAD.MIMIC.LOSS_WEIGHT = 0.1
    # Weight of loss_mimic_cls, the R-CNN branch's own classification loss (the paper's 0.1).
    cfg.MODEL.ROI_BOX_HEAD.MIMIC.CLS_LOSS_WEIGHT = 0.1


def load_dcnv2_config(config_file, opts=()):
    """A frozen config (train_net.py and the tools): Detectron2 defaults + DCNv2 keys + the
    file + ``opts`` (a KEY VALUE list)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_dcnv2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg
