"""Multi-level modulated deformable RoI pooling (mdpool) for FPN box heads.

Shape shorthand: N = images, M = RoIs over the batch, C = feature channels (256),
P = output size (7), L = number of pyramid levels (4: P2..P5, strides 4..32).

One independent ``ModulatedDeformRoIPoolPack`` per level, as MMDetection's
``SingleRoIExtractor`` builds one RoI layer per stride; so MMDetection's
``roi_head.bbox_roi_extractor.roi_layers.{l}.{offset_fc,mask_fc}.*`` maps one to one onto
``roi_heads.box_pooler.level_poolers.{l}.{offset_fc,mask_fc}.*``.

Each RoI is assigned to a level with Detectron2's rule (canonical size 224 at level 4, the
same thresholds as MMDetection's ``finest_scale=56``) and pooled from that level with
``spatial_scale = 1 / stride``. Inside the Pack a first pass (zero offset = RoIAlign,
aligned) feeds ``offset_fc`` -> (M, 2, P, P) bin offsets, channel 0 = dx (width),
channel 1 = dy (height) — x first, unlike the conv offsets — scaled by ``gamma`` times the RoI
width/height, and ``mask_fc`` -> (M, 1, P, P) in (0, 1); the second, deformed pass is
multiplied by the mask.
"""

import math
from typing import List, Tuple

import torch
from torch import nn

from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from ..layers import DeformRoIPool, ModulatedDeformRoIPoolPack

__all__ = ["MDPoolROIPooler"]


class MDPoolROIPooler(nn.Module):
    """Drop-in replacement of Detectron2's ``ROIPooler`` for the box head, one
    ``ModulatedDeformRoIPoolPack`` per feature level (``self.level_poolers``)."""

    def __init__(
        self,
        output_size: int,
        scales: List[float],
        in_channels: int,
        *,
        deform_fc_dim: int = 1024,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            output_size (int): P, the pooled size (7).
            scales (list[float]): 1 / stride of each input level, finest first, a pyramid
                with ratio 1/2 (e.g. [1/4, 1/8, 1/16, 1/32]).
            in_channels (int): C of every level; also the Pack's ``output_channels``.
            deform_fc_dim (int): hidden width of ``offset_fc`` / ``mask_fc``.
            sampling_ratio (int): samples per bin side, 0 = adaptive ``ceil(roi_size / P)``.
            gamma (float): offset scale (MMCV's ``gamma``).
            canonical_box_size, canonical_level: level assignment, as Detectron2's ``ROIPooler``.
        """
        super().__init__()
        levels = [-math.log2(s) for s in scales]
        if not all(math.isclose(lvl, round(lvl)) for lvl in levels) or [
            round(lvl) for lvl in levels
        ] != list(range(round(levels[0]), round(levels[0]) + len(levels))):
            raise ValueError(f"scales must be 1/2**k for consecutive k, finest first; got {scales}")
        self.min_level, self.max_level = round(levels[0]), round(levels[-1])
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.output_size = (output_size, output_size)
        self.level_poolers = nn.ModuleList(
            ModulatedDeformRoIPoolPack(
                output_size=output_size,
                output_channels=in_channels,
                deform_fc_channels=deform_fc_dim,
                spatial_scale=scale,
                sampling_ratio=sampling_ratio,
                gamma=gamma,
            )
            for scale in scales
        )

    def assign_levels(self, box_lists: List[Boxes]) -> torch.Tensor:
        """(M,) index into the feature levels of each RoI (Detectron2's rule, see above)."""
        return assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )

    @torch.no_grad()
    def deformation(
        self, x: List[torch.Tensor], box_lists: List[Boxes]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What mdpool does to each RoI (for inspection, e.g. ``tools/visualize_sampling.py``).

        Args:
            x, box_lists: as in :meth:`forward`.

        Returns:
            offset (M, 2, P, P): bin offsets, channel 0 = dx, 1 = dy, in units of ``gamma`` x the
            RoI's width / height; mask (M, P, P): bin modulation; level (M,): index into ``x``.
            RoIs in the order of ``box_lists`` concatenated.
        """
        rois = convert_boxes_to_pooler_format(box_lists)
        level_of_roi = self.assign_levels(box_lists)
        offset = x[0].new_zeros((rois.shape[0], 2) + self.output_size)
        mask = x[0].new_zeros((rois.shape[0],) + self.output_size)
        for level, (features, pack) in enumerate(zip(x, self.level_poolers)):
            inds = nonzero_tuple(level_of_roi == level)[0]
            # The first half of ModulatedDeformRoIPoolPack.forward: plain pass -> offset, mask.
            plain = DeformRoIPool.forward(pack, features, rois[inds].to(features.dtype)).flatten(1)
            offset[inds] = pack._predict_offset(plain).to(offset.dtype)
            mask[inds] = pack.mask_fc(plain).view(-1, *self.output_size).to(mask.dtype)
        return offset, mask, level_of_roi

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """
        Args:
            x (list[Tensor]): L feature maps (N, C, H_l, W_l), finest first.
            box_lists (list[Boxes]): N lists of boxes in input-image pixels (x1, y1, x2, y2).

        Returns:
            Tensor: (M, C, P, P), RoIs in the order of ``box_lists`` concatenated.
        """
        if len(x) != len(self.level_poolers):
            raise ValueError(f"expected {len(self.level_poolers)} feature levels, got {len(x)}")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(
                f"expected one Boxes per image ({x[0].shape[0]}), got {len(box_lists)}"
            )
        num_channels = x[0].shape[1]
        if len(box_lists) == 0:
            return x[0].new_zeros((0, num_channels) + self.output_size)

        rois = convert_boxes_to_pooler_format(box_lists)  # (M, 5): batch index, x1, y1, x2, y2
        level_of_roi = self.assign_levels(box_lists)
        output = x[0].new_zeros((rois.shape[0], num_channels) + self.output_size)
        for level, (features, pooler) in enumerate(zip(x, self.level_poolers)):
            inds = nonzero_tuple(level_of_roi == level)[0]
            # Every level runs, even with no RoI, so all parameters join the graph (DDP).
            # Like MMDetection's force_fp32 RoI extractor, pool in fp32 under autocast (half
            # precision is upcast; float64 models stay float64).
            dtype = torch.promote_types(features.dtype, torch.float32)
            with torch.autocast(device_type=features.device.type, enabled=False):
                pooled = pooler(features.to(dtype), rois[inds].to(dtype))
            output[inds] = pooled.to(output.dtype)
        return output
