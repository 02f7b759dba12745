"""R-CNN feature mimicking (projects_dcnv2/modeling/mimic.py): the losses, the RoI sampling, the
crops, where the gradients go, inference without the branch, and checkpoints.

The losses are checked against numbers computed by hand; the crops against ``grid_sample`` (the
branch uses ``roi_align``); the model-level tests use the paper-complete configs with narrow
widths (every layer kept) on 64-pixel images.
"""

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

import projects_dcnv2  # noqa: F401  (registers MimicRCNN / MimicROIHeads)
from projects_dcnv2 import load_dcnv2_config
from projects_dcnv2.checkpoint import DCNv2Checkpointer, convert_d2_to_mmdet
from projects_dcnv2.modeling import mimic
from projects_dcnv2.modeling.mimic import (
    RCNNMimicBranch,
    crop_rois,
    mimic_cosine_loss,
    sample_foreground_proposals,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SIZE = 64
# Narrow widths (every key name kept), few proposals, a CPU-sized branch.
SMALL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.FPN.OUT_CHANNELS", 16,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "MODEL.ROI_BOX_HEAD.MDPOOL.DEFORM_FC_DIM", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
    "MODEL.ROI_HEADS.NUM_CLASSES", 4,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 50, "MODEL.RPN.POST_NMS_TOPK_TEST", 10,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "INPUT.MIN_SIZE_TEST", SIZE, "INPUT.MAX_SIZE_TEST", SIZE,
]  # fmt: skip
BRANCH = ["MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE", 2, "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE", 32]


def build(name, *opts, seed=0):
    cfg = load_dcnv2_config(str(CONFIG_DIR / f"{name}.yaml"), SMALL + BRANCH + list(opts))
    torch.manual_seed(seed)
    return build_model(cfg)


def perturb(model, seed=0):
    """Add noise to every parameter, so the zero-initialised ones (offset convs, the last mdpool
    fcs) pass gradients on to the layers before them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch(with_objects=(True, True)):
    g = torch.Generator().manual_seed(1)
    boxes = [[[4.0, 6, 30, 40], [30, 20, 60, 58]], [[10.0, 10, 50, 34]]]
    classes = [[0, 3], [2]]
    out = []
    for b, c, keep in zip(boxes, classes, with_objects):
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes = Boxes(torch.tensor(b if keep else [], dtype=torch.float32).view(-1, 4))
        inst.gt_classes = torch.tensor(c if keep else [], dtype=torch.int64)
        inst.gt_masks = _box_masks(inst.gt_boxes)
        image = torch.rand(3, SIZE, SIZE, generator=g) * 255
        out.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE})
    return out


def _box_masks(boxes):
    from detectron2.structures import BitMasks

    masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tensor.round().long().tolist()):
        m[y1:y2, x1:x2] = True
    return BitMasks(masks)


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    return calls, handle


# ------------------------------------------------------------------------------------------------
# The losses, on hand-built features.


def test_cosine_loss_is_the_sum_of_one_minus_cosines():
    a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [3, 4, 0]])
    b = torch.tensor([[2.0, 0, 0], [1, 0, 0], [4, 3, 0]])
    # cosines 1, 0 and 24/25
    assert mimic_cosine_loss(a, b).item() == pytest.approx(0 + 1 + 1 / 25, abs=1e-6)


def _proposals(classes_per_image, num_classes):
    out = []
    for classes in classes_per_image:
        n = len(classes)
        p = Instances((SIZE, SIZE))
        p.proposal_boxes = Boxes(torch.tensor([[i, i, i + 20.0, i + 24.0] for i in range(n)]))
        p.gt_classes = torch.tensor(classes, dtype=torch.int64)
        out.append(p)
    return out


def test_branch_losses_weights_and_normalisation():
    """Stub backbone / pooler / head that hand over chosen f_FRCNN and f_RCNN: the two losses are
    the weighted sums over the sampled RoIs divided by ROIS_PER_IMAGE x images."""
    num_classes, per_image = 4, 3
    # image 0: two foreground RoIs (classes 0, 2) and a background one; image 1: one (class 1)
    proposals = _proposals([[0, num_classes, 2], [num_classes, 1]], num_classes)
    f_frcnn = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [3, 4, 0, 0]])
    f_rcnn = torch.tensor([[2.0, 0, 0, 0], [1, 0, 0, 0], [4, 3, 0, 0]])
    branch = RCNNMimicBranch(
        feature_dim=4,
        num_classes=num_classes,
        rois_per_image=per_image,
        crop_size=32,
        loss_weight=0.1,
        cls_loss_weight=0.3,
    )
    with torch.no_grad():  # logits = (f_RCNN, 0)
        branch.cls_score.weight.copy_(torch.eye(5, 4))
        branch.cls_score.bias.zero_()
    images = ImageList(torch.zeros(2, 3, SIZE, SIZE), [(SIZE, SIZE)] * 2)
    losses = branch(
        images,
        [f_frcnn],
        proposals,
        backbone=lambda crops: {"p2": f_rcnn[: len(crops)]},
        in_features=["p2"],
        box_pooler=lambda feats, boxes: feats[0],
        box_head=nn.Identity(),
    )
    normaliser = per_image * 2
    assert losses["loss_mimic"].item() == pytest.approx(0.1 * 1.04 / normaliser, rel=1e-6)

    def cross_entropy(logits, label):
        return math.log(sum(math.exp(v) for v in logits)) - logits[label]

    rows = [[2.0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [4, 3, 0, 0, 0]]
    expected = sum(cross_entropy(r, c) for r, c in zip(rows, [0, 2, 1]))
    assert losses["loss_mimic_cls"].item() == pytest.approx(0.3 * expected / normaliser, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Sampling.


def test_sampling_keeps_only_foreground_at_most_the_budget():
    num_classes = 4
    classes = [[4, 0, 4, 1, 2, 3, 3, 4, 0], [4, 4, 2], [4, 4]]
    proposals = _proposals(classes, num_classes)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        sampled = sample_foreground_proposals(proposals, num_classes, max_per_image=3)
        assert [len(s) for s in sampled] == [3, 1, 0]
        for s, p in zip(sampled, proposals):
            assert bool((s.gt_classes < num_classes).all())
            rows = {tuple(b) for b in s.proposal_boxes.tensor.tolist()}
            assert len(rows) == len(s)  # distinct RoIs
            assert rows <= {tuple(b) for b in p.proposal_boxes.tensor.tolist()}
        seen.add(tuple(sampled[0].proposal_boxes.tensor[:, 0].tolist()))
    assert len(seen) > 5  # a random subset, not always the first three


def test_no_foreground_gives_zero_losses_that_reach_the_classifier():
    branch = RCNNMimicBranch(feature_dim=4, num_classes=4, rois_per_image=2, crop_size=32)
    never = lambda *a, **k: pytest.fail("nothing should run without a foreground RoI")  # noqa: E731
    losses = branch(
        ImageList(torch.zeros(2, 3, SIZE, SIZE), [(SIZE, SIZE)] * 2),
        [torch.zeros(1)],
        _proposals([[4, 4], [4]], 4),
        backbone=never,
        in_features=["p2"],
        box_pooler=never,
        box_head=never,
    )
    assert losses["loss_mimic"].item() == 0 and losses["loss_mimic_cls"].item() == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in branch.parameters())


def test_model_without_foreground_keeps_every_parameter_in_the_graph():
    """An image batch without objects: every parameter still gets a gradient (as
    DistributedDataParallel needs from every rank), the mimic losses are zero."""
    model = build("mask_rcnn_R50_FPN_dcnv2_mimic").train()
    with EventStorage():
        losses = model(batch(with_objects=(False, False)))
    assert losses["loss_mimic"].item() == 0 and losses["loss_mimic_cls"].item() == 0
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ------------------------------------------------------------------------------------------------
# Crops.


def _grid_sample_crop(image, box, size):
    """Bilinear crop of one box (x1, y1, x2, y2; pixel centres at +0.5) to size x size."""
    _, h, w = image.shape
    x1, y1, x2, y2 = box
    xs = x1 + (torch.arange(size, dtype=torch.float64) + 0.5) * (x2 - x1) / size
    ys = y1 + (torch.arange(size, dtype=torch.float64) + 0.5) * (y2 - y1) / size
    gy, gx = torch.meshgrid(2 * ys / h - 1, 2 * xs / w - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].to(image.dtype)
    return F.grid_sample(image[None], grid, align_corners=False, padding_mode="border")[0]


def test_crop_equals_an_independent_bilinear_resize():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 40, 52, generator=g, dtype=torch.float64)
    boxes = [
        Boxes(torch.tensor([[3.3, 5.1, 21.7, 30.2], [0.0, 0.0, 52.0, 40.0]], dtype=torch.float64)),
        Boxes(torch.tensor([[10.0, 2.5, 12.0, 4.0]], dtype=torch.float64)),  # tiny: upsampled
    ]
    crops = crop_rois(images, boxes, 224)
    assert crops.shape == (3, 3, 224, 224)
    expected = [(0, boxes[0].tensor[0]), (0, boxes[0].tensor[1]), (1, boxes[1].tensor[0])]
    for crop, (i, box) in zip(crops, expected):
        torch.testing.assert_close(crop, _grid_sample_crop(images[i], box.tolist(), 224))


def test_model_crops_the_normalised_image_at_the_sampled_rois(monkeypatch):
    """The crops the backbone sees are the sampled RoIs of (image - PIXEL_MEAN) / PIXEL_STD,
    resized to CROP_SIZE (the paper's 224 here)."""
    model = build("faster_rcnn_R50_FPN_dcnv2_mimic", "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE", 224)
    model.train()
    recorded = []
    original = mimic.crop_rois

    def recording_crop_rois(images, boxes, crop_size):
        recorded.append(([b.tensor.clone() for b in boxes], crop_size))
        return original(images, boxes, crop_size)

    monkeypatch.setattr(mimic, "crop_rois", recording_crop_rois)
    calls = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].clone()))
    inputs = batch()
    with EventStorage():
        model(inputs)
    handle.remove()

    assert len(calls) == 2 and len(recorded) == 1  # the images, then the crops
    boxes, size = recorded[0]
    assert size == 224 and [len(b) for b in boxes] == [2, 2]  # ROIS_PER_IMAGE
    mean, std = model.pixel_mean, model.pixel_std
    expected = [
        _grid_sample_crop((x["image"] - mean) / std, box.tolist(), 224)
        for x, image_boxes in zip(inputs, boxes)
        for box in image_boxes
    ]
    torch.testing.assert_close(calls[1], torch.stack(expected), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Gradients.


def _grads(loss, named):
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def test_gradients_of_the_two_losses():
    model = perturb(build("faster_rcnn_R50_FPN_dcnv2_mimic")).train()
    with EventStorage():
        losses = model(batch())
    named = list(model.named_parameters())
    mimic_grads = _grads(losses["loss_mimic"], named)
    cls_grads = _grads(losses["loss_mimic_cls"], named)

    def nonzero(g):
        return g is not None and bool(g.abs().sum() > 0)

    # 64-px images and 32-px crops: every RoI of both passes is pooled from P2 (level 0).
    reached = [
        n
        for n in mimic_grads
        if n.startswith(("backbone.bottom_up.", "roi_heads.box_head."))
        or n.startswith("roi_heads.box_pooler.level_poolers.0.")
    ]
    assert sum(".conv2_offset." in n for n in reached) == 13 * 2
    assert len([n for n in reached if "level_poolers" in n]) == 5 * 2  # offset_fc 3 + mask_fc 2
    assert [n for n in reached if not nonzero(mimic_grads[n])] == []
    classifier = [n for n in mimic_grads if n.startswith("roi_heads.mimic.")]
    assert classifier == ["roi_heads.mimic.cls_score.weight", "roi_heads.mimic.cls_score.bias"]
    # The R-CNN classifier learns from loss_mimic_cls only; the detector's cls_score from neither.
    assert all(mimic_grads[n] is None for n in classifier)
    assert all(nonzero(cls_grads[n]) for n in classifier)
    for grads in (mimic_grads, cls_grads):
        assert grads["roi_heads.box_predictor.cls_score.weight"] is None


# ------------------------------------------------------------------------------------------------
# Inference and the training log.


def test_losses_are_named_for_the_log():
    model = build("mask_rcnn_R50_FPN_dcnv2_mimic").train()
    with EventStorage():
        losses = model(batch())
    assert {"loss_mimic", "loss_mimic_cls", "loss_cls", "loss_mask"} <= set(losses)
    assert losses["loss_mimic"].item() > 0 and losses["loss_mimic_cls"].item() > 0


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_inference_drops_the_branch(kind):
    mimic_model = perturb(build(f"{kind}_rcnn_R50_FPN_dcnv2_mimic")).eval()
    plain = build(f"{kind}_rcnn_R50_FPN_dcnv2", seed=1).eval()
    state = {k: v for k, v in mimic_model.state_dict().items() if ".mimic." not in k}
    plain.load_state_dict(state)  # strict: the plain model is the mimic one minus its classifier
    calls, handle = count_calls(mimic_model.backbone)
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch()]
    with torch.no_grad():
        got = mimic_model(inputs)
        expected = plain(inputs)
    handle.remove()
    assert len(calls) == 1  # the batch, no crops
    for a, b in zip(got, expected):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert a.get_fields().keys() == b.get_fields().keys()
        for field in a.get_fields():
            va, vb = a.get(field), b.get(field)
            va, vb = (va.tensor, vb.tensor) if isinstance(va, Boxes) else (va, vb)
            assert torch.equal(va, vb), field


def test_training_runs_the_backbone_on_the_crops():
    model = build("faster_rcnn_R50_FPN_dcnv2_mimic").train()
    calls, handle = count_calls(model.backbone)
    with EventStorage():
        model(batch())
    handle.remove()
    assert calls == [(2, 3, SIZE, SIZE), (4, 3, 32, 32)]  # 2 images, then 2 x 2 crops


def test_configuration_errors():
    with pytest.raises(ValueError, match="META_ARCHITECTURE 'MimicRCNN'.*'GeneralizedRCNN'"):
        build("faster_rcnn_R50_FPN_dcnv2_mimic", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    with pytest.raises(ValueError, match="ROI_HEADS.NAME.*'StandardROIHeads'"):
        build("faster_rcnn_R50_FPN_dcnv2_mimic", "MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    with pytest.raises(ValueError, match=r"CROP_SIZE must be a multiple of .* \(32\), got 48"):
        build("faster_rcnn_R50_FPN_dcnv2_mimic", "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE", 48)
    with pytest.raises(ValueError, match="rois_per_image must be >= 1, got 0"):
        build("faster_rcnn_R50_FPN_dcnv2_mimic", "MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE", 0)


def test_paper_complete_configs():
    for kind in ("faster", "mask"):
        for suffix in ("", "_mimic"):
            cfg = load_dcnv2_config(str(CONFIG_DIR / f"{kind}_rcnn_R50_FPN_dcnv2{suffix}.yaml"))
            assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, True, True, True]
            assert cfg.MODEL.ROI_HEADS.NAME == "MDPoolROIHeads"
            assert cfg.MODEL.MASK_ON == (kind == "mask")
            m = cfg.MODEL.ROI_BOX_HEAD.MIMIC
            assert m.ENABLED == bool(suffix)
            if suffix:  # the paper's settings
                assert (m.ROIS_PER_IMAGE, m.CROP_SIZE, m.LOSS_WEIGHT, m.CLS_LOSS_WEIGHT) == (
                    32,
                    224,
                    0.1,
                    0.1,
                )
    quick = CONFIG_DIR / "quick_schedules"
    a = load_dcnv2_config(str(quick / "mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml"))
    b = load_dcnv2_config(str(quick / "mask_rcnn_R50_FPN_dcnv2_shapes.yaml"))
    assert a.SEED == b.SEED and a.SOLVER == b.SOLVER and a.INPUT == b.INPUT  # twins
    assert a.MODEL.ROI_BOX_HEAD.MIMIC.ENABLED and not b.MODEL.ROI_BOX_HEAD.MIMIC.ENABLED


# ------------------------------------------------------------------------------------------------
# Checkpoints, through the public checkpointer.


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log_records():
    """Messages of every logger (Detectron2 may have turned propagation off on some)."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("fvcore"), logging.getLogger("detectron2")]
    loggers.append(logging.getLogger("projects_dcnv2"))
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler.messages
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_mimic_checkpoint_loads_into_the_plain_config(tmp_path, log_records):
    trained = perturb(build("mask_rcnn_R50_FPN_dcnv2_mimic"))
    DCNv2Checkpointer(trained, save_dir=str(tmp_path)).save("model_mimic")
    saved = torch.load(tmp_path / "model_mimic.pth", weights_only=False)["model"]
    assert "roi_heads.mimic.cls_score.weight" in saved  # the classifier is saved

    plain = build("mask_rcnn_R50_FPN_dcnv2", seed=3)
    log_records.clear()
    DCNv2Checkpointer(plain).load(str(tmp_path / "model_mimic.pth"))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, saved[k]), k
    text = "\n".join(log_records)
    classifier = "roi_heads.mimic.cls_score.bias, roi_heads.mimic.cls_score.weight"
    assert f"Skipped, as expected: {classifier}" in text  # reported as expected-unused...
    assert "not used by the model" not in text  # ...not as fvcore's unexpected keys


@pytest.mark.parametrize("target", ["faster_rcnn_R50_FPN_dcnv2", "faster_rcnn_R50_FPN_dcnv2_mimic"])
def test_mmdet_mdconv_weights_load_into_the_paper_complete_configs(tmp_path, target):
    source = perturb(build("faster_rcnn_R50_FPN_mdconv"))
    path = tmp_path / "mmdet_mdconv.pth"
    torch.save(convert_d2_to_mmdet(source.state_dict()), path)

    model = build(target, seed=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = DCNv2Checkpointer(model)
    checkpointer.load(str(path))
    loaded = source.state_dict()
    for k, v in model.state_dict().items():
        if k in loaded:
            assert torch.equal(v, loaded[k]), k
        else:  # newly initialised: the mdpool FCs (and the mimic classifier)
            assert k.startswith(("roi_heads.box_pooler.", "roi_heads.mimic.")), k
            assert torch.equal(v, fresh[k]), k
    not_loaded = checkpointer.report.not_loaded
    assert not_loaded["mdpool"] == 4 * 5 * 2  # 4 levels x (3 offset_fc + 2 mask_fc) x (w, b)
    assert sum(not_loaded.values()) == 40 + (2 if "mimic" in target else 0)
    assert "left at the model's initialisation: mdpool 40" in checkpointer.report.summary()


# ------------------------------------------------------------------------------------------------
# train_net.py with the quick mimic config: the two losses reach the log and metrics.json.


def test_train_net_logs_the_mimic_losses(tmp_path):
    from test_train_net import TINY, run_train_net

    out = tmp_path / "output"
    config = "configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml"
    args = [*TINY, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    returncode, output = run_train_net(tmp_path / "datasets", *args, config=config)
    assert returncode == 0, output[-5000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert {"loss_mimic", "loss_mimic_cls"} <= set(records[-1])
    assert records[-1]["loss_mimic"] > 0 and records[-1]["loss_mimic_cls"] > 0
    log = (out / "log.txt").read_text()
    assert re.search(r"loss_mimic: [0-9.e-]+ +loss_mimic_cls: [0-9.e-]+", log), log[-3000:]
