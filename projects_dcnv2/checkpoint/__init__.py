"""Loading MMDetection's DCNv2 model zoo and torchvision ImageNet weights into this project's models.

* :mod:`.convert`: key names MMDetection / torchvision -> Detectron2 (no tensor is permuted);
* :mod:`.validate`: does a converted checkpoint fit a model? (clear errors, nothing half-loaded);
* :mod:`.checkpointer`: ``convert_checkpoint`` (both steps for any file's content, used by the
  checkpointer and ``tools/convert_mmdet_to_d2.py``) and ``DCNv2Checkpointer``, which calls it
  on load.

Importing this package registers ``torchvision://<model>`` paths with Detectron2's
``PathManager`` (below), so ``MODEL.WEIGHTS torchvision://resnet50`` works as in MMDetection.
Atomic checkpoint saves during training are the trainer's: ``projects_dcnv2.engine``.
"""

from detectron2.utils.file_io import PathManager

from .checkpointer import AUTHOR, DCNv2Checkpointer, TorchvisionHandler, convert_checkpoint
from .validate import CheckpointMismatchError

PathManager.register_handler(TorchvisionHandler())

__all__ = ["AUTHOR", "CheckpointMismatchError", "DCNv2Checkpointer", "convert_checkpoint"]
