#!/usr/bin/env python
"""Model-level benchmark: per-image inference time and peak memory of DCNv2 configs next to their plain
twins, random weights, same image, same machine, one run.

    python tools/benchmark_model.py [--pairs faster_rcnn_R50_FPN:faster_rcnn_R50_FPN_mdconv,...]
                                    [--size 800x1216] [--repeat 5] [--device cpu] [--json out.json]

Each config runs in its own subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) is
its own. Prints medians and the DCNv2 / plain ratio.
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


def _worker(config, size, repeat, device):
    import resource

    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from projects_dcnv2 import add_dcnv2_config

    cfg = get_cfg()
    add_dcnv2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config + ".yaml"))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    h, w = size
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, h, w, generator=g) * 255).to(device)
    inputs = [{"image": image, "height": h, "width": w}]
    times = []
    with torch.no_grad():
        for i in range(repeat + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first run warms up
                times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "median_s": statistics.median(times), "peak_mb": peak_mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated plain:dcnv2 config names")
    parser.add_argument("--size", default="800x1216", help="HxW of the (already resized) input image")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.worker:
        print(json.dumps(_worker(args.worker, size, args.repeat, args.device)))
        return

    import torch

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {machine}; image {args.size}; median of {args.repeat} after one warm-up; random weights")
    print("| plain | DCNv2 | plain s/img | DCNv2 s/img | ratio | plain peak MB | DCNv2 peak MB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    cache = {}
    for pair in args.pairs.split(","):
        plain, dcn = pair.split(":")
        for config in (plain, dcn):
            if config not in cache:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", config, "--size", args.size, "--repeat", str(args.repeat),
                     "--device", args.device],
                    check=True, capture_output=True, text=True,
                )
                cache[config] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = cache[plain], cache[dcn]
        row = {"plain": a, "dcnv2": b, "ratio": b["median_s"] / a["median_s"]}
        rows.append(row)
        print(f"| {plain} | {dcn} | {a['median_s']:.2f} | {b['median_s']:.2f} | {row['ratio']:.2f}x "
              f"| {a['peak_mb']:.0f} | {b['peak_mb']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "size": args.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
