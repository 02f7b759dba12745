"""ONNX export of the DCNv2 operators: ``dcnv2::modulated_deform_conv2d`` becomes ONNX ``DeformConv``.

ONNX has had a standard ``DeformConv`` operator since opset 19. Its inputs are (X, W, offset, B,
mask), with attributes strides, pads, dilations, group and offset_group, and its offset layout is
ours: (N, offset_group * kh * kw * 2, Ho, Wo), per offset group, then per kernel tap (row-major),
then (dy, dx). The mask (N, offset_group * kh * kw, Ho, Wo) multiplies each bilinear sample, and
samples outside the input are zero, as in our op (the tests in ``tests/test_export.py`` compare
the two, far-outside offsets included).

* :data:`ONNX_TRANSLATIONS`: the onnxscript translation for the dynamo exporter, to pass as
  ``torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)``.
* Importing this module also registers a symbolic for torch's TorchScript exporter
  (``torch.onnx.export(..., dynamo=False)``, deprecated but still present in torch 2.14), so
  traced models (Detectron2's ``TracingAdapter``) export too.
* :func:`export_onnx`: the dynamo exporter with those translations, plus what ONNX Runtime needs.

``deform_roi_pool`` (mdpool) has no ONNX operator and is not composed from standard ones (see
``docs/deploy.md``): exporting a model that uses it raises :class:`UnsupportedOperatorError`. Such
models deploy through TorchScript tracing, ``torch.export`` or AOTInductor, which keep our operator.
"""

import io
import os
from typing import Any, Optional, Union

import torch

from . import layers  # noqa: F401  (loads the extension: torch.ops.dcnv2.* must exist below)

__all__ = [
    "MIN_OPSET",
    "ONNX_TRANSLATIONS",
    "TupleOutputs",
    "UnsupportedOperatorError",
    "export_onnx",
    "fix_ir_version",
]

MIN_OPSET = 19
"""The first ONNX opset with ``DeformConv``."""

_MDCONV = torch.ops.dcnv2.modulated_deform_conv2d.default
_MDPOOL = torch.ops.dcnv2.deform_roi_pool.default

_MDPOOL_MESSAGE = (
    "dcnv2::deform_roi_pool (mdpool) cannot be exported to ONNX: ONNX has no deformable RoI pooling "
    "operator, and RoIAlign cannot take per-bin offsets. Export the backbone + FPN to ONNX and run "
    "the RoI heads in PyTorch, or deploy the model with TorchScript tracing (a whole Detectron2 "
    "R-CNN: tools/deploy/export_model.py --format torchscript), torch.export (.pt2) or an "
    "AOTInductor package, which keep the operator (docs/deploy.md)."
)


class UnsupportedOperatorError(RuntimeError):
    """A model uses a dcnv2 operator that has no ONNX translation (``deform_roi_pool``)."""


def _check_opset(opset_version: int) -> None:
    if opset_version < MIN_OPSET:
        raise ValueError(
            f"opset_version: dcnv2::modulated_deform_conv2d exports to ONNX DeformConv, which needs "
            f"opset >= {MIN_OPSET}; got {opset_version}"
        )


# ---------------------------------------------------------------------------------------------
# Dynamo exporter: onnxscript translations
def _deform_conv_attributes(
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, deformable_groups
):
    """Our op's trailing integer arguments -> ONNX DeformConv's attributes."""
    return dict(
        strides=[stride_h, stride_w],
        pads=[pad_h, pad_w, pad_h, pad_w],
        dilations=[dil_h, dil_w],
        group=groups,
        offset_group=deformable_groups,
    )


def _mdconv_to_onnx(x, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw, groups, dg):
    # The exporter matches the op's arguments to these parameters by position: no *args here.
    from onnxscript import opset19

    attributes = _deform_conv_attributes(sh, sw, ph, pw, dh, dw, groups, dg)
    # A None bias leaves DeformConv's optional input B empty.
    return opset19.DeformConv(x, weight, offset, bias, mask, **attributes)


ONNX_TRANSLATIONS = {_MDCONV: _mdconv_to_onnx}
"""``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: our convolution -> ONNX
``DeformConv`` (opset >= 19)."""


# ---------------------------------------------------------------------------------------------
# TorchScript exporter: symbolics (registered on import)
def _register_torchscript_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i")
    def mdconv_symbolic(g, x, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw, groups, dg):
        # parse_args matches the arguments to these parameters by name: no *args here either.
        if symbolic_helper._is_none(bias):
            bias = symbolic_helper._optional_input_placeholder_tensor(g)
        attributes = _deform_conv_attributes(sh, sw, ph, pw, dh, dw, groups, dg)
        attributes = {f"{name}_i": value for name, value in attributes.items()}
        return g.op("DeformConv", x, weight, offset, bias, mask, **attributes)

    def mdpool_symbolic(g, *args):
        raise UnsupportedOperatorError(_MDPOOL_MESSAGE)

    register_custom_op_symbolic("dcnv2::modulated_deform_conv2d", mdconv_symbolic, MIN_OPSET)
    register_custom_op_symbolic("dcnv2::deform_roi_pool", mdpool_symbolic, MIN_OPSET)


_register_torchscript_symbolics()


# ---------------------------------------------------------------------------------------------
class TupleOutputs(torch.nn.Module):
    """Wraps a module of one input ``x`` that returns a dict of tensors (a backbone's p2..p6) to
    return them as a tuple, in the dict's order: exported graphs and runtimes take flat outputs."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return tuple(self.module(x).values())


def fix_ir_version(model_proto):
    """Lowers ``model_proto.ir_version`` (in place) to the oldest IR version that declares its opsets.

    The ONNX package writes its own, newest IR version (14 for onnx 1.23), which runtimes built
    against an older ONNX refuse (ONNX Runtime 1.31 reads up to 13); the oldest version that holds
    the opsets (9 for opset 19, 10 for 21) is read by every runtime that knows those opsets.
    """
    import onnx.helper

    oldest = onnx.helper.find_min_ir_version_for(model_proto.opset_import, ignore_unknown=True)
    model_proto.ir_version = min(model_proto.ir_version, oldest)
    return model_proto


def _uses(program: "torch.export.ExportedProgram", target) -> bool:
    return any(node.op == "call_function" and node.target is target for node in program.graph.nodes)


def export_onnx(
    model: Union[torch.nn.Module, "torch.export.ExportedProgram"],
    args: tuple,
    f: Optional[Union[str, os.PathLike, io.BufferedIOBase]] = None,
    opset_version: int = MIN_OPSET,
    *,
    dynamic_shapes: Optional[Any] = None,
    **kwargs,
):
    """Exports ``model`` to ONNX with the dynamo exporter, our convolution as ``DeformConv``.

    Args:
        model: an ``nn.Module`` (exported with ``torch.export.export(model, args, strict=False)``)
            or an already exported ``ExportedProgram``.
        args: example inputs (a tuple).
        f: file path or binary file to write, or None to only return the model.
        opset_version: ONNX opset, at least 19.
        dynamic_shapes: as ``torch.export.export`` (e.g. ``{"x": {0: Dim("batch")}}``).
        **kwargs: passed on to ``torch.onnx.export`` (e.g. ``input_names``, ``output_names``,
            ``optimize``); a ``custom_translation_table`` is merged with :data:`ONNX_TRANSLATIONS`.

    Returns:
        onnx.ModelProto: the model as written, its IR version lowered by :func:`fix_ir_version`.

    Raises:
        ValueError: ``opset_version`` below 19.
        UnsupportedOperatorError: the model uses ``deform_roi_pool``.
    """
    import onnx

    _check_opset(opset_version)
    if isinstance(model, torch.export.ExportedProgram):
        if dynamic_shapes is not None:
            raise ValueError(
                "dynamic_shapes: give them to torch.export.export, not with an ExportedProgram"
            )
        program = model
    else:
        program = torch.export.export(
            model, tuple(args), dynamic_shapes=dynamic_shapes, strict=False
        )
    if _uses(program, _MDPOOL):
        raise UnsupportedOperatorError(_MDPOOL_MESSAGE)
    table = {**ONNX_TRANSLATIONS, **kwargs.pop("custom_translation_table", {})}
    kwargs.setdefault("verbose", False)
    onnx_program = torch.onnx.export(
        program,
        (),
        dynamo=True,
        opset_version=opset_version,
        custom_translation_table=table,
        **kwargs,
    )
    model_proto = fix_ir_version(onnx_program.model_proto)
    onnx.checker.check_model(model_proto)
    if f is not None:
        onnx.save(model_proto, f)
    return model_proto
