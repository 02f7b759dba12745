#!/usr/bin/env python
"""Draw where a trained DCNv2 model looks: effective sampling locations of its deformable
convolutions and the deformed bins of its mdpool RoI pooling, as in the DCNv2 paper's figures.

    python tools/visualize_sampling.py --config-file configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml \
        --input datasets/dcnv2_shapes/val/000000.png --output vis/ \
        MODEL.WEIGHTS output/quick_mdconv/model_final.pth
    python tools/visualize_sampling.py ... --positions 40,60 100,20 --layers res5

Writes ``sampling_<name>.png`` (mdconv models) and ``mdpool_bins_<name>.png`` (mdpool models).

Effective sampling locations (``--layers``, output side first; default ``last-per-stage``:
res5.2 <- res4.5 <- res3.3, 9^3 = 729 points per unit; ``res5`` = its three blocks). A unit
of the first listed layer's output map is chosen for each ``--positions`` point (the nearest).
Its 3x3 deformable conv samples tap (i, j) at ``u * stride - pad + (i, j) * dilation + (dy, dx)``
on its input map; every such location is then an output location of the next listed layer
(1x1 convs and residual paths keep positions; skipped layers are crossed by position only),
whose offset and mask maps are read there by bilinear interpolation (border values beyond the
map). A map at stride s (image pixels per
cell) places cell u on image pixel ``u * s`` (pixel centres at integers), exact for the
PyTorch-style ResNet (every 3x3 has padding 1, the 7x7 stem padding 3). Each final point is
coloured by the product of the modulation weights along its path.

Offsets come from forward hooks on every block's ``conv2_offset`` (channels [0, 2GK): per
group, per tap, (dy, dx); [2GK, 3GK): mask logits; see projects_dcnv2/modeling/backbone.py);
with several deformable groups one group (``--group``) is drawn.

mdpool bins: the top ``--topk`` detections are pooled again by the model's own
``MDPoolROIPooler`` with hooks on each level's ``offset_fc`` / ``mask_fc``. Bin (ph, pw) of a
box (x1, y1, x2, y2) of size w x h covers ``x1 + pw * w / P + gamma * w * dx`` to ``+ w / P``
(and the same in y), mask = its modulation (see projects_dcnv2/layers/deform_roi_pool.py).
"""
import argparse
import contextlib
import io
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

import detectron2.data.transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import assign_boxes_to_levels  # noqa: E402

from projects_dcnv2 import load_dcnv2_config  # noqa: E402  (import registers the components)
from projects_dcnv2.checkpoint import DCNv2Checkpointer  # noqa: E402
from projects_dcnv2.modeling.poolers import MDPoolROIPooler  # noqa: E402

__all__ = [
    "DeformField",
    "field_from_conv_offset",
    "compose_sampling_locations",
    "deformed_bins",
    "capture_deform_fields",
    "select_fields",
    "main",
]


# ----------------------------------------------------------------------------------------------
# Geometry (numpy, no model)


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
        offset = _bilinear(field.offset.reshape(2 * num_taps, height, width), read[:, 0], read[:, 1])
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
    mask = np.ones((pooled_h, pooled_w)) if mask is None else np.asarray(mask).reshape(pooled_h, pooled_w)
    return rects, mask


# ----------------------------------------------------------------------------------------------
# Capturing offsets from a model


def _bottom_up(model):
    backbone = model.backbone
    return getattr(backbone, "bottom_up", backbone)


def deformable_blocks(model) -> List[Tuple[str, torch.nn.Module]]:
    """(name, block) of every block with a ``conv2_offset``, input side first (``res3.0``...)."""
    blocks = []
    for stage_name, stage in _bottom_up(model).named_children():
        for index, block in enumerate(stage.children() if isinstance(stage, torch.nn.Sequential) else []):
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
                    f"--layers: no deformable block or stage {item!r}; have {sorted(by_name)}"
                )
            chosen.extend(reversed(stage))
    return chosen


def _box_pooler_fields(model, features, boxes):
    """Runs the model's MDPoolROIPooler on ``boxes`` (Boxes, one image) and returns per box
    (offset (2, P, P), mask (P, P), level index) from hooks on each level's ``offset_fc`` and
    ``mask_fc``. The pooler pools level by level, each level's RoIs in their given order."""
    pooler = model.roi_heads.box_pooler
    records = [{} for _ in pooler.level_poolers]
    handles = []
    for pack, record in zip(pooler.level_poolers, records):
        handles.append(pack.offset_fc.register_forward_hook(lambda m, a, o, r=record: r.__setitem__("offset", o)))
        handles.append(pack.mask_fc.register_forward_hook(lambda m, a, o, r=record: r.__setitem__("mask", o)))
    try:
        with torch.no_grad():
            pooler([features[f] for f in model.roi_heads.box_in_features], [boxes])
    finally:
        for handle in handles:
            handle.remove()
    level_of_box = assign_boxes_to_levels(
        [boxes], pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    size = pooler.output_size
    result = [None] * len(boxes)
    for level, record in enumerate(records):
        inds = torch.nonzero(level_of_box == level).flatten().tolist()
        if not inds:
            continue
        offsets = record["offset"].view(-1, 2, *size).double().numpy()
        masks = record["mask"].view(-1, *size).double().numpy()
        for k, index in enumerate(inds):
            result[index] = (offsets[k], masks[k], level)
    return result


# ----------------------------------------------------------------------------------------------
# Drawing


def _save_small_png(fig, path, max_kb=250):
    """Saves ``fig`` as PNG; a 256-colour palette PNG when the RGB one exceeds ``max_kb``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    image.save(path, optimize=True)
    if os.path.getsize(path) > max_kb * 1024:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _panel(ax, image, title, view=None):
    """Shows ``image`` (pixel centres at integers); ``view`` (x0, y0, x1, y1) sets the limits."""
    height, width = image.shape[:2]
    ax.set_facecolor("0.85")
    ax.imshow(image, interpolation="nearest")
    x0, y0, x1, y1 = view if view is not None else (-0.5, -0.5, width - 0.5, height - 0.5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure(count, panel_inches):
    fig, axes = plt.subplots(1, count, figsize=(panel_inches * count + 1.0, panel_inches + 0.6), dpi=100,
                             squeeze=False, layout="constrained")
    return fig, axes[0]


def draw_sampling(image, units_yx, locations, weights, layer_names, path, panel_inches=4.0):
    """One panel per unit: its effective sampling points coloured by modulation product. The
    view extends past the image (grey) to show points outside it, by 40% of its size at most."""
    height, width = image.shape[:2]
    fig, axes = _figure(len(units_yx), panel_inches)
    vmax = max(float(weights.max()), 1e-6)
    lo = np.maximum(np.minimum(locations.reshape(-1, 2).min(0) - 2, -0.5), [-0.4 * height, -0.4 * width])
    hi = np.minimum(np.maximum(locations.reshape(-1, 2).max(0) + 2, [height - 0.5, width - 0.5]),
                    [1.4 * height, 1.4 * width])
    scatter = None
    for ax, unit, locs, w in zip(axes, units_yx, locations, weights):
        title = f"unit at (x={unit[1]:.0f}, y={unit[0]:.0f}): {locs.shape[0]} points"
        _panel(ax, image, title, view=(lo[1], lo[0], hi[1], hi[0]))
        ax.add_patch(Rectangle((-0.5, -0.5), width, height, fill=False, ec="k", lw=0.8))
        order = np.argsort(w)
        scatter = ax.scatter(locs[order, 1], locs[order, 0], c=w[order], cmap="cool", vmin=0, vmax=vmax,
                             s=9 if locs.shape[0] <= 729 else 3, edgecolors="k",
                             linewidths=0.3 if locs.shape[0] <= 729 else 0)
        ax.plot(unit[1], unit[0], marker="*", color="lime", markersize=14, markeredgecolor="k")
    fig.suptitle("effective sampling locations through " + " \u2190 ".join(layer_names), fontsize=10)
    fig.colorbar(scatter, ax=list(axes), fraction=0.03, pad=0.01, label="product of modulation weights")
    _save_small_png(fig, path)


def draw_bins(image, detections, path, class_names, panel_inches=4.0):
    """One panel per detection, zoomed on it: the box (dashed white) and its deformed bins
    (filled, coloured by their mask; dots at their centres)."""
    fig, axes = _figure(max(len(detections), 1), panel_inches)
    cmap = plt.get_cmap("cool")
    shift = -0.5  # continuous coordinates (pixel i covers [i, i + 1)) -> pixel-centre plot coordinates
    for ax, det in zip(axes, detections):
        box, score, label, rects, mask, level = det
        name = class_names[label] if label < len(class_names) else str(label)
        corners = np.concatenate([rects.reshape(-1, 4), box[None]])
        x0, y0 = corners[:, :2].min(0) + shift
        x1, y1 = corners[:, 2:].max(0) + shift
        margin = max(0.25 * max(x1 - x0, y1 - y0), 4.0)
        side = max(x1 - x0, y1 - y0) / 2 + margin  # square view around the box and its bins
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        _panel(ax, image, f"{name} {score:.2f}, pooled at P{level + 2}", view=(cx - side, cy - side, cx + side, cy + side))
        bx0, by0, bx1, by1 = box + shift
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec="white", lw=1.5, ls="--"))
        for rect, m in zip(rects.reshape(-1, 4) + shift, mask.reshape(-1)):
            ax.add_patch(Rectangle((rect[0], rect[1]), rect[2] - rect[0], rect[3] - rect[1], fill=True,
                                   fc=cmap(m), ec=cmap(m), alpha=0.3, lw=0.8))
        centres = (rects[..., :2] + rects[..., 2:]) / 2 + shift
        ax.scatter(centres[..., 0].ravel(), centres[..., 1].ravel(), c=mask.ravel(), cmap=cmap, vmin=0, vmax=1,
                   s=10, edgecolors="k", linewidths=0.4)
    if not detections:
        _panel(axes[0], image, "no detection above the threshold")
    fig.suptitle("mdpool: detection box (dashed) and its 7x7 deformed bins, colour = bin modulation", fontsize=10)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01, label="bin mask")
    _save_small_png(fig, path)


# ----------------------------------------------------------------------------------------------
# Command line


def setup_cfg(args):
    return load_dcnv2_config(args.config_file, args.opts, score_thresh_test=args.confidence_threshold)


def _parse_positions(items):
    points = []
    for item in items:
        try:
            x, y = (float(v) for v in item.split(","))
        except ValueError:
            raise SystemExit(f"--positions: expected x,y pairs like 40,60; got {item!r}")
        points.append((y, x))
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _default_positions(boxes_xyxy, image_hw, count=3):
    """Centres of the top detections plus the image point farthest from every box."""
    height, width = image_hw
    centres = [((b[1] + b[3]) / 2, (b[0] + b[2]) / 2) for b in boxes_xyxy[: count - 1]]
    grid = np.stack(np.meshgrid(np.linspace(0.2 * height, 0.8 * height, 7), np.linspace(0.2 * width, 0.8 * width, 7),
                                indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    if len(centres):
        dist = np.min(np.linalg.norm(grid[:, None] - np.array(centres)[None], axis=-1), axis=1)
        centres.append(tuple(grid[np.argmax(dist)]))
    while len(centres) < count:
        centres.append(((len(centres) + 1) * height / (count + 1), (len(centres) + 1) * width / (count + 1)))
    return np.array(centres, dtype=np.float64)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--name", default=None, help="output file suffix (default: the image's stem)")
    parser.add_argument("--positions", nargs="*", default=None, metavar="X,Y",
                        help="image positions (original image pixels) of the units to trace "
                             "(default: centres of the top detections and one background point)")
    parser.add_argument("--layers", default="last-per-stage",
                        help="deformable layers to compose, output side first: block names "
                             "(res5.2), stages (res5 = its blocks, last first) or last-per-stage")
    parser.add_argument("--group", type=int, default=0, help="deformable group to draw")
    parser.add_argument("--topk", type=int, default=3, help="detections whose mdpool bins are drawn")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--display-size", type=int, default=400,
                        help="pixels per image panel in the PNGs (small images are upscaled)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    DCNv2Checkpointer(model).load(cfg.MODEL.WEIGHTS)

    original = read_image(args.input, format=cfg.INPUT.FORMAT)  # (H, W, 3) uint8
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(original).apply_image(original)
    scale = np.array([original.shape[0] / resized.shape[0], original.shape[1] / resized.shape[1]])
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    inputs = [{"image": tensor, "height": resized.shape[0], "width": resized.shape[1]}]

    features = {}
    hook = model.backbone.register_forward_hook(lambda m, a, out: features.update(out))
    try:
        with torch.no_grad(), capture_deform_fields(model, args.group) as fields:
            instances = model.inference(inputs, do_postprocess=False)[0]
    finally:
        hook.remove()
    instances = instances[instances.scores.argsort(descending=True)]
    display = original if cfg.INPUT.FORMAT == "RGB" else original[:, :, ::-1]
    name = args.name or os.path.splitext(os.path.basename(args.input))[0]
    os.makedirs(args.output, exist_ok=True)
    panel_inches = args.display_size / 100.0
    written = []

    if fields:
        chosen = select_fields(fields, args.layers)
        if len(chosen) > 4:
            raise SystemExit(f"--layers: {len(chosen)} layers give 9^{len(chosen)} points per unit; pick at most 4")
        if args.positions:
            wanted = _parse_positions(args.positions) / scale  # -> model input pixels
        else:
            boxes = instances.pred_boxes.tensor.numpy()
            wanted = _default_positions(boxes, resized.shape[:2])
        units = unit_centres(chosen[0], wanted)
        locations, weights = compose_sampling_locations(chosen, units)
        path = os.path.join(args.output, f"sampling_{name}.png")
        draw_sampling(display, units * scale, locations * scale, weights, [f.name for f in chosen], path,
                      panel_inches)
        written.append(path)

    if isinstance(getattr(model.roi_heads, "box_pooler", None), MDPoolROIPooler):
        top = instances[: args.topk]
        detections = []
        if len(top):
            per_box = _box_pooler_fields(model, features, top.pred_boxes)
            gamma = model.roi_heads.box_pooler.level_poolers[0].gamma
            box_scale = np.array([scale[1], scale[0], scale[1], scale[0]])
            for box, score, label, (offset, mask, level) in zip(
                top.pred_boxes.tensor.numpy(), top.scores.tolist(), top.pred_classes.tolist(), per_box
            ):
                rects, mask = deformed_bins(box, offset, mask, gamma)
                detections.append((box * box_scale, score, label, rects * box_scale, mask, level))
        from detectron2.data import MetadataCatalog

        class_names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", []) if cfg.DATASETS.TEST else []
        path = os.path.join(args.output, f"mdpool_bins_{name}.png")
        draw_bins(display, detections, path, class_names, panel_inches)
        written.append(path)

    if not written:
        raise SystemExit("the model has neither deformable convolutions nor an mdpool box pooler")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
