#!/usr/bin/env python
"""Model-level benchmark: per-image inference time and peak memory of DCNv2 configs next to their plain
twins, random weights, same image, same machine, one run.

    python tools/benchmark_model.py [--pairs faster_rcnn_R50_FPN:faster_rcnn_R50_FPN_mdconv,...]
                                    [--size 800x1216] [--repeat 5] [--device cpu] [--json out.json]

Timing: the two models of a pair live in one subprocess and run alternately, so that load on a shared
machine hits both; the ratio is the median of the per-round DCNv2 / plain ratios, for the whole model and for its
backbone alone (ResNet + FPN). Peak memory (max
RSS on CPU, max allocated on CUDA) comes from one warm inference per config in a subprocess of its own.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PAIRS = (
    "faster_rcnn_R50_FPN:faster_rcnn_R50_FPN_mdconv,"
    "faster_rcnn_R50_FPN:faster_rcnn_R50_FPN_mdpool,"
    "mask_rcnn_R50_FPN:mask_rcnn_R50_FPN_mdconv"
)


def _build(config, device):
    from detectron2.modeling import build_model

    from projects_dcnv2 import load_dcnv2_config

    # Every model keeps exactly TEST.DETECTIONS_PER_IMAGE detections: with random weights the
    # number above the usual 0.05 score threshold depends on the features, and the mask head's
    # work with it, which would time the detections rather than the backbone.
    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    return build_model(
        load_dcnv2_config(os.path.join(ROOT, "configs", config + ".yaml"), opts)
    ).eval()


def _inputs(size, device):
    import torch

    h, w = size
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, h, w, generator=g) * 255).to(device)
    return [{"image": image, "height": h, "width": w}]


def _run_once(model, inputs, device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_pair(plain, dcn, size, repeat, device):
    import torch

    """Both models in one process, run alternately (plain, DCNv2, plain, ...): a load change on a shared
    machine hits both, and each round gives one DCNv2 / plain ratio."""
    models = [_build(plain, device), _build(dcn, device)]
    # Same weights wherever the two share a parameter (the offset convs keep their zero init), so that
    # both see the same proposals and detections.
    dcn_state = models[1].state_dict()
    shared = {
        k: v
        for k, v in models[0].state_dict().items()
        if k in dcn_state and dcn_state[k].shape == v.shape
    }
    models[1].load_state_dict(shared, strict=False)
    inputs = _inputs(size, device)
    with torch.no_grad():
        images = models[0].preprocess_image(inputs).tensor
    for model in models:  # warm-up
        _run_once(model, inputs, device)
    # Whole model, and the backbone alone (ResNet + FPN: all that DCNv2 changes in an mdconv
    # config). With random weights the heads' work depends on the boxes each model predicts
    # (adaptive RoIAlign grids, mask pasting grow with box size), so the backbone ratio is the clean one.
    times = {"model": [[], []], "backbone": [[], []]}
    for _ in range(repeat):
        for i, model in enumerate(models):
            times["model"][i].append(_run_once(model, inputs, device))
            times["backbone"][i].append(_run_once(model.backbone, images, device))
    result = {}
    for part, (plain_times, dcn_times) in times.items():
        prefix = "" if part == "model" else "backbone_"
        result[prefix + "plain_median_s"] = statistics.median(plain_times)
        result[prefix + "dcnv2_median_s"] = statistics.median(dcn_times)
        result[prefix + "ratio"] = statistics.median(b / a for a, b in zip(plain_times, dcn_times))
    return result


def _peak_memory(config, size, device):
    """Peak memory of one warm inference, in a process of its own (max RSS on CPU, max allocated on CUDA)."""
    import resource

    import torch

    model = _build(config, device)
    inputs = _inputs(size, device)
    _run_once(model, inputs, device)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess(args, *worker):
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            *worker,
            "--size",
            args.size,
            "--repeat",
            str(args.repeat),
            "--device",
            args.device,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", default=DEFAULT_PAIRS, help="comma-separated plain:dcnv2 config names"
    )
    parser.add_argument(
        "--size", default="800x1216", help="HxW of the (already resized) input image"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--time-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.time_worker or args.memory_worker:
        import torch

        # Random weights can drive activations into the denormal range, where x86 float math is
        # many times slower depending on the values, not on the model: flush them to zero.
        torch.set_flush_denormal(True)
    if args.time_worker:
        print(json.dumps(_time_pair(*args.time_worker.split(":"), size, args.repeat, args.device)))
        return
    if args.memory_worker:
        print(json.dumps(_peak_memory(args.memory_worker, size, args.device)))
        return

    import torch

    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# {machine}; image {args.size}; {args.repeat} alternating rounds after one warm-up; random weights"
    )
    print(
        "| plain | DCNv2 | plain s/img | DCNv2 s/img | ratio | backbone ratio | plain peak MB | DCNv2 peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    peak = {}
    for pair in args.pairs.split(","):
        plain, dcn = pair.split(":")
        for config in (plain, dcn):
            if config not in peak:
                peak[config] = _subprocess(args, "--memory-worker", config)
        t = _subprocess(args, "--time-worker", pair)
        row = {
            "plain": {"config": plain, "median_s": t["plain_median_s"], "peak_mb": peak[plain]},
            "dcnv2": {"config": dcn, "median_s": t["dcnv2_median_s"], "peak_mb": peak[dcn]},
            "ratio": t["ratio"],
            "backbone": {
                k[len("backbone_") :]: v for k, v in t.items() if k.startswith("backbone_")
            },
        }
        rows.append(row)
        print(
            f"| {plain} | {dcn} | {t['plain_median_s']:.2f} | {t['dcnv2_median_s']:.2f} | {t['ratio']:.2f}x "
            f"| {t['backbone_ratio']:.2f}x "
            f"| {peak[plain]:.0f} | {peak[dcn]:.0f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine, "size": args.size, "repeat": args.repeat, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
