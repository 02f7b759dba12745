"""R-CNN feature mimicking (projects_dcnv2/modeling/mimic.py): the losses, the RoI sampling, the
crops, the pairing of the two features, where the gradients go, inference without the branch, and
checkpoints.

The losses are checked against numbers computed by hand; the crops against ``grid_sample`` (the
branch uses ``roi_align``). The paper-geometry tests run one training step of the paper-complete
config (narrow widths, every layer kept) with the paper's 224-px crops on 128-px images and fixed
proposals of known IoU: there the detector's RoIs pool from P2 and P3 and the crops from P4 alone,
so each side of the branch can be told apart.
"""

import json
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import BitMasks, Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

import projects_dcnv2  # noqa: F401  (registers MimicRCNN / MimicROIHeads)
from projects_dcnv2.checkpoint import DCNv2Checkpointer
from projects_dcnv2.modeling import mimic
from projects_dcnv2.modeling.mimic import (
    GT_BOX_FIELD,
    RCNNMimicBranch,
    crop_rois,
    mimic_cosine_loss,
    sample_foreground_proposals,
)

from builders import NARROW, SMALL, make_cfg, make_model
from mmdet_checkpoints import export_mmdet

SIZE = 64
# Narrow widths, 4 classes, every backbone stage trained; a CPU-sized branch (2 RoIs x 32 px).
OPTS = [*SMALL, *NARROW, "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.ROI_HEADS.NUM_CLASSES", "4"]
BRANCH = [
    "MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE",
    "2",
    "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE",
    "32",
]


def build(name, *opts, seed=0):
    return make_model(name, *OPTS, *BRANCH, *opts, seed=seed)[1]


def perturb(model, seed=0):
    """Add noise to every parameter, so the zero-initialised ones (offset convs, the last mdpool
    fcs) pass gradients on to the layers before them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _box_masks(boxes, size):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tensor.round().long().tolist()):
        m[y1:y2, x1:x2] = True
    return BitMasks(masks)


def _inputs(boxes, classes, size, proposals=None):
    """Model inputs: random images, ground truth (with box-shaped masks), optional proposals."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (b, c) in enumerate(zip(boxes, classes)):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(b, dtype=torch.float32).view(-1, 4))
        inst.gt_classes = torch.tensor(c, dtype=torch.int64)
        inst.gt_masks = _box_masks(inst.gt_boxes, size)
        image = torch.rand(3, size, size, generator=g) * 255
        out.append({"image": image, "instances": inst, "height": size, "width": size})
        if proposals is not None:
            p = Instances((size, size), proposal_boxes=Boxes(torch.tensor(proposals[i])))
            p.objectness_logits = torch.zeros(len(p))
            out[-1]["proposals"] = p
    return out


def batch(with_objects=(True, True)):
    boxes = [[[4.0, 6, 30, 40], [30, 20, 60, 58]], [[10.0, 10, 50, 34]]]
    classes = [[0, 3], [2]]
    keep = list(with_objects)
    return _inputs(
        [b if k else [] for b, k in zip(boxes, keep)],
        [c if k else [] for c, k in zip(classes, keep)],
        SIZE,
    )


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
    asked = []  # the boxes the pooler is asked for, per call

    def pooler(feats, boxes):
        asked.append([b.tensor.tolist() for b in boxes])
        return feats[0]

    losses = branch(
        images,
        [f_frcnn],
        proposals,
        backbone=lambda crops: {"p2": f_rcnn[: len(crops)]},
        in_features=["p2"],
        box_pooler=pooler,
        box_head=nn.Identity(),
    )
    # The image side pools the sampled RoIs; the crop side one whole crop (0, 0, S, S) per RoI.
    boxes = [p.proposal_boxes.tensor.tolist() for p in proposals]
    image_side = [[boxes[0][0], boxes[0][2]], [boxes[1][1]]]
    crop_side = [[[0.0, 0.0, 32.0, 32.0]]] * 3
    assert len(asked) == 2 and image_side in asked and crop_side in asked
    normaliser = per_image * 2
    assert losses["loss_mimic"].item() == pytest.approx(0.1 * 1.04 / normaliser, rel=1e-6)

    def cross_entropy(logits, label):
        return math.log(sum(math.exp(v) for v in logits)) - logits[label]

    rows = [[2.0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [4, 3, 0, 0, 0]]
    expected = sum(cross_entropy(r, c) for r, c in zip(rows, [0, 2, 1]))
    assert losses["loss_mimic_cls"].item() == pytest.approx(0.3 * expected / normaliser, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Sampling.


def test_sampling_keeps_only_foreground_proposals_at_most_the_budget():
    num_classes = 4
    classes = [[4, 0, 4, 1, 2, 3, 3, 4, 0], [4, 4, 2, 1], [4, 4]]
    proposals = _proposals(classes, num_classes)
    # Image 1's class-1 entry is an appended ground-truth box: never sampled.
    for p, gt in zip(proposals, [[], [3], []]):
        p.set(GT_BOX_FIELD, torch.zeros(len(p), dtype=torch.bool))
        p.get(GT_BOX_FIELD)[gt] = True
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        sampled = sample_foreground_proposals(proposals, num_classes, max_per_image=3)
        assert [len(s) for s in sampled] == [3, 1, 0]
        assert sampled[1].gt_classes.tolist() == [2]
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


# ------------------------------------------------------------------------------------------------
# The paper's geometry: 224-px crops, pooled from P4. 128-px images with fixed proposals of known
# IoU (Detectron2's "PrecomputedProposals" in place of the RPN) and a RoI budget above the number of
# foreground proposals, so that the branch samples all of them.

GEO, CROP, BUDGET = 128, 224, 8
GEO_GT_BOXES = [[[8.0, 8, 124, 120]], [[10.0, 14, 60, 70], [70, 60, 118, 110]]]
GEO_GT_CLASSES = [[1], [3, 2]]
GEO_PROPOSALS = [  # max IoU with a ground-truth box; FPN level P2 unless said
    [
        [2.0, 8, 118, 120],  # 0.90, P3
        [8.0, 3, 124, 115],  # 0.91, P3
        [13.8, 13.6, 118.2, 114.4],  # 0.81
        [24.24, 23.68, 107.76, 104.32],  # 0.52
        [28.3, 27.6, 103.7, 100.4],  # 0.42: foreground at an IoU threshold of 0.3, not at 0.5
        [37.0, 36, 95, 92],  # 0.25
        [100.0, 100, 128, 128],  # 0.04
        [0.0, 0, 30, 30],  # 0.04
    ],
    [
        [22.5, 14, 72.5, 70],  # 0.60
        [15.0, 19.6, 55, 64.4],  # 0.64
        [65.2, 55, 122.8, 115],  # 0.69
        [10.0, 38, 60, 94],  # 0.40
        [50.0, 60, 98, 110],  # 0.41
        [0.0, 100, 30, 128],  # 0
        [90.0, 0, 128, 30],  # 0
    ],
]
FIXED_PROPOSALS = [
    "MODEL.LOAD_PROPOSALS", "True", "MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals",
]  # fmt: skip
GEO_OPTS = [
    *FIXED_PROPOSALS,
    "MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE", str(BUDGET),
    "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE", str(CROP),
]  # fmt: skip


def geometry_inputs():
    return _inputs(GEO_GT_BOXES, GEO_GT_CLASSES, GEO, GEO_PROPOSALS)


def fpn_level(boxes):
    """FPN level (2 = P2) of each (x1, y1, x2, y2) row: floor(4 + log2(sqrt(area) / 224)) clamped
    to [2, 5] (Lin et al. 2017, eq. 1, with Detectron2's canonical 224 px at level 4)."""
    side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    return torch.floor(4 + torch.log2(side / 224 + 1e-8)).clamp(2, 5).long()


@pytest.fixture(scope="module")
def paper_geometry():
    """One training step of the paper-complete Faster R-CNN config with mimicking at 224 px.
    Records the backbone's inputs and outputs, every box-pooler call (feature-map shapes, boxes,
    and the RoIs each level's mdpool received), the box head's outputs, and the boxes the branch
    cropped; the losses keep their graph."""
    # float64, so that the references below, computed another way, agree to 1e-9: in float32 the
    # deformable ResNet's rounding reaches 0.1% of the features.
    model = perturb(build("faster_rcnn_R50_FPN_dcnv2_mimic", *GEO_OPTS)).double().train()
    rec = SimpleNamespace(backbone=[], pooler=[], head=[], sampled=None)
    pooler = model.roi_heads.box_pooler

    def on_pooler(module, args):
        maps, boxes = args
        rec.pooler.append({"maps": [m.shape for m in maps], "boxes": boxes, "levels": {}})

    def on_level(level):
        return lambda module, args: rec.pooler[-1]["levels"].update({level: args[1].clone()})

    def recording_crop_rois(images, boxes, crop_size):
        rec.sampled = [b.tensor.clone() for b in boxes]
        return original(images, boxes, crop_size)

    original = mimic.crop_rois
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: rec.backbone.append((i[0], o))),
        pooler.register_forward_pre_hook(on_pooler),
        *[lp.register_forward_pre_hook(on_level(i)) for i, lp in enumerate(pooler.level_poolers)],
        model.roi_heads.box_head.register_forward_hook(lambda m, i, o: rec.head.append(o)),
    ]
    inputs = geometry_inputs()
    try:
        with pytest.MonkeyPatch.context() as mp, EventStorage():
            mp.setattr(mimic, "crop_rois", recording_crop_rois)
            losses = model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return SimpleNamespace(model=model, inputs=inputs, losses=losses, **vars(rec))


def _rows(boxes):
    """Per-image (R, 4) tensors -> set of (image, x1, y1, x2, y2)."""
    return {(i, *b) for i, t in enumerate(boxes) for b in t.tolist()}


def test_sampled_rois_are_the_foreground_proposals_not_the_ground_truth(paper_geometry):
    """Every proposal with IoU >= 0.5 with a ground-truth box is sampled (the budget exceeds their
    number), and nothing else: not the proposals of IoU 0.4, and not the ground-truth boxes that
    ROI_HEADS.PROPOSAL_APPEND_GT appends to the box head's proposals (the paper samples RPN
    proposals)."""
    g = paper_geometry
    gt = [torch.tensor(b) for b in GEO_GT_BOXES]
    proposals = [torch.tensor(p) for p in GEO_PROPOSALS]
    ious = [pairwise_iou(Boxes(t), Boxes(p)).max(0).values for t, p in zip(gt, proposals)]
    assert all(bool(((iou >= 0.3) & (iou < 0.5)).any()) for iou in ious)  # 0.3 differs from 0.5
    # The ground-truth boxes were candidates: the detector's own pass pooled them...
    assert _rows(gt) <= _rows(b.tensor for b in g.pooler[0]["boxes"])
    # ...the branch sampled exactly the foreground proposals.
    assert _rows(g.sampled) == _rows(p[iou >= 0.5] for p, iou in zip(proposals, ious))
    assert [len(s) for s in g.sampled] == [4, 3]


def test_crops_pool_whole_from_p4_and_rois_from_their_own_levels(paper_geometry):
    """The backbone sees the images, then K 224-px crops. The branch asks the box pooler for the
    sampled RoIs on the images' maps, which reach the mdpool of their own levels (P2, P3 here),
    and for one whole-crop box (0, 0, 224, 224) per crop on the crops' maps, which all reach
    P4's mdpool (a 14 x 14 map, the paper's size) and no other level's."""
    g = paper_geometry
    k = sum(len(s) for s in g.sampled)
    assert [tuple(x.shape) for x, _ in g.backbone] == [(2, 3, GEO, GEO), (k, 3, CROP, CROP)]
    # pooler calls: the detector's own pass, then the branch's image side and its crop side
    assert len(g.pooler) == 3
    image_side = [c for c in g.pooler[1:] if c["maps"][0][0] == 2]
    crop_side = [c for c in g.pooler[1:] if c["maps"][0][0] == k]
    assert len(image_side) == 1 and len(crop_side) == 1
    image_side, crop_side = image_side[0], crop_side[0]

    whole = torch.tensor([[0.0, 0, CROP, CROP]])
    assert fpn_level(whole).item() == 4
    assert len(crop_side["boxes"]) == k
    assert all(torch.equal(b.tensor, whole) for b in crop_side["boxes"])
    assert tuple(crop_side["maps"][2][-2:]) == (CROP // 16, CROP // 16) == (14, 14)
    p4 = torch.cat([torch.arange(k, dtype=torch.float32)[:, None], whole.expand(k, 4)], dim=1)
    assert torch.equal(crop_side["levels"][2], p4)
    assert [len(crop_side["levels"][i]) for i in (0, 1, 3)] == [0, 0, 0]

    assert [b.tensor.tolist() for b in image_side["boxes"]] == [s.tolist() for s in g.sampled]
    rois = torch.cat(
        [torch.cat([s.new_full((len(s), 1), i), s], 1) for i, s in enumerate(g.sampled)]
    )
    levels = fpn_level(rois[:, 1:]) - 2
    assert sorted(set(levels.tolist())) == [0, 1]  # P2 and P3; no image RoI reaches P4
    for i in range(4):
        assert torch.equal(image_side["levels"][i], rois[levels == i]), f"level index {i}"


def test_each_crop_feature_is_paired_with_the_box_head_feature_of_its_roi(paper_geometry):
    """Both losses recomputed from independent per-RoI references: f_RCNN(b) from b's crop alone
    (``grid_sample`` on the normalised image, the backbone, the whole-crop box, the box head),
    f_FRCNN(b) the row of b in the box head's output in the detector's own pass, and class(b)
    that of the ground-truth box b overlaps most."""
    g = paper_geometry
    model, heads = g.model, g.model.roi_heads
    own_rois = torch.cat(
        [
            torch.cat([b.tensor.new_full((len(b), 1), i), b.tensor], 1)
            for i, b in enumerate(g.pooler[0]["boxes"])
        ]
    )
    own_features = g.head[0].detach()
    crops, f_frcnn, classes = [], [], []
    with torch.no_grad():
        for i, (x, sampled) in enumerate(zip(g.inputs, g.sampled)):
            image = (x["image"].double() - model.pixel_mean) / model.pixel_std
            best = pairwise_iou(x["instances"].gt_boxes, Boxes(sampled)).argmax(0)
            for box, j in zip(sampled, best):
                crops.append(_grid_sample_crop(image, box.tolist(), CROP))
                row = ((own_rois[:, 0] == i) & (own_rois[:, 1:] == box).all(1)).nonzero()
                assert len(row) == 1
                f_frcnn.append(own_features[row[0, 0]])
                classes.append(x["instances"].gt_classes[j])
        # Row k of each batch is computed from crop k alone (frozen batch norm).
        crops, f_frcnn, classes = torch.stack(crops), torch.stack(f_frcnn), torch.stack(classes)
        maps = model.backbone(crops)
        whole = [Boxes(torch.tensor([[0.0, 0, CROP, CROP]]))] * len(crops)
        pooled = heads.box_pooler([maps[f] for f in heads.box_in_features], whole)
        f_rcnn = heads.box_head(pooled)
        logits = heads.mimic.cls_score(f_rcnn)
    torch.testing.assert_close(g.backbone[1][0], crops)

    def cosine_loss(a, b):
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        return 0.1 * (1 - cos).sum() / (BUDGET * 2)

    expected = cosine_loss(f_rcnn, f_frcnn)
    torch.testing.assert_close(g.losses["loss_mimic"].detach(), expected, rtol=1e-9, atol=0)
    # The comparison can tell a pairing off by one RoI.
    assert (cosine_loss(f_rcnn, f_frcnn.roll(1, 0)) - expected).abs() > 0.01 * expected
    expected_cls = 0.1 * F.cross_entropy(logits, classes, reduction="sum") / (BUDGET * 2)
    torch.testing.assert_close(g.losses["loss_mimic_cls"].detach(), expected_cls, rtol=1e-9, atol=0)


def test_gradients_of_the_crop_path(paper_geometry):
    """``loss_mimic_cls`` comes through the crops alone: it reaches the backbone (offset convs
    included), P4's mdpool, the box head and the branch's classifier, but neither the images'
    feature maps nor the mdpool of the levels the image RoIs pool from. ``loss_mimic`` reaches
    both sides: P4's mdpool through the crops (no image RoI pools there), P2's and P3's through
    the image RoIs. The two classifiers are not shared (the paper shares every weight but them)."""
    g = paper_geometry
    named = dict(g.model.named_parameters())
    image_maps = list(g.backbone[0][1].values())  # p2 ... p6

    def grads(loss, names):
        """Gradients of ``loss`` for the parameters ``names`` and the images' maps (autograd
        runs only the part of the graph that leads to them)."""
        tensors = [named[n] for n in names] + image_maps
        out = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        return dict(zip(names, out)), out[len(names) :]

    def reached(grad):
        return grad is not None and bool(grad.abs().sum() > 0)

    def level(i):
        return [n for n in named if n.startswith(f"roi_heads.box_pooler.level_poolers.{i}.")]

    classifier = ["roi_heads.mimic.cls_score.weight", "roi_heads.mimic.cls_score.bias"]
    predictor = [n for n in named if n.startswith("roi_heads.box_predictor.")]
    box_head = [n for n in named if n.startswith("roi_heads.box_head.")]
    backbone = [n for n in named if n.startswith("backbone.bottom_up.")]
    assert sum(".conv2_offset." in n for n in backbone) == 13 * 2 and len(level(2)) == 5 * 2
    others = level(0) + level(1) + level(3) + predictor

    crop_path = backbone + level(2) + box_head + classifier
    cls_grads, cls_maps = grads(g.losses["loss_mimic_cls"], crop_path + others)
    assert [n for n in crop_path if not reached(cls_grads[n])] == []
    assert [n for n in others if reached(cls_grads[n])] == []
    assert not any(reached(m) for m in cls_maps)

    heads = level(0) + level(1) + level(2) + level(3) + box_head + classifier + predictor
    mimic_grads, mimic_maps = grads(g.losses["loss_mimic"], heads)
    assert [
        n for n in level(0) + level(1) + level(2) + box_head if not reached(mimic_grads[n])
    ] == []
    assert [n for n in level(3) + classifier + predictor if reached(mimic_grads[n])] == []
    assert all(reached(m) for m in mimic_maps[:2])  # P2, P3 of the images, where the RoIs pool

    detector_grads, _ = grads(g.losses["loss_cls"], classifier + predictor)
    assert reached(detector_grads["roi_heads.box_predictor.cls_score.weight"])
    assert [n for n in classifier if reached(detector_grads[n])] == []


# ------------------------------------------------------------------------------------------------
# Inference and the training log.


def test_losses_are_named_for_the_log():
    model = build("mask_rcnn_R50_FPN_dcnv2_mimic", *FIXED_PROPOSALS).train()
    with EventStorage():
        losses = model(geometry_inputs())
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
            cfg = make_cfg(f"{kind}_rcnn_R50_FPN_dcnv2{suffix}")
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
    a = make_cfg("quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml")
    b = make_cfg("quick_schedules/mask_rcnn_R50_FPN_dcnv2_shapes.yaml")
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
    torch.save(export_mmdet(source.state_dict()), path)

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
    from test_train_net import run_train_net

    out = tmp_path / "output"
    config = "configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml"
    args = [*SMALL, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    returncode, output = run_train_net(tmp_path / "datasets", *args, config=config)
    assert returncode == 0, output[-5000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert {"loss_mimic", "loss_mimic_cls"} <= set(records[-1])
    assert records[-1]["loss_mimic"] > 0 and records[-1]["loss_mimic_cls"] > 0
    log = (out / "log.txt").read_text()
    assert re.search(r"loss_mimic: [0-9.e-]+ +loss_mimic_cls: [0-9.e-]+", log), log[-3000:]
