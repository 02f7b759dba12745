"""The DCNv2 operator library, as ``torchvision.ops``: needs PyTorch only (no Detectron2).

* ``modulated_deform_conv2d`` / ``deform_roi_pool``: the functional operators, over
  ``torch.ops.dcnv2.modulated_deform_conv2d`` / ``torch.ops.dcnv2.deform_roi_pool``, whose kernels,
  autograd and autocast are C++ (``_C``, built from csrc/).
* ``WITH_CUDA`` / ``CUDA_VERSION``: whether (and with which CUDA runtime) ``_C`` has CUDA kernels.

Importing this package loads ``_C``, registers the fake kernels (``_extension``) and the opt-in fused
Triton operators ``torch.ops.dcnv2._triton_*`` (``_triton_ops``). The nn.Modules are in
``projects_dcnv2.layers``.
"""

from ._extension import CUDA_VERSION, WITH_CUDA
from .deform_conv import modulated_deform_conv2d
from .deform_roi_pool import deform_roi_pool

__all__ = ["CUDA_VERSION", "WITH_CUDA", "modulated_deform_conv2d", "deform_roi_pool"]
