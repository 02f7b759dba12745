"""Property-based fuzzing of both ops and their backward ops: hostile input never crashes the process.

Hypothesis draws valid argument sets, edges included (batch 0, 0 or 1 channels, height or width 0,
kernel 1, odd and even kernels, stride and dilation up to 4 (rarely strides, paddings and dilations
past 2^31), groups x deformable groups, offsets 0 /
1e-6 / 1e4 / NaN / inf; RoIs empty, inverted, degenerate, far outside, large; output size 1,
sampling ratio 0..4; non-contiguous and channels-last tensors; small column budgets and 1 or 2
threads), and then, in about one example in four, one invalid mutation (a wrong size, a zero or
negative stride or group count, a wrong dtype, a wrong ndim, a bad RoI). Properties:

* valid input: the documented shape and dtype, finite where every input is finite, and equal to the
  pure-PyTorch reference (``reference_ops.py``) forward and backward; an input of height or width 0
  gives the bias (conv) or zeros (pool) and zero gradients, as every sample then lies outside the map;
* invalid input: ``ValueError`` / ``RuntimeError`` whose message names the argument, from the forward
  and from the backward op.

Every example runs in a persistent worker process (``crash_guard.CrashGuard``): a segfault, an abort
or a hang kills only the worker, becomes a test failure naming the example (with a command that
reruns it in-process), and the next example gets a fresh worker. Back-ends: the CPU kernels; the CUDA
kernels' host emulation (``torch.ops.dcnv2._emulated_cuda_*``) when the extension has it; CUDA when a
GPU is present (skipped otherwise, with the reason).

Deterministic: a fixed seed (``DCNV2_FUZZ_SEED``, default 0), no example database. A longer campaign:
``DCNV2_FUZZ_EXAMPLES=20000`` runs that many examples per test (default: the budgets in ``BUDGET``).
``python tests/test_fuzz_ops.py --run '<spec json>'`` reruns one example in the current process.
"""

import json
import math
import os
import sys
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import example as hyp_example
from hypothesis import strategies as st

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)

from crash_guard import CrashGuard

HAS_EMULATION = hasattr(torch.ops.dcnv2, "_emulated_cuda_modulated_deform_conv2d")
HAS_CUDA = torch.cuda.is_available() and projects_dcnv2.layers.WITH_CUDA
# examples per test when DCNV2_FUZZ_EXAMPLES is unset (the emulation runs the GPU grid serially, so
# its examples are smaller: at most 2 images of 6 x 6)
BUDGET = {"cpu": 400, "emulated": 300, "cuda": 300}
FUZZ_EXAMPLES = os.environ.get("DCNV2_FUZZ_EXAMPLES")
FUZZ_SEED = int(os.environ.get("DCNV2_FUZZ_SEED", "0"))
EXAMPLE_TIMEOUT_S = float(os.environ.get("DCNV2_FUZZ_TIMEOUT", "120"))
DTYPES = {
    "cpu": ["float32", "float64"],
    "emulated": ["float32", "float64", "float16", "bfloat16"],
    "cuda": ["float32", "float64", "float16", "bfloat16"],
}
# atol and rtol as a fraction of the largest reference magnitude (the reference runs in float64 for
# float64 and in float32 on the rounded inputs otherwise, so sample coordinates agree bit for bit)
TOL = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
BACKENDS = [
    pytest.param("cpu"),
    pytest.param(
        "emulated",
        marks=pytest.mark.skipif(
            not HAS_EMULATION,
            reason="this build of the extension has no _emulated_cuda_* ops (host-run CUDA "
            "kernels): rebuild with DCNV2_BUILD_EMULATED_CUDA=1, as make setup does",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not HAS_CUDA,
            reason="CUDA not available (no GPU, or the extension was built without CUDA kernels)",
        ),
    ),
]


# ================================================================================================
# Strategies (parent process): an example is a plain, JSON-able dict; the worker builds the tensors
# from its seed.
# ================================================================================================
CONV_MUTATIONS = {
    # name: regex that the error message must contain
    "input_3d": "input",
    "weight_3d": "weight",
    "offset_5d": "offset",
    "offset_channels": "offset",
    "offset_height": "offset",
    "mask_channels": "mask",
    "mask_batch": "mask",
    "weight_channels": "weight",
    "kernel_empty": "weight",
    "bias_length": "bias",
    "bias_2d": "bias",
    "stride_zero": "stride",
    "stride_negative": "stride",
    "padding_negative": "padding",
    "dilation_zero": "dilation",
    "groups_zero": "groups",
    "groups_negative": "groups",
    "deformable_groups_zero": "deformable_groups",
    "deformable_groups_negative": "deformable_groups",
    "groups_not_dividing": "groups",
    "offset_dtype": "offset",
    "mask_dtype": "mask",
    "weight_dtype": "weight",
    "integer_tensors": "input",
    "padding_too_small": "input",
    "grad_output_shape": "grad_output",
    "grad_output_dtype": "grad_output",
    "half_on_cpu": "input",
}
POOL_MUTATIONS = {
    "input_3d": "input",
    "rois_1d": "rois",
    "rois_4_columns": "rois",
    "rois_batch_index_high": "rois",
    "rois_batch_index_negative": "rois",
    "rois_nan": "rois",
    "rois_inf": "rois",
    "rois_dtype": "rois",
    "offset_shape": "offset",
    "offset_dtype": "offset",
    "output_size_zero": "output_size",
    "output_size_negative": "output_size",
    "spatial_scale_zero": "spatial_scale",
    "spatial_scale_negative": "spatial_scale",
    "spatial_scale_nan": "spatial_scale",
    "integer_input": "input",
    "grad_output_shape": "grad_output",
    "half_on_cpu": "input",
}


def _size(draw, high, zero_weight=1):
    """0 (an edge, drawn about once in `high / zero_weight + 1` times) or 1..high."""
    return draw(st.sampled_from(list(range(1, high + 1)) + [0] * zero_weight))


def _mutation(draw, table, backend):
    if draw(st.integers(0, 3)) != 0:
        return None
    names = [m for m in table if backend == "cpu" or m != "half_on_cpu"]
    return draw(st.sampled_from(names))


def _common(draw, backend):
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from(DTYPES[backend])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        offset_scale=draw(st.sampled_from([0.5, 3.0, 0.0, 1e-6, 1e4])),
        nonfinite=draw(st.sampled_from([None] * 6 + ["nan", "inf", "-inf"])),
        threads=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def conv_examples(draw, backend):
    small = backend == "emulated"
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    dg = draw(st.sampled_from([1, 1, 2, 3, 4]))
    h, w = _size(draw, 6 if small else 9), _size(draw, 6 if small else 9)
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    stride = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    dilation = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    padding = [draw(st.integers(0, 4)), draw(st.integers(0, 4))]
    huge = draw(st.integers(0, 15)) == 15  # rarely: a geometry past 32-bit integers
    for i, (size, k) in enumerate(((h, kh), (w, kw))):
        if huge:
            dilation[i] = draw(st.sampled_from([1, 2**31, 2**40]))
            padding[i] = draw(st.sampled_from([2**30, 2**31 - 1, 2**40]))
        # the least padding that leaves an output
        padding[i] = max(padding[i], math.ceil((dilation[i] * (k - 1) + 1 - size) / 2))
        if huge:  # one output position, at -padding: taps read where tap * dilation ~ padding
            stride[i] = 2 ** max(31, (size + 2 * padding[i]).bit_length())
    spec = _common(draw, backend)
    if huge:
        spec["dtype"] = "float64"  # sample coordinates exact in the reference too
    spec.update(
        op="mdconv",
        n=_size(draw, 2 if small else 3),
        c=math.lcm(groups, dg) * draw(st.sampled_from([1, 1, 1, 2, 2, 0])),
        c_out=groups * _size(draw, 3),
        h=h,
        w=w,
        kernel=[kh, kw],
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dg=dg,
        bias=draw(st.booleans()),
        api=draw(st.sampled_from(["op", "functional", "functional_no_mask"]))
        if backend != "emulated"
        else "op",
        column_budget=draw(st.sampled_from([None, None, 1, 7, 64])),
        mutation=_mutation(draw, CONV_MUTATIONS, backend),
    )
    return spec


ROI_KINDS = ["inside", "inside", "inverted", "degenerate", "outside", "large"]


@st.composite
def pool_examples(draw, backend):
    small = backend == "emulated"
    n = _size(draw, 3)
    no_rois = n == 0 or draw(st.integers(0, 7)) == 7
    spec = _common(draw, backend)
    spec.update(
        op="pool",
        n=n,
        c=_size(draw, 4),
        h=_size(draw, 6 if small else 10),
        w=_size(draw, 6 if small else 10),
        rois=[]
        if no_rois
        else draw(st.lists(st.sampled_from(ROI_KINDS), min_size=1, max_size=3 if small else 5)),
        output_size=[draw(st.integers(1, 4)), draw(st.integers(1, 4))],
        spatial_scale=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])),
        sampling_ratio=draw(st.integers(0, 4)),
        gamma=draw(st.sampled_from([0.1, 1.0, 0.0])),
        offset=draw(st.sampled_from([True, True, False])),
        api=draw(st.sampled_from(["op", "functional"])) if backend != "emulated" else "op",
        mutation=_mutation(draw, POOL_MUTATIONS, backend),
    )
    return spec


# The reproducers (an empty image with padding: a segfault before the fix), always run first.
_EMPTY_INPUT = dict(
    backend=None, dtype="float32", layout="contiguous", offset_scale=1.0, nonfinite=None, threads=1,
    seed=0, op="mdconv", n=2, c=4, c_out=4, h=0, w=0, kernel=[3, 3], stride=[1, 1], padding=[2, 2],
    dilation=[1, 1], groups=1, dg=1, bias=False, api="functional", column_budget=None, mutation=None,
)  # fmt: skip
EMPTY_INPUT_EXAMPLES = [
    _EMPTY_INPUT,
    dict(_EMPTY_INPUT, n=1, h=5, padding=[1, 2], bias=True, api="op"),
]


# ================================================================================================
# The crash guard (parent process)
# ================================================================================================
@pytest.fixture(scope="module")
def worker():
    rerun = f"python {os.path.relpath(__file__)} --run '{{spec}}'"
    guard = CrashGuard("test_fuzz_ops:_run_example", EXAMPLE_TIMEOUT_S, rerun)
    yield guard
    guard.close()


def _check(worker, spec):
    failure = worker.run(spec)
    assert failure is None, f"example {json.dumps(spec)}:\n{failure}"


def _fuzz_settings(backend):
    examples = int(FUZZ_EXAMPLES) if FUZZ_EXAMPLES else BUDGET[backend]
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


def _fuzz_test(backend, strategy):
    """One hypothesis test per backend: explicit examples first, then the seeded random ones."""

    @seed(FUZZ_SEED)
    @_fuzz_settings(backend)
    @given(spec=strategy(backend))
    def run(worker, spec):
        _check(worker, spec)

    for ex in EMPTY_INPUT_EXAMPLES if strategy is conv_examples else []:
        run = hyp_example(spec=dict(ex, backend=backend))(run)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_modulated_deform_conv2d(worker, backend):
    _fuzz_test(backend, conv_examples)(worker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_deform_roi_pool(worker, backend):
    _fuzz_test(backend, pool_examples)(worker)


def test_crash_guard_names_the_example_and_recovers(worker):
    """The guard itself: a segfault and a hang in the worker become failures naming the example and
    how to rerun it, and the next example runs in a fresh worker."""
    with pytest.raises(
        AssertionError, match=r"died of SIGSEGV on example .*\"segfault\".*\nrerun .*--run"
    ):
        worker.run({"crash_guard": "segfault"})
    with pytest.raises(AssertionError, match="hung for more than 2 s"):
        worker.run({"crash_guard": "hang"}, timeout=2)
    assert worker.run({"crash_guard": "fail"}) == "planted failure"
    assert worker.run({"crash_guard": "pass"}) is None
    spec = dict(EMPTY_INPUT_EXAMPLES[0], backend="cpu", offset_scale=0.5, h=5, w=4)
    assert worker.run(spec) is None  # a real example after the restarts


# ================================================================================================
# The worker: builds the tensors of an example and checks the properties
# ================================================================================================
def _ops(backend):
    d = torch.ops.dcnv2
    if backend == "emulated":
        return (
            d._emulated_cuda_modulated_deform_conv2d,
            d._emulated_cuda_modulated_deform_conv2d_backward,
            d._emulated_cuda_deform_roi_pool,
            d._emulated_cuda_deform_roi_pool_backward,
        )
    return (
        d.modulated_deform_conv2d,
        d._modulated_deform_conv2d_backward,
        d.deform_roi_pool,
        d._deform_roi_pool_backward,
    )


class _Tensors:
    """Builds an example's tensors: values drawn in float64 from the example's seed, then rounded to its
    dtype once, so that the op and the reference see the same numbers."""

    def __init__(self, spec):
        self.spec = spec
        self.gen = torch.Generator().manual_seed(spec["seed"])
        self.dtype = getattr(torch, spec["dtype"])
        self.device = "cuda" if spec["backend"] == "cuda" else "cpu"
        # the reference computes in float64 for float64 and in float32 otherwise
        self.ref_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32

    def randn(self, *shape, scale=1.0):
        return (torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale).to(self.dtype)

    def rand(self, *shape):
        return torch.rand(shape, generator=self.gen, dtype=torch.float64).to(self.dtype)

    def offsets(self, *shape):
        """Offsets of the example's scale, with 1-3 NaN / inf / -inf entries where it asks for them."""
        t = self.randn(*shape, scale=self.spec["offset_scale"])
        if self.spec["nonfinite"] and t.numel():
            count = int(torch.randint(1, 4, (1,), generator=self.gen))
            idx = torch.randint(0, t.numel(), (count,), generator=self.gen)
            t.view(-1)[idx] = float(self.spec["nonfinite"])
        return t

    def to_op(self, t):
        """The op's copy: on the example's device, in its layout (4-D tensors)."""
        if t is None or not torch.is_tensor(t):
            return t
        t = t.to(self.device)
        if t.dim() == 4 and self.spec["layout"] == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() >= 2 and self.spec["layout"] == "strided":
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
            wide[..., ::2] = t
            return wide[..., ::2]
        return t

    def to_ref(self, t, grad=False):
        return None if t is None else t.to(self.ref_dtype).requires_grad_(grad)


def _other_float(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


def _expect_error(call, pattern, what):
    """The call must raise ValueError/RuntimeError naming `pattern`; returns a failure message or None."""
    import re

    try:
        call()
    except (ValueError, RuntimeError) as e:
        if not re.search(pattern, str(e)):
            return f"{what}: error does not name {pattern!r}: {type(e).__name__}: {e}"
        return None
    except Exception as e:  # noqa: BLE001  (any other type is a failure of the property)
        return f"{what}: expected ValueError/RuntimeError naming {pattern!r}, got {type(e).__name__}: {e}"
    return f"{what}: expected ValueError/RuntimeError naming {pattern!r}, but the call returned"


def _expect_errors(forward, backward, pattern, mutation):
    """Both ops raise naming `pattern` (a bad grad_output only concerns the backward op)."""
    failure = (
        None if mutation.startswith("grad_output") else _expect_error(forward, pattern, "forward")
    )
    return failure or _expect_error(backward, pattern, "backward")


def _compare(what, actual, expected, tol, exclude=None):
    """Shape, dtype-independent closeness in float64 with NaN equal to NaN; `exclude` masks entries out."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if exclude is not None:
        a, e = a[~exclude], e[~exclude]
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    close = torch.isclose(a, e, rtol=tol, atol=tol * max(scale, 1.0), equal_nan=True)
    if not close.all():
        bad = (~close).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~close).sum())} of {close.numel()} entries differ from the reference, first at "
            f"{bad}: {a[tuple(bad)].item()!r} vs {e[tuple(bad)].item()!r} (largest |reference| {scale:.3g})"
        )


def _ref_grads(output, leaves, grad):
    """The reference's gradients by autograd; zeros for a leaf the output does not depend on."""
    grads = (
        torch.autograd.grad(output, leaves, grad, allow_unused=True)
        if output.numel()
        else [None] * len(leaves)
    )
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def _assert_finite(what, t):
    assert torch.isfinite(t).all(), f"{what}: non-finite values although every input is finite"


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_args(spec, t):
    """(args, extras) for the raw conv op on CPU, rounded to the example's dtype."""
    kh, kw = spec["kernel"]
    ho = _out_size(spec["h"], kh, spec["stride"][0], spec["padding"][0], spec["dilation"][0])
    wo = _out_size(spec["w"], kw, spec["stride"][1], spec["padding"][1], spec["dilation"][1])
    n, c, taps, dg = spec["n"], spec["c"], kh * kw, spec["dg"]
    return dict(
        input=t.randn(n, c, spec["h"], spec["w"]),
        offset=t.offsets(n, 2 * dg * taps, ho, wo),
        mask=t.rand(n, dg * taps, ho, wo),
        weight=t.randn(spec["c_out"], c // spec["groups"], kh, kw),
        bias=t.randn(spec["c_out"]) if spec["bias"] else None,
        stride=list(spec["stride"]),
        padding=list(spec["padding"]),
        dilation=list(spec["dilation"]),
        groups=spec["groups"],
        dg=dg,
        grad=t.randn(n, spec["c_out"], ho, wo),
    )


def _mutate_conv(a, name, t):
    ri = lambda *s: t.randn(*s)  # noqa: E731
    if name == "input_3d":
        a["input"] = a["input"].flatten(0, 1)
    elif name == "weight_3d":
        a["weight"] = a["weight"].flatten(2)
    elif name == "offset_5d":
        a["offset"] = a["offset"].unsqueeze(0)
    elif name == "offset_channels":
        a["offset"] = torch.cat([a["offset"], a["offset"][:, :1] * 0 + 1], 1)
    elif name == "offset_height":
        a["offset"] = torch.cat([a["offset"], a["offset"][:, :, :1]], 2)
    elif name == "mask_channels":
        a["mask"] = a["mask"][:, 1:]
    elif name == "mask_batch":
        a["mask"] = torch.cat(
            [a["mask"], a["mask"][:1] * 0 + 0.5]
            if len(a["mask"])
            else [ri(1, *a["mask"].shape[1:])],
            0,
        )
    elif name == "weight_channels":
        w = a["weight"]
        a["weight"] = ri(w.shape[0], w.shape[1] + 1, *w.shape[2:])
    elif name == "kernel_empty":
        a["weight"] = a["weight"][:, :, :0]
    elif name == "bias_length":
        a["bias"] = ri(a["weight"].shape[0] + 1)
    elif name == "bias_2d":
        a["bias"] = ri(1, a["weight"].shape[0])
    elif name == "stride_zero":
        a["stride"][0] = 0
    elif name == "stride_negative":
        a["stride"][1] = -1
    elif name == "padding_negative":
        a["padding"][0] = -1
    elif name == "dilation_zero":
        a["dilation"][1] = 0
    elif name == "groups_zero":
        a["groups"] = 0
    elif name == "groups_negative":
        a["groups"] = -2
    elif name == "deformable_groups_zero":
        a["dg"] = 0
    elif name == "deformable_groups_negative":
        a["dg"] = -1
    elif name == "groups_not_dividing":
        c, c_out = a["input"].shape[1], a["weight"].shape[0]
        if c == 0 and c_out == 0:
            a["weight"] = ri(1, *a["weight"].shape[1:])
        a["groups"] = c + 1 if c else a["weight"].shape[0] + 1  # divides neither C nor C_out
    elif name in ("offset_dtype", "mask_dtype", "weight_dtype"):
        key = name.split("_")[0]
        a[key] = a[key].to(_other_float(a[key].dtype))
    elif name == "integer_tensors":
        for key in ("input", "offset", "mask", "weight", "bias", "grad"):
            a[key] = None if a[key] is None else a[key].round().long()
    elif name == "padding_too_small":  # at any stride (a stride > 1 once hid it: test_op_errors.py)
        a["padding"] = [0, 0]
        a["input"] = a["input"][:, :, :1, :1]
        a["weight"] = ri(*a["weight"].shape[:2], 2 + a["weight"].shape[2], a["weight"].shape[3])
    elif name == "grad_output_shape":
        g = a["grad"]
        a["grad"] = torch.cat([g, torch.zeros(*g.shape[:2], 1, g.shape[3], dtype=g.dtype)], 2)
    elif name == "grad_output_dtype":
        a["grad"] = a["grad"].to(_other_float(a["grad"].dtype))
    elif name == "half_on_cpu":
        for key in ("input", "offset", "mask", "weight", "bias", "grad"):
            a[key] = None if a[key] is None else a[key].half()
    else:
        raise ValueError(f"mutation: unknown name {name!r}")


def _conv_calls(spec, a, t):
    """(forward, backward) callables on the op's copies of the arguments."""
    fwd_op, bwd_op = _ops(spec["backend"])[:2]
    x, offset, mask, weight, bias, grad = (
        t.to_op(a[k]) for k in ("input", "offset", "mask", "weight", "bias", "grad")
    )
    params = (*a["stride"], *a["padding"], *a["dilation"], a["groups"], a["dg"])

    def forward():
        if spec["api"] == "op":
            return fwd_op(x, offset, mask, weight, bias, *params)
        from projects_dcnv2.layers import modulated_deform_conv2d

        m = None if spec["api"] == "functional_no_mask" else mask
        return modulated_deform_conv2d(
            x,
            offset,
            m,
            weight,
            bias,
            tuple(a["stride"]),
            tuple(a["padding"]),
            tuple(a["dilation"]),
            a["groups"],
            a["dg"],
        )

    return forward, lambda: bwd_op(grad, x, offset, mask, weight, bias, *params)


def _check_conv(spec):
    t = _Tensors(spec)
    a = _conv_args(spec, t)
    if spec["api"] == "functional_no_mask":
        a["mask"] = torch.ones_like(a["mask"])
    if spec["mutation"]:
        if spec["mutation"].startswith("mask") and spec["api"] == "functional_no_mask":
            spec = dict(spec, api="op")
        _mutate_conv(a, spec["mutation"], t)
        return _expect_errors(
            *_conv_calls(spec, a, t), CONV_MUTATIONS[spec["mutation"]], spec["mutation"]
        )

    forward, backward = _conv_calls(spec, a, t)
    out = forward()
    grads = backward()
    c_out = spec["c_out"]
    shape = tuple(a["grad"].shape)
    assert tuple(out.shape) == shape and out.dtype == t.dtype, (
        f"output: {tuple(out.shape)} {out.dtype}, expected {shape} {t.dtype}"
    )
    names = ("grad_input", "grad_offset", "grad_mask", "grad_weight", "grad_bias")
    expected_shapes = [a[k].shape for k in ("input", "offset", "mask", "weight")] + [
        (c_out,) if spec["bias"] else (0,)
    ]
    for name, g, s in zip(names, grads, expected_shapes):
        assert tuple(g.shape) == tuple(s) and g.dtype == t.dtype, (
            f"{name}: {tuple(g.shape)} {g.dtype}, expected {tuple(s)} {t.dtype}"
        )
    if not spec["nonfinite"]:
        _assert_finite("output", out)
        for name, g in zip(names, grads):
            _assert_finite(name, g)

    # the reference, forward and backward; +-inf offsets sample outside the map, as 1e6 does
    ref = {k: t.to_ref(a[k], grad=True) for k in ("input", "offset", "mask", "weight", "bias")}
    with torch.no_grad():
        ref["offset"].copy_(
            torch.where(torch.isinf(ref["offset"]), ref["offset"].sign() * 1e6, ref["offset"])
        )
    grad = t.to_ref(a["grad"])
    if (
        spec["h"] == 0 or spec["w"] == 0 or spec["c"] == 0
    ):  # nothing to sample: the bias, zero gradients
        expected = torch.zeros(shape, dtype=t.ref_dtype) + (
            ref["bias"].detach().view(1, -1, 1, 1) if spec["bias"] else 0
        )
        expected_grads = [torch.zeros(s, dtype=t.ref_dtype) for s in expected_shapes[:4]]
        expected_grads.append(
            grad.sum((0, 2, 3)) if spec["bias"] else torch.zeros(0, dtype=t.ref_dtype)
        )
    else:
        from reference_ops import mdconv2d_ref

        expected = mdconv2d_ref(
            ref["input"],
            ref["offset"],
            ref["mask"],
            ref["weight"],
            ref["bias"],
            a["stride"],
            a["padding"],
            a["dilation"],
            a["groups"],
            a["dg"],
        )
        leaves = [ref[k] for k in ("input", "offset", "mask", "weight")] + (
            [ref["bias"]] if spec["bias"] else []
        )
        expected_grads = _ref_grads(expected, leaves, grad)
        if not spec["bias"]:
            expected_grads.append(torch.zeros(0, dtype=t.ref_dtype))
    # A NaN offset makes its output position NaN. Which gradient entries of its own tap turn NaN, and
    # where in grad_input its (meaningless) corners land, is left open: those are not compared.
    n, taps = spec["n"], spec["dg"] * spec["kernel"][0] * spec["kernel"][1]
    nan_taps = torch.isnan(a["offset"].reshape(n, taps, 2, *shape[2:])).any(2)
    exclude = [
        None,
        nan_taps.unsqueeze(2).expand(n, taps, 2, *shape[2:]).reshape(a["offset"].shape),
        nan_taps,
        None,
        None,
    ]
    tol = TOL[spec["dtype"]]
    _compare("output", out, expected, tol)
    for name, g, e, ex in zip(names, grads, expected_grads, exclude):
        if name != "grad_input" or spec["nonfinite"] != "nan":
            _compare(name, g, e, tol, ex.reshape(g.shape) if ex is not None else None)
    return None


# ------------------------------------------------------------------------------------------------
def _rois(spec, t):
    """(K, 5) RoIs of the example's kinds, in image pixels (the feature map is H / scale image pixels)."""
    img_h, img_w = spec["h"] / spec["spatial_scale"], spec["w"] / spec["spatial_scale"]
    rows = []
    for kind in spec["rois"]:
        u = torch.rand(5, generator=t.gen, dtype=torch.float64).tolist()
        b = float(int(u[0] * spec["n"]))
        x1, y1 = (u[1] * 1.2 - 0.1) * img_w, (u[2] * 1.2 - 0.1) * img_h
        x2, y2 = x1 + u[3] * img_w, y1 + u[4] * img_h
        if kind == "inverted":
            x1, x2 = x2 + 1, x1
        elif kind == "degenerate":
            x2, y2 = x1, y1
        elif kind == "outside":
            shift = 1e4 if u[3] > 0.5 else -1e4
            x1, x2 = x1 + shift, x2 + shift
        elif kind == "large":
            x1, y1, x2, y2 = -img_w - 3, -img_h - 3, 2 * img_w + 3, 2 * img_h + 3
        rows.append([b, x1, y1, x2, y2])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).to(t.dtype)


def _pool_args(spec, t):
    k, (ph, pw) = len(spec["rois"]), spec["output_size"]
    return dict(
        input=t.randn(spec["n"], spec["c"], spec["h"], spec["w"]),
        rois=_rois(spec, t),
        offset=t.offsets(k, 2, ph, pw) if spec["offset"] else None,
        output_size=list(spec["output_size"]),
        spatial_scale=spec["spatial_scale"],
        sampling_ratio=spec["sampling_ratio"],
        gamma=spec["gamma"],
        grad=t.randn(k, spec["c"], ph, pw),
    )


def _mutate_pool(a, name, t):
    if name in (
        "rois_1d",
        "rois_batch_index_high",
        "rois_batch_index_negative",
        "rois_nan",
        "rois_inf",
    ) and not len(a["rois"]):
        a["rois"] = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=t.dtype)
        a["offset"] = None
        a["grad"] = t.randn(1, *a["grad"].shape[1:])
    rois = a["rois"] = a["rois"].clone()
    if name == "input_3d":
        a["input"] = a["input"].flatten(0, 1)
    elif name == "rois_1d":
        a["rois"] = rois[0]
    elif name == "rois_4_columns":
        a["rois"] = rois[:, 1:]
    elif name == "rois_batch_index_high":
        rois[-1, 0] = a["input"].shape[0]
    elif name == "rois_batch_index_negative":
        rois[0, 0] = -1
    elif name in ("rois_nan", "rois_inf"):
        rois[-1, 3] = float("nan") if name == "rois_nan" else float("inf")
    elif name == "rois_dtype":
        a["rois"] = rois.to(_other_float(rois.dtype))
    elif name == "offset_shape":
        a["offset"] = t.randn(len(rois), 2, a["output_size"][0] + 1, a["output_size"][1])
    elif name == "offset_dtype":
        a["offset"] = t.randn(len(rois), 2, *a["output_size"]).to(_other_float(t.dtype))
    elif name == "output_size_zero":
        a["output_size"][1] = 0
    elif name == "output_size_negative":
        a["output_size"][0] = -3
    elif name.startswith("spatial_scale"):
        a["spatial_scale"] = {"zero": 0.0, "negative": -0.5, "nan": float("nan")}[
            name.split("_")[-1]
        ]
    elif name == "integer_input":
        a["input"], a["rois"] = a["input"].round().long(), rois.long()
        a["offset"] = None
    elif name == "grad_output_shape":
        g = a["grad"]
        a["grad"] = torch.cat([g, torch.zeros(g.shape[0], 1, *g.shape[2:], dtype=g.dtype)], 1)
    elif name == "half_on_cpu":
        for key in ("input", "rois", "offset", "grad"):
            a[key] = None if a[key] is None else a[key].half()
    else:
        raise ValueError(f"mutation: unknown name {name!r}")


def _pool_calls(spec, a, t):
    fwd_op, bwd_op = _ops(spec["backend"])[2:]
    x, rois, offset, grad = (t.to_op(a[k]) for k in ("input", "rois", "offset", "grad"))
    params = (*a["output_size"], a["spatial_scale"], a["sampling_ratio"], a["gamma"])

    def forward():
        if spec["api"] == "op":
            return fwd_op(x, rois, offset, *params)
        from projects_dcnv2.layers import deform_roi_pool

        return deform_roi_pool(x, rois, offset, tuple(a["output_size"]), *params[2:])

    return forward, lambda: bwd_op(grad, x, rois, offset, *params)


def _check_pool(spec):
    t = _Tensors(spec)
    a = _pool_args(spec, t)
    if spec["mutation"]:
        _mutate_pool(a, spec["mutation"], t)
        return _expect_errors(
            *_pool_calls(spec, a, t), POOL_MUTATIONS[spec["mutation"]], spec["mutation"]
        )

    forward, backward = _pool_calls(spec, a, t)
    out = forward()
    grad_input, grad_offset = backward()
    shape = tuple(a["grad"].shape)
    assert tuple(out.shape) == shape and out.dtype == t.dtype, (
        f"output: {tuple(out.shape)} {out.dtype}, expected {shape} {t.dtype}"
    )
    assert grad_input.shape == a["input"].shape and grad_input.dtype == t.dtype, (
        f"grad_input: {grad_input.shape} {grad_input.dtype}"
    )
    offset_shape = a["offset"].shape if spec["offset"] else (0,)
    assert tuple(grad_offset.shape) == tuple(offset_shape), (
        f"grad_offset: {tuple(grad_offset.shape)}, expected {tuple(offset_shape)}"
    )
    if not spec["nonfinite"] or not spec["offset"]:
        for name, v in (("output", out), ("grad_input", grad_input), ("grad_offset", grad_offset)):
            _assert_finite(name, v)

    # bins whose offset is not finite are left out (NaN, or inf times a zero RoI size or gamma);
    # every other bin must equal the reference with those offsets zeroed
    offset = t.to_ref(a["offset"], grad=False)
    bad_bins = torch.zeros((shape[0], shape[2], shape[3]), dtype=torch.bool)
    if offset is not None:
        bad_bins = ~torch.isfinite(offset).all(1)
        offset = torch.where(
            bad_bins.unsqueeze(1), torch.zeros_like(offset), offset
        ).requires_grad_()
    x, rois, grad = t.to_ref(a["input"], grad=True), t.to_ref(a["rois"]), t.to_ref(a["grad"])
    tol = TOL[spec["dtype"]]
    exclude = bad_bins.unsqueeze(1).expand(shape)
    if spec["h"] == 0 or spec["w"] == 0 or not shape[0]:  # nothing to sample: zeros
        expected, expected_gi, expected_go = (
            torch.zeros(shape),
            torch.zeros_like(x),
            torch.zeros(offset_shape),
        )
    else:
        from reference_ops import deform_roi_pool_ref

        expected = deform_roi_pool_ref(
            x, rois, offset, a["output_size"], a["spatial_scale"], a["sampling_ratio"], a["gamma"]
        )
        leaves = [x] + ([offset] if offset is not None else [])
        gs = _ref_grads(expected, leaves, torch.where(exclude, 0, grad))
        expected_gi, expected_go = gs[0], gs[1] if offset is not None else torch.zeros(0)
    _compare("output", out, expected, tol, exclude)
    _compare(
        "grad_offset",
        grad_offset,
        expected_go,
        tol,
        bad_bins.unsqueeze(1).expand(offset_shape) if offset is not None else None,
    )
    if (
        not bad_bins.any()
    ):  # a non-finite bin spreads NaN into grad_input, which the zeroed reference lacks
        _compare("grad_input", grad_input, expected_gi, tol)
    return None


# ------------------------------------------------------------------------------------------------
def _run_example(spec):
    """Runs one example in this process; returns None when every property holds, else a message."""
    torch.set_num_threads(spec["threads"])
    if spec.get("column_budget"):
        os.environ["DCNV2_MAX_COLUMN_ELEMENTS"] = str(spec["column_budget"])
    else:
        os.environ.pop("DCNV2_MAX_COLUMN_ELEMENTS", None)
    try:
        return _check_conv(spec) if spec["op"] == "mdconv" else _check_pool(spec)
    except Exception:  # noqa: BLE001  (a property failed or a valid call raised: report it)
        return traceback.format_exc(limit=-4)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--run"]:
        sys.exit(f"usage: {sys.argv[0]} --run '<example json>'")
    result = _run_example(json.loads(sys.argv[2]))
    print("passed" if result is None else result)
    sys.exit(0 if result is None else 1)
