"""The fused Triton backward of ``modulated_deform_conv2d``
(``torch.ops.dcnv2._triton_modulated_deform_conv2d_backward``, triton_kernels/mdconv_backward.py):
all five gradients against the CPU op's backward in float64, with test_cuda_path.py's per-element
bounds (dtype epsilons relative to the sum of |terms|).

Devices and bounds are test_triton_mdconv.py's: without a GPU the kernels run on CPU tensors in
Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1`` before anything imports the kernels);
with one, the same cases run on CUDA tensors, float32 products in TF32 when
``torch.backends.cudnn.allow_tf32`` is set (held to TF32's epsilon).

Every feature of the kernels is in a case: kernel (3, 2), stride (2, 1), dilation 2, groups 2 x
deformable groups 3 (a deformable group straddling two conv groups, a channel tile meeting two
deformable groups); N = 0, 1, 2, 3; partial pixel tiles; several output-channel and channel
chunks and channel parts; offsets inside, far outside, 1e4 and NaN; non-contiguous inputs; bias and
no bias; grad_weight's reduction in uneven parts (3 pixel tiles in the interpreter's 2 parts). Also
opcheck, the TF32 flag, autotuning's pruning and a compile for sm_90. The determinism alert is
test_triton_mdconv.py's.
"""

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from test_cuda_path import CONV_CASES, assert_within, conv_case_data, conv_inputs, conv_reference
from test_triton_mdconv import DEVICES, HAS_CUDA, _bound_dtype

import projects_dcnv2.layers  # noqa: F401  (registers torch.ops.dcnv2)
from projects_dcnv2.ops import triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="Triton is not installed")

OPS = torch.ops.dcnv2
NAMES = ["grad input", "grad offset", "grad mask", "grad weight", "grad bias"]

# test_cuda_path's "awkward" (N 3, kernel (3, 2), stride (2, 1), padding (1, 0), dilation 2, groups
# 2 x dg 3, bias, offsets inside; 4 x 5 = 20 pixels: a partial tile of 32) and these, in
# its layout: n, c_in, c_out, (H, W), (kh, kw), stride, padding, dilation, groups, dg, offsets
CASES = {
    # no bias; image 0 far outside (offsets x 20), image 1 with +-1e4 and two NaN offsets
    "outside": (2, 6, 4, (7, 6), (3, 2), (2, 1), (1, 0), (2, 2), 2, 3, "outside"),
    # 40 channels in one deformable group over two conv groups of 20, in the interpreter's two
    # channel parts of 32 + 8 (chunks of 16: 16 + 4 | 12 | 8); 18 output channels a group (16 + 2);
    # 5 x 8 = 40 pixels: tiles of 32 + 8
    "wide": (1, 40, 36, (6, 7), (2, 2), (1, 1), (0, 1), (1, 1), 2, 1, "inside"),
    "single": (1, 6, 4, (7, 6), (3, 2), (2, 1), (1, 0), (2, 2), 2, 3, "inside"),
    "batch0": (0, 6, 4, (7, 6), (3, 2), (2, 1), (1, 0), (2, 2), 2, 3, "inside"),
}
WITH_BIAS = {"awkward": True, "outside": False, "wide": True, "single": True, "batch0": True}


def _case_inputs(case, dtype):
    """test_cuda_path.conv_inputs of the case (its offsets inside); "outside" then moves image 0's
    offsets far outside (x 20) and sets +-1e4 and two NaN among image 1's. float64 tensors exactly
    representable in ``dtype``."""
    spec = CASES[case]
    with mock.patch.dict(CONV_CASES, {case: (*spec[:-1], "inside")}):
        ts, params = conv_inputs(case, dtype)
    if spec[-1] == "outside":
        K = spec[4][0] * spec[4][1]
        offset = ts[1].clone()
        offset[0] *= 20.0
        offset[1].view(-1)[::7] = 1e4
        offset[1].view(-1)[3::11] = -1e4
        offset[1, 2 * (1 * K + 2), 1, 2] = float("nan")  # dy of group 1, tap 2
        offset[1, 2 * (2 * K + 5) + 1, 2, 0] = float("nan")  # dx of group 2, tap 5
        ts[1] = offset.to(dtype).double()
    return ts, params


_cache = {}


def case_data(case, dtype):
    """Inputs, parameters, the CPU op's float64 gradients and their S (conv_reference)."""
    if case in CONV_CASES:
        ts, params, ref, scale = conv_case_data(case, dtype)
        return ts, params, ref[1:], scale[1:]
    if (case, dtype) not in _cache:
        ts, params = _case_inputs(case, dtype)
        ref, scale = conv_reference(ts, params)
        _cache[case, dtype] = ts, params, ref[1:], scale[1:]
    return _cache[case, dtype]


def run_backward(case, dtype, device, views=False):
    ts, params = case_data(case, dtype)[:2] if case != "batch0" else _case_inputs(case, dtype)
    x, offset, mask, weight, bias, grad = (t.to(device, dtype) for t in ts)
    if views:  # the same values in other memory layouts
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        offset = offset.transpose(2, 3).contiguous().transpose(2, 3)
        mask = mask.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        weight = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
        assert not any(t.is_contiguous() for t in (x, offset, mask, weight, grad))
    bias = bias if WITH_BIAS[case] else None
    return OPS._triton_modulated_deform_conv2d_backward(
        grad, x, offset, mask, weight, bias, *params
    )


def check_grads(got, case, dtype, device, what):
    _, _, ref, scale = case_data(case, dtype)
    for name, g, r, s in zip(NAMES, got, ref, scale):
        assert g.dtype == dtype and g.device.type == device, f"{what} {name}: {g.dtype} {g.device}"
        assert g.is_contiguous(), f"{what} {name}: not contiguous"
        if name == "grad bias" and not WITH_BIAS[case]:
            assert g.shape == (0,), f"{what} {name}: expected an empty (0,) tensor without bias"
            continue
        assert_within(g, r, s, _bound_dtype(dtype, device), f"{what} {name}")


MATRIX = [
    ("awkward", torch.float32),
    ("awkward", torch.bfloat16),
    ("outside", torch.float32),
    ("outside", torch.float16),
    ("wide", torch.bfloat16),
]


@pytest.mark.parametrize("case,dtype", MATRIX, ids=[f"{c}-{str(d)[6:]}" for c, d in MATRIX])
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_cpu_float64(device, case, dtype):
    got = run_backward(case, dtype, device)
    check_grads(got, case, dtype, device, f"{device} {case} {dtype}")
    if case == "outside":
        # NaN reaches exactly the gradients the reference makes NaN (above), and no further
        assert torch.isfinite(got[3]).float().mean() > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    got = run_backward("single", torch.float32, device, views=True)
    check_grads(got, "single", torch.float32, device, f"{device} non-contiguous")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_zero(device):
    ts = _case_inputs("batch0", torch.float32)[0]
    got = run_backward("batch0", torch.float32, device)
    for name, g, t in zip(NAMES, got, ts[:5]):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("device", DEVICES)
def test_private_backward_opcheck(device):
    """Schema, fake tensors (the triton_op's own function, launches skipped) and AOT dispatch."""
    ts, params = case_data("single", torch.float32)[:2]
    x, offset, mask, weight, bias, grad = (t.to(device, torch.float32) for t in ts)
    args = (grad, x, offset, mask, weight, bias, *params)
    torch.library.opcheck(OPS._triton_modulated_deform_conv2d_backward.default, args)


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32_on", "tf32_off"])
@pytest.mark.parametrize("device", DEVICES)
def test_tf32_flag_reaches_both_kernels(device, allow_tf32, monkeypatch):
    """Both launches get DOT_PRECISION from torch.backends.cudnn.allow_tf32 (not run: recorded)."""
    from projects_dcnv2.ops.triton_kernels import mdconv_backward

    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta["DOT_PRECISION"])

    monkeypatch.setattr(mdconv_backward, "wrap_triton", lambda kernel: Recorder())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    run_backward("awkward", torch.float32, device)
    assert seen == ["tf32" if allow_tf32 else "ieee"] * 2


def test_autotuning_skips_tiles_wider_than_the_channels():
    """Tiny channel counts tune nothing (one config); the wide case's 20 / 40 / 18 channels keep the
    tiles of at most 32 channels; ResNet widths keep every config."""
    from projects_dcnv2.ops.triton_kernels import mdconv_backward as mb

    for tuned in (mb._grad_input_offset_mask_tuned, mb._grad_weight_tuned):
        prune = tuned.early_config_prune
        assert len(prune(tuned.configs, dict(cg=3, cd=2, og=2))) == 1
        kept = prune(tuned.configs, dict(cg=20, cd=40, og=18))
        assert len(tuned.configs) > len(kept) > 1
        assert all(c.kwargs["BLOCK_C"] <= 32 and c.kwargs["BLOCK_O"] <= 32 for c in kept)
        assert prune(tuned.configs, dict(cg=256, cd=256, og=512)) == tuned.configs


_COMPILE_FOR_SM90 = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from projects_dcnv2.ops.triton_kernels import mdconv_backward as mb

accumulators = {"gin_ptr", "goff_ptr", "gmask_ptr", "gw_ptr"}  # float32 buffers
for dtype, precision in (("bfloat16", "ieee"), ("float32", "tf32")):
    for fn in (mb._grad_input_offset_mask_kernel, mb._grad_weight_kernel):
        meta = dict(KH=3, KW=2, BLOCK_P=64, BLOCK_C=32, BLOCK_O=32)
        meta.update(DOT_DTYPE=getattr(tl, dtype), DOT_PRECISION=precision)
        if "COL_DTYPE" in fn.arg_names:
            meta["COL_DTYPE"] = getattr(tl, dtype)
        pointer = "*" + {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        signature = {
            n: "constexpr" if n in meta else "*fp32" if n in accumulators
            else pointer if n.endswith("_ptr") else "i32"
            for n in fn.arg_names
        }
        src = ASTSource(fn=fn, signature=signature, constexprs=meta)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        print(fn.__name__, dtype, len(kernel.asm["cubin"]), "mma" in kernel.asm["ptx"])
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the tests above compile the kernels for it")
def test_kernels_compile_for_an_sm90_gpu():
    """Triton's real compiler (not the interpreter, which accepts some code the compiler rejects: a
    process without TRITON_INTERPRET) turns both kernels into H100/H200 (sm_90) cubins without a
    GPU, with tensor-core instructions (mma) for the bfloat16 and TF32 products."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert len(lines) == 4, run.stdout
    for name, dtype, size, mma in lines:
        assert int(size) > 0 and mma == "True", (name, dtype)
