"""Check that a converted checkpoint fits a model before anything is loaded.

* Scope ``"model"`` (a whole MMDetection detector): equal key sets and shapes; only what such a
  detector never has may be missing (mdpool FCs for a checkpoint without mdpool, the mimic
  branch's classifier): they keep their initialisation.
* Scope ``"backbone"`` (torchvision, or an MMDetection backbone only): every checkpoint key is in
  the model's ResNet with the same shape and provides every ResNet key but the DCNv2 offset convs
  (zero-initialised); the FPN and heads keep their initialisation.

On failure a :class:`CheckpointMismatchError` names the keys and shapes and, where the pattern is
recognisable, the config change that fits (deformable groups, classes, mdpool, mdconv, mask head).
"""

import collections
from typing import Dict, List, Mapping, Optional, Tuple

from .convert import BOTTOM_UP, CLASS_SPECIFIC, component_of, short_list

__all__ = ["CheckpointMismatchError", "bottom_up_prefix", "check_checkpoint_fits"]

# Buffers that Detectron2 versions may or may not save; never a reason to refuse a checkpoint.
_IGNORED = ("pixel_mean", "pixel_std")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from the config; nothing has been loaded."""


def bottom_up_prefix(model_state: Mapping) -> str:
    """Where a model keeps its ResNet: "backbone.bottom_up." (ResNet-FPN), "backbone." (plain
    ResNet backbone) or "" (a bare ResNet)."""
    for prefix in (BOTTOM_UP, "backbone.", ""):
        if prefix + "stem.conv1.weight" in model_state:
            return prefix
    raise CheckpointMismatchError(
        "the model has no ResNet stem (no '*stem.conv1.weight' parameter), so MMDetection / "
        "torchvision ResNet weights have nowhere to go"
    )


def _describe_shapes(items, limit=6) -> str:
    return "    " + short_list(
        [f"{k}: checkpoint {c} vs model {m}" for k, c, m in items], limit, "\n    "
    )


def _describe_keys(keys, limit=6) -> str:
    return "    " + short_list(sorted(keys), limit)


def _deform_groups(shape: Tuple[int, ...]) -> str:
    """Deformable groups of an offset conv's weight (C_out, C_in, kh, kw) or bias (C_out,)."""
    taps = shape[-1] * shape[-2] if len(shape) == 4 else 9
    groups, rest = divmod(shape[0], 3 * taps)
    return str(groups) if rest == 0 else f"? ({shape[0]} is not a multiple of 3*{taps})"


def check_checkpoint_fits(
    checkpoint: Mapping,
    model_state: Mapping,
    *,
    scope: Optional[str] = None,
    bottom_up_prefix: str = BOTTOM_UP,
    name: str = "checkpoint",
) -> Dict[str, List[str]]:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` (Detectron2 names) fits.

    Args:
        checkpoint: converted state dict (key -> tensor).
        model_state: ``model.state_dict()`` of the target model.
        scope: "model" or "backbone", see the module docstring; None: "backbone" if every
            checkpoint key is under the model's ResNet, else "model".
        bottom_up_prefix: where the model keeps its ResNet.
        name: how to call the checkpoint in messages (e.g. its path).

    Returns:
        dict component -> model keys the checkpoint leaves at their initialisation.
    """
    if scope is None:
        scope = "backbone" if all(k.startswith(bottom_up_prefix) for k in checkpoint) else "model"
    if scope not in ("model", "backbone"):
        raise ValueError(f"scope must be 'model' or 'backbone', got {scope!r}")
    model_keys = {k for k in model_state if k not in _IGNORED}
    ckpt_keys = set(checkpoint)
    unexpected = ckpt_keys - model_keys
    missing = model_keys - ckpt_keys
    shapes = sorted(
        (k, tuple(checkpoint[k].shape), tuple(model_state[k].shape))
        for k in ckpt_keys & model_keys
        if tuple(checkpoint[k].shape) != tuple(model_state[k].shape)
    )

    expected_missing = collections.defaultdict(list)
    ckpt_has_mdpool = any(component_of(k, bottom_up_prefix) == "mdpool" for k in ckpt_keys)
    for k in sorted(missing):
        component = component_of(k, bottom_up_prefix)
        if scope == "backbone":
            fresh = not k.startswith(bottom_up_prefix) or component == "offset convs"
        else:  # a detector without mdpool fine-tuned with it; the training-only mimic classifier
            fresh = (component == "mdpool" and not ckpt_has_mdpool) or ".mimic." in k
        if fresh:
            expected_missing[component].append(k)
    missing -= {k for keys in expected_missing.values() for k in keys}

    problems = _diagnose(unexpected, missing, shapes, bottom_up_prefix)
    if problems:
        raise CheckpointMismatchError(
            f"{name} does not fit the model built from this config; nothing was loaded.\n"
            + "\n".join(problems)
        )
    return dict(expected_missing)


def _diagnose(unexpected, missing, shapes, bottom_up_prefix) -> List[str]:
    problems = []
    unexpected, missing, shapes = set(unexpected), set(missing), list(shapes)

    def take(selected):  # the (key, checkpoint shape, model shape) whose dim 0 differs, removed
        nonlocal shapes
        taken = [s for s in shapes if selected(s[0]) and s[1][:1] != s[2][:1]]
        shapes = [s for s in shapes if s not in taken]
        return taken

    offset_shapes = take(lambda k: component_of(k, bottom_up_prefix) == "offset convs")
    if offset_shapes:
        weights = [s for s in offset_shapes if s[0].endswith(".weight")]
        _, ckpt, model = (weights or offset_shapes)[0]
        problems.append(
            f"- deformable groups differ: checkpoint {_deform_groups(ckpt)}, model "
            f"{_deform_groups(model)} (offset convs have 3 x taps x groups output "
            f"channels: {ckpt[0]} vs {model[0]}). Set MODEL.RESNETS.DEFORM_NUM_GROUPS to the "
            "checkpoint's (dg=4: configs/faster_rcnn_R50_FPN_mdconv_dg4.yaml).\n"
            + _describe_shapes(offset_shapes)
        )
    class_shapes = take(lambda k: k.startswith(CLASS_SPECIFIC))
    if class_shapes:
        what = "the class-specific layers differ"
        for key, ckpt, model in class_shapes:
            if key == "roi_heads.box_predictor.cls_score.weight":
                what = (
                    f"the checkpoint has {ckpt[0] - 1} classes (+ background), the model "
                    f"MODEL.ROI_HEADS.NUM_CLASSES = {model[0] - 1}"
                )
        problems.append(f"- number of classes differs: {what}.\n" + _describe_shapes(class_shapes))

    def stages(found):
        return ", ".join(sorted({k[len(bottom_up_prefix) :].split(".")[0] for k in found}))

    # (keys of one side, their component, what to tell the user), in the order they are reported.
    architecture_mismatches = [
        (unexpected, "mdpool",
         "- the checkpoint has modulated deformable RoI pooling (mdpool) weights but the model's "
         "box pooler has no parameters: use configs/faster_rcnn_R50_FPN_mdpool.yaml "
         "(MODEL.ROI_HEADS.NAME: MDPoolROIHeads).\n"),
        (missing, "mdpool",
         "- the model pools boxes with mdpool (MDPoolROIHeads) but the checkpoint has only some "
         "of its weights.\n"),
        (unexpected, "offset convs",
         "- the checkpoint has DCNv2 (mdconv) offset convs in {stages} but the model's ResNet has "
         "no deformable convs there: use a *_mdconv*.yaml config "
         "(MODEL.BACKBONE.NAME: build_dcnv2_resnet_fpn_backbone, "
         "MODEL.RESNETS.DEFORM_ON_PER_STAGE).\n"),
        (missing, "offset convs",
         "- the model has DCNv2 (mdconv) in {stages} but the checkpoint has no offset convs there "
         "(a plain-ResNet detector); loading it would leave the offsets at zero and the masks at "
         "0.5. Use a config without deformable convs.\n"),
        (unexpected, "mask head",
         "- the checkpoint is a Mask R-CNN (mask head weights) but the model has no mask head: "
         "use a mask_rcnn_*.yaml config (MODEL.MASK_ON: True).\n"),
        (missing, "mask head",
         "- the model has a mask head (MODEL.MASK_ON: True) but the checkpoint has none: use a "
         "faster_rcnn_*.yaml config.\n"),
    ]  # fmt: skip
    for keys, component, message in architecture_mismatches:
        found = {k for k in keys if component_of(k, bottom_up_prefix) == component}
        keys -= found  # reported here, not again below
        if found:
            problems.append(message.format(stages=stages(found)) + _describe_keys(found))
    if shapes:
        problems.append("- shapes differ:\n" + _describe_shapes(shapes))
    if unexpected:
        problems.append(
            f"- {len(unexpected)} checkpoint keys are not in the model:\n"
            + _describe_keys(unexpected)
        )
    if missing:
        problems.append(
            f"- {len(missing)} model keys are not in the checkpoint:\n" + _describe_keys(missing)
        )
    return problems
