#!/usr/bin/env python
"""Plots the JSON written by tools/benchmark_ops.py --json: time relative to F.conv2d of our mdconv and
torchvision's deform_conv2d, forward and forward+backward, per shape.

    python tools/plot_benchmarks.py docs/benchmarks_cpu.json docs/benchmarks_cpu.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("json_file")
    parser.add_argument("png_file")
    args = parser.parse_args()
    with open(args.json_file) as f:
        result = json.load(f)
    rows = result["conv"]
    labels = [f"{r['shape']} dg{r['dg']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, phase, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward + backward")):
        xs = range(len(rows))
        ours = [r[f"ours_{phase}_ms"] / r[f"conv2d_{phase}_ms"] for r in rows]
        tv = [r[f"torchvision_{phase}_ms"] / r[f"conv2d_{phase}_ms"] for r in rows]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="projects_dcnv2")
        ax.bar([x + 0.2 for x in xs], tv, width=0.4, label="torchvision deform_conv2d")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30)
        ax.set_title(title)
        ax.set_ylabel("time / F.conv2d time")
        ax.legend()
    fig.suptitle(
        f"mdconv vs F.conv2d, ResNet-50 stages of an 800x1216 image, {result['machine']} ({result['dtype']})"
    )
    fig.tight_layout()
    fig.savefig(args.png_file, dpi=90)


if __name__ == "__main__":
    main()
