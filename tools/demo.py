#!/usr/bin/env python
"""Run a trained model on images and draw its detections with Detectron2's ``Visualizer``.

    python tools/demo.py --config-file configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml \
        --input datasets/dcnv2_shapes/val/00000*.png --output demo/ \
        MODEL.WEIGHTS output/quick_mdconv/model_final.pth
    python tools/demo.py --config-file configs/mask_rcnn_R50_FPN_mdconv.yaml --input photos/ \
        --output demo/ MODEL.WEIGHTS <checkpoint or MMDetection URL> MODEL.DEVICE cuda

``--input`` takes image files, folders (every .jpg/.jpeg/.png/.bmp in them) and glob patterns.
Each result is written as ``<output>/<prefix><image stem>.png``. Runs on the config's
``MODEL.DEVICE`` (the quick configs say cpu; pass ``MODEL.DEVICE cuda`` for a GPU).
The model is built and its weights loaded by ``projects_dcnv2.engine.build_inference_model``
(MMDetection and torchvision checkpoints work too).
Needs OpenCV (``pip install opencv-python-headless``), which Detectron2's ``Visualizer`` imports.
"""

import argparse
import glob
import os
import time

import numpy as np
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image

# (importing the package registers its components)
from projects_dcnv2.engine import build_inference_model, inference_config, inference_input

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def expand_inputs(items):
    """Files, folders and glob patterns -> sorted list of image files (each listed once)."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = [os.path.join(item, f) for f in sorted(os.listdir(item))]
            found = [p for p in found if p.lower().endswith(_IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise SystemExit(f"--input: no image matches {item!r}")
        paths.extend(p for p in found if p not in paths)
    return paths


def draw(image_rgb, instances, metadata, scale):
    """Detections drawn on an RGB image (H, W, 3) -> RGB array, upscaled by ``scale``."""
    from detectron2.utils.visualizer import ColorMode, Visualizer  # needs cv2

    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances.to("cpu")).get_image()


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--prefix", default="", help="prefix of the output file names")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the drawn detections",
    )
    parser.add_argument(
        "--display-size",
        type=int,
        default=512,
        help="upscale images whose longer side is smaller to about this size (0: never)",
    )
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = inference_config(args.config_file, args.opts, args.confidence_threshold)
    paths = expand_inputs(args.input)
    model = build_inference_model(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in paths:
        image = read_image(path, format=cfg.INPUT.FORMAT)
        start = time.perf_counter()
        with torch.no_grad():
            instances = model([inference_input(cfg, image)])[0]["instances"]
        elapsed = time.perf_counter() - start
        longer = max(image.shape[:2])
        scale = args.display_size / longer if 0 < longer < args.display_size else 1.0
        image_rgb = image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1]
        drawn = draw(np.ascontiguousarray(image_rgb), instances, metadata, scale)
        stem = os.path.splitext(os.path.basename(path))[0]
        out_path = os.path.join(args.output, f"{args.prefix}{stem}.png")
        Image.fromarray(drawn).save(out_path, optimize=True)
        written.append(out_path)
        print(f"{path}: {len(instances)} detections in {elapsed:.2f} s -> {out_path}")
    return written


if __name__ == "__main__":
    main()
