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
of the first listed layer's output map is chosen for each ``--positions`` point (the nearest);
each final point is coloured by the product of the modulation weights along its path. With
several deformable groups one group (``--group``) is drawn. mdpool bins: the top ``--topk``
detections, their bins moved by the offsets and coloured by the mask that the model's own
``MDPoolROIPooler.deformation`` gives. The geometry lives in ``projects_dcnv2.analysis``.
"""

import argparse
import io
import os

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2.data.detection_utils import read_image  # noqa: E402

from projects_dcnv2.analysis import (  # noqa: E402
    capture_deform_fields,
    compose_sampling_locations,
    deformed_bins,
    select_fields,
    unit_centres,
)
from projects_dcnv2.engine import (  # noqa: E402  (the package import registers its components)
    build_inference_model,
    inference_config,
    inference_input,
)
from projects_dcnv2.modeling.poolers import MDPoolROIPooler  # noqa: E402

__all__ = ["draw_bins", "draw_sampling", "main"]


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
    fig, axes = plt.subplots(
        1,
        count,
        figsize=(panel_inches * count + 1.0, panel_inches + 0.6),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    return fig, axes[0]


def draw_sampling(image, units_yx, locations, weights, layer_names, path, panel_inches=4.0):
    """One panel per unit: its effective sampling points coloured by modulation product. The
    view extends past the image (grey) to show points outside it, by 40% of its size at most."""
    height, width = image.shape[:2]
    fig, axes = _figure(len(units_yx), panel_inches)
    vmax = max(float(weights.max()), 1e-6)
    lo = np.maximum(
        np.minimum(locations.reshape(-1, 2).min(0) - 2, -0.5), [-0.4 * height, -0.4 * width]
    )
    hi = np.minimum(
        np.maximum(locations.reshape(-1, 2).max(0) + 2, [height - 0.5, width - 0.5]),
        [1.4 * height, 1.4 * width],
    )
    scatter = None
    for ax, unit, locs, w in zip(axes, units_yx, locations, weights):
        title = f"unit at (x={unit[1]:.0f}, y={unit[0]:.0f}): {locs.shape[0]} points"
        _panel(ax, image, title, view=(lo[1], lo[0], hi[1], hi[0]))
        ax.add_patch(Rectangle((-0.5, -0.5), width, height, fill=False, ec="k", lw=0.8))
        order = np.argsort(w)
        scatter = ax.scatter(
            locs[order, 1],
            locs[order, 0],
            c=w[order],
            cmap="cool",
            vmin=0,
            vmax=vmax,
            s=9 if locs.shape[0] <= 729 else 3,
            edgecolors="k",
            linewidths=0.3 if locs.shape[0] <= 729 else 0,
        )
        ax.plot(unit[1], unit[0], marker="*", color="lime", markersize=14, markeredgecolor="k")
    fig.suptitle(
        "effective sampling locations through " + " \u2190 ".join(layer_names), fontsize=10
    )
    fig.colorbar(
        scatter, ax=list(axes), fraction=0.03, pad=0.01, label="product of modulation weights"
    )
    _save_small_png(fig, path)


def draw_bins(image, detections, path, class_names, panel_inches=4.0):
    """One panel per detection, zoomed on it: the box (dashed white) and its deformed bins
    (filled, coloured by their mask; dots at their centres)."""
    fig, axes = _figure(max(len(detections), 1), panel_inches)
    cmap = plt.get_cmap("cool")
    # continuous coordinates (pixel i covers [i, i + 1)) -> pixel-centre plot coordinates
    shift = -0.5
    for ax, det in zip(axes, detections):
        box, score, label, rects, mask, level = det
        name = class_names[label] if label < len(class_names) else str(label)
        corners = np.concatenate([rects.reshape(-1, 4), box[None]])
        x0, y0 = corners[:, :2].min(0) + shift
        x1, y1 = corners[:, 2:].max(0) + shift
        margin = max(0.25 * max(x1 - x0, y1 - y0), 4.0)
        side = max(x1 - x0, y1 - y0) / 2 + margin  # square view around the box and its bins
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        _panel(
            ax,
            image,
            f"{name} {score:.2f}, pooled at P{level + 2}",
            view=(cx - side, cy - side, cx + side, cy + side),
        )
        bx0, by0, bx1, by1 = box + shift
        ax.add_patch(
            Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec="white", lw=1.5, ls="--")
        )
        for rect, m in zip(rects.reshape(-1, 4) + shift, mask.reshape(-1)):
            ax.add_patch(
                Rectangle(
                    (rect[0], rect[1]),
                    rect[2] - rect[0],
                    rect[3] - rect[1],
                    fill=True,
                    fc=cmap(m),
                    ec=cmap(m),
                    alpha=0.3,
                    lw=0.8,
                )
            )
        centres = (rects[..., :2] + rects[..., 2:]) / 2 + shift
        ax.scatter(
            centres[..., 0].ravel(),
            centres[..., 1].ravel(),
            c=mask.ravel(),
            cmap=cmap,
            vmin=0,
            vmax=1,
            s=10,
            edgecolors="k",
            linewidths=0.4,
        )
    if not detections:
        _panel(axes[0], image, "no detection above the threshold")
    fig.suptitle(
        "mdpool: detection box (dashed) and its 7x7 deformed bins, colour = bin modulation",
        fontsize=10,
    )
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01, label="bin mask")
    _save_small_png(fig, path)


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_positions(items):
    points = []
    for item in items:
        try:
            x, y = (float(v) for v in item.split(","))
        except ValueError:
            raise SystemExit(f"--positions: expected x,y pairs like 40,60; got {item!r}") from None
        points.append((y, x))
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _default_positions(boxes_xyxy, image_hw, count=3):
    """Centres of the top detections plus the image point farthest from every box."""
    height, width = image_hw
    centres = [((b[1] + b[3]) / 2, (b[0] + b[2]) / 2) for b in boxes_xyxy[: count - 1]]
    grid = np.stack(
        np.meshgrid(
            np.linspace(0.2 * height, 0.8 * height, 7),
            np.linspace(0.2 * width, 0.8 * width, 7),
            indexing="ij",
        ),
        -1,
    )
    grid = grid.reshape(-1, 2)
    if len(centres):
        dist = np.min(np.linalg.norm(grid[:, None] - np.array(centres)[None], axis=-1), axis=1)
        centres.append(tuple(grid[np.argmax(dist)]))
    while len(centres) < count:
        centres.append(
            ((len(centres) + 1) * height / (count + 1), (len(centres) + 1) * width / (count + 1))
        )
    return np.array(centres, dtype=np.float64)


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--name", default=None, help="output file suffix (default: the image's stem)"
    )
    parser.add_argument(
        "--positions",
        nargs="*",
        default=None,
        metavar="X,Y",
        help="image positions (original image pixels) of the units to trace "
        "(default: centres of the top detections and one background point)",
    )
    parser.add_argument(
        "--layers",
        default="last-per-stage",
        help="deformable layers to compose, output side first: block names "
        "(res5.2), stages (res5 = its blocks, last first) or last-per-stage",
    )
    parser.add_argument("--group", type=int, default=0, help="deformable group to draw")
    parser.add_argument(
        "--topk", type=int, default=3, help="detections whose mdpool bins are drawn"
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument(
        "--display-size",
        type=int,
        default=400,
        help="pixels per image panel in the PNGs (small images are upscaled)",
    )
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = inference_config(args.config_file, args.opts, args.confidence_threshold)
    model = build_inference_model(cfg)

    original = read_image(args.input, format=cfg.INPUT.FORMAT)  # (H, W, 3) uint8
    inputs = [inference_input(cfg, original)]  # the image resized as the test loader does
    resized_hw = inputs[0]["image"].shape[1:]
    scale = np.array([original.shape[0] / resized_hw[0], original.shape[1] / resized_hw[1]])

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
        try:
            chosen = select_fields(fields, args.layers)
        except ValueError as e:
            raise SystemExit(f"--{e}") from None
        if len(chosen) > 4:
            raise SystemExit(
                f"--layers: {len(chosen)} layers give 9^{len(chosen)} points per unit; pick at most 4"
            )
        if args.positions:
            wanted = _parse_positions(args.positions) / scale  # -> model input pixels
        else:
            boxes = instances.pred_boxes.tensor.numpy()
            wanted = _default_positions(boxes, tuple(resized_hw))
        units = unit_centres(chosen[0], wanted)
        locations, weights = compose_sampling_locations(chosen, units)
        path = os.path.join(args.output, f"sampling_{name}.png")
        draw_sampling(
            display,
            units * scale,
            locations * scale,
            weights,
            [f.name for f in chosen],
            path,
            panel_inches,
        )
        written.append(path)

    if isinstance(getattr(model.roi_heads, "box_pooler", None), MDPoolROIPooler):
        top = instances[: args.topk]
        detections = []
        if len(top):
            pooler = model.roi_heads.box_pooler
            box_features = [features[f] for f in model.roi_heads.box_in_features]
            offsets, masks, levels = pooler.deformation(box_features, [top.pred_boxes])
            per_box = zip(offsets.double().numpy(), masks.double().numpy(), levels.tolist())
            gamma = pooler.level_poolers[0].gamma
            box_scale = np.array([scale[1], scale[0], scale[1], scale[0]])
            for box, score, label, (offset, mask, level) in zip(
                top.pred_boxes.tensor.numpy(),
                top.scores.tolist(),
                top.pred_classes.tolist(),
                per_box,
            ):
                rects, mask = deformed_bins(box, offset, mask, gamma)
                detections.append((box * box_scale, score, label, rects * box_scale, mask, level))
        from detectron2.data import MetadataCatalog

        class_names = (
            MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", [])
            if cfg.DATASETS.TEST
            else []
        )
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
