"""ROI heads: an optional R-CNN feature-mimicking branch (``MimicROIHeads``) and a box branch
that pools with modulated deformable RoI pooling (``MDPoolROIHeads``, which has the branch too).

Everything else is Detectron2's ``StandardROIHeads``: box head, predictor and (for Mask R-CNN)
the mask branch with its plain ROIAlign pooler. Box features are (M, C, P, P) as usual; see
:mod:`projects_dcnv2.modeling.poolers` for the mdpool pooler and
:mod:`projects_dcnv2.modeling.mimic` for the mimic branch (training only).
"""

import logging
from typing import Optional

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

from .mimic import GT_BOX_FIELD, MimicRCNN, RCNNMimicBranch
from .poolers import MDPoolROIPooler

__all__ = ["MDPoolROIHeads", "MimicROIHeads"]

logger = logging.getLogger(__name__)


def _with_flag(instances: Instances, device: torch.device, value: bool) -> Instances:
    """A shallow copy of ``instances`` with ``GT_BOX_FIELD`` set to ``value`` for every row."""
    out = Instances(instances.image_size, **instances.get_fields())
    out.set(GT_BOX_FIELD, torch.full((len(instances),), value, dtype=torch.bool, device=device))
    return out


@ROI_HEADS_REGISTRY.register()
class MimicROIHeads(StandardROIHeads):
    """``StandardROIHeads`` plus, when ``MODEL.ROI_BOX_HEAD.MIMIC.ENABLED``, an
    :class:`RCNNMimicBranch` (``self.mimic``) whose ``loss_mimic`` and ``loss_mimic_cls`` join
    the training losses. Inference and the other losses are ``StandardROIHeads``'. Without the
    branch, a checkpoint's ``mimic.*`` tensors are skipped on load and logged as expected."""

    @configurable
    def __init__(self, *, mimic: Optional[RCNNMimicBranch] = None, **kwargs):
        """
        Args:
            mimic: the R-CNN branch, or None (no mimicking).
            kwargs: ``StandardROIHeads``' arguments.
        """
        super().__init__(**kwargs)
        self.mimic = mimic
        self._backbone = ()  # (backbone,): shared with the meta-architecture, not a submodule

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mimic = cfg.MODEL.ROI_BOX_HEAD.MIMIC
        if not mimic.ENABLED:
            return ret
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if not issubclass(meta_arch, MimicRCNN):
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.MIMIC.ENABLED needs MODEL.META_ARCHITECTURE 'MimicRCNN' (it "
                f"lends the backbone to the mimic branch), got {cfg.MODEL.META_ARCHITECTURE!r}"
            )
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.MIMIC.ENABLED needs MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES "
                "False (the branch crops the sampled proposals), got True"
            )
        ret["mimic"] = RCNNMimicBranch(
            feature_dim=ret["box_head"].output_shape.channels,
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            rois_per_image=mimic.ROIS_PER_IMAGE,
            crop_size=mimic.CROP_SIZE,
            loss_weight=mimic.LOSS_WEIGHT,
            cls_loss_weight=mimic.CLS_LOSS_WEIGHT,
        )
        return ret

    def share_backbone(self, backbone):
        """Give the mimic branch the detector's backbone (``MimicRCNN`` does this)."""
        divisibility = backbone.size_divisibility
        if divisibility > 1 and self.mimic.crop_size % divisibility:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE must be a multiple of the backbone's size "
                f"divisibility ({divisibility}), got {self.mimic.crop_size}"
            )
        self._backbone = (backbone,)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        """``StandardROIHeads``', with the mimic branch's ``GT_BOX_FIELD`` on the result: True
        for the ground-truth boxes appended to the proposals (ROI_HEADS.PROPOSAL_APPEND_GT),
        which the branch leaves out, as the paper samples RPN proposals only."""
        if self.mimic is not None:
            proposals = [_with_flag(p, p.proposal_boxes.device, False) for p in proposals]
            targets = [_with_flag(t, t.gt_boxes.device, True) for t in targets]
        return super().label_and_sample_proposals(proposals, targets)

    def forward(self, images, features, proposals, targets=None):
        results, losses = super().forward(images, features, proposals, targets)
        if self.training and self.mimic is not None:
            if not self._backbone:
                raise RuntimeError(
                    "the mimic branch has no backbone: build the model with "
                    "MODEL.META_ARCHITECTURE 'MimicRCNN' or call share_backbone()"
                )
            # In training `results` are the proposals sampled by label_and_sample_proposals.
            losses.update(
                self.mimic(
                    images,
                    [features[f] for f in self.box_in_features],
                    results,
                    backbone=self._backbone[0],
                    in_features=self.box_in_features,
                    box_pooler=self.box_pooler,
                    box_head=self.box_head,
                )
            )
        return results, losses

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.mimic is None:
            unused = sorted(k for k in state_dict if k.startswith(prefix + "mimic."))
            for k in unused:
                del state_dict[k]
            if unused:
                logger.info(
                    f"Skipped, as expected: {', '.join(unused)} (the R-CNN mimic branch's "
                    "classifier, used only in training with MODEL.ROI_BOX_HEAD.MIMIC.ENABLED)"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@ROI_HEADS_REGISTRY.register()
class MDPoolROIHeads(MimicROIHeads):
    """``MimicROIHeads`` (so ``StandardROIHeads`` unless mimicking is on) with an
    :class:`MDPoolROIPooler` (one deformable RoI pool per FPN level) for the box branch.
    ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` is ignored by the box branch.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        ret["box_pooler"] = MDPoolROIPooler(
            output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            scales=[1.0 / input_shape[f].stride for f in in_features],
            in_channels=input_shape[in_features[0]].channels,
            deform_fc_dim=cfg.MODEL.ROI_BOX_HEAD.MDPOOL.DEFORM_FC_DIM,
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            gamma=cfg.MODEL.ROI_BOX_HEAD.MDPOOL.GAMMA,
        )
        return ret
