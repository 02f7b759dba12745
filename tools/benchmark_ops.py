#!/usr/bin/env python
"""Side-by-side op benchmark: our mdconv vs F.conv2d vs torchvision's deform_conv2d (with mask), and our
deform_roi_pool (both mdpool passes, without the FCs) vs torchvision's roi_align.

Shapes are the ResNet-50 stages c3-c5 of an 800x1216 image (batch 1, 3x3, padding 1). Prints median
times and ratios for the device it runs on; --json writes them for docs/benchmarks.md.

    python tools/benchmark_ops.py [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--repeat 10] [--json out.json]
"""
import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from projects_dcnv2.layers import deform_roi_pool, modulated_deform_conv2d

STAGES = {"c3": (128, 100, 152), "c4": (256, 50, 76), "c5": (512, 25, 38)}


def _time(fn, device, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def bench_conv(name, channels, h, w, dg, device, dtype, repeat):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, h, w, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.05).to(device, dtype).requires_grad_()
    offset = torch.randn(1, 2 * dg * 9, h, w, generator=g).to(device, dtype).requires_grad_()
    mask = torch.rand(1, dg * 9, h, w, generator=g).to(device, dtype).requires_grad_()
    cases = {
        "ours": lambda: modulated_deform_conv2d(x, offset, mask, weight, padding=1, deformable_groups=dg),
        "conv2d": lambda: F.conv2d(x, weight, padding=1),
        "torchvision": lambda: torchvision.ops.deform_conv2d(x, offset, weight, padding=(1, 1), mask=mask),
    }
    row = {"shape": name, "dg": dg}
    for key, fn in cases.items():
        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            fn().sum().backward()

        row[f"{key}_fwd_ms"] = 1e3 * _time(fwd, device, repeat)
        row[f"{key}_fwdbwd_ms"] = 1e3 * _time(fwd_bwd, device, repeat)
    for phase in ("fwd", "fwdbwd"):
        row[f"ours/conv2d_{phase}"] = row[f"ours_{phase}_ms"] / row[f"conv2d_{phase}_ms"]
        row[f"torchvision/ours_{phase}"] = row[f"torchvision_{phase}_ms"] / row[f"ours_{phase}_ms"]
    return row


def bench_pool(device, dtype, repeat, num_rois=1000):
    g = torch.Generator().manual_seed(0)
    levels = [(256, 200, 304, 1 / 4), (256, 100, 152, 1 / 8), (256, 50, 76, 1 / 16), (256, 25, 38, 1 / 32)]
    feats = [torch.randn(1, c, h, w, generator=g).to(device, dtype) for c, h, w, _ in levels]
    per_level = num_rois // len(levels)
    rois, offsets = [], []
    for lvl in range(len(levels)):
        size = 32 * 2 ** lvl + torch.rand(per_level, 2, generator=g) * 32 * 2 ** lvl
        xy = torch.rand(per_level, 2, generator=g) * torch.tensor([1216.0, 800.0])
        boxes = torch.cat([torch.zeros(per_level, 1), xy, xy + size], dim=1)
        rois.append(boxes.to(device, dtype))
        offsets.append((torch.randn(per_level, 2, 7, 7, generator=g) * 0.1).to(device, dtype))

    def ours():
        for f, r, o, (_, _, _, s) in zip(feats, rois, offsets, levels):
            deform_roi_pool(f, r, None, 7, s, 0)
            deform_roi_pool(f, r, o, 7, s, 0)

    def roi_align():
        for f, r, (_, _, _, s) in zip(feats, rois, levels):
            torchvision.ops.roi_align(f, r, 7, s, 0, aligned=True)

    with torch.no_grad():
        row = {"shape": f"P2-P5, {num_rois} RoIs", "ours_ms": 1e3 * _time(ours, device, repeat),
               "roi_align_ms": 1e3 * _time(roi_align, device, repeat)}
    row["ours/roi_align"] = row["ours_ms"] / row["roi_align_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--stages", default="c3,c4,c5")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {"device": args.device, "machine": _machine(args.device), "dtype": args.dtype,
              "torch": torch.__version__, "torchvision": torchvision.__version__, "conv": [], "pool": None}
    print(f"# {result['machine']} ({args.device}, {args.dtype}), torch {torch.__version__}; medians of {args.repeat}")
    header = ("shape", "dg", "fwd ms ours/conv/tv", "ours/conv", "tv/ours", "fwd+bwd ms ours/conv/tv", "ours/conv",
              "tv/ours")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dg in (1, 4):
        for name in args.stages.split(","):
            r = bench_conv(name, *STAGES[name], dg, args.device, dtype, args.repeat)
            result["conv"].append(r)
            print(
                f"| {name} | {dg} | {r['ours_fwd_ms']:.1f} / {r['conv2d_fwd_ms']:.1f} / {r['torchvision_fwd_ms']:.1f} "
                f"| {r['ours/conv2d_fwd']:.2f}x | {r['torchvision/ours_fwd']:.2f}x "
                f"| {r['ours_fwdbwd_ms']:.1f} / {r['conv2d_fwdbwd_ms']:.1f} / {r['torchvision_fwdbwd_ms']:.1f} "
                f"| {r['ours/conv2d_fwdbwd']:.2f}x | {r['torchvision/ours_fwdbwd']:.2f}x |",
                flush=True,
            )
    p = bench_pool(args.device, dtype, args.repeat)
    result["pool"] = p
    print(f"\nmdpool (two passes, no FCs) vs roi_align, {p['shape']}: {p['ours_ms']:.1f} ms vs "
          f"{p['roi_align_ms']:.1f} ms = {p['ours/roi_align']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
