"""ROI heads whose box branch pools with modulated deformable RoI pooling (mdpool).

Everything but the box pooler is Detectron2's ``StandardROIHeads``: box head, predictor and
(for Mask R-CNN) the mask branch with its plain ROIAlign pooler. Box features are
(M, C, P, P) as usual; see :mod:`projects_dcnv2.modeling.poolers` for the pooler itself.
"""

from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from .poolers import MDPoolROIPooler

__all__ = ["MDPoolROIHeads"]


@ROI_HEADS_REGISTRY.register()
class MDPoolROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with an :class:`MDPoolROIPooler` (one deformable RoI pool per FPN
    level) for the box branch. ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` is ignored by the box branch.
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
