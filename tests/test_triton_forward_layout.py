"""The fused Triton forward's layout and work split (triton_kernels/mdconv_forward.py): channels-last
inputs read in place, split K, chunks cut at deformable-group borders (dg 4, groups 2, partial
chunks), against the CPU op in float64 (test_cuda_path's bounds); and the launch plan's rule for
ResNet-50's shapes against 132 SMs.

Without a GPU the kernel runs in Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1``);
the cases are tiny for it. What the compiler makes of the kernel: test_triton_static.py.
"""

import math

import pytest
import torch
from test_cuda_path import assert_within, conv_reference

import projects_dcnv2.layers  # noqa: F401  (registers torch.ops.dcnv2: the reference)
from projects_dcnv2.ops import triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="Triton is not installed")

HAS_CUDA = torch.cuda.is_available()


def _module():
    from projects_dcnv2.ops.triton_kernels import mdconv_forward

    return mdconv_forward


def _device():
    if HAS_CUDA:
        return "cuda"
    if not _module().INTERPRETED:
        pytest.skip(
            "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)"
        )
    return "cpu"


def _interpreter_only():
    if HAS_CUDA or not _module().INTERPRETED:
        pytest.skip("sets the interpreter's tiles: needs the kernel in Triton's interpreter")


def _case(
    C=8, out_ch=6, hw=(6, 7), groups=1, dg=1, n=1, offset_scale=1.5, seed=0, dtype=torch.float32
):
    """Random inputs (rounded to ``dtype``, held in float64) and the op's parameters: 3 x 3,
    stride 1, padding 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, *hw, generator=g)
    offset = torch.randn(n, 2 * dg * 9, *hw, generator=g) * offset_scale
    mask = torch.rand(n, dg * 9, *hw, generator=g)
    weight = torch.randn(out_ch, C // groups, 3, 3, generator=g) / math.sqrt(C // groups * 9)
    bias = torch.randn(out_ch, generator=g)
    grad = torch.randn(n, out_ch, *hw, generator=g)
    ts = [t.to(dtype).double() for t in (x, offset, mask, weight, bias, grad)]
    return ts, (1, 1, 1, 1, 1, 1, groups, dg)


def _run(ts, params, dtype, device, channels_last=False):
    x, offset, mask, weight, bias = (t.to(device, dtype) for t in ts[:5])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return _module().mdconv_forward(x, offset, mask, weight, bias, *params)


def _check(ts, params, dtype, what, **kw):
    ref, scale = conv_reference(ts, params)
    out = _run(ts, params, dtype, _device(), **kw)
    assert out.dtype == dtype and out.is_contiguous()
    bound = torch.float16 if dtype == torch.float32 and HAS_CUDA else dtype  # TF32 on a GPU
    assert_within(out, ref[0], scale[0], bound, what)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_channels_last_input_is_read_in_place(dtype):
    """A channels_last input goes to the kernel as it is (no copy); NCHW is copied once; both give
    the same result, equal to the reference."""
    mf = _module()
    ts, params = _case(C=8, dtype=dtype)
    x = ts[0].to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert mf.channels_last_input(x_cl) is x_cl
    copied = mf.channels_last_input(x)
    assert copied.stride(1) == 1 and torch.equal(copied, x)
    out_cl = _check(ts, params, dtype, "channels_last input", channels_last=True)
    out = _check(ts, params, dtype, "NCHW input")
    assert torch.equal(out_cl, out)


def test_channels_last_input_of_a_strided_view():
    """A channels-last view with gaps (every other channel of a wider tensor): channel stride 2,
    so it is copied; the result still matches."""
    ts, params = _case(C=6, out_ch=4)
    device = _device()
    wide = torch.zeros(1, 12, 6, 7).contiguous(memory_format=torch.channels_last)
    wide[:, ::2] = ts[0].float()
    view = wide[:, ::2]
    assert view.stride(1) == 2
    ref, scale = conv_reference(ts, params)
    _, offset, mask, weight, bias = (t.to(device, torch.float32) for t in ts[:5])
    out = _module().mdconv_forward(view.to(device), offset, mask, weight, bias, *params)
    assert_within(out, ref[0], scale[0], torch.float16 if HAS_CUDA else torch.float32, "view")


@pytest.mark.parametrize("split", [2, 3, 7])
def test_split_k_parts_add_up(split, monkeypatch):
    """The K loop (9 taps x 2 chunks = 18 steps) cut into 2, 3 and 7 parts (of 3 steps: the last
    one empty, it writes zeros), summed by _split_sum_kernel: the reference, bias once."""
    _interpreter_only()
    mf = _module()
    monkeypatch.setattr(
        mf, "INTERPRETER_BLOCKS", dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=8, SPLIT_K=split)
    )
    ts, params = _case(C=16, out_ch=6, n=2, seed=1)
    args, meta, grid = mf.launch_spec(
        *(t.float() for t in ts[:5]), *params, torch.empty(2, 6, 6, 7), None
    )
    assert grid[1] == split and args[5].shape == (split, 2, 6, 6, 7)
    _check(ts, params, torch.float32, f"split K {split}")


@pytest.mark.parametrize(
    "groups, dg, C, out_ch, block_k",
    [(2, 4, 16, 6, 4), (2, 4, 24, 10, 4), (1, 4, 24, 6, 8), (2, 3, 12, 4, 4), (2, 1, 20, 6, 8)],
    ids=["g2-dg4", "g2-dg4-partial-chunks", "dg4-chunk-crosses-groups", "g2-dg3-straddle", "g2"],
)
def test_chunks_stop_at_deformable_group_borders(groups, dg, C, out_ch, block_k, monkeypatch):
    """Chunks of BLOCK_K channels never cross a deformable group's border: dg 4 with 4 or 6
    channels each (chunks of 4: the second partial), chunks of 8 over groups of 6 channels, a
    deformable group shared by two conv groups (dg 3 x groups 2), and groups without deformable
    groups (chunks of 8 over 10 channels). Split in 2 as well."""
    _interpreter_only()
    mf = _module()
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=2)
    monkeypatch.setattr(mf, "INTERPRETER_BLOCKS", blocks)
    ts, params = _case(C=C, out_ch=out_ch, hw=(5, 6), groups=groups, dg=dg, seed=2)
    _check(ts, params, torch.float32, f"groups {groups} dg {dg} C {C} chunks {block_k}")


def test_nan_offset_stays_in_its_deformable_group(monkeypatch):
    """A NaN offset of deformable group 1 makes NaN exactly the outputs it reaches (the reference's
    NaN pattern), with several chunks per group and split K."""
    _interpreter_only()
    monkeypatch.setattr(
        _module(), "INTERPRETER_BLOCKS", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=4, SPLIT_K=3)
    )
    ts, params = _case(C=16, out_ch=4, hw=(4, 5), groups=2, dg=4, seed=3)
    ts[1][0, 2 * 9 * 1 + 4, 1, 2] = float("nan")  # group 1, tap 2's dy, pixel (1, 2)
    out = _check(ts, params, torch.float32, "NaN offset")
    assert out[0, :2, 1, 2].isnan().all() and not out[0, 2:].isnan().any()


# ------------------------------------------------------------------------------------------------
# The launch plan (pure Python: no kernel runs)
# ------------------------------------------------------------------------------------------------
RESNET50 = {"c3": (128, 100, 168), "c4": (256, 50, 84), "c5": (512, 25, 42)}


@pytest.mark.parametrize("itemsize", [2, 4], ids=["half", "float32"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shape", list(RESNET50))
def test_plan_fills_132_sms(shape, batch, itemsize):
    C, H, W = RESNET50[shape]
    M = batch * H * W
    plan = _module().forward_plan(M, C, C, C, 1, 3, 3, itemsize, 132, batch * C * H * W)
    tiles, split = plan["grid"]
    assert tiles == math.ceil(M / plan["BLOCK_M"]) * math.ceil(C / plan["BLOCK_N"])
    assert plan["BLOCK_N"] == min(C, 256)  # the sampled tile serves every output channel <= 256
    assert tiles * split >= 1.5 * 132, plan
    steps = 9 * math.ceil(C / plan["BLOCK_K"])
    assert steps / split >= _module().MIN_STEPS_PER_PART
    if tiles >= 2 * 132:
        assert split == 1


def test_plan_split_limits():
    mf = _module()
    # tiny channel counts: too few steps to split
    assert mf.forward_plan(64, 16, 16, 16, 1, 3, 3, 2, 132)["split_k"] == 1
    # the partial sums stay within int32 offsets
    numel = 2**30
    assert mf.forward_plan(64, 512, 512, 512, 1, 3, 3, 2, 132, numel)["split_k"] == 2
    # no part is left empty: 9 * 16 = 144 steps in parts of at least MIN_STEPS_PER_PART
    for sms in (132, 1000, 10_000):
        plan = mf.forward_plan(32, 512, 16, 512, 1, 3, 3, 2, sms)
        split, steps = plan["split_k"], 9 * 16
        per = math.ceil(steps / split)
        assert split <= mf.MAX_SPLIT and per * (split - 1) < steps
