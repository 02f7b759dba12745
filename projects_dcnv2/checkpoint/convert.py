"""Key names: MMDetection / torchvision checkpoints -> this project's Detectron2 models.

Covers MMDetection's ``configs/dcnv2`` R-50-FPN Faster / Mask R-CNN: ResNet (``backbone.*``, the
torchvision names, which an ImageNet ResNet has without ``backbone.``) with DCNv2 offset convs, FPN
(``neck.*``), RPN (``rpn_head.*``), box and mask heads (``roi_head.*``) and mdpool's per-level FCs.
No tensor is permuted (conv offsets are [group][tap][dy, dx] in both code bases; class order,
"background last", anchors and deltas agree): names change, ``num_batches_tracked`` is dropped,
half precision becomes float32. Each rule is a pair of templates whose ``{name}`` fields are
integers (shifted by a fixed amount: MMDetection's ``layer1`` is ``res2``) or ``{p}``, a
parameter / buffer name.
"""

import collections
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["ConversionReport", "convert_mmdet_to_d2", "convert_torchvision_to_d2", "guess_format"]

BOTTOM_UP = "backbone.bottom_up."  # where a ResNet-FPN model keeps its ResNet
COMPONENTS = ("backbone", "offset convs", "fpn", "rpn", "box head", "mask head", "mdpool")

_LEAF = r"(?P<p>weight|bias|running_mean|running_var)"


def _compile(template: str):
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(
        re.escape(part) if i % 2 == 0 else (_LEAF if part == "p" else rf"(?P<{part}>\d+)")
        for i, part in enumerate(parts)
    )
    return re.compile(regex)


class _Rule:
    """One name pattern, in MMDetection / torchvision spelling (``mm``) and in Detectron2's
    (``d2``), and the report component (one of :data:`COMPONENTS`) its keys belong to.
    ``shift[f]`` is added to integer field ``f`` going mm -> d2. ``legacy``: MMCV's old offset
    naming; ``class_specific``: one row per class (dimension 0 depends on the number of classes)."""

    def __init__(self, mm, d2, component, shift=None, *, legacy=False, class_specific=False):
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        self.mm, self.d2, self.component, self.shift = mm, d2, component, shift or {}
        self.legacy, self.class_specific = legacy, class_specific
        self._mm_re = _compile(mm)

    def to_d2(self, key: str) -> Optional[str]:
        match = self._mm_re.fullmatch(key)
        if match is None:
            return None
        shifted = {
            f: int(v) + self.shift.get(f, 0) for f, v in match.groupdict().items() if f != "p"
        }
        return self.d2.format(**{**match.groupdict(), **shifted})


# ResNet, relative to "backbone." (MMDetection) / "" (torchvision) and to the bottom-up prefix
# (Detectron2). s = stage (layer1..4 -> res2..5), b = block, k = conv index.
_RESNET_RULES = [
    _Rule("conv1.weight", "stem.conv1.weight", "backbone"),
    _Rule("bn1.{p}", "stem.conv1.norm.{p}", "backbone"),
    _Rule("layer{s}.{b}.conv{k}.weight", "res{s}.{b}.conv{k}.weight", "backbone", {"s": 1}),
    _Rule("layer{s}.{b}.bn{k}.{p}", "res{s}.{b}.conv{k}.norm.{p}", "backbone", {"s": 1}),
    _Rule("layer{s}.{b}.downsample.0.weight", "res{s}.{b}.shortcut.weight", "backbone", {"s": 1}),
    _Rule("layer{s}.{b}.downsample.1.{p}", "res{s}.{b}.shortcut.norm.{p}", "backbone", {"s": 1}),
    # DCNv2 offset/mask conv: MMCV >= v2 Pack naming, and the legacy sibling "<conv>_offset".
    _Rule("layer{s}.{b}.conv2.conv_offset.{p}", "res{s}.{b}.conv2_offset.{p}", "offset convs", {"s": 1}),
    _Rule("layer{s}.{b}.conv2_offset.{p}", "res{s}.{b}.conv2_offset.{p}", "offset convs", {"s": 1}, legacy=True),
]  # fmt: skip

# Everything after the ResNet; absolute names on both sides.
_HEAD_RULES = [
    # FPN: input levels 0..3 (res2..res5) -> fpn_{lateral,output}{2..5}.
    _Rule("neck.lateral_convs.{i}.conv.{p}", "backbone.fpn_lateral{i}.{p}", "fpn", {"i": 2}),
    _Rule("neck.fpn_convs.{i}.conv.{p}", "backbone.fpn_output{i}.{p}", "fpn", {"i": 2}),
    _Rule("rpn_head.rpn_conv.{p}", "proposal_generator.rpn_head.conv.{p}", "rpn"),
    _Rule("rpn_head.rpn_cls.{p}", "proposal_generator.rpn_head.objectness_logits.{p}", "rpn"),
    _Rule("rpn_head.rpn_reg.{p}", "proposal_generator.rpn_head.anchor_deltas.{p}", "rpn"),
    _Rule("roi_head.bbox_head.shared_fcs.{i}.{p}", "roi_heads.box_head.fc{i}.{p}", "box head", {"i": 1}),
    _Rule("roi_head.bbox_head.fc_cls.{p}", "roi_heads.box_predictor.cls_score.{p}", "box head", class_specific=True),
    _Rule("roi_head.bbox_head.fc_reg.{p}", "roi_heads.box_predictor.bbox_pred.{p}", "box head", class_specific=True),
    _Rule("roi_head.mask_head.convs.{i}.conv.{p}", "roi_heads.mask_head.mask_fcn{i}.{p}", "mask head", {"i": 1}),
    _Rule("roi_head.mask_head.upsample.{p}", "roi_heads.mask_head.deconv.{p}", "mask head"),
    _Rule("roi_head.mask_head.conv_logits.{p}", "roi_heads.mask_head.predictor.{p}", "mask head", class_specific=True),
    # mdpool: one ModulatedDeformRoIPoolPack per FPN level l, nn.Sequential indices j kept.
    _Rule("roi_head.bbox_roi_extractor.roi_layers.{l}.offset_fc.{j}.{p}", "roi_heads.box_pooler.level_poolers.{l}.offset_fc.{j}.{p}", "mdpool"),
    _Rule("roi_head.bbox_roi_extractor.roi_layers.{l}.mask_fc.{j}.{p}", "roi_heads.box_pooler.level_poolers.{l}.mask_fc.{j}.{p}", "mdpool"),
]  # fmt: skip


def _literal_prefix(template: str) -> str:
    return template.split("{", 1)[0]


# Where each format keeps its keys, derived from the rules (used to recognise a file's format).
_MMDET_PREFIXES = tuple(
    sorted(
        {"backbone." + _literal_prefix(r.mm) for r in _RESNET_RULES}
        | {r.mm.split(".", 1)[0] + "." for r in _HEAD_RULES}
    )
)
_TORCHVISION_PREFIXES = tuple(sorted({_literal_prefix(r.mm) for r in _RESNET_RULES} | {"fc."}))
# Detectron2 module prefix -> component, and the layers with one row per class.
_D2_MODULES = {
    _literal_prefix(".".join(r.d2.split(".")[:2]) + "."): r.component for r in _HEAD_RULES
}
_D2_PREFIXES = (BOTTOM_UP,) + tuple(_D2_MODULES)
CLASS_SPECIFIC = tuple(_literal_prefix(r.d2) for r in _HEAD_RULES if r.class_specific)


def component_of(d2_key: str, bottom_up_prefix: str = BOTTOM_UP) -> str:
    """The report bucket of a Detectron2 key: one of :data:`COMPONENTS`, or "other"."""
    component = next((c for p, c in _D2_MODULES.items() if d2_key.startswith(p)), None)
    if component is None and d2_key.startswith(bottom_up_prefix):
        component = "offset convs" if ".conv2_offset." in d2_key else "backbone"
    return component or "other"


@dataclass
class ConversionReport:
    """What a conversion did; ``not_loaded*`` are filled in when it is checked against a model."""

    source: str  # the format converted from
    name: str = "checkpoint"  # the checkpoint (e.g. its path) in messages
    counts: Dict[str, int] = field(default_factory=collections.Counter)  # tensors per component
    dropped: List[str] = field(default_factory=list)  # source keys intentionally not converted
    legacy_offset_keys: int = 0  # "conv2_offset.*" keys in MMCV's old naming
    cast_to_float32: List[str] = field(default_factory=list)  # half-precision source tensors
    unmapped: List[str] = field(default_factory=list)  # no Detectron2 name (strict=False only)
    not_loaded: Dict[str, int] = field(default_factory=dict)  # model tensors left, per component
    not_loaded_keys: List[str] = field(default_factory=list, repr=False)  # and their names

    @property
    def num_converted(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        counts = ", ".join(f"{c} {self.counts.get(c, 0)}" for c in COMPONENTS)
        lines = [f"{self.source} -> Detectron2: {self.num_converted} tensors ({counts})"]
        if self.dropped:
            kinds = collections.Counter(
                "num_batches_tracked" if k.endswith("num_batches_tracked")
                else "fc.* (ImageNet classifier)" if k.startswith("fc.") else k
                for k in self.dropped
            )  # fmt: skip
            lines.append("  dropped: " + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())))
        if self.legacy_offset_keys:
            lines.append(f"  legacy '<conv>_offset' keys renamed: {self.legacy_offset_keys}")
        if self.cast_to_float32:
            lines.append(f"  half-precision tensors cast to float32: {len(self.cast_to_float32)}")
        if self.unmapped:
            lines.append(
                f"  unmapped (not converted): {len(self.unmapped)}: {short_list(self.unmapped)}"
            )
        if self.not_loaded:
            parts = ", ".join(f"{c} {n}" for c, n in self.not_loaded.items())
            lines.append(f"  left at the model's initialisation: {parts}")
            if "offset convs" in self.not_loaded:
                lines.append(
                    "  (offset convs are zero-initialised: regular sampling grid, mask 0.5, "
                    "as MMDetection starts DCNv2 from ImageNet weights)"
                )
        return "\n".join(lines)


def short_list(items, limit: int = 6, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then how many more there are."""
    items = list(items)
    return sep.join(items[:limit] + [f"... and {len(items) - limit} more"] * (len(items) > limit))


def _unwrap(checkpoint: Mapping) -> Mapping:
    """The state dict of an MMCV-style checkpoint (``{"meta", "state_dict"}``) or the mapping
    itself; a DataParallel ``module.`` prefix is removed."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"checkpoint['state_dict'] must be a mapping, got {type(state_dict).__name__}"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def guess_format(state_dict: Mapping) -> Optional[str]:
    """``"mmdet"`` (MMDetection detector / backbone), ``"torchvision"`` (ImageNet ResNet) or None
    (anything else, e.g. a Detectron2 checkpoint). Accepts a state dict or an MMCV-style
    ``{"meta", "state_dict"}`` checkpoint."""
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = _unwrap(state_dict)
    keys = [k for k in state_dict if isinstance(k, str)]
    if not keys or len(keys) != len(state_dict) or any(k.startswith(_D2_PREFIXES) for k in keys):
        return None
    if any(k.startswith(_MMDET_PREFIXES) for k in keys):
        return "mmdet"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.0.") for k in keys):
        if all(k.startswith(_TORCHVISION_PREFIXES) for k in keys):
            return "torchvision"
    return None


def _rename(key, rules, src, dst):
    """(rule, Detectron2 name) of the first rule naming ``key`` (after ``src``), or (None, None)."""
    if key.startswith(src):
        for rule in rules:
            new_key = rule.to_d2(key[len(src) :])
            if new_key is not None:
                return rule, dst + new_key
    return None, None


def _convert(state_dict, source, resnet_prefix, heads, drop_prefixes, bottom_up_prefix, strict):
    report = ConversionReport(source=source)
    converted, origin = collections.OrderedDict(), {}
    for key, value in _unwrap(state_dict).items():
        if key.endswith(".num_batches_tracked") or key.startswith(drop_prefixes):
            report.dropped.append(key)
            continue
        rule, new_key = _rename(key, _RESNET_RULES, resnet_prefix, bottom_up_prefix)
        if rule is None:
            rule, new_key = _rename(key, heads, "", "")
        if rule is None:
            report.unmapped.append(key)
            continue
        if new_key in converted:
            raise ValueError(
                f"{source} checkpoint: '{origin[new_key]}' and '{key}' both map to '{new_key}' "
                "(a DCN offset conv stored in both the old and the new naming?)"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{source} checkpoint: '{key}' is a {type(value).__name__}, not a tensor"
            )
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
            report.cast_to_float32.append(key)
        converted[new_key], origin[new_key] = value, key
        report.counts[rule.component] += 1
        report.legacy_offset_keys += rule.legacy
    if report.unmapped and strict:
        raise ValueError(
            f"{len(report.unmapped)} {source} keys have no Detectron2 equivalent in this project "
            f"(R-50-FPN Faster/Mask R-CNN with DCNv2 / mdpool): {short_list(report.unmapped, 12)}"
        )
    return converted, report


def convert_mmdet_to_d2(
    state_dict: Mapping, *, bottom_up_prefix: str = BOTTOM_UP, strict: bool = True
) -> Tuple["collections.OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Rename an MMDetection DCNv2 R-50-FPN checkpoint to this project's Detectron2 names.

    Args:
        state_dict: MMDetection state dict, or a whole checkpoint ``{"meta", "state_dict"}``.
        bottom_up_prefix: where the model keeps its ResNet ("backbone.bottom_up." under an FPN).
        strict: raise ``ValueError`` naming the keys that have no Detectron2 name; with False they
            are only listed in ``report.unmapped``.

    Returns:
        (Detectron2 state dict, :class:`ConversionReport`). Tensors are shared, not copied
        (half precision is cast to float32).
    """
    return _convert(
        state_dict, "MMDetection", "backbone.", _HEAD_RULES, (), bottom_up_prefix, strict
    )


def convert_torchvision_to_d2(
    state_dict: Mapping, *, bottom_up_prefix: str = BOTTOM_UP, strict: bool = True
) -> Tuple["collections.OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Rename a torchvision ImageNet ResNet (``conv1.weight``, ``layer1.0.conv1.weight``, ...,
    ``fc.*``) onto a Detectron2 ResNet under ``bottom_up_prefix``; ``fc.*`` and
    ``num_batches_tracked`` are dropped. Same return value as :func:`convert_mmdet_to_d2`."""
    return _convert(state_dict, "torchvision", "", [], ("fc.",), bottom_up_prefix, strict)
