"""Loads the C++/CUDA extension once and registers, for every dcnv2 operator, its fake (meta) kernel,
its autograd formula (through the separate ``_*_backward`` operator) and its autocast behaviour.

The kernels themselves are registered by the extension (``csrc/``); after this module is imported
they are reachable as ``torch.ops.dcnv2.modulated_deform_conv2d`` and ``torch.ops.dcnv2.deform_roi_pool``.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "projects_dcnv2._C is missing: the C++/CUDA extension was not built. "
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


def _mdconv_setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, *params = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.params = params


def _mdconv_backward(ctx, grad):
    input, offset, mask, weight, bias = ctx.saved_tensors
    grads = torch.ops.dcnv2._modulated_deform_conv2d_backward(
        grad, input, offset, mask, weight, bias, *ctx.params
    )
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = grads
    return (
        grad_input,
        grad_offset,
        grad_mask,
        grad_weight,
        grad_bias if bias is not None else None,
    ) + (None,) * len(ctx.params)


torch.library.register_autograd(
    "dcnv2::modulated_deform_conv2d", _mdconv_backward, setup_context=_mdconv_setup_context
)


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


def _pool_setup_context(ctx, inputs, output):
    input, rois, offset, *params = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.params = params


def _pool_backward(ctx, grad):
    input, rois, offset = ctx.saved_tensors
    grad_input, grad_offset = torch.ops.dcnv2._deform_roi_pool_backward(
        grad, input, rois, offset, *ctx.params
    )
    return (grad_input, None, grad_offset if offset is not None else None) + (None,) * len(
        ctx.params
    )


torch.library.register_autograd(
    "dcnv2::deform_roi_pool", _pool_backward, setup_context=_pool_setup_context
)


# ---------------------------------------------------------------------------------------------
# Autocast. On CUDA, modulated_deform_conv2d runs in the autocast dtype, as F.conv2d does (both of
# its CUDA implementations accumulate in float32): registered in _triton_ops.py. Everywhere else
# the ops run in float32 under torch.autocast (as torchvision's deform_conv2d and MMDetection's fp32
# RoI extractors do); callers get a float32 result and the next autocast op casts it back. Direct
# float16/bfloat16 inputs (no autocast) use the half kernels on CUDA, which accumulate in float32.
torch.library.register_autocast("dcnv2::modulated_deform_conv2d", "cpu", torch.float32)
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("dcnv2::deform_roi_pool", _device, torch.float32)

# The public modulated_deform_conv2d's CUDA kernels (fused Triton kernels or the column path), the
# private _triton_* operators and the CUDA autocast rule above.
from . import _triton_ops  # noqa: E402, F401
