"""Data-parallel training is exact: one SGD step with 2 processes x 1 image (Detectron2's
``launch``, GLOO on CPU, DistributedDataParallel) gives the same gradients and parameters as one
process with both images, for a DCNv2 model with deformable backbone blocks and mdpool heads.

Why the two must agree (no BatchNorm here: GroupNorm, so no statistic crosses images):

* RPN losses are sums over sampled anchors divided by ``RPN.BATCH_SIZE_PER_IMAGE x images``, a
  fixed count: the 2-image loss is the mean of the two 1-image losses.
* ROI-head losses are means over the sampled proposals of the batch. Each image contributes
  exactly ``ROI_HEADS.BATCH_SIZE_PER_IMAGE`` proposals (checked below), so these too are the mean
  of the per-image losses.
* With R-CNN feature mimicking (the ``dcnv2_mimic`` case), ``loss_mimic`` and ``loss_mimic_cls``
  are sums over the sampled foreground RoIs divided by ``MIMIC.ROIS_PER_IMAGE x images``, also a
  fixed count; each crop goes through the backbone on its own (GroupNorm), so the crops of one
  image do not depend on the other image either.
* DistributedDataParallel averages the ranks' gradients, i.e. takes the gradient of the mean of
  the ranks' losses: the same mean as above.

Detectron2 samples anchors and proposals with ``torch.randperm``, whose stream depends on how
many images a process handled before; both runs use a deterministic sampler instead (the first
positives and negatives, same counts as Detectron2), so each image gets the same samples in both;
the mimic branch's random choice of foreground RoIs is replaced the same way.

The model runs in float64 (the mdpool pooler upcasts only half precision): in float32
the batch-of-2 and batch-of-1 convolutions round differently, and with this seed one ReLU input
is exactly 0.0 in one run and 1e-7 in the other, which moves a few gradients by 2%.
"""

import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import detectron2.utils.comm as comm
from detectron2.engine import launch
from detectron2.layers import nonzero_tuple
from detectron2.modeling.proposal_generator import proposal_utils, rpn
from detectron2.modeling.roi_heads import roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from projects_dcnv2.modeling import mimic

from builders import SMALL, make_model

CONFIG = "quick_schedules/faster_rcnn_R50_FPN_mdpool_shapes.yaml"
OPTS = [
    *SMALL,
    # the mdpool quick config (GroupNorm) plus the 13 DCNv2 blocks of the mdconv one
    "MODEL.BACKBONE.NAME", "build_dcnv2_resnet_fpn_backbone",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]",
    "MODEL.RESNETS.DEFORM_MODULATED", "True",
]  # fmt: skip
MIMIC_OPTS = [
    "MODEL.META_ARCHITECTURE", "MimicRCNN",
    "MODEL.ROI_BOX_HEAD.MIMIC.ENABLED", "True",
    "MODEL.ROI_BOX_HEAD.MIMIC.ROIS_PER_IMAGE", "2",
    "MODEL.ROI_BOX_HEAD.MIMIC.CROP_SIZE", "32",
]  # fmt: skip
SIZE = 64  # both images the same size: no batch padding, which would change the anchors
LR = 1.0  # plain SGD (no momentum, no weight decay): the update is -LR x gradient


def _first_k(labels, num_samples, positive_fraction, bg_label):
    """Detectron2's ``subsample_labels`` with the first candidates instead of random ones."""
    positive = nonzero_tuple((labels != -1) & (labels != bg_label))[0]
    negative = nonzero_tuple(labels == bg_label)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    return positive[:num_pos], negative[:num_neg]


def _first_k_full(labels, num_samples, positive_fraction, bg_label):
    pos, neg = _first_k(labels, num_samples, positive_fraction, bg_label)
    if len(pos) + len(neg) != num_samples:  # the ROI-head normalisation argument needs this
        raise RuntimeError(f"an image has {len(pos) + len(neg)} proposals, not {num_samples}")
    return pos, neg


def _first_foreground(gt_classes, num_classes, max_num):
    """The mimic branch's ``subsample_foreground`` with the first foreground RoIs."""
    return nonzero_tuple((gt_classes >= 0) & (gt_classes < num_classes))[0][:max_num]


_batched_nms = proposal_utils.batched_nms


def _nms_float64(boxes, scores, idxs, iou_threshold):
    """Detectron2's batched_nms casts boxes (not scores) to float32."""
    return _batched_nms(boxes, scores.float(), idxs, iou_threshold)


# (module, attribute, replacement): set for good in the workers, by monkeypatch in this process.
PATCHES = [
    (rpn, "subsample_labels", _first_k),
    (roi_heads, "subsample_labels", _first_k_full),
    (proposal_utils, "batched_nms", _nms_float64),
    (mimic, "subsample_foreground", _first_foreground),
]


def _build(extra_opts):
    """The model in float64; the same initial weights in every process."""
    return make_model(CONFIG, *OPTS, *extra_opts)[1].double().train()


def _images():
    g = torch.Generator().manual_seed(1)
    boxes = [[[4.0, 6, 30, 40], [30, 20, 60, 58]], [[10.0, 10, 50, 34]]]
    classes = [[0, 3], [2]]
    batch = []
    for b, c in zip(boxes, classes):
        inst = Instances(
            (SIZE, SIZE),
            gt_boxes=Boxes(torch.tensor(b, dtype=torch.float64)),
            gt_classes=torch.tensor(c),
        )
        image = torch.rand(3, SIZE, SIZE, generator=g, dtype=torch.float64) * 255
        batch.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE})
    return batch


def _sgd_step(model, images):
    """One step; returns {name: gradient} and {name: parameter after the step}."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    with EventStorage():
        losses = model(images)
    sum(losses.values()).backward()
    optimizer.step()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    return grads, {k: p.detach().clone() for k, p in module.named_parameters()}


def _worker(init_path, out_dir, extra_opts):
    torch.set_num_threads(1)
    for module, name, value in PATCHES:
        setattr(module, name, value)
    model = _build(extra_opts)
    model.load_state_dict(torch.load(init_path))
    # Detectron2's create_ddp_model passes device_ids, which CPU modules reject.
    ddp = DistributedDataParallel(model)
    rank = comm.get_rank()
    result = _sgd_step(ddp, [_images()[rank]])
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pth"))


def _relative_error(actual, expected):
    scale = expected.abs().max()
    if scale == 0:
        return actual.abs().max().item()
    return ((actual - expected).abs().max() / scale).item()


@pytest.mark.parametrize("extra_opts", [[], MIMIC_OPTS], ids=["dcnv2", "dcnv2_mimic"])
def test_two_ranks_one_image_each_equal_one_rank_two_images(tmp_path, monkeypatch, extra_opts):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned workers
    for module, name, value in PATCHES:
        monkeypatch.setattr(module, name, value)
    model = _build(extra_opts)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(init, tmp_path / "init.pth")
    args = (str(tmp_path / "init.pth"), str(tmp_path), extra_opts)
    launch(_worker, 2, dist_url="auto", args=args)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))

    grads, params = _sgd_step(model, _images())
    model.load_state_dict(init)
    grads_image0, _ = _sgd_step(model, _images()[:1])  # control: what rank 0 alone would do

    offset = [k for k in grads if ".conv2_offset." in k and k.startswith("backbone.")]
    mdpool = [k for k in grads if ".level_poolers." in k and ("offset_fc" in k or "mask_fc" in k)]
    assert len(offset) == 13 * 2 and len(mdpool) == 4 * 5 * 2
    # The zero-initialised layers that start learning in step one: the offset convs and the last
    # mdpool fcs of level P2, where every RoI of a 64-px image goes (the earlier fcs sit behind
    # zero weights and the other levels see no RoI: zero gradients, compared all the same).
    last_fcs = (".level_poolers.0.offset_fc.4.", ".level_poolers.0.mask_fc.2.")
    learning = offset + [k for k in mdpool if any(f in k for f in last_fcs)]
    if extra_opts:  # the R-CNN branch's own classifier
        classifier = [k for k in grads if k.startswith("roi_heads.mimic.")]
        assert len(classifier) == 2
        learning += classifier
    for k in learning:
        assert grads[k].abs().max() > 0, k

    for k in grads:
        # DDP leaves identical replicas...
        assert torch.equal(rank0[0][k], rank1[0][k]), k
        assert torch.equal(rank0[1][k], rank1[1][k]), k
        # ...whose gradient and update are those of one process with both images, up to rounding
        # (the images' contributions are summed in another order).
        assert params[k].dtype == torch.float64, k
        assert _relative_error(rank0[0][k], grads[k]) < 1e-10, k
        rounding = torch.finfo(params[k].dtype).eps * params[k].abs().max()
        bound = 1e-10 * LR * grads[k].abs().max() + 2 * rounding
        assert (rank0[1][k] - params[k]).abs().max() <= bound, k
    # The comparison can tell: one image alone gives a clearly different gradient.
    assert min(_relative_error(grads_image0[k], grads[k]) for k in learning) > 0.01
