"""The fused Triton implementation of ``modulated_deform_conv2d`` as operators, and the CUDA kernels of
the public operators, which choose between it and the column path.

* ``torch.ops.dcnv2._triton_modulated_deform_conv2d`` / ``_triton_modulated_deform_conv2d_backward``:
  the fused kernels (``projects_dcnv2/triton_kernels/``) behind the public operators' schemas. They
  run CUDA tensors, and CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before their first call.
* ``dcnv2::modulated_deform_conv2d`` and ``dcnv2::_modulated_deform_conv2d_backward`` on CUDA: the
  kernels registered here call one of those or the column path (``dcnv2::_cuda_*``, csrc/) as
  ``cuda_impl`` decides: the fused kernels when Triton is importable and they take the call
  (float16/bfloat16/float32, element offsets within int32), the column path otherwise;
  ``DCNV2_CUDA_IMPL=auto|triton|cuda`` forces one.

The private operators are ``torch.library.triton_op`` s (with ``wrap_triton`` around each launch)
rather than opaque Python kernels: under ``torch.compile`` and ``torch.export`` a call of them is
traced into the Triton kernel itself, which Inductor and AOTInductor compile into their output,
where an opaque kernel needs Python at run time. The function doubles as the fake kernel (the
launches are skipped on fake tensors). Under ``TRITON_INTERPRET=1`` (set before this module is
imported) they are plain ``custom_op`` s instead: an interpreted kernel cannot be traced into a
graph. Both exist since torch 2.6; the schema is the public operator's, given explicitly (inferred
from the annotations, the ints would become SymInts).

The public operators keep their C++ schema, fake kernel and autograd formula (``_ops.py``); their
CUDA kernel is the Python chooser below, so under ``torch.compile`` they stay one opaque call.
Triton itself is imported on the first call, not when ``projects_dcnv2`` is imported.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels

__all__ = ["IMPL_ENV", "cuda_impl", "check_mdconv_args"]

IMPL_ENV = "DCNV2_CUDA_IMPL"
_IMPLS = ("auto", "triton", "cuda")
_OP = "dcnv2.modulated_deform_conv2d: "


def _conv_out_size(size, pad, dilation, kernel, stride):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def check_mdconv_args(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg
):
    """The C++ operator's argument checks (``mdconv_geometry`` in csrc/), with its messages: raises
    RuntimeError naming the argument, expected vs got."""

    def check(cond, msg):
        torch._check(cond, lambda: _OP + msg)

    layouts = {
        "input": "(N, C, H, W)",
        "weight": "(C_out, C_in / groups, kh, kw)",
        "offset": "(N, 2 * deformable_groups * kh * kw, H_out, W_out)",
        "mask": "(N, deformable_groups * kh * kw, H_out, W_out)",
    }
    tensors = {"input": input, "weight": weight, "offset": offset, "mask": mask}
    for name, t in tensors.items():
        check(
            t.dim() == 4,
            f"{name}: expected a 4-D tensor {layouts[name]}, got a {t.dim()}-D tensor of shape "
            f"{list(t.shape)}",
        )
    check(
        input.is_floating_point(),
        f"input: expected a floating-point tensor, got dtype {input.dtype}",
    )
    others = [("offset", offset), ("mask", mask), ("weight", weight)]
    if bias is not None:
        others.append(("bias", bias))
    for name, t in others:
        check(
            t.device == input.device,
            f"{name}: expected a tensor on {input.device} (the device of input), got one on {t.device}",
        )
        check(
            t.dtype == input.dtype,
            f"{name}: expected dtype {input.dtype} (the dtype of input), got {t.dtype}",
        )
    check(
        stride_h > 0 and stride_w > 0,
        f"stride: expected positive values, got ({stride_h}, {stride_w})",
    )
    check(
        pad_h >= 0 and pad_w >= 0, f"padding: expected non-negative values, got ({pad_h}, {pad_w})"
    )
    check(dil_h > 0 and dil_w > 0, f"dilation: expected positive values, got ({dil_h}, {dil_w})")
    check(groups > 0, f"groups: expected a positive value, got {groups}")
    check(dg > 0, f"deformable_groups: expected a positive value, got {dg}")
    n, c, h, w = input.shape
    out_channels, cg, kh, kw = weight.shape
    check(
        c % groups == 0,
        f"input: expected a channel count divisible by groups={groups}, got {c} channels",
    )
    check(
        c % dg == 0,
        f"input: expected a channel count divisible by deformable_groups={dg}, got {c} channels",
    )
    check(
        out_channels % groups == 0,
        f"weight: expected an output channel count divisible by groups={groups}, got {out_channels}",
    )
    check(
        cg * groups == c,
        f"weight: expected shape (C_out, {c // groups}, kh, kw) for {c} input channels and "
        f"groups={groups}, got {list(weight.shape)}",
    )
    check(kh > 0 and kw > 0, f"weight: expected a non-empty kernel, got shape {list(weight.shape)}")
    span_h = h + 2 * pad_h - (dil_h * (kh - 1) + 1)
    span_w = w + 2 * pad_w - (dil_w * (kw - 1) + 1)
    check(
        span_h >= 0 and span_w >= 0,
        f"input: expected a padded spatial size of at least the dilated kernel "
        f"({dil_h * (kh - 1) + 1}, {dil_w * (kw - 1) + 1}), got {list(input.shape)} with padding "
        f"({pad_h}, {pad_w})",
    )
    ho, wo = span_h // stride_h + 1, span_w // stride_w + 1
    taps = kh * kw
    offset_shape = [n, 2 * dg * taps, ho, wo]
    mask_shape = [n, dg * taps, ho, wo]
    check(
        list(offset.shape) == offset_shape,
        f"offset: expected shape (N, 2 * deformable_groups * kh * kw, H_out, W_out) = "
        f"{offset_shape}, got {list(offset.shape)}",
    )
    check(
        list(mask.shape) == mask_shape,
        f"mask: expected shape (N, deformable_groups * kh * kw, H_out, W_out) = {mask_shape}, "
        f"got {list(mask.shape)}",
    )
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == out_channels,
            f"bias: expected shape ({out_channels}), got {list(bias.shape)}",
        )
    return n, out_channels, ho, wo


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
    check_mdconv_args(input, offset, mask, weight, bias, *params)
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
    n, out_channels, ho, wo = check_mdconv_args(input, offset, mask, weight, bias, *params)
    torch._check(
        list(grad_output.shape) == [n, out_channels, ho, wo],
        lambda: (
            f"{_OP}grad_output: expected shape {[n, out_channels, ho, wo]}, got "
            f"{list(grad_output.shape)}"
        ),
    )
    torch._check(
        grad_output.device == input.device and grad_output.dtype == input.dtype,
        lambda: (
            f"{_OP}grad_output: expected dtype {input.dtype} on {input.device} (as input), "
            f"got {grad_output.dtype} on {grad_output.device}"
        ),
    )
    reason = triton_kernels.unsupported_reason(input, offset, mask, weight, grad_output)
    torch._check(
        reason is None, lambda: f"{_OP}the fused Triton kernels cannot run this call: {reason}"
    )
    if not triton_kernels.fused_backward_state()[0]:
        raise NotImplementedError(
            "dcnv2._triton_modulated_deform_conv2d_backward: the fused backward "
            "(projects_dcnv2/triton_kernels/mdconv_backward.py) is not available"
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


_define("_triton_modulated_deform_conv2d", _triton_mdconv, "modulated_deform_conv2d")
_define(
    "_triton_modulated_deform_conv2d_backward",
    _triton_mdconv_backward,
    "_modulated_deform_conv2d_backward",
)


# ---------------------------------------------------------------------------------------------
# The public operators on CUDA
def cuda_impl(
    input,
    offset,
    mask,
    weight,
    grad_output=None,
    *,
    environ=None,
    triton_available=None,
    fused_backward=None,
    fused_forward_default=None,
):
    """Which implementation runs a CUDA call of the public operator: ``("triton" | "cuda", why)``.

    ``DCNV2_CUDA_IMPL`` (in ``environ``, default ``os.environ``): ``auto`` (or unset) takes the
    fused kernels when Triton is importable, the call is one they take
    (``triton_kernels.unsupported_reason``) and the fused kernel is the default for that direction
    (``FUSED_FORWARD_DEFAULT``; for the backward, ``grad_output`` given, the fused backward exists
    and ``FUSED_BACKWARD_DEFAULT``); the column path otherwise. Both defaults are False today: the
    column path was faster on the H200.
    ``triton`` forces the fused kernels (an error when they cannot take the call), ``cuda`` the
    column path; another value is a ValueError naming the variable. ``triton_available`` and
    ``fused_backward`` (None: whether the fused backward exists, whether it is the default) stand in
    for the installation in tests; ``fused_forward_default`` for ``FUSED_FORWARD_DEFAULT``.
    """
    environ = os.environ if environ is None else environ
    available = triton_kernels.AVAILABLE if triton_available is None else triton_available
    requested = environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if requested not in _IMPLS:
        raise ValueError(
            f"{IMPL_ENV}: expected one of auto, triton, cuda, got {environ.get(IMPL_ENV)!r}"
        )
    if requested == "cuda":
        return "cuda", f"{IMPL_ENV}=cuda"
    backward = grad_output is not None
    if backward and fused_backward is None:
        fused_backward = triton_kernels.fused_backward_state() if available else (False, False)
    if not available:
        reason = "Triton is not importable"
    elif backward and not fused_backward[0]:
        reason = "the fused backward is not available"
    else:
        reason = triton_kernels.unsupported_reason(input, offset, mask, weight, grad_output)
    if requested == "triton":
        if reason is not None:
            raise RuntimeError(
                f"{IMPL_ENV}=triton, but the fused kernels cannot run this call: {reason}"
            )
        return "triton", f"{IMPL_ENV}=triton"
    if reason is not None:
        return "cuda", reason
    if backward and not fused_backward[1]:
        return "cuda", "the column path is the default backward (FUSED_BACKWARD_DEFAULT)"
    if fused_forward_default is None:
        fused_forward_default = triton_kernels.FUSED_FORWARD_DEFAULT
    if not backward and not fused_forward_default:
        return "cuda", "the column path is the default forward (FUSED_FORWARD_DEFAULT)"
    return "triton", "supported"


def _column_path(op_name, why):
    if torch.ops.dcnv2._cuda_version() < 0:
        raise RuntimeError(
            f"{_OP}this CUDA call needs the column path ({why}), but projects_dcnv2._C was built "
            "without CUDA"
        )
    return getattr(torch.ops.dcnv2, op_name)


def _mdconv_cuda(input, offset, mask, weight, bias, *params):
    impl, why = cuda_impl(input, offset, mask, weight)
    if impl == "triton":
        op = torch.ops.dcnv2._triton_modulated_deform_conv2d
    else:
        op = _column_path("_cuda_modulated_deform_conv2d", why)
    return op(input, offset, mask, weight, bias, *params)


def _mdconv_backward_cuda(grad_output, input, offset, mask, weight, bias, *params):
    impl, why = cuda_impl(input, offset, mask, weight, grad_output)
    if impl == "triton":
        op = torch.ops.dcnv2._triton_modulated_deform_conv2d_backward
    else:
        op = _column_path("_cuda_modulated_deform_conv2d_backward", why)
    return op(grad_output, input, offset, mask, weight, bias, *params)


_lib = torch.library.Library("dcnv2", "IMPL")  # noqa: TOR901  (kept alive: owns the registrations)
_lib.impl("modulated_deform_conv2d", _mdconv_cuda, "CUDA")
_lib.impl("_modulated_deform_conv2d_backward", _mdconv_backward_cuda, "CUDA")


# ---------------------------------------------------------------------------------------------
# Autocast on CUDA: as F.conv2d, in the autocast dtype (the fused kernel and the column path both
# accumulate in float32); float64 tensors are left alone, as autocast leaves them for conv2d.
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
        return torch.ops.dcnv2.modulated_deform_conv2d.default(*args)


_lib.impl("modulated_deform_conv2d", _autocast_cuda, "AutocastCUDA", with_keyset=True)
