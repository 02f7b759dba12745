"""Where a DCNv2 model samples: the geometry behind ``tools/visualize_sampling.py``, as in the
DCNv2 paper's figures (numpy, no drawing).

Effective sampling locations: a unit of the first (output-side) layer's map at stride s sits on
image pixel ``u * s`` (pixel centres at integers; exact for the PyTorch-style ResNet, where every
3x3 conv has padding 1 and the 7x7 stem padding 3). Its 3x3 deformable conv samples tap (i, j) at
``u * stride - pad + (i, j) * dilation + (dy, dx)`` on its input map; each such location is an
output location of the next listed layer (1x1 convs and residual paths keep positions; skipped
layers are crossed by position only), whose offset and mask maps are read there by bilinear
interpolation (border values beyond the map). Each final point carries the product of the
modulation weights along its path.

mdpool bins: bin (ph, pw) of a box (x1, y1, x2, y2) of size w x h covers
``x1 + pw * w / P + gamma * w * dx`` to ``+ w / P`` (and the same in y), weighted by its mask
(docs/semantics.md, "Deformable RoI pooling").
"""

import contextlib
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch


@dataclass
class DeformField:
    """Offsets and modulation of one deformable 3x3 conv on one image, one deformable group.

    Attributes:
        name: block name, e.g. ``"res5.2"``.
        offset: (K, 2, Ho, Wo), per tap k = i * kw + j the (dy, dx) shift in input-map cells.
        mask: (K, Ho, Wo) modulation in [0, 1].
        kernel_size, stride, padding, dilation: (h, w) pairs of the conv.
        out_stride: image pixels per output cell (cell u sits on image pixel u * out_stride).
    """

    name: str
    offset: np.ndarray
    mask: np.ndarray
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    out_stride: float

    @property
    def in_stride(self) -> np.ndarray:
        """(2,) image pixels per input cell, (y, x)."""
        return self.out_stride / np.asarray(self.stride, dtype=np.float64)


def field_from_conv_offset(name, raw, conv, out_stride, group=0) -> DeformField:
    """Splits a ``conv2_offset`` output of one image into a :class:`DeformField`.

    Args:
        raw: (3 * G * K, Ho, Wo) tensor or array, G = ``conv.deformable_groups``.
        conv: the ``ModulatedDeformConv2d`` the offsets drive (its geometry is read).
        out_stride (float): image pixels per output cell.
        group (int): which deformable group to keep.
    """
    raw = torch.as_tensor(raw).detach().double().cpu()
    kh, kw = conv.kernel_size
    num_taps, groups = kh * kw, conv.deformable_groups
    if raw.dim() != 3 or raw.shape[0] != 3 * groups * num_taps:
        raise ValueError(
            f"raw: expected ({3 * groups * num_taps}, Ho, Wo) for G={groups}, K={num_taps}, "
            f"got shape {tuple(raw.shape)}"
        )
    if not 0 <= group < groups:
        raise ValueError(f"group: expected 0 <= group < {groups}, got {group}")
    height, width = raw.shape[1:]
    offset = raw[: 2 * groups * num_taps].view(groups, num_taps, 2, height, width)[group]
    mask = raw[2 * groups * num_taps :].view(groups, num_taps, height, width)[group].sigmoid()
    return DeformField(
        name,
        offset.numpy(),
        mask.numpy(),
        tuple(conv.kernel_size),
        tuple(conv.stride),
        tuple(conv.padding),
        tuple(conv.dilation),
        float(out_stride),
    )


def _bilinear(maps: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """maps (C, H, W) read at fractional (y, x) (M,), border values beyond the map -> (M, C)."""
    height, width = maps.shape[-2:]
    y = np.clip(y, 0, height - 1)
    x = np.clip(x, 0, width - 1)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    y1 = np.minimum(y0 + 1, height - 1)
    x1 = np.minimum(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    value = (
        maps[:, y0, x0] * (1 - ly) * (1 - lx)
        + maps[:, y0, x1] * (1 - ly) * lx
        + maps[:, y1, x0] * ly * (1 - lx)
        + maps[:, y1, x1] * ly * lx
    )
    return value.T


def compose_sampling_locations(
    fields: Sequence[DeformField], points: np.ndarray, round_to_cell: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """Effective sampling locations of units through stacked deformable convs.

    Args:
        fields: the layers, output side first (e.g. res5.2, res5.1, res5.0).
        points: (P, 2) image positions (y, x) of the units; they are used as given (snap them
            to the first field's grid with :func:`unit_centres` to pick units).
        round_to_cell: read offset maps at the nearest cell instead of interpolating.

    Returns:
        locations (P, K**L, 2) image positions (y, x), weights (P, K**L) products of the
        modulation weights along each path; taps are ordered like the offset channels,
        the first layer's tap varying slowest.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    num_units = points.shape[0]
    weights = np.ones(num_units)
    for field in fields:
        kh, kw = field.kernel_size
        num_taps = kh * kw
        _, _, height, width = field.offset.shape
        cell = points / field.out_stride  # (M, 2) output-map coordinates
        read = np.round(cell) if round_to_cell else cell
        offset = _bilinear(
            field.offset.reshape(2 * num_taps, height, width), read[:, 0], read[:, 1]
        )
        offset = offset.reshape(-1, num_taps, 2)  # (M, K, (dy, dx))
        mask = _bilinear(field.mask, read[:, 0], read[:, 1])  # (M, K)
        tap_i, tap_j = np.divmod(np.arange(num_taps), kw)
        (sh, sw), (ph, pw), (dh, dw) = field.stride, field.padding, field.dilation
        y = cell[:, :1] * sh - ph + tap_i * dh + offset[..., 0]
        x = cell[:, 1:] * sw - pw + tap_j * dw + offset[..., 1]
        points = (np.stack([y, x], axis=-1) * field.in_stride).reshape(-1, 2)
        weights = (weights[:, None] * mask).reshape(-1)
    return points.reshape(num_units, -1, 2), weights.reshape(num_units, -1)


def unit_centres(field: DeformField, points_yx: np.ndarray) -> np.ndarray:
    """(P, 2) image positions (y, x) -> the image positions of the nearest output cells."""
    height, width = field.offset.shape[-2:]
    cell = np.round(np.asarray(points_yx, dtype=np.float64) / field.out_stride)
    cell = np.clip(cell, 0, [height - 1, width - 1])
    return cell * field.out_stride


def deformed_bins(box, offset, mask, gamma) -> Tuple[np.ndarray, np.ndarray]:
    """Rectangles of the deformed mdpool bins of one RoI.

    Args:
        box: (4,) x1, y1, x2, y2 in continuous image coordinates (pixel i covers [i, i + 1)).
        offset: (2, P, P) bin offsets, channel 0 = dx (RoI widths), 1 = dy (RoI heights).
        mask: (P, P) modulation, or None.
        gamma: the pooler's offset scale.

    Returns:
        rects (P, P, 4) x1, y1, x2, y2 of each bin, same coordinates; mask (P, P).
    """
    x1, y1, x2, y2 = [float(v) for v in box]
    offset = np.asarray(offset, dtype=np.float64)
    pooled_h, pooled_w = offset.shape[1:]
    roi_w, roi_h = x2 - x1, y2 - y1
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
    ph, pw = np.meshgrid(np.arange(pooled_h), np.arange(pooled_w), indexing="ij")
    left = x1 + pw * bin_w + gamma * roi_w * offset[0]
    top = y1 + ph * bin_h + gamma * roi_h * offset[1]
    rects = np.stack([left, top, left + bin_w, top + bin_h], axis=-1)
    mask = (
        np.ones((pooled_h, pooled_w))
        if mask is None
        else np.asarray(mask).reshape(pooled_h, pooled_w)
    )
    return rects, mask


def _bottom_up(model):
    backbone = model.backbone
    return getattr(backbone, "bottom_up", backbone)


def deformable_blocks(model) -> List[Tuple[str, torch.nn.Module]]:
    """(name, block) of every block with a ``conv2_offset``, input side first (``res3.0``...)."""
    blocks = []
    for stage_name, stage in _bottom_up(model).named_children():
        for index, block in enumerate(
            stage.children() if isinstance(stage, torch.nn.Sequential) else []
        ):
            if hasattr(block, "conv2_offset"):
                blocks.append((f"{stage_name}.{index}", block))
    return blocks


@contextlib.contextmanager
def capture_deform_fields(model, group=0):
    """Hooks every deformable block of ``model``; on exit ``fields`` (the yielded list) holds a
    :class:`DeformField` per block for the first image of the last forward, input side first."""
    raws, padded = {}, {}
    handles = [
        _bottom_up(model).register_forward_pre_hook(
            lambda module, args: padded.__setitem__("shape", args[0].shape[-2:])
        )
    ]
    blocks = deformable_blocks(model)
    for name, block in blocks:
        handles.append(
            block.conv2_offset.register_forward_hook(
                lambda module, args, out, name=name: raws.__setitem__(name, out[0].detach())
            )
        )
    fields: List[DeformField] = []
    try:
        yield fields
    finally:
        for handle in handles:
            handle.remove()
    for name, block in blocks:
        if name in raws:
            out_stride = padded["shape"][0] / raws[name].shape[-2]
            fields.append(field_from_conv_offset(name, raws[name], block.conv2, out_stride, group))


def select_fields(fields: Sequence[DeformField], spec: str) -> List[DeformField]:
    """Picks layers, output side first. ``spec``: comma-separated block names (``res5.2``) or
    stage names (``res5`` = all its blocks, last first), or ``last-per-stage``."""
    by_name = {f.name: f for f in fields}
    if spec == "last-per-stage":
        last = {}
        for f in fields:
            last[f.name.split(".")[0]] = f
        return sorted(last.values(), key=lambda f: f.name, reverse=True)
    chosen = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item in by_name:
            chosen.append(by_name[item])
        else:
            stage = [f for f in fields if f.name.split(".")[0] == item]
            if not stage:
                raise ValueError(
                    f"layers: no deformable block or stage {item!r}; have {sorted(by_name)}"
                )
            chosen.extend(reversed(stage))
    return chosen
