"""DCNv2 (modulated deformable convolution and RoI pooling) for Detectron2."""
from . import layers  # noqa: F401  (loads the C++/CUDA extension and registers the ops)
