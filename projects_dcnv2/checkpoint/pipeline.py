"""``convert_checkpoint``: the one path from a checkpoint file's content to a state dict that fits
a model, used by ``DCNv2Checkpointer`` and ``tools/convert_mmdet_to_d2.py`` alike.

Detect the format, rename the keys (:mod:`.convert`), check the fit (:mod:`.validate`), report.
"""

from typing import Mapping, Optional, Tuple

from .convert import (
    BOTTOM_UP,
    ConversionReport,
    component_of,
    convert_mmdet_to_d2,
    convert_torchvision_to_d2,
    find_bottom_up_prefix,
    guess_format,
)
from .validate import CheckpointMismatchError, check_checkpoint_fits, checkpoint_scope

__all__ = ["AUTHOR", "convert_checkpoint"]

AUTHOR = "projects_dcnv2"  # "__author__" of the pickles written by tools/convert_mmdet_to_d2.py

_CONVERTERS = {"mmdet": convert_mmdet_to_d2, "torchvision": convert_torchvision_to_d2}


def _bottom_up_prefix(model_state: Mapping) -> str:
    prefix = find_bottom_up_prefix(model_state.keys())
    if prefix is not None:
        return prefix
    raise CheckpointMismatchError(
        "the model has no ResNet stem (no '*stem.conv1.weight' parameter), so MMDetection / "
        "torchvision ResNet weights have nowhere to go"
    )


def convert_checkpoint(
    raw: Mapping, model_state: Optional[Mapping] = None, *, name: str = "checkpoint"
) -> Tuple[Mapping, Optional[ConversionReport]]:
    """Turn a checkpoint file's content into Detectron2 names for this project's models and check
    that it fits the model.

    Args:
        raw: what the file holds: an MMDetection checkpoint (``{"meta", "state_dict"}`` or a bare
            state dict), a torchvision ImageNet ResNet state dict, a pickle written by
            ``tools/convert_mmdet_to_d2.py`` (``{"model", "__author__": AUTHOR}``), or anything
            else, which is taken for a Detectron2 checkpoint / state dict.
        model_state: ``model.state_dict()`` of the target model; None converts without checking
            (ResNet keys then go under ``backbone.bottom_up.``).
        name: how to call the checkpoint in messages (e.g. its path).

    Returns:
        ``(state_dict, report)``: the Detectron2 state dict and a :class:`ConversionReport`
        (``report.source`` names the format). For a Detectron2 checkpoint, ``(raw, None)``: it is
        neither converted nor checked (Detectron2's checkpointer loads it as usual).

    Raises:
        CheckpointMismatchError: the checkpoint does not fit ``model_state`` (nothing should be
            loaded), or it is an MMCV-style checkpoint of an unknown model.
    """
    ours = raw.get("__author__") == AUTHOR  # already in Detectron2 names
    fmt = None if ours else guess_format(raw)
    if not ours and fmt is None:
        if isinstance(raw.get("state_dict"), Mapping):
            raise CheckpointMismatchError(
                f"{name} is an MMCV-style checkpoint ({{'state_dict': ...}}) but its keys are "
                "neither MMDetection R-50-FPN R-CNN keys (backbone.layer*, neck.*, rpn_head.*, "
                "roi_head.*) nor a torchvision ResNet (conv1.*, layer*.*, fc.*): "
                f"{list(raw['state_dict'])[:5]}"
            )
        return raw, None  # a Detectron2 checkpoint: any model, stem or not
    prefix = BOTTOM_UP if model_state is None else _bottom_up_prefix(model_state)
    if ours:
        state_dict = raw["model"]
        report = ConversionReport(source=f"{AUTHOR} pickle")
        for key in state_dict:
            component = component_of(key, prefix)
            report.counts[component] = report.counts.get(component, 0) + 1
    else:
        state_dict, report = _CONVERTERS[fmt](raw, bottom_up_prefix=prefix)
    report.name = name
    if model_state is not None:
        expected_missing = check_checkpoint_fits(
            state_dict,
            model_state,
            scope=checkpoint_scope(state_dict, prefix),
            bottom_up_prefix=prefix,
            name=name,
        )
        report.not_loaded = {c: len(keys) for c, keys in expected_missing.items()}
        report.not_loaded_keys = [k for keys in expected_missing.values() for k in keys]
    return state_dict, report
