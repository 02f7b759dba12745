"""The fused Triton forward of modulated_deform_conv2d (``torch.ops.dcnv2._triton_modulated_deform_conv2d``)
under the matrix of test_cuda_path.py, the dispatch of the public operator on CUDA, and the
precision policies.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (conftest.py sets
``TRITON_INTERPRET=1`` before anything imports projects_dcnv2); with one, the same tests run on CUDA
tensors and the CPU-tensor runs are skipped (the kernels are compiled for the GPU in that process).
References and bounds are test_cuda_path.py's: the CPU op in float64, per element within
``UNITS[dtype]`` epsilons of the sum of |terms| (see its docstring). float32 products in TF32 (on a
GPU when ``torch.backends.cudnn.allow_tf32`` is set) are held to TF32's epsilon, 2**-10, that of
float16.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from test_cuda_path import assert_within, conv_case_data, conv_reference, non_contiguous_views

import projects_dcnv2.layers  # noqa: F401  (registers torch.ops.dcnv2)
from projects_dcnv2.ops import _triton_ops, triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="Triton is not installed")

OPS = torch.ops.dcnv2
HAS_CUDA = torch.cuda.is_available()


def _interpreted():
    from projects_dcnv2.ops.triton_kernels import mdconv_forward

    return mdconv_forward.INTERPRETED


DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            HAS_CUDA or not triton_kernels.interpreter_requested(),
            reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py "
            "on machines without a GPU); here the kernels are compiled for the GPU",
        ),
    ),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: device run skipped")
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def _bound_dtype(dtype, device):
    """The dtype whose epsilon bounds the result: TF32 products keep float16's 10 bits."""
    tf32 = device == "cuda" and triton_kernels.dot_precision(dtype) == "tf32"
    return torch.float16 if tf32 else dtype


def _forward(device, dtype, ts, params):
    x, offset, mask, weight, bias = (t.to(device=device, dtype=dtype) for t in ts[:5])
    return OPS._triton_modulated_deform_conv2d(x, offset, mask, weight, bias, *params)


# test_cuda_path's cases: basic (N 2), batch1 (dg 2), awkward (N 3, kernel (3, 2), stride (2, 1),
# padding (1, 0), dilation 2, groups 2 x dg 3: a deformable group straddles the two conv groups),
# nan_and_1e4 (offsets of 1e4 and NaN). Offsets far outside: test_forward_own_cases.
CASES = ["basic", "batch1", "awkward", "nan_and_1e4"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_cpu_float64(device, case, dtype):
    ts, params, ref, scale = conv_case_data(case, dtype)
    out = _forward(device, dtype, ts, params)
    assert out.dtype == dtype and out.device.type == device
    assert_within(out, ref[0], scale[0], _bound_dtype(dtype, device), f"{device} {case} output")


def _own_case(dtype, n=1, offset_scale=1.5):
    """20 input channels in dg 2 (chunks of 16 leave 4 of the first deformable group's 10, then
    6 of the second's), 18 output channels (16 + 2), 5 x 7 = 35 pixels per image (32 + 3): with
    the interpreter's tiles, every tile dimension ends in a partial tile."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 20, 5, 7, generator=g)
    offset = torch.randn(n, 2 * 2 * 9, 5, 7, generator=g) * offset_scale
    mask = torch.rand(n, 2 * 9, 5, 7, generator=g)
    weight = torch.randn(18, 20, 3, 3, generator=g) / math.sqrt(20 * 9)
    bias = torch.randn(18, generator=g)
    grad = torch.randn(n, 18, 5, 7, generator=g)
    ts = [t.to(dtype).double() for t in (x, offset, mask, weight, bias, grad)]
    params = (1, 1, 1, 1, 1, 1, 1, 2)
    return ts, params


OWN_CASES = [
    pytest.param(dtype, 1, 1.5, id=f"partial_tiles-{name}")
    for dtype, name in zip(DTYPES, DTYPE_IDS)
] + [pytest.param(torch.float16, 2, 20.0, id="far_outside-float16")]  # +-20 px: most outside


@pytest.mark.parametrize("dtype, n, offset_scale", OWN_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_own_cases(device, dtype, n, offset_scale):
    ts, params = _own_case(dtype, n, offset_scale)
    ref, scale = conv_reference(ts, params)
    out = _forward(device, dtype, ts, params)
    assert_within(out, ref[0], scale[0], _bound_dtype(dtype, device), "own case")


@pytest.mark.parametrize(
    "blocks",
    [dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=4), dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=32)],
    ids=["16x16x4", "32x64x32"],
)
def test_forward_other_interpreter_tiles(blocks, monkeypatch):
    """Other tiles in the interpreter (on a GPU the autotuner tries several): BLOCK_K 4 makes
    several channel chunks per deformable group (the interpreter's tl.dot takes any size)."""
    if HAS_CUDA or not _interpreted():
        pytest.skip("the interpreter's tiles: needs the kernels in Triton's interpreter")
    from projects_dcnv2.ops.triton_kernels import mdconv_forward

    monkeypatch.setattr(mdconv_forward, "INTERPRETER_BLOCKS", blocks)
    ts, params = _own_case(torch.float32)
    ref, scale = conv_reference(ts, params)
    out = _forward("cpu", torch.float32, ts, params)
    assert_within(out, ref[0], scale[0], torch.float32, f"tiles {blocks}")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_non_contiguous_inputs(device):
    ts, params, ref, scale = conv_case_data("awkward", torch.float32)
    x, offset, mask, weight, bias = (t.to(device, torch.float32) for t in ts[:5])
    views = non_contiguous_views(x, offset, mask, weight)
    out = OPS._triton_modulated_deform_conv2d(*views, bias[::1], *params)
    assert_within(out, ref[0], scale[0], _bound_dtype(torch.float32, device), "non-contiguous")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_batch_zero_and_empty_image(device):
    """No image (N = 0), and an image of width 0 with padding: the output is the bias."""
    for shape, pad, out_hw in (((0, 4, 5, 5), 1, (5, 5)), ((2, 4, 0, 3), 2, (2, 5))):
        n = shape[0]
        x = torch.randn(*shape, device=device)
        offset = torch.randn(n, 18, *out_hw, device=device)
        mask = torch.rand(n, 9, *out_hw, device=device)
        weight, bias = torch.randn(6, 4, 3, 3, device=device), torch.randn(6, device=device)
        params = (1, 1, pad, pad, 1, 1, 1, 1)
        out = OPS._triton_modulated_deform_conv2d(x, offset, mask, weight, bias, *params)
        assert out.shape == (n, 6, *out_hw)
        assert torch.equal(out, bias.view(1, 6, 1, 1).expand_as(out))


@pytest.mark.parametrize("device", DEVICES)
def test_private_op_errors(device):
    x = torch.randn(1, 4, 5, 5, device=device)
    offset, mask = torch.randn(1, 18, 5, 5, device=device), torch.rand(1, 9, 5, 5, device=device)
    weight = torch.randn(6, 4, 3, 3, device=device)
    params = (1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(
        RuntimeError, match=r"offset: expected shape .* = \[1, 18, 5, 5\], got \[1, 16"
    ):
        OPS._triton_modulated_deform_conv2d(x, offset[:, :16], mask, weight, None, *params)
    with pytest.raises(RuntimeError, match="weight: expected dtype Float .*got Half"):
        OPS._triton_modulated_deform_conv2d(x, offset, mask, weight.half(), None, *params)
    with pytest.raises(RuntimeError, match="cannot run this call: dtype torch.float64"):
        OPS._triton_modulated_deform_conv2d(
            x.double(), offset.double(), mask.double(), weight.double(), None, *params
        )


def test_private_ops_have_the_public_schemas():
    for private, public in (
        ("_triton_modulated_deform_conv2d", "modulated_deform_conv2d"),
        ("_triton_modulated_deform_conv2d_backward", "_modulated_deform_conv2d_backward"),
    ):
        a = str(getattr(OPS, private).default._schema)
        b = str(getattr(OPS, public).default._schema)
        assert a[a.index("(") :] == b[b.index("(") :]


@pytest.mark.parametrize("device", DEVICES)
def test_private_forward_opcheck(device):
    g = torch.Generator().manual_seed(0)
    x, offset = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 8, 2, 3, generator=g)
    mask, weight = torch.rand(1, 4, 2, 3, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    args = (*(t.to(device) for t in (x, offset, mask, weight)), None, 1, 1, 0, 0, 1, 1, 1, 1)
    torch.library.opcheck(OPS._triton_modulated_deform_conv2d.default, args)


# ------------------------------------------------------------------------------------------------
# Precision policy: TF32 for float32 as F.conv2d (torch.backends.cudnn.allow_tf32)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32_on", "tf32_off"])
def test_dot_precision_follows_cudnn_allow_tf32(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    assert triton_kernels.dot_precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
    assert triton_kernels.dot_precision(torch.float16) == "ieee"
    assert triton_kernels.dot_precision(torch.bfloat16) == "ieee"


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32_on", "tf32_off"])
@pytest.mark.parametrize("device", DEVICES)
def test_tf32_flag_reaches_the_kernel(device, allow_tf32, monkeypatch):
    """The launch gets DOT_PRECISION from the flag, and both settings meet their bound (in the
    interpreter both compute in full float32)."""
    from projects_dcnv2.ops.triton_kernels import mdconv_forward

    seen = []
    for name in ("_mdconv_forward_kernel", "_mdconv_forward_tuned"):
        kernel = getattr(mdconv_forward, name)

        class Recorder:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **meta):
                    seen.append(meta["DOT_PRECISION"])
                    return self.kernel[grid](*args, **meta)

                return launch

        monkeypatch.setattr(mdconv_forward, name, Recorder(kernel))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    ts, params, ref, scale = conv_case_data("basic", torch.float32)
    out = _forward(device, torch.float32, ts, params)
    assert seen == ["tf32" if allow_tf32 else "ieee"]
    assert_within(out, ref[0], scale[0], _bound_dtype(torch.float32, device), "tf32 flag")


# ------------------------------------------------------------------------------------------------
# The opt-in: the layer picks the Triton operator when built; the public operator never does
# ------------------------------------------------------------------------------------------------
def test_resolve_impl():
    resolve = _triton_ops.resolve_impl
    assert resolve("cuda", environ={}) == "cuda"
    assert resolve(" Triton ", environ={"DCNV2_CUDA_IMPL": "cuda"}) == "triton"  # explicit wins
    assert resolve("auto", environ={}) == "cuda"  # the column path by default
    for env, expected in (("triton", "triton"), ("cuda", "cuda"), ("auto", "cuda"), ("", "cuda")):
        assert resolve("auto", environ={"DCNV2_CUDA_IMPL": env}) == expected
        assert resolve(None, environ={"DCNV2_CUDA_IMPL": env}) == expected
    with pytest.raises(ValueError, match="impl: expected one of auto, cuda, triton, got 'gpu'"):
        resolve("gpu", environ={})
    with pytest.raises(ValueError, match="DCNV2_CUDA_IMPL: expected one of auto, cuda, triton"):
        resolve("auto", environ={"DCNV2_CUDA_IMPL": "fused"})


def test_layer_impl_is_chosen_at_construction(monkeypatch):
    from projects_dcnv2.layers import ModulatedDeformConv2d, ModulatedDeformConv2dPack

    monkeypatch.setenv("DCNV2_CUDA_IMPL", "triton")
    layer = ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    assert layer.impl == "triton" and "impl='triton'" in repr(layer)
    monkeypatch.setenv("DCNV2_CUDA_IMPL", "cuda")
    assert layer.impl == "triton"  # read once, when built
    assert ModulatedDeformConv2d(4, 6, 3).impl == "cuda"
    assert ModulatedDeformConv2d(4, 6, 3, impl="triton").impl == "triton"
    with pytest.raises(ValueError, match="impl: expected one of auto, cuda, triton, got 'cudnn'"):
        ModulatedDeformConv2d(4, 6, 3, impl="cudnn")
    monkeypatch.setenv("DCNV2_CUDA_IMPL", "gpu")
    with pytest.raises(ValueError, match="DCNV2_CUDA_IMPL: expected one of auto, cuda, triton"):
        ModulatedDeformConv2d(4, 6, 3)


def test_triton_layer_takes_the_public_op_on_cpu(monkeypatch):
    """impl="triton" concerns CUDA tensors: on CPU the layer calls the public operator."""
    from projects_dcnv2.layers import ModulatedDeformConv2dPack

    calls = []
    monkeypatch.setattr(
        torch.ops.dcnv2,
        "_triton_modulated_deform_conv2d",
        lambda *a: calls.append(a),
        raising=False,
    )
    torch.manual_seed(0)
    a = ModulatedDeformConv2dPack(4, 6, 3, padding=1, impl="triton")
    b = ModulatedDeformConv2dPack(4, 6, 3, padding=1, impl="cuda")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(a(x), b(x)) and not calls


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the layer's CUDA dispatch skipped")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_layer_on_cuda_follows_impl(impl, monkeypatch):
    from projects_dcnv2.layers import ModulatedDeformConv2d

    ts, params, ref, scale = conv_case_data("awkward", torch.float16)
    x, offset, mask, weight, bias = (t.to("cuda", torch.float16) for t in ts[:5])
    stride, pad, dil, groups, dg = params[0:2], params[2:4], params[4:6], params[6], params[7]
    layer = ModulatedDeformConv2d(
        x.shape[1],
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride,
        pad,
        dil,
        groups,
        dg,
        impl=impl,
    ).to("cuda", torch.float16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    calls = []
    real = torch.ops.dcnv2._triton_modulated_deform_conv2d
    monkeypatch.setattr(
        torch.ops.dcnv2,
        "_triton_modulated_deform_conv2d",
        lambda *a: calls.append(1) or real(*a),
    )
    out = layer(x, offset, mask)
    assert len(calls) == (impl == "triton")
    assert_within(out, ref[0], scale[0], torch.float16, f"layer, {impl}")


def test_public_op_has_no_python_kernel():
    """Every kernel of the public operators on the hot path (CPU, CUDA, Autograd, Autocast) is C++:
    the dispatcher's table names a csrc/ file for each, and no Python (torch/library.py or a .py)."""
    for op in (
        "modulated_deform_conv2d",
        "_modulated_deform_conv2d_backward",
        "deform_roi_pool",
        "_deform_roi_pool_backward",
    ):
        dump = torch._C._dispatch_dump(f"dcnv2::{op}")
        rows = {
            line.split(":", 1)[0]: line
            for line in dump.splitlines()
            if line.split(":", 1)[0].split("[")[0] in _HOT_KEYS
        }
        keys = ["CPU", "CUDA", "Autograd[alias]"]
        if not op.startswith("_"):
            keys += ["AutocastCPU", "AutocastCUDA"]
        for key in keys:
            assert key in rows, f"{op}: no {key} kernel:\n{dump}"
            assert "/csrc/ops/" in rows[key] and ".py" not in rows[key], f"{op} {key}: {rows[key]}"
        for key, row in rows.items():  # no Python kernel on any of these keys
            assert ".py" not in row, f"{op} {key}: {row}"


_HOT_KEYS = {
    "CPU",
    "CUDA",
    "Autograd",
    "AutogradCPU",
    "AutogradCUDA",
    "AutocastCPU",
    "AutocastCUDA",
    "CompositeImplicitAutograd",
}


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: CUDA autocast skipped")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cuda_autocast_runs_in_the_autocast_dtype(dtype):
    """As F.conv2d: float32 inputs under autocast compute (and return) in the autocast dtype,
    equal to the op on inputs cast to it; float64 inputs are left alone."""
    ts, params, ref, scale = conv_case_data("basic", dtype)
    x, offset, mask, weight, bias = (t.to("cuda", torch.float32) for t in ts[:5])
    for op in (OPS.modulated_deform_conv2d, OPS._triton_modulated_deform_conv2d):
        with torch.autocast("cuda", dtype=dtype):
            out = op(x, offset, mask, weight, bias, *params)
            out64 = OPS.modulated_deform_conv2d(
                *(t.double() for t in (x, offset, mask, weight, bias)), *params
            )
        assert out.dtype == dtype and out64.dtype == torch.float64
        expected = op(*(t.to(dtype) for t in (x, offset, mask, weight, bias)), *params)
        assert torch.equal(out, expected)
        assert_within(out, ref[0], scale[0], dtype, "autocast")


def test_backward_op_alerts_under_deterministic_algorithms():
    """The fused backward accumulates with atomics: PyTorch's standard error in deterministic mode."""
    if not triton_kernels.fused_backward_state()[0]:
        pytest.skip("the fused backward is not available")
    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not _interpreted():
        pytest.skip("CPU tensors need Triton's interpreter")
    ts, params, _, _ = conv_case_data("batch1", torch.float32)
    x, offset, mask, weight, bias, grad = (t.to(device, torch.float32) for t in ts)
    torch.use_deterministic_algorithms(True)  # conftest.py puts the mode back
    with pytest.raises(RuntimeError, match="_triton_modulated_deform_conv2d_backward"):
        OPS._triton_modulated_deform_conv2d_backward(grad, x, offset, mask, weight, bias, *params)


_COMPILE_FOR_SM90 = """
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from projects_dcnv2.ops.triton_kernels import mdconv_forward

fn = mdconv_forward._mdconv_forward_kernel
for dtype, precision in (("float16", "ieee"), ("bfloat16", "ieee"), ("float32", "tf32")):
    meta = dict(HAS_BIAS=True, KH=3, KW=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    meta.update(DOT_DTYPE=getattr(tl, dtype), DOT_PRECISION=precision)
    pointer = "*" + {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    signature = {
        n: "constexpr" if n in meta else pointer if n.endswith("_ptr") else "i32"
        for n in fn.arg_names
    }
    constexprs = {(fn.arg_names.index(k),): v for k, v in meta.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print(dtype, len(kernel.asm["cubin"]), "mma" in kernel.asm["ptx"])
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU every test above compiles the kernel for it")
def test_forward_kernel_compiles_for_an_sm90_gpu():
    """Triton's real compiler (not the interpreter: a process without TRITON_INTERPRET) turns the
    kernel into an H100/H200 (sm_90) cubin without a GPU, with tensor-core instructions (mma) for
    the float16, bfloat16 and TF32 products."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert [line[0] for line in lines] == ["float16", "bfloat16", "float32"]
    for dtype, size, mma in lines:
        assert int(size) > 0 and mma == "True", dtype


def test_package_imports_and_dispatches_without_triton():
    """Without Triton, projects_dcnv2 imports, the private operator says what is missing, and the
    layers still resolve to the column path."""
    script = (
        "import sys; sys.modules['triton'] = None\n"  # any triton import now fails
        "import torch\n"
        "from projects_dcnv2.ops import triton_kernels\n"
        "from projects_dcnv2.ops import _triton_ops\n"
        "assert not triton_kernels.AVAILABLE\n"
        "x, o, m = torch.randn(1, 4, 5, 5), torch.randn(1, 18, 5, 5), torch.rand(1, 9, 5, 5)\n"
        "w = torch.randn(6, 4, 3, 3)\n"
        "assert _triton_ops.resolve_impl('auto', environ={}) == 'cuda'\n"
        "try:\n"
        "    torch.ops.dcnv2._triton_modulated_deform_conv2d(x, o, m, w, None, *[1] * 8)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs Triton, which is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without Triton')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
