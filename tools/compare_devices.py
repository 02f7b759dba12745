#!/usr/bin/env python
"""Evaluate one checkpoint on two devices and say whether they agree.

    python tools/compare_devices.py --config-file configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_shapes.yaml \
        --devices cuda,cpu --images 4 --json compare.json MODEL.WEIGHTS output/model_final.pth
    python tools/compare_devices.py --config-file <cfg> --devices cpu,cpu --threads 1,2 MODEL.WEIGHTS <pth>

Each side builds the config's model on its device (``MODEL.DEVICE``), loads ``MODEL.WEIGHTS`` and
runs Detectron2's ``COCOEvaluator`` over the config's first test set (``DATASETS.TEST[0]``), keeping
the detections of the first ``--images`` images. They agree when

* box and mask AP differ by at most ``--ap-tol`` (0.1 AP point), and
* every detection of those images on one side has a partner on the other (matched greedily, best
  score first, each partner used once): same class, box IoU > ``--box-iou`` (0.99), score within
  ``--score-tol`` (1e-3), mask IoU > ``--mask-iou`` (0.98). A detection without a partner is
  excused only where it sits at a cut: its score within ``--score-tol`` of the score threshold, or
  of the other side's lowest score when that side holds ``TEST.DETECTIONS_PER_IMAGE`` boxes (a
  float difference there can move a box across the cut).

Why these bounds: both devices compute in float32, in different orders, so a score (a softmax
output, in [0, 1]) moves by about 1e-6 to 1e-4 after the backbone's ~60 layers; 1e-3 leaves a margin
of ten and still catches a wrong kernel (a wrong offset or mask moves scores by 1e-2 and more). On
the 128-pixel shapes images a box of 30 pixels at IoU 0.99 is within about 0.1 pixel of its partner.
A mask is a 28 x 28 grid of probabilities pasted and cut at 0.5: only pixels whose probability sits
at 0.5 can flip, a pixel-wide rim at most, so 0.98 mask IoU. TF32 (``cudnn.allow_tf32`` and
``cuda.matmul.allow_tf32``, on by default for cuDNN) rounds float32 products to 10 mantissa bits and
moves scores by ~1e-3: it is turned off unless ``--tf32 on``.

Prints one verdict line (``compare_devices: AGREE ...`` or ``compare_devices: DISAGREE ...``),
writes everything to ``--json``, and exits with 1 when the devices disagree.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.utils.logger import setup_logger

from projects_dcnv2.engine import build_evaluator, build_inference_model, inference_config

TASKS = ("bbox", "segm")


class FirstImages(DatasetEvaluator):
    """Keeps the detections of the first ``count`` images the loader yields (on the CPU):
    ``{"image_id", "boxes": (R, 4), "scores": (R,), "classes": (R,), "masks": (R, H, W) bool
    or None}`` each."""

    def __init__(self, count):
        self.count = count
        self.images = []

    def reset(self):
        self.images = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if len(self.images) >= self.count:
                return
            inst = out["instances"].to("cpu")
            masks = inst.pred_masks.numpy().astype(bool) if inst.has("pred_masks") else None
            self.images.append(
                {
                    "image_id": inp["image_id"],
                    "boxes": inst.pred_boxes.tensor.numpy().astype(np.float64),
                    "scores": inst.scores.numpy().astype(np.float64),
                    "classes": inst.pred_classes.numpy(),
                    "masks": masks,
                }
            )

    def evaluate(self):
        return None


def evaluate(cfg, images, threads=None, output_dir=None):
    """COCO metrics of ``cfg``'s model on ``cfg.DATASETS.TEST[0]`` and the detections of its first
    ``images`` images: ``{"metrics": {task: {metric: value}}, "images": [...], "seconds": s}``."""
    if threads:
        torch.set_num_threads(threads)
    dataset = cfg.DATASETS.TEST[0]
    model = build_inference_model(cfg)
    first = FirstImages(images)
    coco = build_evaluator(cfg, dataset, output_dir)
    start = time.perf_counter()
    metrics = inference_on_dataset(
        model, build_detection_test_loader(cfg, dataset), DatasetEvaluators([coco, first])
    )
    return {
        "metrics": {task: dict(metrics[task]) for task in TASKS if task in metrics},
        "images": first.images,
        "seconds": time.perf_counter() - start,
    }


def box_iou(a, b):
    """(A, 4) x (B, 4) XYXY boxes -> (A, B) IoU."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


def mask_iou(a, b):
    """Two (H, W) boolean masks -> IoU (1 for two empty masks)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def match_image(a, b, tol):
    """Greedy matching of image ``a``'s detections to ``b``'s. ``tol``: ``box_iou``, ``score``,
    ``mask_iou``, ``score_cut`` (scores within ``score`` of it are at a cut). Returns
    ``{"matched", "unmatched": [(side, index, score)], "excused", "worst": {...}}``."""
    ious = box_iou(a["boxes"], b["boxes"]) if len(a["scores"]) and len(b["scores"]) else None
    used = set()
    pairs = []
    for i in np.argsort(-a["scores"], kind="stable"):
        best = None
        for j in range(len(b["scores"])):
            if j in used or a["classes"][i] != b["classes"][j]:
                continue
            if ious[i, j] <= tol["box_iou"] or abs(a["scores"][i] - b["scores"][j]) > tol["score"]:
                continue
            if best is None or ious[i, j] > ious[i, best]:
                best = j
        if best is None:
            continue
        m_iou = 1.0
        if a["masks"] is not None and b["masks"] is not None:
            m_iou = mask_iou(a["masks"][i], b["masks"][best])
            if m_iou <= tol["mask_iou"]:
                continue
        used.add(best)
        pairs.append((int(i), int(best), float(ious[i, best]), m_iou))
    matched_a = {p[0] for p in pairs}
    unmatched = [("a", int(i), float(a["scores"][i])) for i in range(len(a["scores"]))]
    unmatched = [u for u in unmatched if u[1] not in matched_a]
    unmatched += [("b", j, float(b["scores"][j])) for j in range(len(b["scores"])) if j not in used]
    cuts = {"a": [tol["score_cut"]], "b": [tol["score_cut"]]}
    for side, other in (("a", b), ("b", a)):  # the other side's lowest kept score, if it was full
        if len(other["scores"]) >= tol["per_image"]:
            cuts[side].append(float(other["scores"].min()))
    excused = [u for u in unmatched if min(abs(u[2] - c) for c in cuts[u[0]]) <= tol["score"]]
    score_diffs = [abs(a["scores"][i] - b["scores"][j]) for i, j, _, _ in pairs]
    return {
        "image_id": a["image_id"],
        "detections": [len(a["scores"]), len(b["scores"])],
        "matched": len(pairs),
        "unmatched": [u for u in unmatched if u not in excused],
        "excused": excused,
        "worst": {
            "box_iou": min((p[2] for p in pairs), default=1.0),
            "score_diff": float(max(score_diffs, default=0.0)),
            "mask_iou": min((p[3] for p in pairs), default=1.0),
        },
    }


def compare(a, b, tol):
    """The report of two :func:`evaluate` results: AP differences per task, the per-image
    matches, ``agree`` (bool) and ``reasons`` (why not)."""
    reasons = []
    ap = {}
    for task in TASKS:
        if task not in a["metrics"] and task not in b["metrics"]:
            continue
        x, y = a["metrics"].get(task, {}).get("AP"), b["metrics"].get(task, {}).get("AP")
        diff = abs(x - y) if x is not None and y is not None else None
        ap[task] = {"a": x, "b": y, "diff": diff}
        if diff is None or not diff <= tol["ap"]:  # NaN fails too
            reasons.append(f"{task} AP {x} vs {y} (tolerance {tol['ap']})")
    if [im["image_id"] for im in a["images"]] != [im["image_id"] for im in b["images"]]:
        reasons.append("the two sides saw different images")
        images = []
    else:
        images = [match_image(x, y, tol) for x, y in zip(a["images"], b["images"])]
    for im in images:
        if im["unmatched"]:
            reasons.append(f"image {im['image_id']}: {len(im['unmatched'])} detections unmatched")
    return {"ap": ap, "images": images, "agree": not reasons, "reasons": reasons}


def verdict(report, devices):
    """One line: AGREE/DISAGREE, the APs and the worst detection pair."""
    word = "AGREE" if report["agree"] else "DISAGREE"
    aps = "; ".join(
        f"{task} AP {v['a']:.3f} vs {v['b']:.3f}" if v["diff"] is not None else f"{task} AP n/a"
        for task, v in report["ap"].items()
    )
    images = report["images"]
    matched = sum(im["matched"] for im in images)
    total = sum(max(im["detections"]) for im in images)
    worst = {
        "box IoU": min((im["worst"]["box_iou"] for im in images), default=1.0),
        "score diff": max((im["worst"]["score_diff"] for im in images), default=0.0),
        "mask IoU": min((im["worst"]["mask_iou"] for im in images), default=1.0),
    }
    worst_text = ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
    line = f"compare_devices: {word} {devices[0]} vs {devices[1]}: {aps}; detections of "
    line += f"{len(images)} images: {matched}/{total} matched (worst {worst_text})"
    if report["reasons"]:
        line += "; " + "; ".join(report["reasons"][:5])
    return line


def _pair(text, name, cast):
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{name}: expected two values A,B, got {text!r}")
    try:
        return [cast(p) if p else None for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected two values A,B, got {text!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--devices", required=True, type=lambda s: _pair(s, "--devices", str), help="A,B"
    )
    parser.add_argument(
        "--threads",
        type=lambda s: _pair(s, "--threads", int),
        default=[None, None],
        help="CPU threads of side A,B (torch.set_num_threads); default: torch's",
    )
    parser.add_argument("--images", type=int, default=4, help="images whose detections are paired")
    parser.add_argument("--ap-tol", type=float, default=0.1, help="largest AP difference")
    parser.add_argument("--box-iou", type=float, default=0.99, help="a partner's box IoU above")
    parser.add_argument("--score-tol", type=float, default=1e-3, help="largest score difference")
    parser.add_argument("--mask-iou", type=float, default=0.98, help="a partner's mask IoU above")
    parser.add_argument("--tf32", choices=["on", "off"], default="off", help="CUDA TF32 (off)")
    parser.add_argument("--output-dir", help="keep COCOEvaluator's files here (default: not kept)")
    parser.add_argument("--json", help="write the metrics, the matches and the verdict here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"--images: expected a count >= 0, got {args.images}")
    if "MODEL.WEIGHTS" not in args.opts[::2]:
        parser.error("MODEL.WEIGHTS: expected a checkpoint (KEY VALUE after the options), got none")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detectron2")  # the evaluation's progress and timing lines
    tf32 = args.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    sides = []
    with tempfile.TemporaryDirectory(prefix="compare_devices-") as scratch:
        for k, (device, threads) in enumerate(zip(args.devices, args.threads)):
            out = os.path.join(args.output_dir or scratch, f"{k}_{device}")
            cfg = inference_config(args.config_file, [*args.opts, "MODEL.DEVICE", device])
            sides.append(evaluate(cfg, args.images, threads, out))
    tol = {
        "ap": args.ap_tol,
        "box_iou": args.box_iou,
        "score": args.score_tol,
        "mask_iou": args.mask_iou,
        "score_cut": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        "per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
    }
    report = compare(sides[0], sides[1], tol)
    names = [d + (f"({t} threads)" if t else "") for d, t in zip(args.devices, args.threads)]
    line = verdict(report, names)
    print(line, flush=True)
    if args.json:
        record = {
            "config": args.config_file,
            "opts": args.opts,
            "devices": names,
            "tf32": tf32,
            "tolerances": tol,
            "metrics": [s["metrics"] for s in sides],
            "seconds": [round(s["seconds"], 2) for s in sides],
            "verdict": line,
            **report,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=float)
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
