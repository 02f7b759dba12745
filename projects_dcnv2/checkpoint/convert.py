"""Key mapping between MMDetection / torchvision checkpoints and this project's Detectron2 models.

Covers the R-50-FPN Faster / Mask R-CNN layout of MMDetection's ``configs/dcnv2`` model zoo:
ResNet (``backbone.*``, torchvision naming) with DCNv2 offset convs, FPN (``neck.*``), RPN
(``rpn_head.*``), the 2-FC box head and 4-conv mask head (``roi_head.*``) and the per-level mdpool
offset / mask FCs (``roi_head.bbox_roi_extractor.roi_layers.{l}.*``).

Tensors are never permuted (conv offsets are [group][tap][dy, dx] in both code bases, class order
and "background last" agree, anchors and deltas are in the same order); only names change, and
``num_batches_tracked`` is dropped. Half-precision tensors are cast to float32.

Every mapping is a pair of templates whose ``{name}`` fields are integers (shifted by a fixed
amount, e.g. MMDetection's ``layer1`` is Detectron2's ``res2``) or ``{p}``, a parameter / buffer
name; the same table is read in both directions, so ``convert_d2_to_mmdet`` is the exact inverse.
"""

import collections
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "COMPONENTS",
    "ConversionReport",
    "component_of",
    "convert_d2_to_mmdet",
    "convert_mmdet_to_d2",
    "convert_torchvision_to_d2",
    "find_bottom_up_prefix",
    "guess_format",
    "unwrap_state_dict",
]

BOTTOM_UP = "backbone.bottom_up."  # where a ResNet-FPN model keeps its ResNet
COMPONENTS = ("backbone", "offset convs", "fpn", "rpn", "box head", "mask head", "mdpool")

_LEAF = r"(?P<p>weight|bias|running_mean|running_var)"


class _Rule:
    """One name pattern, in MMDetection / torchvision spelling (``mm``) and in Detectron2's
    (``d2``), and the report component (one of :data:`COMPONENTS`) its keys belong to.
    ``shift[f]`` is added to integer field ``f`` going mm -> d2. ``legacy``: MMCV's old offset
    naming, read but not written by default; ``class_specific``: one row per class (dimension 0
    depends on the number of classes)."""

    def __init__(
        self,
        mm: str,
        d2: str,
        component: str,
        shift: Optional[Dict[str, int]] = None,
        *,
        legacy: bool = False,
        class_specific: bool = False,
    ):
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        self.mm, self.d2, self.component, self.shift = mm, d2, component, shift or {}
        self.legacy, self.class_specific = legacy, class_specific
        self._mm_re, self._d2_re = _compile(mm), _compile(d2)

    def matches_d2(self, key: str) -> bool:
        return self.to_mm(key) is not None

    def to_d2(self, key: str) -> Optional[str]:
        return self._apply(self._mm_re, self.d2, key, +1)

    def to_mm(self, key: str) -> Optional[str]:
        return self._apply(self._d2_re, self.mm, key, -1)

    def _apply(self, pattern, template, key, sign):
        match = pattern.fullmatch(key)
        if match is None:
            return None
        fields = {}
        for name, value in match.groupdict().items():
            if name != "p":
                value = int(value) + sign * self.shift.get(name, 0)
                if value < 0:
                    return None
            fields[name] = value
        return template.format(**fields)


def _compile(template: str):
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(
        re.escape(part) if i % 2 == 0 else (_LEAF if part == "p" else rf"(?P<{part}>\d+)")
        for i, part in enumerate(parts)
    )
    return re.compile(regex)


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
    _Rule(
        "layer{s}.{b}.conv2_offset.{p}", "res{s}.{b}.conv2_offset.{p}", "offset convs", {"s": 1},
        legacy=True,
    ),
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
    _Rule(
        "roi_head.bbox_head.fc_cls.{p}", "roi_heads.box_predictor.cls_score.{p}", "box head",
        class_specific=True,
    ),
    _Rule(
        "roi_head.bbox_head.fc_reg.{p}", "roi_heads.box_predictor.bbox_pred.{p}", "box head",
        class_specific=True,
    ),
    _Rule("roi_head.mask_head.convs.{i}.conv.{p}", "roi_heads.mask_head.mask_fcn{i}.{p}", "mask head", {"i": 1}),
    _Rule("roi_head.mask_head.upsample.{p}", "roi_heads.mask_head.deconv.{p}", "mask head"),
    _Rule(
        "roi_head.mask_head.conv_logits.{p}", "roi_heads.mask_head.predictor.{p}", "mask head",
        class_specific=True,
    ),
    # mdpool: one ModulatedDeformRoIPoolPack per FPN level l, nn.Sequential indices j kept.
    _Rule(
        "roi_head.bbox_roi_extractor.roi_layers.{l}.offset_fc.{j}.{p}",
        "roi_heads.box_pooler.level_poolers.{l}.offset_fc.{j}.{p}",
        "mdpool",
    ),
    _Rule(
        "roi_head.bbox_roi_extractor.roi_layers.{l}.mask_fc.{j}.{p}",
        "roi_heads.box_pooler.level_poolers.{l}.mask_fc.{j}.{p}",
        "mdpool",
    ),
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
# Detectron2 module prefix -> component, for keys no rule names (e.g. a GroupNorm box head).
_D2_MODULES = {
    _literal_prefix(".".join(r.d2.split(".")[:2]) + "."): r.component for r in _HEAD_RULES
}
_D2_PREFIXES = (BOTTOM_UP,) + tuple(_D2_MODULES)


def rule_of(d2_key: str, bottom_up_prefix: str = BOTTOM_UP) -> Optional[_Rule]:
    """The rule that names a Detectron2 key of one of this project's models, or None."""
    if d2_key.startswith(bottom_up_prefix):
        resnet_key = d2_key[len(bottom_up_prefix) :]
        for rule in _RESNET_RULES:
            if rule.matches_d2(resnet_key):
                return rule
    for rule in _HEAD_RULES:
        if rule.matches_d2(d2_key):
            return rule
    return None


def component_of(d2_key: str, bottom_up_prefix: str = BOTTOM_UP) -> str:
    """The report bucket of a Detectron2 key: one of :data:`COMPONENTS`, or "other"."""
    rule = rule_of(d2_key, bottom_up_prefix)
    if rule is not None:
        return rule.component
    if d2_key.startswith(bottom_up_prefix):
        return "backbone"
    for prefix, component in _D2_MODULES.items():
        if d2_key.startswith(prefix):
            return component
    return "other"


def find_bottom_up_prefix(model_keys) -> Optional[str]:
    """Where a model keeps its ResNet: "backbone.bottom_up." (ResNet-FPN), "backbone." (plain
    ResNet backbone), "" (a bare ResNet), or None when it has no ResNet stem."""
    model_keys = set(model_keys)
    for prefix in (BOTTOM_UP, "backbone.", ""):
        if prefix + "stem.conv1.weight" in model_keys:
            return prefix
    return None


@dataclass
class ConversionReport:
    """What a conversion did. ``source``: the format converted from; ``name``: the checkpoint
    (e.g. its path) in messages; ``counts``: converted tensors per component; ``dropped``: source keys
    intentionally not converted; ``legacy_offset_keys``: ``conv2_offset.*`` keys in the old
    naming; ``cast_to_float32``: half-precision source tensors; ``unmapped``: source keys with no
    Detectron2 name (an error unless ``strict=False``); ``not_loaded``: model tensors per
    component that the checkpoint does not provide and ``not_loaded_keys`` their names (both
    filled in when the checkpoint is checked against a model)."""

    source: str
    name: str = "checkpoint"
    counts: Dict[str, int] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    legacy_offset_keys: int = 0
    cast_to_float32: List[str] = field(default_factory=list)
    unmapped: List[str] = field(default_factory=list)
    not_loaded: Dict[str, int] = field(default_factory=dict)
    not_loaded_keys: List[str] = field(default_factory=list, repr=False)

    @property
    def num_converted(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        counts = ", ".join(f"{c} {self.counts.get(c, 0)}" for c in COMPONENTS)
        lines = [f"{self.source} -> Detectron2: {self.num_converted} tensors ({counts})"]
        if self.dropped:
            kinds = collections.Counter(_drop_kind(k) for k in self.dropped)
            lines.append(
                "  dropped: " + ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items()))
            )
        if self.legacy_offset_keys:
            lines.append(f"  legacy '<conv>_offset' keys renamed: {self.legacy_offset_keys}")
        if self.cast_to_float32:
            lines.append(f"  half-precision tensors cast to float32: {len(self.cast_to_float32)}")
        if self.unmapped:
            lines.append(
                f"  unmapped (not converted): {len(self.unmapped)}: {_short_list(self.unmapped)}"
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

    def __str__(self) -> str:
        return self.summary()


def _drop_kind(key: str) -> str:
    if key.endswith("num_batches_tracked"):
        return "num_batches_tracked"
    return "fc.* (ImageNet classifier)" if key.startswith("fc.") else key


def _short_list(keys, limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def unwrap_state_dict(checkpoint: Mapping) -> Mapping:
    """The state dict of an MMCV-style checkpoint (``{"meta", "state_dict"}``) or the mapping
    itself; a DataParallel ``module.`` prefix is removed."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"checkpoint['state_dict'] must be a mapping, got {type(state_dict).__name__}"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = collections.OrderedDict(
            (k[len("module.") :], v) for k, v in state_dict.items()
        )
    return state_dict


def guess_format(state_dict: Mapping) -> Optional[str]:
    """``"mmdet"`` (MMDetection detector / backbone), ``"torchvision"`` (ImageNet ResNet) or None
    (anything else, e.g. a Detectron2 checkpoint). Accepts a state dict or an MMCV-style
    ``{"meta", "state_dict"}`` checkpoint."""
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = unwrap_state_dict(state_dict)
    keys = [k for k in state_dict if isinstance(k, str)]
    if not keys or len(keys) != len(state_dict):
        return None
    if any(k.startswith(_D2_PREFIXES) for k in keys):
        return None
    if any(k.startswith(_MMDET_PREFIXES) for k in keys):
        return "mmdet"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.0.") for k in keys):
        if all(k.startswith(_TORCHVISION_PREFIXES) for k in keys):
            return "torchvision"
    return None


def _convert(items, rules, source: str, mm_prefix: str, d2_prefix: str, drop, strict: bool):
    report = ConversionReport(source=source)
    converted = collections.OrderedDict()
    origin = {}
    for key, value in items:
        if drop(key):
            report.dropped.append(key)
            continue
        new_key = rule = None
        if key.startswith(mm_prefix):
            for rule in rules["resnet"]:
                new_key = rule.to_d2(key[len(mm_prefix) :])
                if new_key is not None:
                    new_key = d2_prefix + new_key
                    report.legacy_offset_keys += rule.legacy
                    break
        if new_key is None:
            for rule in rules["heads"]:
                new_key = rule.to_d2(key)
                if new_key is not None:
                    break
        if new_key is None:
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
        converted[new_key] = value
        origin[new_key] = key
        report.counts[rule.component] = report.counts.get(rule.component, 0) + 1
    if report.unmapped and strict:
        raise ValueError(
            f"{len(report.unmapped)} {source} keys have no Detectron2 equivalent in this project "
            f"(R-50-FPN Faster/Mask R-CNN with DCNv2 / mdpool): {_short_list(report.unmapped, 12)}"
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
    state_dict = unwrap_state_dict(state_dict)
    rules = {"resnet": _RESNET_RULES, "heads": _HEAD_RULES}
    return _convert(
        state_dict.items(),
        rules,
        "MMDetection",
        "backbone.",
        bottom_up_prefix,
        lambda k: k.endswith(".num_batches_tracked"),
        strict,
    )


def convert_torchvision_to_d2(
    state_dict: Mapping, *, bottom_up_prefix: str = BOTTOM_UP, strict: bool = True
) -> Tuple["collections.OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Rename a torchvision ImageNet ResNet (``conv1.weight``, ``layer1.0.conv1.weight``, ...,
    ``fc.*``) onto a Detectron2 ResNet under ``bottom_up_prefix``; ``fc.*`` and
    ``num_batches_tracked`` are dropped. Same return value as :func:`convert_mmdet_to_d2`."""
    state_dict = unwrap_state_dict(state_dict)
    rules = {"resnet": _RESNET_RULES, "heads": []}
    return _convert(
        state_dict.items(),
        rules,
        "torchvision",
        "",
        bottom_up_prefix,
        lambda k: k.endswith(".num_batches_tracked") or k.startswith("fc."),
        strict,
    )


def convert_d2_to_mmdet(
    state_dict: Mapping,
    *,
    meta: Optional[dict] = None,
    bottom_up_prefix: str = BOTTOM_UP,
    legacy_offset_names: bool = False,
) -> dict:
    """The inverse of :func:`convert_mmdet_to_d2`: an MMDetection-format checkpoint.

    Args:
        state_dict: Detectron2 state dict of one of this project's models.
        meta: stored as ``checkpoint["meta"]`` (a small default naming this exporter otherwise).
        bottom_up_prefix: where the model keeps its ResNet.
        legacy_offset_names: write offset convs as ``layerL.B.conv2_offset.*`` (MMCV's version-1
            naming) instead of ``layerL.B.conv2.conv_offset.*``.

    Returns:
        ``{"meta": dict, "state_dict": OrderedDict}``, with a ``num_batches_tracked`` (int64 zero)
        after every BatchNorm's ``running_var``, as ``torch.nn.BatchNorm2d`` stores it.

    Raises:
        ValueError: naming the keys that have no MMDetection name.
    """
    resnet = [r for r in _RESNET_RULES if r.legacy == legacy_offset_names or "offset" not in r.mm]
    out = collections.OrderedDict()
    unmapped = []
    for key, value in state_dict.items():
        new_key = None
        if key.startswith(bottom_up_prefix):
            for rule in resnet:
                new_key = rule.to_mm(key[len(bottom_up_prefix) :])
                if new_key is not None:
                    new_key = "backbone." + new_key
                    break
        else:
            for rule in _HEAD_RULES:
                new_key = rule.to_mm(key)
                if new_key is not None:
                    break
        if new_key is None:
            unmapped.append(key)
            continue
        out[new_key] = value
        if new_key.startswith("backbone.") and new_key.endswith(".running_var"):
            out[new_key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(
                0, dtype=torch.long
            )
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} Detectron2 keys have no MMDetection name: {_short_list(unmapped, 12)}"
        )
    if meta is None:
        meta = {"exported_by": "projects_dcnv2.checkpoint.convert_d2_to_mmdet"}
    return {"meta": dict(meta), "state_dict": out}
