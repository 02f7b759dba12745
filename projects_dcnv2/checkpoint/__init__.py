"""Loading MMDetection's DCNv2 model zoo and torchvision ImageNet weights into this project's models.

* :mod:`.convert`: key mapping MMDetection / torchvision <-> Detectron2 (no tensor is permuted).
* :mod:`.validate`: does a converted checkpoint fit a model? (clear errors, nothing half-loaded)
* :mod:`.pipeline`: ``convert_checkpoint``, both steps for any checkpoint file's content (used by
  the checkpointer and ``tools/convert_mmdet_to_d2.py``).
* :mod:`.checkpointer`: ``DCNv2Checkpointer``, a ``DetectionCheckpointer`` calling it on load;
  importing it registers the ``torchvision://`` path prefix.
"""

from .checkpointer import DCNv2Checkpointer, TorchvisionHandler, torchvision_url
from .convert import (
    COMPONENTS,
    ConversionReport,
    convert_d2_to_mmdet,
    convert_mmdet_to_d2,
    convert_torchvision_to_d2,
    find_bottom_up_prefix,
    guess_format,
)
from .pipeline import AUTHOR, convert_checkpoint
from .validate import CheckpointMismatchError, check_checkpoint_fits, checkpoint_scope

__all__ = [
    "AUTHOR",
    "COMPONENTS",
    "CheckpointMismatchError",
    "ConversionReport",
    "DCNv2Checkpointer",
    "TorchvisionHandler",
    "check_checkpoint_fits",
    "checkpoint_scope",
    "convert_checkpoint",
    "convert_d2_to_mmdet",
    "convert_mmdet_to_d2",
    "convert_torchvision_to_d2",
    "find_bottom_up_prefix",
    "guess_format",
    "torchvision_url",
]
