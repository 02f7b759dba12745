"""Loading: :func:`convert_checkpoint` turns any checkpoint file's content into a state dict that
fits the model (MMDetection and torchvision files converted, every file checked), and
``DCNv2Checkpointer`` is Detectron2's checkpointer calling it on ``load``. The formats a
``MODEL.WEIGHTS`` may be are listed in ``convert_checkpoint``'s docstring and docs/model_zoo.md.
A checkpoint that does not fit raises :class:`CheckpointMismatchError` before any tensor is copied.
"""

import pickle
from typing import Mapping, Optional, Tuple

from iopath.common.file_io import PathHandler

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .convert import (
    BOTTOM_UP,
    ConversionReport,
    component_of,
    convert_mmdet_to_d2,
    convert_torchvision_to_d2,
    guess_format,
)
from .validate import CheckpointMismatchError, bottom_up_prefix, check_checkpoint_fits

__all__ = ["AUTHOR", "DCNv2Checkpointer", "TorchvisionHandler", "convert_checkpoint"]

AUTHOR = "projects_dcnv2"  # "__author__" of the pickles written by tools/convert_mmdet_to_d2.py

_CONVERTERS = {"mmdet": convert_mmdet_to_d2, "torchvision": convert_torchvision_to_d2}


def convert_checkpoint(
    raw: Mapping, model_state: Optional[Mapping] = None, *, name: str = "checkpoint"
) -> Tuple[Mapping, Optional[ConversionReport]]:
    """Turn a checkpoint file's content into Detectron2 names for this project's models and check
    that it fits the model: the one path used by ``DCNv2Checkpointer`` and
    ``tools/convert_mmdet_to_d2.py`` alike.

    Args:
        raw: what the file holds: an MMDetection checkpoint (``{"meta", "state_dict"}`` or a bare
            state dict; from a path or an ``https://download.openmmlab.com/...`` URL), a
            torchvision ImageNet ResNet state dict (e.g. ``torchvision://resnet50``: the DCNv2
            offset convs then stay zero-initialised), a pickle written by
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
    prefix = BOTTOM_UP if model_state is None else bottom_up_prefix(model_state)
    if ours:
        state_dict, report = raw["model"], ConversionReport(source=f"{AUTHOR} pickle")
        report.counts.update(component_of(k, prefix) for k in state_dict)
    else:
        state_dict, report = _CONVERTERS[fmt](raw, bottom_up_prefix=prefix)
    report.name = name
    if model_state is not None:
        expected_missing = check_checkpoint_fits(
            state_dict, model_state, bottom_up_prefix=prefix, name=name
        )
        report.not_loaded = {c: len(keys) for c, keys in expected_missing.items()}
        report.not_loaded_keys = [k for keys in expected_missing.values() for k in keys]
    return state_dict, report


class TorchvisionHandler(PathHandler):
    """Resolves ``torchvision://<model name>`` (MMDetection's spelling, e.g.
    ``torchvision://resnet50``) to torchvision's original ImageNet weights (``IMAGENET1K_V1``),
    downloaded through ``PathManager``'s HTTP cache. Registered by ``projects_dcnv2.checkpoint``."""

    PREFIX = "torchvision://"

    @staticmethod
    def url(name: str) -> str:
        """Download URL of ``IMAGENET1K_V1`` for a torchvision model name such as ``resnet50``."""
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"torchvision://{name}: torchvision has no model named {name!r}"
            ) from e
        if "IMAGENET1K_V1" not in weights.__members__:
            raise ValueError(
                f"torchvision://{name}: torchvision has no IMAGENET1K_V1 weights for {name!r}"
            )
        return weights.IMAGENET1K_V1.url

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return PathManager.get_local_path(self.url(path[len(self.PREFIX) :]), **kwargs)

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


class DCNv2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts MMDetection and torchvision checkpoints on load
    (:func:`convert_checkpoint`).

    Same constructor as ``DetectionCheckpointer``. After a converted load, ``self.report`` holds
    the :class:`ConversionReport` (also logged); it is None after a plain Detectron2 load.
    Training saves through ``projects_dcnv2.engine.AtomicCheckpointer``, a subclass.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.report = None

    def _load_file(self, filename):
        """Detectron2's loader, then :func:`convert_checkpoint`: ``self.report`` is its report
        (None for a Detectron2 checkpoint, returned as loaded)."""
        self.report = None
        try:
            loaded = super()._load_file(filename)
        except pickle.UnpicklingError as e:
            if filename.endswith(".pkl"):
                raise
            raise RuntimeError(
                f"torch.load(weights_only=True) refused {filename}: it holds Python objects besides "
                "tensors and containers. If you trust the file, convert it once with "
                f"`python tools/convert_mmdet_to_d2.py {filename} OUT.pkl --trust-pickle` and set "
                "MODEL.WEIGHTS to OUT.pkl."
            ) from e
        # Detectron2 wraps a .pth without a "model" entry (any non-Detectron2 file) as {"model": ...}.
        raw = loaded if filename.endswith(".pkl") else loaded.get("model")
        if not isinstance(raw, Mapping):
            return loaded
        state_dict, self.report = convert_checkpoint(raw, self.model.state_dict(), name=filename)
        if self.report is None or self.report.source == f"{AUTHOR} pickle":
            return loaded  # Detectron2 names already
        article = "an" if self.report.source == "MMDetection" else "a"
        self.logger.info(
            f"Reading {filename} as {article} {self.report.source} checkpoint; converting its keys"
        )
        return {
            "model": state_dict,
            "__author__": f"{self.report.source} (converted by {AUTHOR})",
            "matching_heuristics": False,
        }

    def _load_model(self, checkpoint):
        """Detectron2's ``_load_model``; after a converted load, the keys the report says stay at
        their initialisation are not listed as missing."""
        incompatible = super()._load_model(checkpoint)
        if self.report is None:
            return incompatible
        if incompatible.unexpected_keys or incompatible.incorrect_shapes:  # ruled out by the check
            raise RuntimeError(f"unexpected load result after validation: {incompatible}")
        expected = set(self.report.not_loaded_keys)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in expected]
        self.logger.info(f"Loaded {self.report.name}:\n{self.report.summary()}")
        return incompatible
