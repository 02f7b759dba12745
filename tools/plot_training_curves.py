#!/usr/bin/env python
"""Plot training losses of one or more Detectron2 runs from their ``metrics.json``.

    python tools/plot_training_curves.py output/quick_mdconv output/quick_plain \
        --labels mdconv plain --output docs/images/training_curves_shapes.png

Each run is an OUTPUT_DIR or a metrics.json file (one JSON object per line, as Detectron2's
``JSONWriter`` writes them every 20 iterations: median losses over the window, ``lr``, ...).
One panel per ``--keys`` entry (default: total_loss and the box / mask losses), one line per
run; a run's final ``bbox/AP`` / ``segm/AP`` (written after the last evaluation) is added to
its legend label. Keys that a run does not log (loss_mask of Faster R-CNN) are skipped.
"""

import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_KEYS = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask")
_TASK_NAMES = {"bbox": "box", "segm": "mask"}


def load_metrics(run):
    """Returns the list of records (dicts) of a run folder or metrics.json file. Records of a
    resumed run that repeat an iteration keep the last one."""
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    records, final_ap = {}, {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "total_loss" in record:
                records[record["iteration"]] = record
            for task in ("bbox", "segm"):
                if f"{task}/AP" in record:
                    final_ap[task] = record[f"{task}/AP"]
    training = [record for _, record in sorted(records.items())]
    return training, final_ap


def plot(runs, labels, keys, output, title=None):
    """Draws one panel per key, one line per run, and writes ``output`` (PNG)."""
    loaded = [load_metrics(run) for run in runs]
    keys = [k for k in keys if any(k in r for records, _ in loaded for r in records)]
    if not keys:
        raise SystemExit("none of the requested keys is logged by these runs")
    columns = min(len(keys), 2)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5.0 * columns, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for ax, key in zip(axes.flat, keys):
        for index, ((records, final_ap), label) in enumerate(zip(loaded, labels)):
            points = [(r["iteration"] + 1, r[key]) for r in records if key in r]
            if not points:
                continue
            scores = ", ".join(f"{_TASK_NAMES[task]} AP {ap:.1f}" for task, ap in final_ap.items())
            ax.plot(
                *zip(*points),
                marker="o",
                markersize=3,
                color=f"C{index}",  # a run keeps its colour in panels other runs do not log
                label=f"{label} ({scores})" if scores else label,
            )
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIRs or metrics.json files")
    parser.add_argument(
        "--labels", nargs="+", help="one legend label per run (default: folder names)"
    )
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="metrics to plot")
    parser.add_argument("--title", default=None)
    parser.add_argument("--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    labels = args.labels or [
        os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r)))
        for r in args.runs
    ]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: expected {len(args.runs)} labels, got {len(labels)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    print(f"wrote {plot(args.runs, labels, args.keys, args.output, args.title)}")


if __name__ == "__main__":
    main()
