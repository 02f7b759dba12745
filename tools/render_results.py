#!/usr/bin/env python
"""Writes the generated tables of docs/results/*.md from the benchmark JSON files in docs/.

A results page marks each generated block with a pair of HTML comments,

    <!-- results:NAME -->
    ...
    <!-- /results:NAME -->

and this script replaces what lies between them with the output of the renderer registered as
NAME: an entry of ``OP_BLOCKS`` for a tools/benchmark_ops.py JSON file, or a function decorated
with ``@renderer("NAME", "docs/results/PAGE.md")``. Run it whenever a JSON file changes:

    python tools/render_results.py           # rewrite the pages
    python tools/render_results.py --check   # exit 1, naming each page that is out of date

tests/test_tools.py runs the check, so a committed page cannot disagree with its JSON. The prose
around the markers (machine, date, command) is written by hand.
"""

import argparse
import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_utils, beside this file
import bench_utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# name -> (page path relative to the repository root, function(docs folder) -> markdown)
RENDERERS = {}

_BLOCK = re.compile(
    r"<!-- results:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S
)


def renderer(name, page):
    """Registers ``fn(docs: Path) -> str`` as the renderer of block ``name`` in ``page``."""

    def register(fn):
        RENDERERS[name] = (page, fn)
        return fn

    return register


def _load(docs, filename):
    with open(Path(docs) / filename) as f:
        return json.load(f)


def _ms(value):
    """Milliseconds to about three significant digits: 2516.8, 31.9, 1.93, 0.306."""
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _x(ratio):
    return f"{ratio:.2f}x"


def _environment(result, filename):
    kept = (
        "freed memory kept (`mallopt`)" if result.get("freed_memory_kept") else "allocator defaults"
    )
    return (
        f"`docs/{filename}`: {result['machine']}, {result['dtype']}, torch {result['torch']}, "
        f"torchvision {result['torchvision']}, {kept}."
    )


def _conv_table(rows):
    lines = [
        "| stage | dg | forward ms: ours / `F.conv2d` / torchvision | ours / conv | torchvision / ours "
        "| fwd+bwd ms: ours / conv / torchvision | ours / conv | torchvision / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["shape"], str(r["dg"])]
        for phase in ("fwd", "fwdbwd"):
            times = (r[f"ours_{phase}_ms"], r[f"conv2d_{phase}_ms"], r[f"torchvision_{phase}_ms"])
            cells += [
                " / ".join(_ms(t) for t in times),
                bench_utils.format_ratio(r, f"ours/conv2d_{phase}"),
                bench_utils.format_ratio(r, f"torchvision/ours_{phase}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pool_table(pool):
    return [
        "| mdpool (both passes, no FCs) | ours ms | `roi_align` ms | ours / `roi_align` |",
        "|---|---|---|---|",
        f"| {pool['shape']} | {_ms(pool['ours_ms'])} | {_ms(pool['roi_align_ms'])} "
        f"| {bench_utils.format_ratio(pool, 'ours/roi_align')} |",
    ]


# The CPU targets of the performance issue, which docs/results/cpu_ops.md states above its tables:
# (name, JSON key, limit, True when the ratio must stay at or below the limit).
CPU_TARGETS = (
    ("forward", "ours/conv2d_fwd", 1.5, True),
    ("forward+backward", "ours/conv2d_fwdbwd", 2.5, True),
    ("torchvision", "torchvision/ours_fwdbwd", 2.5, False),
)
POOL_TARGET = 2.0  # mdpool at most 2x torchvision's roi_align


def _verdict(result):
    missed = []
    for what, key, limit, at_most in CPU_TARGETS:
        for r in result["conv"]:
            if (r[key] > limit) if at_most else (r[key] < limit):
                missed.append(f"{what} ({r['shape']} dg {r['dg']})")
    if result["pool"]["ours/roi_align"] > POOL_TARGET:
        missed.append("mdpool")
    if missed:
        return "Targets: **not met**: " + ", ".join(missed) + "."
    return "Targets: met in every row."


def _op_block(docs, filename, targets):
    result = _load(docs, filename)
    lines = [_environment(result, filename), "", *_conv_table(result["conv"]), ""]
    lines += [*_pool_table(result["pool"]), ""]
    if targets:
        lines += [_verdict(result), ""]
    return "\n".join(lines)


# The op benchmark blocks (tools/benchmark_ops.py --json): name -> (page, JSON file in docs/,
# whether the CPU targets apply).
OP_BLOCKS = {
    "cpu_ops": ("docs/results/cpu_ops.md", "benchmarks_cpu.json", True),
    "cpu_ops_fresh_memory": ("docs/results/cpu_ops.md", "benchmarks_cpu_fresh_memory.json", True),
    "gpu_ops_float32": ("docs/results/gpu_ops.md", "benchmarks_cuda_h200_float32.json", False),
    "gpu_ops_float16": ("docs/results/gpu_ops.md", "benchmarks_cuda_h200_float16.json", False),
}
for _name, (_page, _filename, _targets) in OP_BLOCKS.items():
    renderer(_name, _page)(functools.partial(_op_block, filename=_filename, targets=_targets))


# the fused Triton kernels' rows of the 2026-12-04 run
GPU_FUSED = "benchmarks_cuda_h200_fused.json"


@renderer("gpu_ops_fused", "docs/results/gpu_ops.md")
def gpu_ops_fused(docs):
    """The fused Triton mdconv against the column path, torchvision and cuDNN: medians per
    implementation and the ratios of those medians (the run kept no per-round times, so no
    spread: the ratios are marked as ratios of medians)."""
    result = _load(docs, GPU_FUSED)
    lines = [
        f"`docs/{GPU_FUSED}`: {result['machine']}, {result['date']}, torch {result['torch']}, "
        f"Triton {result['triton']}; {result['source']}.",
        "",
        "| dtype | shape, dg, N | call (rounds) | fwd ms: fused / column / torchvision / conv2d "
        "| fwd+bwd ms: fused / column / torchvision / conv2d | fwd extra MB: fused / column "
        "| fused / column fwd, fwd+bwd (of medians) | fused / conv2d fwd (of medians) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    impls = ("triton", "cuda", "torchvision", "conv2d")
    for r in result["fused"]:
        dtype = r["dtype"] + (f", TF32 {r['tf32']}" if r["tf32"] != "n/a" else "")
        rounds = result["calls"][str(r["call"])]["repeat"]
        fwd, both = ([r[f"{k}_{ph}_ms"] for k in impls] for ph in ("fwd", "fwdbwd"))
        lines.append(
            f"| {dtype} | {r['shape']}, {r['dg']}, {r['batch']} | {r['call']} ({rounds}) "
            f"| {' / '.join(f'{t:.3f}' for t in fwd)} | {' / '.join(f'{t:.3f}' for t in both)} "
            f"| {r['triton_fwd_extra_mb']:.1f} / {r['cuda_fwd_extra_mb']:.1f} "
            f"| {_x(fwd[0] / fwd[1])}, {_x(both[0] / both[1])} | {_x(fwd[0] / fwd[3])} |"
        )
    return "\n".join([*lines, ""])


MODEL_TARGET = ("mask_rcnn_R50_FPN_mdconv", 1.15)  # the DCNv2 config whose ratio has a target


def _inference_pair(r):
    """(plain, DCNv2, plain s, DCNv2 s, ratio, backbone ratio, plain MB, DCNv2 MB) of a row of
    benchmarks_model_cpu.json: the tool's rows ("infer", "backbone"), or the inference pairs it
    wrote before it had a training mode (the committed file)."""
    if "infer" in r:
        i = r["infer"]
        return (r["twin"], r["config"], i["twin_median_s"], i["median_s"], i["ratio"],
                r["backbone"]["ratio"], i["twin_peak_gb"] * 1024, i["peak_gb"] * 1024)  # fmt: skip
    plain, dcn = r["plain"], r["dcnv2"]
    return (plain["config"], dcn["config"], plain["median_s"], dcn["median_s"], r["ratio"],
            r["backbone"]["ratio"], plain["peak_mb"], dcn["peak_mb"])  # fmt: skip


@renderer("cpu_models", "docs/results/cpu_models.md")
def cpu_models(docs):
    filename = "benchmarks_model_cpu.json"
    result = _load(docs, filename)
    rounds = result.get("iters", result.get("repeat"))
    lines = [
        f"`docs/{filename}`: {result['machine']}, input {result['size']}, "
        f"{rounds} rounds per pair.",
        "",
        "| plain | DCNv2 | plain s/img | DCNv2 s/img | ratio | backbone ratio "
        "| plain peak MB | DCNv2 peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    outcome = "not measured"
    for r in result["rows"]:
        plain, dcn, plain_s, dcn_s, ratio, backbone, plain_mb, dcn_mb = _inference_pair(r)
        lines.append(
            f"| {plain} | {dcn} | {plain_s:.2f} | {dcn_s:.2f} | {_x(ratio)} | {_x(backbone)} "
            f"| {plain_mb:.0f} | {dcn_mb:.0f} |"
        )
        if dcn == MODEL_TARGET[0]:
            outcome = "met" if ratio <= MODEL_TARGET[1] else "**not met**"
    verdict = (
        f"Target (`{MODEL_TARGET[0]}` at most {MODEL_TARGET[1]:g}x its plain model): {outcome}."
    )
    return "\n".join([*lines, "", verdict, ""])


GPU_MODELS = "benchmarks_model_cuda_h200.json"  # tools/benchmark_model.py on the card, seed rows
GPU_MODELS_MORE = "benchmarks_model_cuda_h200_more.json"  # the same, --rows dcnv2,mimic


def _pct(ratio):
    return f"{(ratio - 1) * 100:+.1f}%"


def model_ratio(result, row, part, other=None):
    """The ``ratio_entry("ratio", ...)`` of a benchmark_model row's ``part`` against its twin (or against
    config ``other``): from the row where the tool recorded the spread, else recomputed from the
    per-round times in ``result["models"]`` (files written before the spread was recorded)."""
    prefix = "ratio" if other is None else f"ratio_to_{other}"
    entry = row[part]
    if f"{prefix}_q25" in entry:
        return {k.replace(prefix, "ratio", 1): v for k, v in entry.items() if k.startswith(prefix)}
    models = result.get("models", {})
    base = row["twin"] if other is None else other
    if row["config"] in models and base in models:
        stats = bench_utils.ratio_entry(
            "ratio", models[row["config"]][part]["times"], models[base][part]["times"]
        )
        if abs(stats["ratio"] - entry[prefix]) > 1e-9:
            raise ValueError(
                f"{row['config']} {part}: the JSON's {prefix} {entry[prefix]} is not the median "
                f"of its per-round ratios ({stats['ratio']})"
            )
        return stats
    return {"ratio": entry[prefix]}


def _ratio(result, row, part, other=None):
    return bench_utils.format_ratio(model_ratio(result, row, part, other))


def _candidates(result):
    if result.get("nms_candidates"):
        return (
            f"inference sent the {result['nms_candidates']} top-scoring (class, box) pairs per "
            "image to NMS (a pre-NMS top-k)"
        )
    return (
        "inference at score threshold 0: every class of all 1000 proposals went to NMS "
        "(80,000 candidates per image, a heavier postprocess than a trained model's)"
    )


@renderer("gpu_models", "docs/results/gpu_models.md")
def gpu_models(docs):
    """MMDetection's V100 figures and their ratio to MMDetection's plain R-50-FPN, beside ours and
    our ratios to our plain twin (from the same rounds, with their 25-75% range, or "too noisy"
    where the ratio of medians falls outside it); ours pending until the JSON exists."""
    mmdet = _load(docs, "benchmarks_model_mmdet_v100.json")
    ours = _load(docs, GPU_MODELS) if (Path(docs) / GPU_MODELS).is_file() else None
    rows = {r["config"]: r for r in ours["rows"]} if ours else {}
    source = (
        f"{ours['machine']}, torch {ours['torch']}; {ours['note']}; {_candidates(ours)}."
        if ours
        else "pending."
    )
    lines = [
        f"`docs/{GPU_MODELS}`: {source}",
        "",
        "| row | MMDetection Mem GB / fps | its plain | Mem / inference time vs plain "
        "| ours Mem GB / fps | our plain twin | Mem vs twin | inference time vs twin "
        "| backbone time vs twin | train s/iter vs twin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in mmdet["rows"]:
        base = mmdet["baselines"][m["baseline"]]
        mem = m["mem_gb"] / base["mem_gb"]
        slower = base["fps"] / m["fps"] if m["fps"] else None  # inference time vs plain
        cells = [
            m["label"],
            f"{m['mem_gb']:.1f} / {m['fps'] or '-'}",
            f"{base['mem_gb']:.1f} / {base['fps']}",
            f"{_pct(mem)} / {_x(slower) if slower else '-'}",
        ]
        r = rows.get(m["config"])
        if r is None:
            cells += ["pending"] * 6
        else:
            t, i = r["train"], r["infer"]
            cells += [
                f"{t['peak_gb']:.2f} / {i['fps']:.1f}",
                f"{t['twin_peak_gb']:.2f} / {i['twin_fps']:.1f}",
                _pct(t["memory_ratio"]),
                _ratio(ours, r, "infer"),
                _ratio(ours, r, "backbone") if "backbone" in r else "-",
                _ratio(ours, r, "train"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


@renderer("gpu_models_more", "docs/results/gpu_models.md")
def gpu_models_more(docs):
    """The mdconv + mdpool and mimicking rows (not in MMDetection's table): ours against the plain
    twin, and the mimic rows against their model without the branch, from the same rounds."""
    result = _load(docs, GPU_MODELS_MORE)
    lines = [
        f"`docs/{GPU_MODELS_MORE}`: {result['machine']}, torch {result['torch']}; "
        f"{result['note']}; {_candidates(result)}.",
        "",
        "| row | Mem GB (twin) | train s/iter vs twin | inference time vs twin "
        "| backbone time vs twin | train s/iter vs the row without mimicking |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["train"]
        others = [k[len("ratio_to_") :] for k in t if k.startswith("ratio_to_")]
        others = [o for o in others if not o.endswith(("_q25", "_q75", "_min", "_max", "_agrees"))]
        others = [o for o in others if not o.endswith("_of_medians")]
        lines.append(
            f"| {r['label']} | {t['peak_gb']:.2f} ({t['twin_peak_gb']:.2f}) "
            f"| {_ratio(result, r, 'train')} | {_ratio(result, r, 'infer')} "
            f"| {_ratio(result, r, 'backbone')} "
            f"| {_ratio(result, r, 'train', others[0]) if others else '-'} |"
        )
    return "\n".join([*lines, ""])


HOST_OVERHEAD = "benchmarks_host_overhead_cpu.json"  # tools/benchmark_ops.py --host-overhead --json


@renderer("host_overhead", "docs/results/cpu_ops.md")
def host_overhead(docs):
    """Per-call time of tiny calls (all host overhead): ours against F.conv2d and torchvision's
    deform_conv2d under grad, no_grad and inference_mode, ratios with their spread."""
    result = _load(docs, HOST_OVERHEAD)
    lines = [
        f"`docs/{HOST_OVERHEAD}`: {result['machine']}, torch {result['torch']}, torchvision "
        f"{result['torchvision']}, {result['date']}, commit {result['commit']}; {result['timing']}.",
        "",
        "| device | mode | us per call: F.conv2d / ours / torchvision | ours / F.conv2d "
        "| torchvision / ours |",
        "|---|---|---|---|---|",
    ]
    for r in result["host_overhead"]:
        lines.append(
            f"| {r['device']} | {r['mode']} | {r['conv2d_us']:.1f} / {r['ours_us']:.1f} / "
            f"{r['torchvision_us']:.1f} | {bench_utils.format_ratio(r, 'ours/conv2d')} "
            f"| {bench_utils.format_ratio(r, 'torchvision/ours')} |"
        )
    return "\n".join([*lines, ""])


PROFILE = "profile_cpu.json"  # tools/profile_model.py --json


@renderer("profile", "docs/results/profile.md")
def profile(docs):
    """Per model and phase: the kinds of work (tools/profile_model.py) with kernel time, host
    time and launches per step, the total, the wall time, and the GPU's idle time."""
    result = _load(docs, PROFILE)
    cuda = result["device"] == "cuda"
    kernel = "kernel ms" if cuda else "op self ms"
    launches = "kernel launches" if cuda else "op calls"
    lines = [
        f"`docs/{PROFILE}`: {result['machine']}, torch {result['torch']}, {result['date']}; "
        f"`{result['command']}`; input {result['size']}, backbone at batch 1, training step at "
        f"batch {result['ims_per_batch']}; {result['warmup']} warm-up steps, figures per step "
        f"over {result['iters']} profiled steps.",
        "",
        f"| model | phase | wall ms | {kernel}: "
        + " / ".join(result["categories"])
        + f" | total | host ms: same order | total | {launches}: same order | total "
        "| GPU idle ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for phase in ("backbone", "train"):
            p = m[phase]
            cat = [p["categories"][c] for c in result["categories"]]
            idle = "n/a" if p["gpu_idle_ms"] is None else _ms(p["gpu_idle_ms"])
            calls = " / ".join(f"{c['launches']:.0f}" for c in cat)
            lines.append(
                f"| {m['label']} | {phase} | {_ms(p['wall_ms'])} "
                f"| {' / '.join(_ms(c['kernel_ms']) for c in cat)} | {_ms(p['total']['kernel_ms'])} "
                f"| {' / '.join(_ms(c['host_ms']) for c in cat)} | {_ms(p['total']['host_ms'])} "
                f"| {calls} "
                f"| {p['total']['launches']:.0f} | {idle} |"
            )
    return "\n".join([*lines, ""])


def render_text(text, page, docs=DOCS):
    """``text`` (the content of ``page``, a path relative to the repository root) with every
    generated block rewritten from the JSON files in ``docs``. Raises ValueError for a block
    without a renderer, a renderer of this page whose block is missing, or a renderer registered
    for another page."""
    found = set()

    def replace(match):
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"{page}: block {name!r} has no renderer (known: {sorted(RENDERERS)})")
        if RENDERERS[name][0] != page:
            raise ValueError(f"{page}: block {name!r} belongs to {RENDERERS[name][0]}")
        found.add(name)
        body = RENDERERS[name][1](docs)
        return f"<!-- results:{name} -->\n{body}<!-- /results:{name} -->"

    rendered = _BLOCK.sub(replace, text)
    missing = sorted(n for n, (p, _) in RENDERERS.items() if p == page and n not in found)
    if missing:
        raise ValueError(f"{page}: no <!-- results:NAME --> markers for {missing}")
    return rendered


def pages():
    """The pages that have generated blocks, relative to the repository root: those of the
    registered renderers and every docs/results/ page with a marker (a marker without a renderer is
    an error in render_text)."""
    marked = {
        str(path.relative_to(REPO))
        for path in (DOCS / "results").glob("*.md")
        if "<!-- results:" in path.read_text()
    }
    return sorted(marked | {page for page, _ in RENDERERS.values()})


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a page is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        path = REPO / page
        text = path.read_text()
        rendered = render_text(text, page)
        if rendered != text:
            stale.append(page)
            if not args.check:
                path.write_text(rendered)
    verb = "out of date" if args.check else "rewritten"
    for page in stale:
        print(f"{page}: {verb}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
