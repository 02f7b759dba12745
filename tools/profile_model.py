#!/usr/bin/env python
"""Where a DCNv2 model's time goes, next to its plain twin: ``torch.profiler`` over the backbone's
forward at batch 1 (inference, ``no_grad``) and one training step at batch 2 (Detectron2's
trainer step, as tools/benchmark_model.py runs it), split by kind of work:

- ``mdconv``: our op, forward and backward (every ``dcnv2::`` op and what runs inside it; in the
  mdpool rows that includes the RoI pooling's ``dcnv2::`` ops);
- ``offset_conv``: the convs that predict offsets and masks (``conv2_offset``, ``conv_offset``),
  forward and their backward;
- ``dcn_small_ops``: the DCN layer's small ops around the op call (split, sigmoid, copies, adds),
  forward and backward;
- ``other_conv``: every other convolution, forward and backward;
- ``rest``: everything else (norms, activations, FPN adds, heads, losses, optimizer, Python).

Forward work is attributed by ``record_function`` scopes that module hooks open around the offset
convs and the DCN layer; backward work by the autograd node's sequence number, which links it to
the forward op that recorded it. Per kind and per step: kernel time (CUDA: the kernels' device
time; CPU: the ops' self time), host time (the ops' self CPU time), kernel launches (CUDA: device
kernels; CPU: op calls), and, on CUDA, the GPU's idle time between its kernels over the step (from
the kernel timeline of the exported trace; "n/a" on CPU).

    python tools/profile_model.py [--rows seed | CONFIG,...] [--device cuda] [--size 800x1333]
        [--warmup 2] [--iters 3] [--json out.json] [KEY VALUE ...]

``--rows`` is benchmark_model's (default: the seed's Faster mdconv row and its plain twin). The
JSON renders into docs/results/profile.md (tools/render_results.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils, benchmark_model
import bench_utils  # noqa: E402
import benchmark_model  # noqa: E402

CATEGORIES = ("mdconv", "offset_conv", "dcn_small_ops", "other_conv", "rest")
SCOPE = "profile::"  # prefix of the record_function scopes this tool opens
CONV_OPS = {
    "aten::conv2d",
    "aten::convolution",
    "aten::_convolution",
    "aten::convolution_backward",
    "ConvolutionBackward0",
}
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def _scoped(module, name):
    """Opens ``record_function(SCOPE + name)`` around every forward of ``module``."""
    import torch

    open_scopes = []

    def pre(_module, _inputs):
        scope = torch.profiler.record_function(SCOPE + name)
        scope.__enter__()
        open_scopes.append(scope)

    def post(_module, _inputs, _output):
        open_scopes.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def add_scopes(model):
    """Scopes for the DCN layers of ``model``: ``offset_conv`` around each offset/mask predictor,
    ``dcn_layer`` around the layer (the backbone block's ``_conv2`` or a Pack module's forward)
    and ``norm`` around a DCN conv's own norm (counted with the rest, as the twin's). Returns the
    number of DCN layers scoped."""
    import torch

    from projects_dcnv2.layers import ModulatedDeformConv2d, ModulatedDeformConv2dPack

    layers = 0
    for module in model.modules():
        offset = getattr(module, "conv2_offset", None) or getattr(module, "conv_offset", None)
        if offset is None:
            continue
        _scoped(offset, "offset_conv")
        conv = module if isinstance(module, ModulatedDeformConv2d) else module.conv2
        if getattr(conv, "norm", None) is not None:
            _scoped(conv.norm, "norm")
        if isinstance(module, ModulatedDeformConv2dPack):
            _scoped(module, "dcn_layer")
        else:  # a backbone block: the layer is its _conv2 method

            def scoped_conv2(self, x, _original=module._conv2):
                with torch.profiler.record_function(SCOPE + "dcn_layer"):
                    return _original(x)

            module._conv2 = types.MethodType(scoped_conv2, module)
        layers += 1
    return layers


def categorize(events):
    """{event id: category} for every event of a profile (``prof.events()``), see the module
    docstring; an event's own name comes first, then its ancestors', then (backward) the category
    of the forward op with its sequence number."""
    parent = {id(e): e.cpu_parent for e in events}
    found = {}

    def own(e):
        if e.name.startswith("dcnv2::"):
            return "mdconv"
        if e.name.startswith(SCOPE):
            scope = e.name[len(SCOPE) :]
            # the step's own scope decides nothing: its self time (Python) is the rest's
            return {"offset_conv": "offset_conv", "dcn_layer": "dcn_small_ops", "norm": "rest"}.get(
                scope
            )
        return None

    def scoped(e):  # the nearest deciding name at or above e, or None
        while e is not None:
            if id(e) in found:
                return found[id(e)]
            c = own(e)
            if c is not None:
                return c
            e = parent.get(id(e))
        return None

    # the forward ops' categories by sequence number (scoped ones only)
    by_seq = {}
    for e in events:
        if not e.name.startswith(BACKWARD_NODE) and getattr(e, "sequence_nr", -1) >= 0:
            c = scoped(e)
            if c is not None:
                by_seq.setdefault(e.sequence_nr, c)

    def decide(e):
        chain, x = [], e
        while x is not None:
            c = own(x)
            if c is not None:
                return c
            if x.name.startswith(BACKWARD_NODE) and x.sequence_nr in by_seq:
                return by_seq[x.sequence_nr]
            chain.append(x)
            x = parent.get(id(x))
        return "other_conv" if any(y.name in CONV_OPS for y in chain) else "rest"

    for e in events:
        found[id(e)] = decide(e)
    return found


def summarize(prof, device, iters):
    """Per category: kernel_ms, host_ms, launches (per step), and the step's GPU idle time."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    category = categorize(events)
    out = {c: {"kernel_ms": 0.0, "host_ms": 0.0, "launches": 0} for c in CATEGORIES}
    for e in events:
        row = out[category[id(e)]]
        row["host_ms"] += e.self_cpu_time_total / 1e3 / iters
        if device == "cuda":
            row["kernel_ms"] += e.self_device_time_total / 1e3 / iters
            row["launches"] += len(e.kernels)
        elif not e.name.startswith((SCOPE, BACKWARD_NODE)):
            row["kernel_ms"] += e.self_cpu_time_total / 1e3 / iters
            row["launches"] += 1
    for row in out.values():
        row["launches"] /= iters
    return out


def gpu_idle_ms(prof, iters):
    """Milliseconds per step between the first kernel's start and the last one's end during which
    no kernel ran, from the exported Chrome trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in trace["traceEvents"]
        if e.get("cat") == "kernel" and "dur" in e
    )
    if not spans:
        return None
    idle, end = 0.0, spans[0][1]
    for s, e in spans[1:]:
        idle += max(0.0, s - end)
        end = max(end, e)
    return idle / 1e3 / iters


def profile(step, device, warmup, iters):
    """Runs ``step`` ``warmup`` times, then ``iters`` times under the profiler. Returns the
    summary with the wall time per step and the categories' totals."""
    import torch
    from torch.profiler import ProfilerActivity

    for _ in range(warmup):
        step()
    bench_utils.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            with torch.profiler.record_function(SCOPE + "step"):
                step()
        bench_utils.sync(device)
        wall = (time.perf_counter() - start) / iters
    categories = summarize(prof, device, iters)
    total = {
        k: sum(c[k] for c in categories.values()) for k in ("kernel_ms", "host_ms", "launches")
    }
    return {
        "wall_ms": wall * 1e3,
        "categories": categories,
        "total": total,
        "gpu_idle_ms": gpu_idle_ms(prof, iters) if device == "cuda" else None,
    }


def profile_spec(spec, label, args):
    """The two profiles (backbone at batch 1, training step at ``--ims-per-batch``) of a config."""
    import torch

    model = benchmark_model._Model(spec, args)
    layers = add_scopes(model.model)
    h, w = (int(v) for v in args.size.split("x"))
    batch = benchmark_model.synthetic_batch(args.ims_per_batch, h, w, args.objects)
    inputs = [{k: batch[0][k] for k in ("image", "height", "width")}]
    images = model.model.preprocess_image(inputs).tensor
    model.model.eval()
    result = {"config": spec, "label": label, "dcn_layers": layers}
    with torch.no_grad():
        result["backbone"] = profile(
            lambda: model.model.backbone(images), args.device, args.warmup, args.iters
        )
    model.model.train()
    model.start_training(batch)
    result["train"] = profile(model.train_step, args.device, args.warmup, args.iters)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="faster_rcnn_R50_FPN_mdconv", help="benchmark_model's")
    parser.add_argument("--device", default="cuda" if benchmark_model._cuda() else "cpu")
    parser.add_argument("--size", default="800x1333", help="HxW of the generated images")
    parser.add_argument("--ims-per-batch", type=int, default=2, help="training images per step")
    parser.add_argument("--objects", type=int, default=16, help="ground-truth objects per image")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps before")
    parser.add_argument("--iters", type=int, default=3, help="profiled steps (figures per step)")
    parser.add_argument("--json", help="write the profiles here")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides for every model")
    args = parser.parse_args(argv)
    if not benchmark_model._re_size(args.size):
        parser.error(f"--size: expected HxW such as 800x1333, got {args.size!r}")
    if args.iters < 1:
        parser.error(f"--iters: expected at least 1, got {args.iters}")
    import torch

    torch.set_flush_denormal(True)  # as benchmark_model's workers
    # what benchmark_model's _Model reads
    args.proposals_per_object, args.nms_candidates = 3, 0
    specs = {}
    for key, label, _, twin, _ in benchmark_model._select(args.rows):
        specs.setdefault(key, label)
        specs.setdefault(twin, f"{twin} (plain twin)")
    result = {
        **bench_utils.header(args.device),
        "command": "python tools/profile_model.py " + " ".join(argv or sys.argv[1:]),
        "size": args.size,
        "ims_per_batch": args.ims_per_batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "opts": [str(o) for o in args.opts],
        "categories": list(CATEGORIES),
        "models": [],
    }
    for spec, label in specs.items():
        result["models"].append(profile_spec(spec, label, args))
        if args.json:  # after every model: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    for m in result["models"]:
        for phase in ("backbone", "train"):
            p = m[phase]
            cells = ", ".join(f"{c} {p['categories'][c]['kernel_ms']:.2f}" for c in CATEGORIES)
            print(f"{m['label']} {phase}: wall {p['wall_ms']:.2f} ms; kernel ms: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
