"""R-CNN feature mimicking (Zhu et al. 2018, DCNv2, Section 3.3), adapted to FPN. Training only.

Shape shorthand: N = images, K = foreground RoIs sampled over the batch, S = crop size (224),
D = box-head feature width (1024), C = classes.

The sampled RoIs are up to ROIS_PER_IMAGE foreground proposals per image (IoU >= 0.5 with a
ground-truth box), not the ground-truth boxes appended to the proposals: the paper samples RPN
proposals. The R-CNN branch sees each sampled RoI alone: the RoI is cropped from the normalised
input image, resized to S x S, run through the detector's own backbone, pooled as one whole-patch
box (0, 0, S, S) by the detector's own box pooler (on an FPN the pooler picks the level of an
S-pixel box: P4, a 14 x 14 map, for 224) and its own box head, giving f_RCNN (K, D). The
detector's feature of the same RoI, f_FRCNN (K, D), is the box head's output on that RoI in the
image, pooled from the RoI's own level; row k of both is RoI k. Two losses (names as in the
training log):

* ``loss_mimic`` = LOSS_WEIGHT x sum_b (1 - cos(f_RCNN(b), f_FRCNN(b))) / (ROIS_PER_IMAGE x N)
* ``loss_mimic_cls`` = CLS_LOSS_WEIGHT x sum_b CE(cls_score(f_RCNN(b)), class(b)) / (ROIS_PER_IMAGE x N)

``cls_score`` is the branch's own (C + 1)-way classifier. The divisor is the configured RoI budget,
a constant, not the number of RoIs found (docs/mimic.md says why). Nothing here runs at inference.
"""

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from detectron2.config import configurable
from detectron2.layers import cat, nonzero_tuple
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes, ImageList, Instances

__all__ = [
    "GT_BOX_FIELD",
    "MimicRCNN",
    "RCNNMimicBranch",
    "crop_rois",
    "mimic_cosine_loss",
    "sample_foreground_proposals",
]

# Boolean field of the proposals MimicROIHeads labels: True for the ground-truth boxes appended to
# them (ROI_HEADS.PROPOSAL_APPEND_GT), which the branch does not sample.
GT_BOX_FIELD = "is_gt_box"


def subsample_foreground(gt_classes: torch.Tensor, num_classes: int, max_num: int) -> torch.Tensor:
    """Indices of at most ``max_num`` foreground entries of ``gt_classes`` (labels in
    [0, num_classes); ``num_classes`` is background), chosen uniformly at random."""
    foreground = nonzero_tuple((gt_classes >= 0) & (gt_classes < num_classes))[0]
    if foreground.numel() > max_num:
        keep = torch.randperm(foreground.numel(), device=foreground.device)[:max_num]
        foreground = foreground[keep]
    return foreground


def sample_foreground_proposals(
    proposals: List[Instances], num_classes: int, max_per_image: int
) -> List[Instances]:
    """Per image, up to ``max_per_image`` of the proposals the box head labelled foreground
    (``gt_classes`` set by ``label_and_sample_proposals``: IoU >= ROI_HEADS.IOU_THRESHOLDS with a
    ground-truth box), leaving out those whose ``GT_BOX_FIELD`` is True: the ground-truth boxes
    that ROI_HEADS.PROPOSAL_APPEND_GT adds, since the paper samples RPN proposals only. Proposals
    without the field are all candidates."""
    sampled = []
    for p in proposals:
        classes = p.gt_classes
        if p.has(GT_BOX_FIELD):
            classes = classes.masked_fill(p.get(GT_BOX_FIELD), -1)  # -1: not a candidate
        sampled.append(p[subsample_foreground(classes, num_classes, max_per_image)])
    return sampled


def crop_rois(images: torch.Tensor, boxes: List[Boxes], crop_size: int) -> torch.Tensor:
    """Crop every box from its image and resize it bilinearly to ``crop_size`` squared.

    Args:
        images: (N, 3, H, W) normalised images (``ImageList.tensor``).
        boxes: N ``Boxes`` in input-image pixels (x1, y1, x2, y2).
        crop_size: S.

    Returns:
        (K, 3, S, S), the boxes of all images in order. Output pixel (i, j) is the bilinear
        sample at (x1 + (j + 0.5) w / S, y1 + (i + 0.5) h / S) in continuous coordinates (pixel
        centres at +0.5), i.e. a resize with align_corners=False of the box's region.
    """
    rois = convert_boxes_to_pooler_format(boxes).to(images.dtype)  # (K, 5)
    # One bilinear sample per output pixel at the bin centre (sampling_ratio=1, aligned): a resize.
    return roi_align(images, rois, crop_size, spatial_scale=1.0, sampling_ratio=1, aligned=True)


def mimic_cosine_loss(f_rcnn: torch.Tensor, f_frcnn: torch.Tensor) -> torch.Tensor:
    """sum_b (1 - cos(f_rcnn[b], f_frcnn[b])) over the K rows of two (K, D) features (the
    paper's L_mimic, unnormalised)."""
    return (1.0 - F.cosine_similarity(f_rcnn, f_frcnn, dim=1)).sum()


class RCNNMimicBranch(nn.Module):
    """The R-CNN branch: samples foreground RoIs, crops them, and computes ``loss_mimic`` and
    ``loss_mimic_cls`` with the detector's backbone, box pooler and box head (passed to
    :meth:`forward`; the branch owns only ``cls_score``)."""

    def __init__(
        self,
        *,
        feature_dim: int,
        num_classes: int,
        rois_per_image: int = 32,
        crop_size: int = 224,
        loss_weight: float = 0.1,
        cls_loss_weight: float = 0.1,
    ):
        """
        Args:
            feature_dim: D, width of the box head's output.
            num_classes: C; the classifier has C + 1 outputs (index C = background).
            rois_per_image: at most this many foreground RoIs per image; also the per-image
                share of the loss normaliser.
            crop_size: S, side of the square crops in pixels.
            loss_weight, cls_loss_weight: weights of ``loss_mimic`` and ``loss_mimic_cls``.
        """
        super().__init__()
        for name, value in (("rois_per_image", rois_per_image), ("crop_size", crop_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_classes = num_classes
        self.rois_per_image = rois_per_image
        self.crop_size = crop_size
        self.loss_weight = loss_weight
        self.cls_loss_weight = cls_loss_weight
        self.cls_score = nn.Linear(feature_dim, num_classes + 1)
        # Same initialisation as Detectron2's FastRCNNOutputLayers.cls_score.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0)

    def forward(
        self,
        images: ImageList,
        features: List[torch.Tensor],
        proposals: List[Instances],
        *,
        backbone: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
        in_features: List[str],
        box_pooler: nn.Module,
        box_head: nn.Module,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: the normalised batch the detector ran on.
            features: the detector's feature maps, in the order of ``in_features``.
            proposals: N ``Instances`` as ``StandardROIHeads`` samples them in training
                (``proposal_boxes``, ``gt_classes``; ``GT_BOX_FIELD`` from ``MimicROIHeads``).
            backbone: the detector's backbone: (K, 3, S, S) -> {name: feature map}.
            in_features: the feature maps the box pooler reads.
            box_pooler, box_head: the detector's own.

        Returns:
            {"loss_mimic": scalar, "loss_mimic_cls": scalar}.
        """
        sampled = sample_foreground_proposals(proposals, self.num_classes, self.rois_per_image)
        boxes = [p.proposal_boxes for p in sampled]
        normaliser = float(self.rois_per_image * max(len(proposals), 1))
        num_rois = sum(len(b) for b in boxes)
        if num_rois == 0:
            # No foreground anywhere: zero losses that still reach cls_score, so every parameter
            # has a gradient (DistributedDataParallel expects one from every rank).
            zero = sum(p.sum() for p in self.cls_score.parameters()) * 0.0
            return {"loss_mimic": zero, "loss_mimic_cls": zero.clone()}

        f_frcnn = box_head(box_pooler(features, boxes))  # (K, D)
        crops = crop_rois(images.tensor, boxes, self.crop_size)  # (K, 3, S, S)
        crop_features = backbone(crops)
        whole = Boxes(crops.new_tensor([[0.0, 0.0, self.crop_size, self.crop_size]]))
        f_rcnn = box_head(box_pooler([crop_features[f] for f in in_features], [whole] * num_rois))

        gt_classes = cat([p.gt_classes for p in sampled])
        loss_cls = F.cross_entropy(self.cls_score(f_rcnn), gt_classes, reduction="sum")
        return {
            "loss_mimic": self.loss_weight * mimic_cosine_loss(f_rcnn, f_frcnn) / normaliser,
            "loss_mimic_cls": self.cls_loss_weight * loss_cls / normaliser,
        }


@META_ARCH_REGISTRY.register()
class MimicRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` that lends its backbone to RoI heads with an R-CNN mimic branch
    (``MODEL.ROI_BOX_HEAD.MIMIC.ENABLED``), which run it on the RoI crops in training.
    Everything else, inference included, is ``GeneralizedRCNN``'s."""

    @configurable
    def __init__(self, **kwargs):
        """Same arguments as ``GeneralizedRCNN``."""
        super().__init__(**kwargs)
        if getattr(self.roi_heads, "mimic", None) is not None:
            self.roi_heads.share_backbone(self.backbone)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if (
            cfg.MODEL.ROI_BOX_HEAD.MIMIC.ENABLED
            and getattr(ret["roi_heads"], "mimic", None) is None
        ):
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.MIMIC.ENABLED needs RoI heads with a mimic branch "
                f"(MODEL.ROI_HEADS.NAME 'MDPoolROIHeads' or 'MimicROIHeads'), got "
                f"{cfg.MODEL.ROI_HEADS.NAME!r}"
            )
        return ret
