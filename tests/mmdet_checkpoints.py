"""MMDetection checkpoints for the tests, written without the package's key tables.

Everything here is spelled out from MMDetection's module structure (docs/semantics.md, "MMDetection
checkpoints"), independently of ``projects_dcnv2.checkpoint``: the key layout of an MMDetection
2.x R-50-FPN Faster / Mask R-CNN (:func:`mmdet_r50_fpn_layout`), the Detectron2 name of each
MMDetection key (:func:`d2_name`), and from those two an exporter of our models' state dicts to
MMDetection's format (:func:`export_mmdet`), so that a wrong rule in the package cannot hide
behind the same wrong rule in the fixtures.
"""

import collections
import functools

import torch

__all__ = ["LAYOUTS", "d2_name", "export_mmdet", "mmdet_r50_fpn_layout", "random_checkpoint"]


def mmdet_r50_fpn_layout(*, dg=1, dcn=True, mask=False, mdpool=False):
    """{key: shape} of an MMDetection 2.x R-50-FPN Faster/Mask R-CNN checkpoint, written from
    MMDetection's module structure (docs/semantics.md, "Deformable RoI pooling" and
    "MMDetection checkpoints"), independently of our mapping."""
    shapes = {}

    def bn(prefix, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{p}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def conv(prefix, shape, bias=True):
        shapes[prefix + ".weight"] = shape
        if bias:
            shapes[prefix + ".bias"] = (shape[0],)

    conv("backbone.conv1", (64, 3, 7, 7), bias=False)
    bn("backbone.bn1", 64)
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"backbone.layer{layer}.{b}"
            cin = inplanes if b == 0 else planes * 4
            conv(p + ".conv1", (planes, cin, 1, 1), bias=False)
            bn(p + ".bn1", planes)
            conv(p + ".conv2", (planes, planes, 3, 3), bias=False)
            if dcn and layer >= 2:
                conv(p + ".conv2.conv_offset", (3 * 9 * dg, planes, 3, 3))
            bn(p + ".bn2", planes)
            conv(p + ".conv3", (planes * 4, planes, 1, 1), bias=False)
            bn(p + ".bn3", planes * 4)
            if b == 0:
                conv(p + ".downsample.0", (planes * 4, cin, 1, 1), bias=False)
                bn(p + ".downsample.1", planes * 4)
        inplanes = planes * 4
    for i, cin in enumerate((256, 512, 1024, 2048)):
        conv(f"neck.lateral_convs.{i}.conv", (256, cin, 1, 1))
        conv(f"neck.fpn_convs.{i}.conv", (256, 256, 3, 3))
    conv("rpn_head.rpn_conv", (256, 256, 3, 3))
    conv("rpn_head.rpn_cls", (3, 256, 1, 1))
    conv("rpn_head.rpn_reg", (12, 256, 1, 1))
    conv("roi_head.bbox_head.shared_fcs.0", (1024, 256 * 7 * 7))
    conv("roi_head.bbox_head.shared_fcs.1", (1024, 1024))
    conv("roi_head.bbox_head.fc_cls", (81, 1024))
    conv("roi_head.bbox_head.fc_reg", (320, 1024))
    if mask:
        for i in range(4):
            conv(f"roi_head.mask_head.convs.{i}.conv", (256, 256, 3, 3))
        conv("roi_head.mask_head.upsample", (256, 256, 2, 2))
        conv("roi_head.mask_head.conv_logits", (80, 256, 1, 1))
    if mdpool:
        for lvl in range(4):
            p = f"roi_head.bbox_roi_extractor.roi_layers.{lvl}"
            conv(p + ".offset_fc.0", (1024, 256 * 7 * 7))
            conv(p + ".offset_fc.2", (1024, 1024))
            conv(p + ".offset_fc.4", (2 * 49, 1024))
            conv(p + ".mask_fc.0", (1024, 256 * 7 * 7))
            conv(p + ".mask_fc.2", (49, 1024))
    return shapes


def random_checkpoint(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000, dtype=torch.long)
        else:
            state[k] = torch.randn(shape, generator=g)
    state._metadata = collections.OrderedDict([("", {"version": 1})])  # as nn.Module.state_dict()
    meta = {"mmdet_version": "2.0.0", "CLASSES": tuple(f"class{i}" for i in range(80)), "epoch": 12}
    return {"meta": meta, "state_dict": state}


LAYOUTS = {  # the MMDetection model behind each seed config
    "faster_rcnn_R50_FPN_mdconv": dict(dg=1),
    "faster_rcnn_R50_FPN_mdconv_dg4": dict(dg=4),
    "faster_rcnn_R50_FPN_mdpool": dict(dcn=False, mdpool=True),
    "mask_rcnn_R50_FPN_mdconv": dict(mask=True),
    "mask_rcnn_R50_FPN_mdconv_fp16": dict(mask=True),
}


def d2_name(mm_key):
    """The Detectron2 name of an MMDetection key, spelled out from the two module trees
    (docs/semantics.md, "MMDetection checkpoints"), independently of the package's rule table."""
    bottom_up = "backbone.bottom_up."
    parts = mm_key.split(".")
    if parts[0] == "backbone":
        if parts[1] == "conv1":
            return bottom_up + "stem.conv1.weight"
        if parts[1] == "bn1":
            return bottom_up + "stem.conv1.norm." + parts[2]
        stage, block, rest = "res%d" % (int(parts[1][len("layer") :]) + 1), parts[2], parts[3:]
        if rest[0] == "downsample":
            rest = ["shortcut"] + (["norm"] if rest[1] == "1" else []) + rest[2:]
        elif rest[0].startswith("bn"):
            rest = ["conv" + rest[0][len("bn") :], "norm"] + rest[1:]
        elif rest[:2] == ["conv2", "conv_offset"]:
            rest = ["conv2_offset"] + rest[2:]
        return bottom_up + ".".join([stage, block] + rest)
    if parts[0] == "neck":
        kind = {"lateral_convs": "fpn_lateral", "fpn_convs": "fpn_output"}[parts[1]]
        return f"backbone.{kind}{int(parts[2]) + 2}.{parts[-1]}"
    if parts[0] == "rpn_head":
        kind = {"rpn_conv": "conv", "rpn_cls": "objectness_logits", "rpn_reg": "anchor_deltas"}
        return f"proposal_generator.rpn_head.{kind[parts[1]]}.{parts[2]}"
    head, rest = parts[1], parts[2:]
    if head == "bbox_head" and rest[0] == "shared_fcs":
        return f"roi_heads.box_head.fc{int(rest[1]) + 1}.{rest[2]}"
    if head == "bbox_head":
        return f"roi_heads.box_predictor.{dict(fc_cls='cls_score', fc_reg='bbox_pred')[rest[0]]}.{rest[1]}"
    if head == "mask_head" and rest[0] == "convs":
        return f"roi_heads.mask_head.mask_fcn{int(rest[1]) + 1}.{rest[-1]}"
    if head == "mask_head":
        return f"roi_heads.mask_head.{dict(upsample='deconv', conv_logits='predictor')[rest[0]]}.{rest[1]}"
    assert head == "bbox_roi_extractor" and rest[0] == "roi_layers", mm_key
    return "roi_heads.box_pooler.level_poolers." + ".".join(rest[1:])


@functools.lru_cache(maxsize=None)
def _mmdet_names():
    """Detectron2 name -> MMDetection name, for every key of the largest layout (offset convs, mask
    head and mdpool all present); ``num_batches_tracked`` has no Detectron2 counterpart."""
    layout = mmdet_r50_fpn_layout(mask=True, mdpool=True)
    return {d2_name(k): k for k in layout if not k.endswith("num_batches_tracked")}


def export_mmdet(state_dict, *, meta=None, legacy_offset_names=False):
    """One of our models' state dicts as an MMDetection checkpoint ``{"meta", "state_dict"}``, with
    a ``num_batches_tracked`` (int64 zero) after every BatchNorm's ``running_var``, as
    ``torch.nn.BatchNorm2d`` stores it. ``legacy_offset_names``: offset convs as
    ``layerL.B.conv2_offset.*`` (MMCV's version-1 naming) instead of ``layerL.B.conv2.conv_offset.*``.
    Raises ``ValueError`` naming the keys that have no MMDetection name."""
    names = _mmdet_names()
    unmapped = [k for k in state_dict if k not in names]
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} Detectron2 keys have no MMDetection name: {unmapped[:12]}"
        )
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        mm_key = names[key]
        if legacy_offset_names:
            mm_key = mm_key.replace(".conv2.conv_offset.", ".conv2_offset.")
        out[mm_key] = value
        if mm_key.endswith(".running_var"):
            out[mm_key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    return {"meta": dict(meta or {"exported_by": "tests/mmdet_checkpoints.py"}), "state_dict": out}
