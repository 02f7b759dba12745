"""DCNv2 (modulated deformable convolution and RoI pooling) for Detectron2."""
from . import layers  # noqa: F401  (loads the C++/CUDA extension and registers the ops)
from .config import add_dcnv2_config, load_dcnv2_config
from . import modeling  # noqa: F401  (imported so the backbone / ROI-head registrations run)
from . import data  # noqa: F401  (imported so the embedded shapes data set is registered)

__all__ = ["add_dcnv2_config", "load_dcnv2_config"]
