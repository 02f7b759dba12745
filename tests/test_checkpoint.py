"""Model-zoo weights: MMDetection / torchvision checkpoints -> this project's Detectron2 models.

No network and no real checkpoint: every MMDetection file here is written by the test, either from
a hand-written key table or by exporting one of our models through ``mmdet_checkpoints`` (which
spells MMDetection's names out independently of the package's rules). Most models are the seed
configs with reduced widths (``builders.NARROW``: same key names, same block counts); the
full-size Mask R-CNN mdconv is built once for the exact-shape checks.
"""

import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from projects_dcnv2.checkpoint import CheckpointMismatchError, DCNv2Checkpointer, convert_checkpoint
from projects_dcnv2.checkpoint.checkpointer import TorchvisionHandler
from projects_dcnv2.checkpoint.convert import (
    convert_mmdet_to_d2,
    convert_torchvision_to_d2,
    guess_format,
)
from projects_dcnv2.checkpoint.validate import check_checkpoint_fits
from projects_dcnv2.engine import AtomicCheckpointer
from projects_dcnv2.layers import ModulatedDeformRoIPoolPack

from builders import NARROW, REPO, SEED_CONFIGS, SMALL, config_path, make_cfg
from mmdet_checkpoints import (
    LAYOUTS,
    d2_name,
    export_mmdet,
    mmdet_r50_fpn_layout,
    random_checkpoint,
)

OPTS = [*SMALL, *NARROW]  # narrow models, few proposals, every detection kept
IMAGE = 64


def randomise(model, seed):
    """Random weights everywhere (offset convs and mdpool FCs included, which start at zero), at
    a scale that keeps activations O(1); BN statistics positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (".norm." in name and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def build_small(name, seed, *opts):
    torch.manual_seed(seed)
    return randomise(build_model(make_cfg(name, *OPTS, *opts)), seed)


def run(model):
    image = torch.randint(0, 256, (3, IMAGE, IMAGE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model([{"image": image.float(), "height": IMAGE, "width": IMAGE}])[0]["instances"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(state, model):
    current = model.state_dict()
    assert state.keys() == current.keys()
    for k, v in state.items():
        assert torch.equal(v, current[k]), k


def save(obj, path, legacy=False):
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Fixtures: the full-size model is built once; small exports are cached per config.


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The small models run tiny convolutions, for which OpenMP start-up dominates on a busy
    machine (10x slower with 2 threads here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def full_mask_mdconv():
    torch.manual_seed(0)
    return build_model(make_cfg("mask_rcnn_R50_FPN_mdconv", "MODEL.DEVICE", "cpu")).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> path of an MMDetection-format checkpoint exported from a small random model."""
    cache = {}
    folder = tmp_path_factory.mktemp("mmdet")

    def get(name, *opts):
        key = (name,) + opts
        if key not in cache:
            model = build_small(name, 1, *opts)
            cache[key] = save(export_mmdet(model.state_dict()), folder / f"{len(cache)}.pth")
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------------
# The five model-zoo rows, end to end.


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_seed_config_round_trip(name, tmp_path):
    """Export a random model to MMDetection's format, load it back through DCNv2Checkpointer into
    a differently initialised model: same tensors, same detections."""
    source = build_small(name, 1)
    checkpoint = export_mmdet(
        source.state_dict(), meta={"mmdet_version": "2.0.0", "CLASSES": tuple(map(str, range(80)))}
    )
    mm = checkpoint["state_dict"]
    assert set(checkpoint) == {"meta", "state_dict"}
    bns = [k for k in mm if k.endswith(".running_var")]
    assert len(bns) == 53 and all(k.startswith("backbone.") for k in bns)
    assert all(k[: -len("running_var")] + "num_batches_tracked" in mm for k in bns)
    offsets = [k for k in mm if ".conv_offset." in k]
    pools = [k for k in mm if k.startswith("roi_head.bbox_roi_extractor.roi_layers.")]
    masks = [k for k in mm if k.startswith("roi_head.mask_head.")]
    assert len(offsets) == (0 if "mdpool" in name else 26)  # 13 blocks of layer2-4, weight + bias
    assert all(k.split(".")[1] in ("layer2", "layer3", "layer4") for k in offsets)
    assert len(pools) == (40 if "mdpool" in name else 0)  # 4 levels x (3 + 2 Linear) x 2
    assert len(masks) == (12 if name.startswith("mask") else 0)
    assert guess_format(checkpoint) == "mmdet"

    path = save(checkpoint, tmp_path / "model.pth", legacy=name.endswith("fp16"))
    target = build_small(name, 2)
    assert not torch.equal(run(source).scores, run(target).scores)
    checkpointer = DCNv2Checkpointer(target)
    checkpointer.load(path)
    assert_state_equal(source.state_dict(), target)
    report = checkpointer.report
    assert report.num_converted == len(target.state_dict()) and report.not_loaded == {}
    assert len(report.dropped) == 53 and not report.unmapped

    expected, got = run(source), run(target)
    assert len(expected) > 0
    for field in ("pred_boxes", "scores", "pred_classes") + (
        ("pred_masks",) if name.startswith("mask") else ()
    ):
        a, b = expected.get(field), got.get(field)
        a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
        assert torch.equal(a, b), field


def test_full_size_export_has_mmdetection_layout(full_mask_mdconv):
    """Our full-size Mask R-CNN mdconv exports exactly MMDetection's key set and shapes."""
    exported = export_mmdet(full_mask_mdconv.state_dict())["state_dict"]
    got = {k: tuple(v.shape) for k, v in exported.items()}
    assert got == mmdet_r50_fpn_layout(mask=True)


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_full_size_mmdet_checkpoint_loads(name, full_mask_mdconv, tmp_path):
    """A random checkpoint with MMDetection's layout of each seed config (legacy serialisation,
    module metadata, meta) loads onto the full-size model: every model tensor is the checkpoint
    tensor of the independently derived name, nothing is left at its initialisation."""
    if name == "mask_rcnn_R50_FPN_mdconv":
        model = full_mask_mdconv
    else:
        torch.manual_seed(0)
        model = build_model(make_cfg(name, "MODEL.DEVICE", "cpu")).eval()
    layout = LAYOUTS[name]
    checkpoint = random_checkpoint(mmdet_r50_fpn_layout(**layout))
    path = save(checkpoint, tmp_path / f"{name}.pth", legacy=True)
    checkpointer = DCNv2Checkpointer(model)
    checkpointer.load(path)

    state = model.state_dict()
    mm = {
        k: v for k, v in checkpoint["state_dict"].items() if not k.endswith("num_batches_tracked")
    }
    assert {d2_name(k) for k in mm} == set(state)
    for k, v in mm.items():
        assert torch.equal(state[d2_name(k)], v), k
    mask, mdpool, dcn = (
        layout.get("mask", False),
        layout.get("mdpool", False),
        layout.get("dcn", True),
    )
    expected_counts = {
        "backbone": 265,
        "offset convs": 26 if dcn else 0,
        "fpn": 16,
        "rpn": 6,
        "box head": 8,
        "mask head": 12 if mask else 0,
        "mdpool": 40 if mdpool else 0,
    }
    assert checkpointer.report.counts == {c: n for c, n in expected_counts.items() if n}
    assert checkpointer.report.not_loaded == {}


def test_convert_checkpoint_detects_each_format(exported, tmp_path):
    """One entry point for every file content: MMDetection and torchvision are converted, a
    projects_dcnv2 pickle is counted, a Detectron2 checkpoint is passed through untouched."""
    model_state = build_small("faster_rcnn_R50_FPN_mdconv", 12).state_dict()
    mm = torch.load(exported("faster_rcnn_R50_FPN_mdconv"), weights_only=True)
    state, report = convert_checkpoint(mm, model_state, name="a.pth")
    assert report.source == "MMDetection" and report.name == "a.pth" and report.not_loaded == {}
    assert state.keys() == model_state.keys()

    exported_state = export_mmdet(model_state)["state_dict"].items()
    torchvision_like = {  # the plain ResNet, torchvision's names
        k[len("backbone.") :]: v
        for k, v in exported_state
        if k.startswith("backbone.") and ".conv_offset." not in k
    }
    state, report = convert_checkpoint(torchvision_like, model_state)
    assert report.source == "torchvision" and report.not_loaded["offset convs"] == 26
    assert set(report.not_loaded_keys) == set(model_state) - set(state)

    pickled = {
        "model": {k: v.numpy() for k, v in model_state.items()},
        "__author__": "projects_dcnv2",
    }
    state, report = convert_checkpoint(pickled, model_state)
    assert state is pickled["model"] and report.counts["offset convs"] == 26

    detectron2_file = {"model": model_state, "iteration": 5}
    assert convert_checkpoint(detectron2_file, model_state) == (detectron2_file, None)

    with pytest.raises(CheckpointMismatchError, match="dg4.pth does not fit"):
        convert_checkpoint(
            torch.load(exported("faster_rcnn_R50_FPN_mdconv_dg4"), weights_only=True),
            model_state,
            name="dg4.pth",
        )


# ------------------------------------------------------------------------------------------------
# The mapping on a hand-written subset.


def test_hand_written_subset_maps_to_expected_keys(full_mask_mdconv):
    def bn(prefix, c):
        return {f"{prefix}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}

    mm = {
        "backbone.conv1.weight": (64, 3, 7, 7),
        **bn("backbone.bn1", 64),
        "backbone.bn1.num_batches_tracked": (),
        # A deformable bottleneck (first block of layer2: strided, with downsample).
        "backbone.layer2.0.conv1.weight": (128, 256, 1, 1),
        **bn("backbone.layer2.0.bn1", 128),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
        "backbone.layer2.0.conv2.conv_offset.weight": (27, 128, 3, 3),
        "backbone.layer2.0.conv2.conv_offset.bias": (27,),
        **bn("backbone.layer2.0.bn2", 128),
        "backbone.layer2.0.conv3.weight": (512, 128, 1, 1),
        **bn("backbone.layer2.0.bn3", 512),
        "backbone.layer2.0.downsample.0.weight": (512, 256, 1, 1),
        **bn("backbone.layer2.0.downsample.1", 512),
        # Legacy offset naming (MMCV DCN version 1).
        "backbone.layer3.1.conv2_offset.weight": (27, 256, 3, 3),
        "backbone.layer3.1.conv2_offset.bias": (27,),
        # One FPN level, the RPN head, the box head.
        "neck.lateral_convs.1.conv.weight": (256, 512, 1, 1),
        "neck.lateral_convs.1.conv.bias": (256,),
        "neck.fpn_convs.1.conv.weight": (256, 256, 3, 3),
        "neck.fpn_convs.1.conv.bias": (256,),
        "rpn_head.rpn_conv.weight": (256, 256, 3, 3),
        "rpn_head.rpn_conv.bias": (256,),
        "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
        "rpn_head.rpn_cls.bias": (3,),
        "rpn_head.rpn_reg.weight": (12, 256, 1, 1),
        "rpn_head.rpn_reg.bias": (12,),
        "roi_head.bbox_head.shared_fcs.0.weight": (1024, 12544),
        "roi_head.bbox_head.shared_fcs.0.bias": (1024,),
        "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024),
        "roi_head.bbox_head.shared_fcs.1.bias": (1024,),
        "roi_head.bbox_head.fc_cls.weight": (81, 1024),
        "roi_head.bbox_head.fc_cls.bias": (81,),
        "roi_head.bbox_head.fc_reg.weight": (320, 1024),
        "roi_head.bbox_head.fc_reg.bias": (320,),
        # One mdpool level (the third, stride 16).
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.0.weight": (1024, 12544),
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.0.bias": (1024,),
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.2.weight": (1024, 1024),
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.2.bias": (1024,),
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.4.weight": (98, 1024),
        "roi_head.bbox_roi_extractor.roi_layers.2.offset_fc.4.bias": (98,),
        "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.0.weight": (1024, 12544),
        "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.0.bias": (1024,),
        "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.2.weight": (49, 1024),
        "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.2.bias": (49,),
    }
    bu = "backbone.bottom_up."
    expected = {
        bu + "stem.conv1.weight": (64, 3, 7, 7),
        **bn(bu + "stem.conv1.norm", 64),
        bu + "res3.0.conv1.weight": (128, 256, 1, 1),
        **bn(bu + "res3.0.conv1.norm", 128),
        bu + "res3.0.conv2.weight": (128, 128, 3, 3),
        bu + "res3.0.conv2_offset.weight": (27, 128, 3, 3),
        bu + "res3.0.conv2_offset.bias": (27,),
        **bn(bu + "res3.0.conv2.norm", 128),
        bu + "res3.0.conv3.weight": (512, 128, 1, 1),
        **bn(bu + "res3.0.conv3.norm", 512),
        bu + "res3.0.shortcut.weight": (512, 256, 1, 1),
        **bn(bu + "res3.0.shortcut.norm", 512),
        bu + "res4.1.conv2_offset.weight": (27, 256, 3, 3),
        bu + "res4.1.conv2_offset.bias": (27,),
        "backbone.fpn_lateral3.weight": (256, 512, 1, 1),
        "backbone.fpn_lateral3.bias": (256,),
        "backbone.fpn_output3.weight": (256, 256, 3, 3),
        "backbone.fpn_output3.bias": (256,),
        "proposal_generator.rpn_head.conv.weight": (256, 256, 3, 3),
        "proposal_generator.rpn_head.conv.bias": (256,),
        "proposal_generator.rpn_head.objectness_logits.weight": (3, 256, 1, 1),
        "proposal_generator.rpn_head.objectness_logits.bias": (3,),
        "proposal_generator.rpn_head.anchor_deltas.weight": (12, 256, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.bias": (12,),
        "roi_heads.box_head.fc1.weight": (1024, 12544),
        "roi_heads.box_head.fc1.bias": (1024,),
        "roi_heads.box_head.fc2.weight": (1024, 1024),
        "roi_heads.box_head.fc2.bias": (1024,),
        "roi_heads.box_predictor.cls_score.weight": (81, 1024),
        "roi_heads.box_predictor.cls_score.bias": (81,),
        "roi_heads.box_predictor.bbox_pred.weight": (320, 1024),
        "roi_heads.box_predictor.bbox_pred.bias": (320,),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.0.weight": (1024, 12544),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.0.bias": (1024,),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.2.weight": (1024, 1024),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.2.bias": (1024,),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.4.weight": (98, 1024),
        "roi_heads.box_pooler.level_poolers.2.offset_fc.4.bias": (98,),
        "roi_heads.box_pooler.level_poolers.2.mask_fc.0.weight": (1024, 12544),
        "roi_heads.box_pooler.level_poolers.2.mask_fc.0.bias": (1024,),
        "roi_heads.box_pooler.level_poolers.2.mask_fc.2.weight": (49, 1024),
        "roi_heads.box_pooler.level_poolers.2.mask_fc.2.bias": (49,),
    }
    half = {"roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias"}  # an FP16 file
    state = {
        k: (
            torch.zeros(s, dtype=torch.long)
            if "num_batches" in k
            else torch.empty(s, dtype=torch.float16 if k in half else torch.float32)
        )
        for k, s in mm.items()
    }
    converted, report = convert_mmdet_to_d2(state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert all(v.dtype == torch.float32 for v in converted.values())
    assert report.counts == {
        "backbone": 25,
        "offset convs": 4,
        "fpn": 4,
        "rpn": 6,
        "box head": 8,
        "mdpool": 10,
    }
    assert report.dropped == ["backbone.bn1.num_batches_tracked"]
    assert report.legacy_offset_keys == 2 and sorted(report.cast_to_float32) == sorted(half)

    # The same names and shapes exist in our real modules.
    model_state = full_mask_mdconv.state_dict()
    pool_state = ModulatedDeformRoIPoolPack(7, 256, 1024).state_dict()
    pool_prefix = "roi_heads.box_pooler.level_poolers.2."
    for k, shape in expected.items():
        if k.startswith(pool_prefix):
            assert tuple(pool_state[k[len(pool_prefix) :]].shape) == shape, k
        else:
            assert tuple(model_state[k].shape) == shape, k


def test_conversion_refuses_duplicate_and_unknown_keys():
    offset = torch.zeros(27, 128, 3, 3)
    with pytest.raises(
        ValueError, match="both map to 'backbone.bottom_up.res3.0.conv2_offset.weight'"
    ):
        convert_mmdet_to_d2(
            {
                "backbone.layer2.0.conv2.conv_offset.weight": offset,
                "backbone.layer2.0.conv2_offset.weight": offset,
            }
        )
    unknown = {
        "backbone.conv1.weight": torch.zeros(1),
        "roi_head.bbox_head.shared_convs.0.conv.weight": torch.zeros(1),
    }
    with pytest.raises(ValueError, match=r"roi_head\.bbox_head\.shared_convs\.0\.conv\.weight"):
        convert_mmdet_to_d2(unknown)
    _, report = convert_mmdet_to_d2(unknown, strict=False)
    assert report.unmapped == ["roi_head.bbox_head.shared_convs.0.conv.weight"]


def test_legacy_offset_names_round_trip():
    state = build_small("faster_rcnn_R50_FPN_mdconv", 3).state_dict()
    legacy = export_mmdet(state, legacy_offset_names=True)["state_dict"]
    assert "backbone.layer4.2.conv2_offset.bias" in legacy and not any(
        ".conv_offset." in k for k in legacy
    )
    back, report = convert_mmdet_to_d2(legacy)
    assert report.legacy_offset_keys == 26
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------
# Checkpoints that do not fit are refused, and nothing is loaded.


def refuse(path, name, *opts):
    model = build_small(name, 4, *opts)
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError) as info:
        DCNv2Checkpointer(model).load(path)
    assert_state_equal(before, model)
    message = str(info.value)
    assert "nothing was loaded" in message
    return message


def test_refuses_dg4_checkpoint_for_dg1_config(exported):
    message = refuse(exported("faster_rcnn_R50_FPN_mdconv_dg4"), "faster_rcnn_R50_FPN_mdconv")
    assert "deformable groups differ" in message and "DEFORM_NUM_GROUPS" in message
    assert (
        "backbone.bottom_up.res3.0.conv2_offset.weight: checkpoint (108, 16, 3, 3) vs model (27, 16, 3, 3)"
        in message
    )
    assert "deformable groups differ: checkpoint 4, model 1" in message


def test_refuses_mdpool_checkpoint_for_mdconv_config(exported):
    message = refuse(exported("faster_rcnn_R50_FPN_mdpool"), "faster_rcnn_R50_FPN_mdconv")
    assert "mdpool" in message and "roi_heads.box_pooler.level_poolers.0.mask_fc.0.bias" in message
    assert "no offset convs" in message  # and the backbone it expects is deformable


def test_refuses_mdconv_checkpoint_for_plain_config(exported):
    message = refuse(exported("mask_rcnn_R50_FPN_mdconv"), "mask_rcnn_R50_FPN")
    assert "DCNv2 (mdconv) offset convs in res3, res4, res5" in message
    assert "backbone.bottom_up.res3.0.conv2_offset.bias" in message


def test_refuses_other_number_of_classes(exported):
    message = refuse(
        exported("faster_rcnn_R50_FPN_mdconv"),
        "faster_rcnn_R50_FPN_mdconv",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        3,
    )
    assert "80 classes (+ background)" in message and "NUM_CLASSES = 3" in message
    assert (
        "roi_heads.box_predictor.cls_score.weight: checkpoint (81, 32) vs model (4, 32)" in message
    )
    assert (
        "roi_heads.box_predictor.bbox_pred.weight: checkpoint (320, 32) vs model (12, 32)"
        in message
    )


def test_refuses_mask_checkpoint_for_faster_config(exported):
    message = refuse(exported("mask_rcnn_R50_FPN_mdconv"), "faster_rcnn_R50_FPN_mdconv")
    assert "Mask R-CNN" in message and "roi_heads.mask_head.mask_fcn1.weight" in message


# ------------------------------------------------------------------------------------------------
# torchvision ImageNet initialisation.


def test_torchvision_resnet50_initialises_the_dcnv2_backbone(
    full_mask_mdconv, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet50().state_dict()  # no download: random weights, real keys
    assert guess_format(imagenet) == "torchvision"
    converted, report = convert_torchvision_to_d2(imagenet)
    assert report.counts == {"backbone": 265}
    assert {k for k in report.dropped if not k.endswith("num_batches_tracked")} == {
        "fc.weight",
        "fc.bias",
    }
    assert len(report.dropped) == 2 + 53
    model_state = full_mask_mdconv.state_dict()
    missing = check_checkpoint_fits(converted, model_state, scope="backbone")
    assert len(missing["offset convs"]) == 26
    resnet_keys = {k for k in model_state if k.startswith("backbone.bottom_up.")}
    assert resnet_keys - set(converted) == set(missing["offset convs"])

    # The same through the checkpointer, from torchvision:// (served from iopath's cache).
    cache = tmp_path / "cache"
    url_path = TorchvisionHandler.url("resnet50").split("://", 1)[1].split("/", 1)[1]
    assert url_path == "models/resnet50-0676ba61.pth"
    os.makedirs(cache / "models")
    save(imagenet, cache / url_path)
    offsets_before = {k: model_state[k].clone() for k in missing["offset convs"]}
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    checkpointer = DCNv2Checkpointer(full_mask_mdconv)
    checkpointer.load("torchvision://resnet50")
    state = full_mask_mdconv.state_dict()
    for k, v in converted.items():
        assert torch.equal(state[k], v), k
    for k, v in offsets_before.items():
        assert torch.equal(state[k], v), k
    assert checkpointer.report.not_loaded == {
        "offset convs": 26,
        "fpn": 16,
        "rpn": 6,
        "box head": 8,
        "mask head": 12,
    }
    assert "zero-initialised" in checkpointer.report.summary()


def test_torchvision_checkpoint_of_wrong_depth_is_refused(tmp_path):
    path = save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointMismatchError, match="shapes differ"):
        DCNv2Checkpointer(build_small("faster_rcnn_R50_FPN_mdconv", 5)).load(path)


# ------------------------------------------------------------------------------------------------
# URLs, Detectron2 files, the offline converter.


def test_openmmlab_url_is_read_through_the_iopath_cache(exported, tmp_path, monkeypatch):
    url = (
        "https://download.openmmlab.com/mmdetection/v2.0/dcn/faster_rcnn_r50_fpn_mdpool_1x_coco/"
        "faster_rcnn_r50_fpn_mdpool_1x_coco_20200307-c0df27ff.pth"
    )
    cached = tmp_path / url.split("://", 1)[1].split("/", 1)[1]
    os.makedirs(cached.parent)
    with open(exported("faster_rcnn_R50_FPN_mdpool"), "rb") as src, open(cached, "wb") as dst:
        dst.write(src.read())
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    model = build_small("faster_rcnn_R50_FPN_mdpool", 6)
    checkpointer = DCNv2Checkpointer(model)
    checkpointer.load(url)
    assert checkpointer.report.counts["mdpool"] == 40


def test_detectron2_checkpoint_loads_as_usual(tmp_path):
    source = build_small("mask_rcnn_R50_FPN_mdconv", 7)
    path = save({"model": source.state_dict(), "iteration": 3}, tmp_path / "model_final.pth")
    target = build_small("mask_rcnn_R50_FPN_mdconv", 8)
    checkpointer = DCNv2Checkpointer(target)
    extra = checkpointer.load(path)
    assert checkpointer.report is None and extra == {"iteration": 3}
    assert_state_equal(source.state_dict(), target)


def test_from_checkpointer_keeps_model_save_dir_and_checkpointables(tmp_path):
    model = build_small("faster_rcnn_R50_FPN_mdpool", 11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    original = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    converted = AtomicCheckpointer.from_checkpointer(original)
    assert converted.model is model and converted.save_dir == str(tmp_path)
    assert converted.checkpointables == {"optimizer": optimizer}
    assert converted.save_to_disk == original.save_to_disk


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_mmdet_to_d2", REPO / "tools" / "convert_mmdet_to_d2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_converter(exported, tmp_path, capsys):
    tool = load_tool()
    name = "faster_rcnn_R50_FPN_mdpool"
    out = str(tmp_path / "model.pkl")
    tool.main([exported(name), out, "--config-file", config_path(name), *OPTS])
    printed = capsys.readouterr().out
    assert "mdpool 40" in printed and "fits the model" in printed
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["__author__"] == "projects_dcnv2" and data["matching_heuristics"] is False
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())

    reference = build_small(name, 1)  # the exported model
    for checkpointer_class in (DetectionCheckpointer, DCNv2Checkpointer):
        target = build_small(name, 9)
        checkpointer_class(target).load(out)
        assert_state_equal(reference.state_dict(), target)
    # With a config it does not fit, nothing is written.
    bad = str(tmp_path / "bad.pkl")
    with pytest.raises(CheckpointMismatchError, match="deformable groups differ"):
        tool.main(
            [
                exported("faster_rcnn_R50_FPN_mdconv_dg4"),
                bad,
                "--config-file",
                config_path("faster_rcnn_R50_FPN_mdconv"),
                *OPTS,
            ]
        )
    assert not os.path.exists(bad)


def test_untrusted_pickle_needs_the_offline_converter(exported, tmp_path):
    checkpoint = torch.load(exported("faster_rcnn_R50_FPN_mdconv"), weights_only=True)
    checkpoint["meta"]["seed"] = np.int64(0)  # not allowed by torch.load(weights_only=True)
    path = save(checkpoint, tmp_path / "numpy_meta.pth")
    with pytest.raises(RuntimeError, match="--trust-pickle"):
        DCNv2Checkpointer(build_small("faster_rcnn_R50_FPN_mdconv", 10)).load(path)
    out = str(tmp_path / "numpy_meta.pkl")
    load_tool().main([path, out, "--trust-pickle"])
    target = build_small("faster_rcnn_R50_FPN_mdconv", 10)
    DCNv2Checkpointer(target).load(out)
    assert_state_equal(build_small("faster_rcnn_R50_FPN_mdconv", 1).state_dict(), target)
