"""The fused Triton implementation of ``modulated_deform_conv2d`` as opt-in operators.

* ``torch.ops.dcnv2._triton_modulated_deform_conv2d`` / ``_triton_modulated_deform_conv2d_backward``:
  the fused kernels (``projects_dcnv2/ops/triton_kernels/``) behind the public operators' schemas. They
  run CUDA tensors, and CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before their first call.

The public operator ``dcnv2::modulated_deform_conv2d`` never comes here: its CPU, CUDA (the column
path), Autograd and Autocast kernels are all C++ (csrc/). A caller opts in to the fused kernels by
calling these operators, as ``ModulatedDeformConv2d(impl="triton")`` does (``resolve_impl``).

The argument checks exist once, in C++: the operators call ``dcnv2::_modulated_deform_conv2d_check``
(the public operator's checks, its messages) on real tensors; under fake tensors (torch.compile,
torch.export) that check is a no-op, and the public operator's fake kernel's shape checks apply.

The private forward has its own autograd formula (below, in Python: an opt-in path, not the default
hot path): the fused backward when it exists and takes the call, the public backward operator (the
column path) otherwise. Under CUDA autocast it runs in the autocast dtype, as the public operator.

The operators are ``torch.library.triton_op`` s (with ``wrap_triton`` around each launch) rather than
opaque Python kernels: under ``torch.compile`` and ``torch.export`` a call of them is traced into the
Triton kernel itself, which Inductor and AOTInductor compile into their output. Under
``TRITON_INTERPRET=1`` (set before this module is imported) they are plain ``custom_op`` s instead: an
interpreted kernel cannot be traced into a graph. The schema is the public operator's, given explicitly
(inferred from the annotations, the ints would become SymInts). Triton itself is imported on the first
call, not when ``projects_dcnv2`` is imported.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels

__all__ = ["IMPL_ENV", "IMPLS", "resolve_impl"]

IMPL_ENV = "DCNV2_CUDA_IMPL"
IMPLS = ("auto", "cuda", "triton")
_OP = "dcnv2.modulated_deform_conv2d: "


def resolve_impl(impl: Optional[str] = None, *, environ=None) -> str:
    """The implementation a ``ModulatedDeformConv2d`` runs its CUDA calls with: ``"cuda"`` (the public
    operator: the column path) or ``"triton"`` (the fused kernels, ``_triton_modulated_deform_conv2d``).

    ``impl``: ``"auto"``, ``"cuda"`` or ``"triton"`` (case and spaces ignored); ``"auto"`` and ``None``
    read ``DCNV2_CUDA_IMPL`` from ``environ`` (default ``os.environ``), whose own ``auto`` (or unset)
    is the column path, the faster one on the H200. Another value is a ValueError naming the argument
    (or the variable).
    """
    name, value = "impl", impl
    if impl is None or (isinstance(impl, str) and impl.strip().lower() in ("", "auto")):
        environ = os.environ if environ is None else environ
        name, value = IMPL_ENV, environ.get(IMPL_ENV, "auto") or "auto"
    if not isinstance(value, str) or value.strip().lower() not in IMPLS:
        raise ValueError(f"{name}: expected one of auto, cuda, triton, got {value!r}")
    return "triton" if value.strip().lower() == "triton" else "cuda"


def _check(grad_output, input, offset, mask, weight, bias, params):
    """The public operator's argument checks (C++), with its messages."""
    torch.ops.dcnv2._modulated_deform_conv2d_check(
        grad_output, input, offset, mask, weight, bias, *params
    )


# ---------------------------------------------------------------------------------------------
# The private operators
def _require_triton(op_name):
    if not triton_kernels.AVAILABLE:
        raise RuntimeError(f"dcnv2.{op_name}: needs Triton, which is not installed")


def _triton_mdconv(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    deformable_groups: int,
) -> Tensor:
    """Modulated deformable convolution by the fused Triton kernel (``triton_kernels/mdconv_forward.py``).

    float16, bfloat16 and float32 (float32 products in TF32 when
    ``torch.backends.cudnn.allow_tf32`` is set, as ``F.conv2d``), accumulated in float32; CUDA
    tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    params = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, deformable_groups)
    _require_triton("_triton_modulated_deform_conv2d")
    _check(None, input, offset, mask, weight, bias, params)
    reason = triton_kernels.unsupported_reason(input, offset, mask, weight)
    torch._check(
        reason is None, lambda: f"{_OP}the fused Triton kernel cannot run this call: {reason}"
    )
    from .triton_kernels.mdconv_forward import mdconv_forward

    return mdconv_forward(input, offset, mask, weight, bias, *params)


def _triton_mdconv_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    deformable_groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients (input, offset, mask, weight, bias) by the fused Triton kernels
    (``triton_kernels/mdconv_backward.py``); the bias gradient is an empty (0,) tensor without bias.
    Nondeterministic (atomics): alerts under ``torch.use_deterministic_algorithms(True)``."""
    params = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, deformable_groups)
    _require_triton("_triton_modulated_deform_conv2d_backward")
    _check(grad_output, input, offset, mask, weight, bias, params)
    reason = triton_kernels.unsupported_reason(input, offset, mask, weight, grad_output)
    torch._check(
        reason is None, lambda: f"{_OP}the fused Triton kernels cannot run this call: {reason}"
    )
    if not triton_kernels.fused_backward_state()[0]:
        raise NotImplementedError(
            "dcnv2._triton_modulated_deform_conv2d_backward: the fused backward "
            "(projects_dcnv2/ops/triton_kernels/mdconv_backward.py) is not available"
        )
    triton_kernels.alert_not_deterministic("dcnv2::_triton_modulated_deform_conv2d_backward")
    from .triton_kernels.mdconv_backward import mdconv_backward

    return mdconv_backward(grad_output, input, offset, mask, weight, bias, *params)


def _define(name, fn, public):
    """``dcnv2::<name>`` with the schema of the public operator ``public``: a ``triton_op``, or an
    opaque ``custom_op`` under the interpreter (tracing cannot see an interpreted kernel's launch)
    and without Triton (``triton_op`` imports it; the operator then says Triton is missing)."""
    schema = str(getattr(torch.ops.dcnv2, public).default._schema)
    schema = schema[schema.index("(") :]
    if triton_kernels.interpreter_requested() or not triton_kernels.AVAILABLE:
        op = torch.library.custom_op("dcnv2::" + name, fn, mutates_args=(), schema=schema)
        op.register_fake(fn)  # the launchers skip the kernels on fake tensors
    else:
        op = torch.library.triton_op("dcnv2::" + name, fn, mutates_args=(), schema=schema)
    return op


_forward_op = _define("_triton_modulated_deform_conv2d", _triton_mdconv, "modulated_deform_conv2d")
_define(
    "_triton_modulated_deform_conv2d_backward",
    _triton_mdconv_backward,
    "_modulated_deform_conv2d_backward",
)


# ---------------------------------------------------------------------------------------------
# Autograd of the private forward: the fused backward when it exists and takes the call, else the
# public backward operator (on CUDA the column path; on CPU, under the interpreter, the CPU kernel).
def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, *params = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.params = params


def _backward(ctx, grad):
    input, offset, mask, weight, bias = ctx.saved_tensors
    fused = (
        triton_kernels.fused_backward_state()[0]
        and triton_kernels.unsupported_reason(input, offset, mask, weight, grad) is None
    )
    op = (
        torch.ops.dcnv2._triton_modulated_deform_conv2d_backward
        if fused
        else torch.ops.dcnv2._modulated_deform_conv2d_backward
    )
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = op(
        grad, input, offset, mask, weight, bias, *ctx.params
    )
    grad_bias = grad_bias if bias is not None else None
    return (grad_input, grad_offset, grad_mask, grad_weight, grad_bias) + (None,) * len(ctx.params)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Autocast on CUDA, as the public operator's (csrc/ops/autocast/): in the autocast dtype, float64 left
# alone.
def _autocast_cuda(keyset, *args):
    dtype = torch.get_autocast_dtype("cuda")
    args = [
        a.to(dtype)
        if isinstance(a, Tensor)
        and a.is_floating_point()
        and a.device.type == "cuda"
        and a.dtype != torch.float64
        else a
        for a in args
    ]
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)
    with torch._C._ExcludeDispatchKeyGuard(excluded):
        return torch.ops.dcnv2._triton_modulated_deform_conv2d.default(*args)


_lib = torch.library.Library("dcnv2", "IMPL")  # noqa: TOR901  (kept alive: owns the registration)
_lib.impl("_triton_modulated_deform_conv2d", _autocast_cuda, "AutocastCUDA", with_keyset=True)
