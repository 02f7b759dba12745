"""``DCNv2Checkpointer``: Detectron2's checkpointer that also reads MMDetection and torchvision files.

``MODEL.WEIGHTS`` may then be

* a Detectron2 checkpoint (``.pth`` from training, ``.pkl`` model-zoo file): loaded exactly as
  ``DetectionCheckpointer`` does;
* an MMDetection checkpoint (``{"meta", "state_dict"}`` with ``backbone.layer*`` / ``neck.*`` /
  ``roi_head.*`` keys), a local path or a URL such as ``https://download.openmmlab.com/...``
  (downloaded once into iopath's cache, like Detectron2's own URLs): converted on the fly and
  checked against the model, which must match it completely;
* a torchvision ImageNet ResNet (``torchvision://resnet50``, its
  ``https://download.pytorch.org/models/resnet50-*.pth`` URL or a local copy): converted onto the
  model's ResNet; the DCNv2 offset convs stay zero-initialised and are reported, not warned about;
* a pickle written by ``tools/convert_mmdet_to_d2.py``: loaded as Detectron2 loads ``.pkl`` files,
  and checked like the formats above.

A checkpoint that does not fit raises :class:`CheckpointMismatchError` before any tensor is copied.
Importing this module registers the ``torchvision://`` prefix with Detectron2's ``PathManager``.

Saving is atomic on local disks: a checkpoint is written to a temporary file in ``save_dir`` and
renamed into place, and ``last_checkpoint`` is rewritten the same way only after that rename, so
a process killed while saving leaves the previous checkpoint and ``last_checkpoint`` intact.
"""

import os
import pickle
import uuid
from typing import IO, Any, Callable, Mapping

import torch
from iopath.common.file_io import PathHandler

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .pipeline import AUTHOR, convert_checkpoint

__all__ = ["AUTHOR", "DCNv2Checkpointer", "TorchvisionHandler", "atomic_write", "torchvision_url"]


def torchvision_url(name: str) -> str:
    """Download URL of torchvision's original ImageNet weights (``IMAGENET1K_V1``, what
    MMDetection's ``torchvision://<name>`` resolves to) for a model name such as ``resnet50``."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision://{name}: torchvision has no model named {name!r}") from e
    if "IMAGENET1K_V1" not in weights.__members__:
        raise ValueError(
            f"torchvision://{name}: torchvision has no IMAGENET1K_V1 weights for {name!r}"
        )
    return weights.IMAGENET1K_V1.url


class TorchvisionHandler(PathHandler):
    """Resolves ``torchvision://<model name>`` to torchvision's weight URL, downloaded through
    ``PathManager``'s HTTP cache."""

    PREFIX = "torchvision://"

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return PathManager.get_local_path(torchvision_url(path[len(self.PREFIX) :]), **kwargs)

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(TorchvisionHandler())


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a new temporary file next to ``path``, flush it to disk, then rename
    it onto ``path`` (``os.replace``: readers see the old file or the complete new one, never a
    partial one). If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    name = f".{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp = os.path.join(directory, name)
    try:
        with open(tmp, "xb") as f:  # "x": never reuse someone else's file; mode follows umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DCNv2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts MMDetection and torchvision checkpoints on load
    and saves atomically.

    Same constructor as ``DetectionCheckpointer``. After a converted load, ``self.report`` holds
    the :class:`ConversionReport` (also logged); it is None after a plain Detectron2 load.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.report = None

    @classmethod
    def from_checkpointer(cls, other: DetectionCheckpointer) -> "DCNv2Checkpointer":
        """A DCNv2Checkpointer with the model, save_dir and checkpointables of ``other`` (e.g. the
        one ``DefaultTrainer`` builds). Swap it in before ``DefaultTrainer`` builds its hooks (as
        ``train_net.Trainer.build_hooks`` does): the ``PeriodicCheckpointer`` hook keeps the
        checkpointer it was given."""
        return cls(
            other.model, other.save_dir, save_to_disk=other.save_to_disk, **other.checkpointables
        )

    def _save_dir_is_local(self) -> bool:
        return "://" not in self.save_dir  # other PathManager back-ends keep fvcore's plain write

    def save(self, name: str, **kwargs: Any) -> None:
        """As ``Checkpointer.save`` (model, checkpointables and ``kwargs`` into
        ``save_dir/<name>.pth``, then ``last_checkpoint``), but each file is written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._save_dir_is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``save_dir/last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._save_dir_is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

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
        state_dict, report = convert_checkpoint(raw, self.model.state_dict(), name=filename)
        if report is None or report.source == f"{AUTHOR} pickle":
            self.report = report
            return loaded  # Detectron2 names already
        article = "an" if report.source == "MMDetection" else "a"
        self.logger.info(
            f"Reading {filename} as {article} {report.source} checkpoint; converting its keys"
        )
        self.report = report
        return {
            "model": state_dict,
            "__author__": f"{report.source} (converted by {AUTHOR})",
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
