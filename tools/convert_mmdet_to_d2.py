#!/usr/bin/env python
"""Convert an MMDetection DCNv2 checkpoint (or a torchvision ImageNet ResNet) to a Detectron2 pickle.

    python tools/convert_mmdet_to_d2.py IN.pth OUT.pkl [--config-file configs/X.yaml] [KEY VALUE ...]

IN may be a local file, an https:// URL (downloaded once into iopath's cache) or
torchvision://resnet50. OUT.pkl is ``{"model": {name: ndarray}, "__author__": "projects_dcnv2",
"matching_heuristics": False}``: Detectron2's own ``DetectionCheckpointer`` loads it by exact
name, and ``DCNv2Checkpointer`` additionally checks it against the model. With --config-file the
converted weights are checked against the model built from that config (on the CPU; trailing
KEY VALUE pairs override the config) and nothing is written if they do not fit.

The input is read with ``torch.load(weights_only=True)``; --trust-pickle allows arbitrary pickled
objects (only for files from a source you trust).
"""

import argparse
import pickle
import sys
from typing import Mapping

import torch

from detectron2.utils.file_io import PathManager

from projects_dcnv2.checkpoint import AUTHOR, CheckpointMismatchError, convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "input", help="MMDetection / torchvision checkpoint: path, URL or torchvision://NAME"
    )
    parser.add_argument("output", help="Detectron2 pickle to write (.pkl)")
    parser.add_argument(
        "--config-file", default="", help="check the weights against this config's model"
    )
    parser.add_argument(
        "--trust-pickle", action="store_true", help="torch.load with weights_only=False"
    )
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def build_model_state(config_file, opts):
    """State dict of the model built from a config (on the CPU)."""
    from detectron2.modeling import build_model

    from projects_dcnv2 import load_dcnv2_config

    cfg = load_dcnv2_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    return build_model(cfg).state_dict()


def main(argv=None):
    """Convert, optionally check, write; returns the :class:`ConversionReport`."""
    args = parse_args(argv)
    if not args.output.endswith(".pkl"):
        raise ValueError(
            f"output must end with .pkl (Detectron2 reads other names with torch.load): {args.output}"
        )
    local = PathManager.get_local_path(args.input)
    checkpoint = torch.load(local, map_location="cpu", weights_only=not args.trust_pickle)
    model_state = build_model_state(args.config_file, args.opts) if args.config_file else None
    state_dict, report = (None, None)
    if isinstance(checkpoint, Mapping):
        state_dict, report = convert_checkpoint(checkpoint, model_state, name=args.input)
    if report is None or report.source not in ("MMDetection", "torchvision"):
        raise ValueError(
            f"{args.input} is neither an MMDetection R-50-FPN checkpoint (backbone.layer*, neck.*, "
            "rpn_head.*, roi_head.*) nor a torchvision ResNet (conv1.*, layer*.*, fc.*)"
        )
    print(report.summary())
    if model_state is not None:
        print(f"fits the model of {args.config_file}")

    data = {
        "model": {k: v.detach().cpu().numpy() for k, v in state_dict.items()},
        "__author__": AUTHOR,
        "matching_heuristics": False,
    }
    with PathManager.open(args.output, "wb") as f:
        pickle.dump(data, f)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    try:
        main()
    except CheckpointMismatchError as e:
        sys.exit(f"error: {e}")
