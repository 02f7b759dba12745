"""Fused (implicit-GEMM) Triton kernels of ``modulated_deform_conv2d``: no column buffer.

This package only says whether the kernels can run; the kernel modules (``mdconv_forward``,
``mdconv_backward``, and ``common`` for the per-sample math they share) import Triton and are
imported on first use, so ``import projects_dcnv2`` neither needs Triton nor pays for it.

Triton decides when a kernel is decorated whether it is compiled for the GPU or run by its
interpreter on CPU tensors (``TRITON_INTERPRET=1``): set the variable before the first call of a
``_triton_*`` operator (or the first import of a kernel module) to run the kernels on the CPU.
"""

import importlib.util
import os

import torch

__all__ = [
    "AVAILABLE",
    "INT32_MAX",
    "alert_not_deterministic",
    "dot_precision",
    "fused_backward_state",
    "interpreter_requested",
    "max_offset",
    "SUPPORTED_DTYPES",
    "unsupported_reason",
]

AVAILABLE: bool = importlib.util.find_spec("triton") is not None
"""Whether Triton is importable (it ships with PyTorch's CUDA wheels)."""

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The fused kernels' dtypes (float64 stays on the column path)."""

INT32_MAX = 2**31 - 1
"""The kernels index with int32: every tensor's largest element offset must stay at or below this."""


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at kernel decoration)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset (in elements) that indexing ``t`` through its strides reaches."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: TF32 tensor-core products for float32
    when ``torch.backends.cudnn.allow_tf32`` is set (as ``F.conv2d`` decides), "ieee" otherwise
    (float16 and bfloat16 products are exact in the float32 accumulator either way)."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def alert_not_deterministic(caller: str) -> None:
    """The standard alert of a nondeterministic kernel (atomics): an error under
    ``torch.use_deterministic_algorithms(True)``, a warning with ``warn_only=True``; as the C++
    ``at::globalContext().alertNotDeterministic`` of the column path."""
    torch._prims_common.alert_not_deterministic(caller)  # torch._C has no such binding


FUSED_FORWARD_DEFAULT = False
"""Whether the dispatcher sends the CUDA forward to the fused kernel by default (``cuda_impl`` under
``DCNV2_CUDA_IMPL=auto``). False: the fused forward was slower than the column path on an NVIDIA
H200 (docs/gpu_runs/2026-12-04_h200.md), though it needs far less memory;
``DCNV2_CUDA_IMPL=triton`` selects it where memory matters more than time. (That run measured the
previous forward kernel; the channels-last rebuild of ``mdconv_forward.py`` is not measured yet.)"""


def unsupported_reason(input, offset, mask, weight, grad_output=None):
    """Why the fused kernels cannot take these (already checked) arguments, as a phrase, or None when
    they can: a dtype other than float16/bfloat16/float32, or a tensor (the output included) whose
    element offsets pass the int32 index range."""
    if input.dtype not in SUPPORTED_DTYPES:
        return f"dtype {input.dtype} (the fused kernels take float16, bfloat16 and float32)"
    named = [("input", input), ("offset", offset), ("mask", mask), ("weight", weight)]
    if grad_output is not None:
        named.append(("grad_output", grad_output))
    for name, t in named:
        if max_offset(t) > INT32_MAX:
            return f"{name} of shape {tuple(t.shape)} passes the kernels' int32 index range"
    n, _, ho, wo = offset.shape
    if n * weight.shape[0] * ho * wo - 1 > INT32_MAX:
        return "the output passes the kernels' int32 index range"
    return None


def fused_backward_state():
    """(whether the fused backward exists, whether the dispatcher takes it by default on CUDA): its
    module's ``FUSED_BACKWARD_DEFAULT``, set from a GPU measurement against the column path. Imports
    the backward kernels (and Triton)."""
    if not AVAILABLE or importlib.util.find_spec(__name__ + ".mdconv_backward") is None:
        return False, False
    from . import mdconv_backward

    return True, bool(getattr(mdconv_backward, "FUSED_BACKWARD_DEFAULT", False))
