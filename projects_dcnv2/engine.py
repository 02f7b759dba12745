"""What ``train_net.py`` and the tools share: the trainer, the evaluator, the inference model.

* :class:`DCNv2Trainer`: Detectron2's ``DefaultTrainer`` with what long DCNv2 runs need:
  checkpoints go through :class:`AtomicCheckpointer` (atomic writes; loads MMDetection /
  torchvision weights), the periodic ones included; they keep the optimizer (and AMP grad scaler)
  state, also on Detectron2 releases whose ``DefaultTrainer`` saves only the iteration and the LR
  scheduler; the training loader raises an error naming the image file of a bad record; the
  evaluator is :func:`build_evaluator`.
* :func:`build_evaluator`: the evaluator for a data set (COCO metrics).
* :func:`inference_config`: the tools' config (file, overrides, score threshold).
* :func:`build_inference_model`: build the model, load ``MODEL.WEIGHTS``, eval mode.
* :func:`inference_input`: one image as the test-time loader gives it to the model.
"""

import os
import uuid
from typing import IO, Any, Callable

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

from .checkpoint import DCNv2Checkpointer
from .config import load_dcnv2_config
from .data.checks import CheckedMapper

__all__ = [
    "AtomicCheckpointer",
    "DCNv2Trainer",
    "build_evaluator",
    "build_inference_model",
    "inference_config",
    "inference_input",
]


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO box (and mask) AP for ``dataset_name``, results under ``output_folder`` (default
    ``OUTPUT_DIR/inference``). Detectron2's fast COCOeval needs ``detectron2._C``; without it
    (a Python-only Detectron2 install) pycocotools' own COCOeval is used."""
    try:
        from detectron2 import _C  # noqa: F401

        fast = True
    except ImportError:
        fast = False
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=fast)


def inference_config(config_file, opts=(), score_threshold=None):
    """``load_dcnv2_config(config_file, opts)`` with ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` set to
    ``score_threshold`` when it is given (the lowest score a tool keeps)."""
    if score_threshold is not None:
        opts = [*opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", score_threshold]
    return load_dcnv2_config(config_file, opts)


def build_inference_model(cfg, *, resume: bool = False):
    """The config's model in eval mode with ``MODEL.WEIGHTS`` loaded through
    ``DCNv2Checkpointer`` (Detectron2, MMDetection and torchvision files; an empty
    ``MODEL.WEIGHTS`` keeps the initialisation). ``resume``: the last checkpoint in
    ``OUTPUT_DIR`` instead, when there is one (``train_net.py --eval-only --resume``)."""
    model = build_model(cfg)
    checkpointer = DCNv2Checkpointer(model, save_dir=cfg.OUTPUT_DIR)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    return model.eval()


def inference_input(cfg, image: np.ndarray) -> dict:
    """``{"image": (3, H', W') float32 tensor, "height": H, "width": W}`` for an (H, W, 3) image
    in ``cfg.INPUT.FORMAT``: resized to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` as the test
    loader does; height and width are the original size, to which the model rescales its
    detections."""
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}


def _atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
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


class AtomicCheckpointer(DCNv2Checkpointer):
    """``DCNv2Checkpointer`` whose saves are atomic on local disks: a checkpoint is written to a
    temporary file in ``save_dir`` and renamed into place, and ``last_checkpoint`` is rewritten
    the same way only after that rename, so a process killed while saving leaves the previous
    checkpoint and ``last_checkpoint`` intact. Folders on other ``PathManager`` back-ends
    (``manifold://`` ...) keep fvcore's plain write."""

    @classmethod
    def from_checkpointer(cls, other) -> "AtomicCheckpointer":
        """An AtomicCheckpointer with the model, save_dir and checkpointables of ``other`` (e.g.
        the one ``DefaultTrainer`` builds)."""
        return cls(
            other.model, other.save_dir, save_to_disk=other.save_to_disk, **other.checkpointables
        )

    def _save_dir_is_local(self) -> bool:
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """As ``Checkpointer.save`` (model, checkpointables and ``kwargs`` into
        ``save_dir/<name>.pth``, then ``last_checkpoint``), but each file is written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._save_dir_is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``save_dir/last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._save_dir_is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        _atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )


class DCNv2Trainer(DefaultTrainer):
    """``DefaultTrainer`` with atomic checkpoints that keep the optimizer state, a checked
    training loader and the COCO evaluator (see the module docstring)."""

    def build_hooks(self):
        # DefaultTrainer.__init__ creates its checkpointer just before the hooks, and the
        # PeriodicCheckpointer hook keeps the one it is given: swap it here so that the periodic
        # checkpoints are atomic too.
        self.checkpointer = AtomicCheckpointer.from_checkpointer(self.checkpointer)
        return super().build_hooks()

    # Without DefaultTrainer.state_dict of the inner trainer (the PyPI 0.6 build), `--resume` would
    # restart the optimizer's momentum: save and restore it as newer Detectron2 does.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent from checkpoints of the releases above
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = CheckedMapper(
            DatasetMapper(cfg, True), num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)
