"""Every config in configs/ merges after add_dcnv2_config and builds a model (CPU, build only)."""

import re
from pathlib import Path

import pytest

from detectron2.config import get_cfg
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    ROI_HEADS_REGISTRY,
    build_model,
)

import projects_dcnv2  # noqa: F401  (registers the builders)
from projects_dcnv2 import add_dcnv2_config

from builders import CONFIG_DIR, PLAIN_TWINS, QUICK, SEED_CONFIGS, config_path, make_cfg, make_model

CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# MMDetection's DCNv2 results table (the seed table), by model-zoo name.
SEED_TABLE = {
    "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco",
    "faster_rcnn_r50_fpn_mdconv_c3-c5_group4_1x_coco",
    "faster_rcnn_r50_fpn_mdpool_1x_coco",
    "mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco",
    "mask_rcnn_r50_fpn_fp16_mdconv_c3-c5_1x_coco",
}


def test_import_registers_builders():
    assert "build_dcnv2_resnet_backbone" in BACKBONE_REGISTRY
    assert "build_dcnv2_resnet_fpn_backbone" in BACKBONE_REGISTRY
    assert "MDPoolROIHeads" in ROI_HEADS_REGISTRY
    assert "MimicROIHeads" in ROI_HEADS_REGISTRY and "MimicRCNN" in META_ARCH_REGISTRY


def test_add_dcnv2_config_adds_only_new_keys():
    before = get_cfg()
    cfg = get_cfg()
    add_dcnv2_config(cfg)
    assert cfg.MODEL.ROI_BOX_HEAD.MDPOOL.GAMMA == 0.1
    assert cfg.MODEL.ROI_BOX_HEAD.MDPOOL.DEFORM_FC_DIM == 1024
    assert cfg.MODEL.ROI_BOX_HEAD.MIMIC.ENABLED is False
    del cfg.MODEL.ROI_BOX_HEAD["MDPOOL"]
    del cfg.MODEL.ROI_BOX_HEAD["MIMIC"]
    assert cfg == before


def test_every_seed_config_is_present():
    """Each row of the seed table has one config naming it (which is how builders.SEED_CONFIGS
    finds them), and both plain twins exist."""
    named = [
        re.search(r"MMDetection ([\w-]+_coco):", Path(config_path(n)).read_text())[1]
        for n in SEED_CONFIGS
    ]
    assert sorted(named) == sorted(SEED_TABLE)
    assert PLAIN_TWINS == ["faster_rcnn_R50_FPN", "mask_rcnn_R50_FPN"]
    quick = {p.name for p in QUICK.glob("*.yaml")}
    assert {
        "mask_rcnn_R50_FPN_mdconv_shapes.yaml",
        "mask_rcnn_R50_FPN_shapes.yaml",
        "faster_rcnn_R50_FPN_mdpool_shapes.yaml",
        "mask_rcnn_R50_FPN_dcnv2_shapes.yaml",
        "mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml",
    } <= quick


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_merges_and_builds(path):
    # Reduced proposal counts; construction does not depend on the input size.
    cfg, model = make_model(path, "MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TEST", "50")
    assert (
        model.roi_heads.box_predictor.cls_score.out_features == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    )
    assert hasattr(model.roi_heads, "mask_head") == cfg.MODEL.MASK_ON


@pytest.mark.parametrize("name", SEED_CONFIGS + PLAIN_TWINS)
def test_seed_configs_follow_the_mmdetection_recipe(name):
    cfg = make_cfg(name)
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000 and cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignV2"
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == 0
    for head in (cfg.MODEL.RPN, cfg.MODEL.ROI_BOX_HEAD):
        assert head.BBOX_REG_LOSS_TYPE == "smooth_l1" and head.SMOOTH_L1_BETA == 0.0
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.02, 90000)
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.05
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    mdconv = "mdconv" in name
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, mdconv, mdconv, mdconv]
    assert cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == (4 if "dg4" in name else 1)
    assert cfg.SOLVER.AMP.ENABLED == ("fp16" in name)
    assert (cfg.MODEL.ROI_HEADS.NAME == "MDPoolROIHeads") == ("mdpool" in name)
    assert cfg.MODEL.MASK_ON == name.startswith("mask_rcnn")


def test_base_paths_stay_inside_configs():
    for path in CONFIGS:
        for line in path.read_text().splitlines():
            if line.startswith("_BASE_"):
                base = (path.parent / line.split(":", 1)[1].strip().strip("\"'")).resolve()
                assert base.is_file() and CONFIG_DIR in base.parents, (path, base)


def test_dcnv1_request_is_refused():
    cfg = make_cfg(
        "faster_rcnn_R50_FPN_mdconv",
        "MODEL.DEVICE",
        "cpu",
        "MODEL.RESNETS.DEFORM_MODULATED",
        "False",
    )
    with pytest.raises(ValueError, match="DEFORM_MODULATED"):
        build_model(cfg)
