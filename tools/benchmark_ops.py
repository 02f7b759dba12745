#!/usr/bin/env python
"""Side-by-side op benchmark: our mdconv vs F.conv2d vs torchvision's deform_conv2d (with mask), and our
deform_roi_pool (both mdpool passes, without the FCs) vs torchvision's roi_align.

Shapes are the ResNet-50 stages c3-c5 of an 800x1216 image (batch 1, 3x3, padding 1). Ours and
F.conv2d run in turn, round after round, then ours and torchvision likewise; prints median times and
the medians of the per-round ratios for the device it runs on; --json writes them for
docs/benchmarks.md.

On CPU in float32, when onnxruntime is installed, it also times ONNX Runtime's DeformConv (our op
exported by projects_dcnv2.export, forward only, in rounds with ours) and a model-level row: a
ResNet-50-FPN with mdconv in c3-c5 (torchvision's ResNet and FPN, random weights) exported to ONNX
and run in ONNX Runtime vs eager PyTorch. ONNX Runtime uses as many threads as PyTorch, with
session.intra_op.allow_spinning=0 (idle threads that spin slow down whatever runs next).

On CUDA (``--device cuda``) the mdconv rows instead time, in the same rounds: the fused Triton
kernels (``torch.ops.dcnv2._triton_*``), the column path (the public op's CUDA kernel), torchvision's
deform_conv2d and cuDNN's conv2d, at each ``--batch``, forward and forward+backward (all through
autograd, gradients of every input); each op's peak memory beyond its inputs, output and
gradients (``max_memory_allocated``); the first call's time (Triton's compile and autotune) apart
from the rounds. ``--tf32 on|off`` sets both ``torch.backends.cudnn.allow_tf32`` (conv2d, the
fused kernels) and ``torch.backends.cuda.matmul.allow_tf32`` (the column path's GEMM).

    python tools/benchmark_ops.py [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--repeat 10] [--json out.json]
    python tools/benchmark_ops.py --device cuda --batch 1,2 --dtype float16 --tf32 on --json out.json
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import torchvision

from projects_dcnv2.layers import deform_roi_pool, modulated_deform_conv2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils, beside this file
import bench_utils  # noqa: E402

STAGES = {"c3": (128, 100, 152), "c4": (256, 50, 76), "c5": (512, 25, 38)}
STAGES_TINY = {"c3": (16, 6, 5), "c4": (16, 3, 4), "c5": (32, 2, 2)}  # --fused-on-cpu


_once = bench_utils.once


def _time_rounds(fns, device, repeat, warmup=2):
    """``bench_utils.time_rounds``: the functions in turn, round after round, so that a noisy spell
    of a shared machine hits all of them alike. Returns per-function lists of times."""
    return bench_utils.time_rounds(fns, device, repeat, warmup)


def _ratio(row, name, times, base_times):
    """``row[name]``: the median of the per-round ratios, with its spread and agreement check
    (``bench_utils.ratio_entry``)."""
    row.update(bench_utils.ratio_entry(name, times, base_times))


def _keep_freed_memory():
    """Tells glibc to keep freed memory for reuse instead of unmapping it (mallopt), as a caching
    allocator would. On this kind of VM a page fault costs microseconds, and a multi-megabyte buffer
    mapped afresh adds milliseconds to whichever op happens to get it in a round (F.conv2d's 8 MB
    output at c3 ran 25 or 34 ms depending on the heap state). Returns whether it took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
    big = 1 << 30
    return bool(libc.mallopt(m_trim_threshold, big)) and bool(
        libc.mallopt(m_mmap_threshold, 1 << 25)
    )


def _machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    kernels = torch.ops.dcnv2._cpu_kernels()
    return f"{bench_utils.cpu_name()}, {torch.get_num_threads()} threads, {kernels} CPU loops"


def _onnxruntime():
    """The onnxruntime module, or None where it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _ort_session(ort, model_proto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class _ExplicitMdconv(torch.nn.Module):
    def __init__(self, weight, dg):
        super().__init__()
        self.weight, self.dg = torch.nn.Parameter(weight.detach().clone()), dg

    def forward(self, x, offset, mask):
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, padding=1, deformable_groups=self.dg
        )


def bench_onnxruntime_conv(ort, x, offset, mask, weight, dg, repeat):
    """Our forward vs ONNX Runtime's DeformConv running our exported op, in rounds of their own."""
    from projects_dcnv2.export import export_onnx

    x, offset, mask = (t.detach() for t in (x, offset, mask))
    with torch.no_grad():
        session = _ort_session(ort, export_onnx(_ExplicitMdconv(weight, dg), (x, offset, mask)))
        feed = dict(
            zip((i.name for i in session.get_inputs()), (t.numpy() for t in (x, offset, mask)))
        )
        expected = modulated_deform_conv2d(x, offset, mask, weight, padding=1, deformable_groups=dg)
        error = (torch.from_numpy(session.run(None, feed)[0]) - expected).abs().max().item()
        if error > 1e-3:
            raise RuntimeError(f"ONNX Runtime's DeformConv differs from ours by {error:.3g}")
        times = _time_rounds(
            {
                "ours": lambda: modulated_deform_conv2d(
                    x, offset, mask, weight, padding=1, deformable_groups=dg
                ),
                "onnxruntime": lambda: session.run(None, feed),
            },
            "cpu",
            repeat,
        )
    return {
        "onnxruntime_fwd_ms": 1e3 * statistics.median(times["onnxruntime"]),
        "ours_fwd_ms_onnxruntime_rounds": 1e3 * statistics.median(times["ours"]),
        **bench_utils.ratio_entry("onnxruntime/ours_fwd", times["onnxruntime"], times["ours"]),
    }


def mdconv_resnet50_fpn():
    """torchvision's ResNet-50-FPN (random weights, frozen BN) with ModulatedDeformConv2dPack as
    the 3x3 of every block in c3-c5, offsets and masks predicted by random (not zero) convs."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from projects_dcnv2.layers import ModulatedDeformConv2dPack

    g = torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=0)
    for stage in (model.body.layer2, model.body.layer3, model.body.layer4):
        for block in stage:
            conv = block.conv2
            dcn = ModulatedDeformConv2dPack(
                conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1, bias=False
            )
            dcn.weight.data.copy_(conv.weight.data)
            torch.nn.init.normal_(dcn.conv_offset.weight, std=1e-3, generator=g)
            block.conv2 = dcn
    return model.eval()


def bench_onnxruntime_model(ort, repeat, size=(800, 1216)):
    """The mdconv ResNet-50-FPN in ONNX Runtime vs eager PyTorch, inference on one image."""
    from projects_dcnv2.export import TupleOutputs, export_onnx

    model = TupleOutputs(mdconv_resnet50_fpn())
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        session = _ort_session(ort, export_onnx(model, (x,)))
        name = session.get_inputs()[0].name
        got = session.run(None, {name: x.numpy()})
        expected = model(x)
        error = max(
            (torch.from_numpy(a) - b).abs().max().item() / max(1.0, b.abs().max().item())
            for a, b in zip(got, expected)
        )
        if error > 1e-3:
            raise RuntimeError(
                f"the exported backbone differs from eager by {error:.3g} (relative)"
            )
        times = _time_rounds(
            {
                "eager": lambda: model(x),
                "onnxruntime": lambda: session.run(None, {name: x.numpy()}),
            },
            "cpu",
            repeat,
            warmup=1,
        )
    return {
        "shape": f"ResNet-50-FPN, mdconv c3-c5, 1x3x{size[0]}x{size[1]}",
        "eager_ms": 1e3 * statistics.median(times["eager"]),
        "onnxruntime_ms": 1e3 * statistics.median(times["onnxruntime"]),
        **bench_utils.ratio_entry("onnxruntime/eager", times["onnxruntime"], times["eager"]),
        "max_relative_difference": error,
    }


def bench_conv(name, channels, h, w, dg, device, dtype, repeat, ort=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, h, w, generator=g).to(device, dtype).requires_grad_()
    weight = (
        (torch.randn(channels, channels, 3, 3, generator=g) * 0.05)
        .to(device, dtype)
        .requires_grad_()
    )
    offset = torch.randn(1, 2 * dg * 9, h, w, generator=g).to(device, dtype).requires_grad_()
    mask = torch.rand(1, dg * 9, h, w, generator=g).to(device, dtype).requires_grad_()
    cases = {
        "ours": lambda: modulated_deform_conv2d(
            x, offset, mask, weight, padding=1, deformable_groups=dg
        ),
        "conv2d": lambda: F.conv2d(x, weight, padding=1),
        "torchvision": lambda: torchvision.ops.deform_conv2d(
            x, offset, weight, padding=(1, 1), mask=mask
        ),
    }
    row = {"shape": name, "dg": dg}
    for phase in ("fwd", "fwdbwd"):
        if phase == "fwd":
            fns = {key: (lambda fn=fn: _no_grad(fn)) for key, fn in cases.items()}
        else:
            fns = {key: (lambda fn=fn: fn().sum().backward()) for key, fn in cases.items()}
        # Two pairs, each in rounds of its own: torchvision's large temporary buffers would otherwise
        # change the allocator state (page faults) that ours and conv2d meet in the same round.
        conv = _time_rounds({k: fns[k] for k in ("ours", "conv2d")}, device, repeat)
        tv = _time_rounds({k: fns[k] for k in ("ours", "torchvision")}, device, repeat)
        row[f"ours_{phase}_ms"] = 1e3 * statistics.median(conv["ours"])
        row[f"conv2d_{phase}_ms"] = 1e3 * statistics.median(conv["conv2d"])
        row[f"torchvision_{phase}_ms"] = 1e3 * statistics.median(tv["torchvision"])
        # ratios: medians of the per-round ratios (the two cases of a round ran back to back)
        _ratio(row, f"ours/conv2d_{phase}", conv["ours"], conv["conv2d"])
        _ratio(row, f"torchvision/ours_{phase}", tv["torchvision"], tv["ours"])
    if ort is not None:
        row.update(bench_onnxruntime_conv(ort, x, offset, mask, weight, dg, repeat))
    return row


class _ViaOps(torch.autograd.Function):
    """mdconv through a given forward and backward operator pair, with autograd as the public op."""

    @staticmethod
    def forward(ctx, ops, x, offset, mask, weight, dg):
        ctx.ops, ctx.dg = ops, dg
        ctx.save_for_backward(x, offset, mask, weight)
        return ops[0](x, offset, mask, weight, None, 1, 1, 1, 1, 1, 1, 1, dg)

    @staticmethod
    def backward(ctx, grad):
        x, offset, mask, weight = ctx.saved_tensors
        grads = ctx.ops[1](grad, x, offset, mask, weight, None, 1, 1, 1, 1, 1, 1, 1, ctx.dg)
        return (None, *grads[:4], None)


def _fused_impls(device):
    """The four implementations of a 3x3 (padding 1) convolution timed on CUDA, as
    fn(x, offset, mask, weight, dg). On CPU (the hidden --fused-on-cpu, Triton's interpreter) the
    column path's place is taken by the CPU op."""
    ops = torch.ops.dcnv2
    pairs = {
        "triton": (
            ops._triton_modulated_deform_conv2d,
            ops._triton_modulated_deform_conv2d_backward,
        ),
        # the public op: its CUDA kernel is the column path (its CPU kernel under --fused-on-cpu)
        "cuda": (ops.modulated_deform_conv2d, ops._modulated_deform_conv2d_backward),
    }
    return {
        "triton": lambda x, o, m, w, dg: _ViaOps.apply(pairs["triton"], x, o, m, w, dg),
        "cuda": lambda x, o, m, w, dg: _ViaOps.apply(pairs["cuda"], x, o, m, w, dg),
        "torchvision": lambda x, o, m, w, dg: torchvision.ops.deform_conv2d(
            x, o, w, padding=(1, 1), mask=m
        ),
        "conv2d": lambda x, o, m, w, dg: F.conv2d(x, w, padding=1),
    }


def _peak_extra_bytes(fn, device, known_bytes):
    """Peak memory allocated while fn runs beyond what was allocated before it and the
    ``known_bytes`` of what it returns (output, gradients); None off CUDA."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - known_bytes(result)
    del result
    return extra


def _nbytes(result):
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


IMPLS = ("triton", "cuda", "torchvision", "conv2d")
TIMING = {
    "cuda": "ms: wall time per synchronised call (host and kernels); kernel_ms: the kernels' "
    "durations from torch.profiler over 10 back-to-back calls",
    "cpu": "ms: wall time per call (the op runs on the host: no separate kernel time)",
}


def bench_conv_fused(name, channels, h, w, dg, batch, device, dtype, repeat):
    """One row of the CUDA table: every implementation in the same rounds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, h, w, generator=g).to(device, dtype)
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.05).to(device, dtype)
    offset = torch.randn(batch, 2 * dg * 9, h, w, generator=g).to(device, dtype)
    mask = torch.rand(batch, dg * 9, h, w, generator=g).to(device, dtype)
    grad = torch.randn(batch, channels, h, w, generator=g).to(device, dtype)
    leaves = [t.requires_grad_() for t in (x, offset, mask, weight)]
    impls = _fused_impls(device)
    row = {"shape": name, "dg": dg, "batch": batch}
    if dtype == torch.bfloat16:  # its CUDA kernel raises "not implemented for 'BFloat16'"
        del impls["torchvision"]
        row["torchvision_skipped"] = "torchvision's deform_conv2d has no bfloat16 kernel"
    for phase in ("fwd", "fwdbwd"):
        if phase == "fwd":
            fns = {
                k: (lambda f=f: _no_grad_result(lambda: f(x, offset, mask, weight, dg)))
                for k, f in impls.items()
            }
        else:
            fns = {
                k: (
                    lambda f=f: torch.autograd.grad(
                        f(x, offset, mask, weight, dg), leaves, grad, allow_unused=True
                    )
                )
                for k, f in impls.items()
            }
        # the first call of each (Triton compiles and autotunes here), apart from the rounds
        for key, fn in fns.items():
            row[f"{key}_{phase}_first_call_s"] = _once(fn, device)
        for key, fn in fns.items():
            extra = _peak_extra_bytes(fn, device, _nbytes)
            row[f"{key}_{phase}_extra_mb"] = None if extra is None else extra / 2**20
        times = _time_rounds(fns, device, repeat)
        for key in times:
            row[f"{key}_{phase}_ms"] = 1e3 * statistics.median(times[key])
            # the kernels' own time (host time left out); None off CUDA
            row[f"{key}_{phase}_kernel_ms"] = bench_utils.kernel_ms(fns[key], device)
        # ratios: medians of the per-round ratios of these same rounds
        for a, b in (
            ("triton", "conv2d"),
            ("cuda", "conv2d"),
            ("torchvision", "triton"),
            ("cuda", "triton"),
            ("torchvision", "cuda"),
        ):
            if a not in times or b not in times:
                continue
            _ratio(row, f"{a}/{b}_{phase}", times[a], times[b])
    row["output_mb"] = batch * channels * h * w * x.element_size() / 2**20
    return row


def _no_grad_result(fn):
    with torch.no_grad():
        return fn()


def main_fused(args, dtype):
    """The CUDA table (and, with the hidden --fused-on-cpu, the same code on CPU tensors through
    Triton's interpreter at a tiny size, to exercise it without a GPU)."""
    device = args.device
    if device == "cuda":
        tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    stages = STAGES_TINY if args.fused_on_cpu else STAGES
    batches = [int(b) for b in args.batch.split(",")]
    result = {
        "device": device,
        "machine": _machine(device),
        "dtype": args.dtype,
        "tf32": args.tf32 if dtype == torch.float32 else "n/a",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": _triton_version(),
        "repeat": args.repeat,
        "timing": TIMING[device],
        "fused": [],
    }
    print(
        f"# {result['machine']} ({device}, {args.dtype}, TF32 {result['tf32']}), torch "
        f"{torch.__version__}, triton {result['triton']}; medians of {args.repeat} rounds, "
        "every implementation in each round"
    )
    header = (
        "shape",
        "dg",
        "N",
        "phase",
        "ms triton / cuda / tv / conv2d",
        "kernel ms triton / cuda / tv / conv2d",
        "triton/conv2d",
        "tv/triton",
        "cuda/triton",
        "extra MB triton / cuda / tv",
        "first call s (triton)",
    )
    _print_table_header(header)
    for batch in batches:
        for dg in (1, 4):
            for name in args.stages.split(","):
                r = bench_conv_fused(name, *stages[name], dg, batch, device, dtype, args.repeat)
                result["fused"].append(r)
                for ph in ("fwd", "fwdbwd"):
                    ms = " / ".join(_fmt(r.get(f"{k}_{ph}_ms"), ".3f") for k in IMPLS)
                    kms = " / ".join(_fmt(r.get(f"{k}_{ph}_kernel_ms"), ".3f") for k in IMPLS)
                    mb = " / ".join(_fmt(r.get(f"{k}_{ph}_extra_mb"), ".1f") for k in IMPLS[:3])
                    ratios = " | ".join(
                        _fmt(r.get(f"{a}/{b}_{ph}"), ".2f", "x")
                        for a, b in (
                            ("triton", "conv2d"),
                            ("torchvision", "triton"),
                            ("cuda", "triton"),
                        )
                    )
                    print(
                        f"| {name} | {dg} | {batch} | {ph} | {ms} | {kms} | {ratios} "
                        f"| {mb} | {r[f'triton_{ph}_first_call_s']:.2f} |",
                        flush=True,
                    )
                if args.json:  # after every row: a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
    return result


def _print_table_header(header):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _no_grad(fn):
    with torch.no_grad():
        fn()


def bench_pool(device, dtype, repeat, num_rois=1000):
    g = torch.Generator().manual_seed(0)
    levels = [
        (256, 200, 304, 1 / 4),
        (256, 100, 152, 1 / 8),
        (256, 50, 76, 1 / 16),
        (256, 25, 38, 1 / 32),
    ]
    feats = [torch.randn(1, c, h, w, generator=g).to(device, dtype) for c, h, w, _ in levels]
    per_level = num_rois // len(levels)
    rois, offsets = [], []
    for lvl in range(len(levels)):
        size = 32 * 2**lvl + torch.rand(per_level, 2, generator=g) * 32 * 2**lvl
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
        times = _time_rounds({"ours": ours, "roi_align": roi_align}, device, repeat)
    row = {
        "shape": f"P2-P5, {num_rois} RoIs",
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "roi_align_ms": 1e3 * statistics.median(times["roi_align"]),
        **bench_utils.ratio_entry("ours/roi_align", times["ours"], times["roi_align"]),
    }
    return row


def host_overhead(device, calls=2000, repeat=7):
    """Per-call time of tiny calls (1x4x5x5 input, 3x3 weight, padding 1, one thread), where the
    work is all host overhead: our functional op vs ``F.conv2d`` vs torchvision's
    ``deform_conv2d`` (with mask), under grad, no_grad and inference_mode. Each round times
    ``calls`` back-to-back calls of each (synchronised at the end on CUDA). Returns the rows."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, w, off = (torch.randn(s, generator=g) for s in ((1, 4, 5, 5), (4, 4, 3, 3), (1, 18, 5, 5)))
    m = torch.rand(1, 9, 5, 5, generator=g)
    x, w, off, m = (t.to(device).requires_grad_() for t in (x, w, off, m))
    cases = {
        "conv2d": lambda: F.conv2d(x, w, None, 1, 1),
        "ours": lambda: modulated_deform_conv2d(x, off, m, w, None, 1, 1),
        "torchvision": lambda: torchvision.ops.deform_conv2d(x, off, w, None, 1, 1, 1, m),
    }

    def many(fn):
        def run():
            for _ in range(calls):
                fn()

        return run

    rows = []
    modes = {"grad": torch.enable_grad, "no_grad": torch.no_grad}
    modes["inference_mode"] = torch.inference_mode
    for mode, context in modes.items():
        with context():
            times = bench_utils.time_rounds(
                {k: many(fn) for k, fn in cases.items()}, device, repeat, warmup=1, rotate=True
            )
        row = {"device": device, "mode": mode, "calls": calls}
        for key, t in times.items():
            row[f"{key}_us"] = 1e6 * statistics.median(t) / calls
        _ratio(row, "ours/conv2d", times["ours"], times["conv2d"])
        _ratio(row, "torchvision/ours", times["torchvision"], times["ours"])
        rows.append(row)
    return rows


def main_host_overhead(args):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {
        **bench_utils.header(args.device),
        "timing": "us: wall time per call, median over rounds of back-to-back calls, one thread",
        "host_overhead": [],
    }
    _print_table_header(("device", "mode", "us: conv2d / ours / torchvision", "ours / conv2d",
                         "torchvision / ours"))  # fmt: skip
    for device in devices:
        for r in host_overhead(device, args.calls, args.repeat):
            result["host_overhead"].append(r)
            print(
                f"| {device} | {r['mode']} | {r['conv2d_us']:.1f} / {r['ours_us']:.1f} / "
                f"{r['torchvision_us']:.1f} | {bench_utils.format_ratio(r, 'ours/conv2d')} "
                f"| {bench_utils.format_ratio(r, 'torchvision/ours')} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--stages", default="c3,c4,c5")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="CPU: leave glibc's default of unmapping large freed buffers (page faults included)",
    )
    parser.add_argument(
        "--no-onnxruntime", action="store_true", help="CPU: skip the ONNX Runtime column and row"
    )
    parser.add_argument("--batch", default="1", help="CUDA: comma-separated batch sizes (e.g. 1,2)")
    parser.add_argument(
        "--tf32",
        default="on",
        choices=["on", "off"],
        help="CUDA, float32: TF32 products for conv2d, the fused kernels and the column path",
    )
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="tiny calls (1x4x5x5, 3x3), one thread: ours vs F.conv2d vs torchvision, on CPU and "
        "(where present) CUDA, under grad, no_grad and inference_mode",
    )
    parser.add_argument(
        "--calls", type=int, default=2000, help="--host-overhead: calls per timed round"
    )
    # hidden: the CUDA table's code on CPU tensors at a tiny size, with TRITON_INTERPRET=1 set
    parser.add_argument("--fused-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat: expected at least 1, got {args.repeat}")
    if args.host_overhead:
        if args.calls < 1:
            parser.error(f"--calls: expected at least 1, got {args.calls}")
        main_host_overhead(args)
        return
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda" or args.fused_on_cpu:
        main_fused(args, dtype)
        return
    use_ort = args.device == "cpu" and dtype == torch.float32 and not args.no_onnxruntime
    ort = _onnxruntime() if use_ort else None
    kept = args.device == "cpu" and not args.fresh_memory and _keep_freed_memory()
    result = {
        "device": args.device,
        "machine": _machine(args.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timing": TIMING[args.device],
        "conv": [],
        "pool": None,
        "freed_memory_kept": kept,
    }
    print(
        f"# {result['machine']} ({args.device}, {args.dtype}), torch {torch.__version__}; medians of {args.repeat}"
        + ("; freed memory kept by glibc (no page faults on reuse)" if kept else "")
    )
    header = (
        "shape",
        "dg",
        "fwd ms ours/conv/tv",
        "ours/conv",
        "tv/ours",
        "fwd+bwd ms ours/conv/tv",
        "ours/conv",
        "tv/ours",
    )
    _print_table_header(header)
    for dg in (1, 4):
        for name in args.stages.split(","):
            r = bench_conv(name, *STAGES[name], dg, args.device, dtype, args.repeat, ort)
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
    print(
        f"\nmdpool (two passes, no FCs) vs roi_align, {p['shape']}: {p['ours_ms']:.1f} ms vs "
        f"{p['roi_align_ms']:.1f} ms = {p['ours/roi_align']:.2f}x"
    )
    if ort is not None:
        print(
            f"\nONNX Runtime {ort.__version__} DeformConv (our op exported), forward, {torch.get_num_threads()} "
            "threads, allow_spinning=0; ort/conv = (ort/ours) x (ours/conv)"
        )
        print("| shape | dg | fwd ms ours / ort | ort/ours | ort/conv |\n|---|---|---|---|---|")
        for r in result["conv"]:
            print(
                f"| {r['shape']} | {r['dg']} | {r['ours_fwd_ms_onnxruntime_rounds']:.1f} / {r['onnxruntime_fwd_ms']:.1f} "
                f"| {r['onnxruntime/ours_fwd']:.2f}x | {r['onnxruntime/ours_fwd'] * r['ours/conv2d_fwd']:.2f}x |"
            )
        m = bench_onnxruntime_model(ort, max(3, args.repeat // 2))
        result["onnxruntime"] = {"version": ort.__version__, "model": m}
        print(
            f"\n{m['shape']}: eager {m['eager_ms']:.0f} ms, ONNX Runtime {m['onnxruntime_ms']:.0f} ms = "
            f"{m['onnxruntime/eager']:.2f}x eager (outputs within {m['max_relative_difference']:.1g} relative)"
        )
    elif use_ort:
        print("\n(onnxruntime is not installed: no ONNX Runtime column)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
