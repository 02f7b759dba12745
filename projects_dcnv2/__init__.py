"""DCNv2 (modulated deformable convolution and RoI pooling) for Detectron2.

``projects_dcnv2.layers`` (the operators and their modules) needs only PyTorch. When detectron2 is
installed, importing this package also registers the Detectron2 components (backbones, RoI heads,
the embedded shapes data set) and exposes ``add_dcnv2_config`` / ``load_dcnv2_config``.
"""

from . import layers  # noqa: F401  (loads the C++/CUDA extension and registers the ops)

try:
    import detectron2  # noqa: F401
except ImportError:  # the operator library alone: torchvision.ops-style use without Detectron2
    HAS_DETECTRON2 = False
else:
    HAS_DETECTRON2 = True

if HAS_DETECTRON2:
    from . import (
        data,  # noqa: F401  (imported so the embedded shapes data set is registered)
        modeling,  # noqa: F401  (imported so the backbone / ROI-head registrations run)
    )
    from .config import add_dcnv2_config, load_dcnv2_config

__all__ = ["HAS_DETECTRON2", "add_dcnv2_config", "load_dcnv2_config"]


def __getattr__(name):
    if not HAS_DETECTRON2 and name in ("add_dcnv2_config", "load_dcnv2_config"):
        raise ImportError(
            f"projects_dcnv2.{name} needs detectron2, which is not installed; "
            "projects_dcnv2.layers (the operators and modules) works without it"
        )
    raise AttributeError(f"module 'projects_dcnv2' has no attribute {name!r}")
