"""Loads the C++/CUDA extension once and registers, for every dcnv2 operator, its fake (meta) kernel.

Everything on the hot path is registered by the extension, in C++ (``csrc/``): the CPU and CUDA
kernels, the autograd formulas (through the separate ``_*_backward`` operators) and the autocast
kernels. The fake kernels are Python (they run only while tracing). After this module is imported
the operators are reachable as ``torch.ops.dcnv2.modulated_deform_conv2d`` and
``torch.ops.dcnv2.deform_roi_pool``; the opt-in fused Triton operators are in ``_triton_ops.py``.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "projects_dcnv2.ops._C is missing: the C++/CUDA extension was not built. "
        "Run `make setup` or `pip install -e . --no-build-isolation` in the project root."
    ) from e

__all__ = ["WITH_CUDA", "CUDA_VERSION"]

CUDA_VERSION: int = torch.ops.dcnv2._cuda_version()
"""CUDA runtime version the extension was built with (e.g. 13000), or -1 for a CPU-only build."""
WITH_CUDA: bool = CUDA_VERSION >= 0


def _conv_out_size(size, pad, dilation, kernel, stride):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


# ---------------------------------------------------------------------------------------------
# modulated_deform_conv2d
@torch.library.register_fake("dcnv2::modulated_deform_conv2d")
def _mdconv_fake(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg
):
    torch._check(input.dim() == 4, lambda: f"input: expected a 4-D tensor, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"weight: expected a 4-D tensor, got {weight.dim()}-D")
    out_h = _conv_out_size(input.shape[2], pad_h, dil_h, weight.shape[2], stride_h)
    out_w = _conv_out_size(input.shape[3], pad_w, dil_w, weight.shape[3], stride_w)
    for size in (
        out_h,
        out_w,
    ):  # as the kernels: an input smaller than the dilated kernel is an error
        torch._check(
            size > 0, lambda: "input: expected a padded spatial size of at least the dilated kernel"
        )
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.register_fake("dcnv2::_modulated_deform_conv2d_backward")
def _mdconv_backward_fake(grad, input, offset, mask, weight, bias, *params):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
    return (
        input.new_empty(input.shape),
        offset.new_empty(offset.shape),
        mask.new_empty(mask.shape),
        weight.new_empty(weight.shape),
        grad_bias,
    )


@torch.library.register_fake("dcnv2::_modulated_deform_conv2d_check")
def _mdconv_check_fake(grad_output, input, offset, mask, weight, bias, *params):
    """No-op: the check reads concrete sizes; while tracing, the operators' fake kernels check."""
    return None


# ---------------------------------------------------------------------------------------------
# deform_roi_pool
@torch.library.register_fake("dcnv2::deform_roi_pool")
def _pool_fake(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma):
    torch._check(input.dim() == 4, lambda: f"input: expected a 4-D tensor, got {input.dim()}-D")
    torch._check(rois.dim() == 2, lambda: f"rois: expected a 2-D tensor (K, 5), got {rois.dim()}-D")
    return input.new_empty((rois.shape[0], input.shape[1], pooled_h, pooled_w))


@torch.library.register_fake("dcnv2::_deform_roi_pool_backward")
def _pool_backward_fake(grad, input, rois, offset, *params):
    grad_offset = offset.new_empty(offset.shape) if offset is not None else input.new_empty((0,))
    return input.new_empty(input.shape), grad_offset


# The opt-in fused Triton operators (private; the public operators never call them).
from . import _triton_ops  # noqa: E402, F401
