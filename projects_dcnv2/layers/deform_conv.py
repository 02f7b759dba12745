"""Modulated deformable convolution (DCNv2, Zhu et al. 2018): the modules (the functional operator is
``projects_dcnv2.ops.modulated_deform_conv2d``, re-exported here).

Shapes and the offset / mask layout: ``projects_dcnv2.ops.deform_conv``'s docstring.
"""

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops._triton_ops import resolve_impl
from ..ops.deform_conv import _ones_mask, modulated_deform_conv2d

__all__ = [
    "modulated_deform_conv2d",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "upgrade_legacy_offset_keys",
]

_IntPair = Union[int, Tuple[int, int]]


def _check_int(name: str, value, minimum: int) -> None:
    """A constructor argument must be an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {value}")


def _check_pair(name: str, value, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each at least `minimum`; returns the pair."""
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    pair = _pair(value)
    for v in pair:
        _check_int(name, v, minimum)
    return int(pair[0]), int(pair[1])


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution whose offsets and masks are given to ``forward``.

    Parameters: ``weight`` (C_out, C_in / groups, kh, kw) and optional ``bias`` (C_out,), initialised
    as MMCV does: uniform in +-1/sqrt(C_in * kh * kw), bias zero.

    ``impl`` picks the implementation of CUDA calls, once, when the module is built: ``"cuda"`` the
    public operator (the column path, its kernels and autograd all C++), ``"triton"`` the opt-in fused
    Triton operator ``dcnv2::_triton_modulated_deform_conv2d`` (CPU tensors still take the public
    operator), ``"auto"`` (default) reads ``DCNV2_CUDA_IMPL`` (unset or ``auto``: ``"cuda"``); the
    choice is ``self.impl``. Another value is a ValueError naming the argument.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        self.impl = resolve_impl(impl)
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
            ("deformable_groups", deformable_groups),
        ):
            _check_int(name, value, 1)
        for name, value, divisor, what in (
            ("in_channels", in_channels, groups, "groups"),
            ("out_channels", out_channels, groups, "groups"),
            ("in_channels", in_channels, deformable_groups, "deformable_groups"),
        ):
            if value % divisor != 0:
                raise ValueError(f"{name}: expected a multiple of {what}={divisor}, got {value}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _check_pair("kernel_size", kernel_size, 1)
        self.stride = _check_pair("stride", stride, 1)
        self.padding = _check_pair("padding", padding, 0)
        self.dilation = _check_pair("dilation", dilation, 1)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(n), 1.0 / math.sqrt(n))  # MMCV's init
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if self.impl == "triton" and x.is_cuda:
            if mask is None:
                mask = _ones_mask(offset)
            return torch.ops.dcnv2._triton_modulated_deform_conv2d(
                x,
                offset,
                mask,
                self.weight,
                self.bias,
                *self.stride,
                *self.padding,
                *self.dilation,
                self.groups,
                self.deformable_groups,
            )
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deformable_groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}, "
            f"impl={self.impl!r}"
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """DCNv2 layer that predicts its own offsets and masks (MMCV's ``DCNv2`` / ModulatedDeformConv2dPack).

    ``conv_offset`` is a plain convolution with the main conv's kernel, stride, padding and dilation
    and 3 * dg * kh * kw output channels, zero-initialised (so a fresh layer samples the regular grid
    with mask 0.5). Its first 2 * dg * K channels are the offsets, the last dg * K go through a sigmoid
    as the mask.
    """

    _version = 2  # version 1 stored conv_offset as a sibling "<name>_offset" module (MMCV)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            3 * self.deformable_groups * self.num_taps,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        split = 2 * self.deformable_groups * self.num_taps
        return super().forward(x, out[:, :split], out[:, split:].sigmoid())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Effective with loaders that hand every module the whole state dict (MMCV / mmengine's
        # load_state_dict). torch.nn.Module.load_state_dict hands a child only its own keys, so for
        # it call upgrade_legacy_offset_keys(root, state_dict) first.
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            _rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _rename_legacy_keys(state_dict, prefix: str) -> None:
    for suffix in ("weight", "bias"):
        legacy, current = f"{prefix[:-1]}_offset.{suffix}", f"{prefix}conv_offset.{suffix}"
        if legacy in state_dict and current not in state_dict:
            state_dict[current] = state_dict.pop(legacy)


def upgrade_legacy_offset_keys(module: nn.Module, state_dict: dict) -> dict:
    """Renames legacy ``<name>_offset.*`` keys of every ModulatedDeformConv2dPack in ``module`` to
    ``<name>.conv_offset.*``, in place, and returns ``state_dict``.

    ``torch.nn.Module.load_state_dict`` hands each child only the keys under its own prefix, so a
    Pack cannot see its legacy sibling keys itself; call this on the root module's state dict first.
    """
    for name, child in module.named_modules():
        if isinstance(child, ModulatedDeformConv2dPack) and name:
            _rename_legacy_keys(state_dict, name + ".")
    return state_dict
