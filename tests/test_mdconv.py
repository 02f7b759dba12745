"""Tests of modulated_deform_conv2d (CPU) and its modules against torchvision and a naive reference.

Offsets are random and non-integer, so no sample lands exactly on y = -1 or x = -1, the only place
where torchvision's offset gradient differs from MMCV's (docs/semantics.md, "Where we differ from MMCV").
"""

import os
import subprocess
import sys
from typing import NamedTuple, Tuple, Union

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)
from projects_dcnv2.layers import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    modulated_deform_conv2d,
    upgrade_legacy_offset_keys,
)

from reference_ops import assert_same, conv_out_size, mdconv2d_ref, pair

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

Pair = Union[int, Tuple[int, int]]


class Case(NamedTuple):
    n: int
    cin: int
    cout: int
    hw: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    dg: int
    offset_scale: float  # offsets ~ N(0, scale^2); 50 pushes most samples far outside the map
    bias: bool

    @property
    def id(self):
        return (
            f"n{self.n}-c{self.cin}-{self.cout}-hw{self.hw[0]}x{self.hw[1]}-k{self.kernel[0]}x{self.kernel[1]}"
            f"-s{self.stride}-p{self.padding}-d{self.dilation}-g{self.groups}-dg{self.dg}-o{self.offset_scale}"
            f"-{'bias' if self.bias else 'nobias'}"
        ).replace(" ", "")


# Covers: stride 1/2/(2,1)/(1,2); padding 0/1/2/(1,0); dilation 1/2/(2,1); groups 1/2/3; deformable
# groups 1/2/3/4; kernels (3,3), (3,2), (2,3), (1,1); non-square images; batch 1/2/3; far-out offsets;
# 2 to 96 channels.
CASES = [
    Case(1, 4, 4, (7, 6), (3, 3), 1, 1, 1, 1, 1, 1.0, True),
    Case(3, 4, 6, (8, 9), (3, 2), (2, 1), (1, 0), 1, 2, 4, 2.0, True),
    Case(2, 8, 4, (9, 7), (3, 3), 2, 2, 2, 2, 4, 3.0, False),
    Case(1, 3, 2, (5, 5), (2, 3), 1, 0, (2, 1), 1, 1, 50.0, True),
    Case(3, 6, 6, (6, 10), (1, 1), 2, 0, 1, 3, 3, 1.5, True),
    Case(2, 4, 2, (5, 8), (3, 3), (1, 2), 2, 2, 1, 2, 50.0, False),
    Case(2, 2, 3, (1, 4), (3, 3), 1, 1, 1, 1, 1, 0.7, True),
    Case(1, 6, 4, (10, 5), (3, 2), 2, 1, (1, 2), 2, 3, 4.0, True),
    # wide channel runs: the CPU kernels' vectorised loops (8-lane sums, 16-channel slices) and their
    # remainders; groups 2 x dg 3 splits 96 channels into runs of 32, 16, 16 and 32
    Case(2, 40, 24, (9, 11), (3, 3), 1, 1, 1, 1, 2, 2.0, True),
    Case(1, 96, 16, (6, 7), (3, 3), 2, 1, 1, 2, 3, 1.5, False),
]


def make_inputs(case: Case, dtype=torch.float64, requires_grad=True):
    kh, kw = case.kernel
    sh, sw = pair(case.stride)
    ph, pw = pair(case.padding)
    dh, dw = pair(case.dilation)
    H, W = case.hw
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    K = kh * kw
    t = dict(
        input=torch.randn(case.n, case.cin, H, W, dtype=dtype),
        offset=torch.randn(case.n, 2 * case.dg * K, Ho, Wo, dtype=dtype) * case.offset_scale,
        mask=torch.rand(case.n, case.dg * K, Ho, Wo, dtype=dtype),
        weight=torch.randn(case.cout, case.cin // case.groups, kh, kw, dtype=dtype),
        bias=torch.randn(case.cout, dtype=dtype) if case.bias else None,
    )
    for v in t.values():
        if v is not None:
            v.requires_grad_(requires_grad)
    return t


def conv_kwargs(case: Case):
    return dict(stride=case.stride, padding=case.padding, dilation=case.dilation)


def run_op(t, case: Case, op=modulated_deform_conv2d):
    tensors = (t["input"], t["offset"], t["mask"], t["weight"], t["bias"])
    return op(*tensors, groups=case.groups, deformable_groups=case.dg, **conv_kwargs(case))


def run_tv(t, case: Case):
    return tv_deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **conv_kwargs(case)
    )


def run_ref(t, case: Case):
    return run_op(t, case, mdconv2d_ref)


def grads(out, t, grad_out):
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    g = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    return dict(zip(names, g))


def check_against(run_expected, case: Case, dtype=torch.float64, atol=1e-9, rtol=1e-7):
    t = make_inputs(case, dtype)
    out = run_op(t, case)
    expected = run_expected(t, case)
    assert_same(out, expected, atol, rtol, "output")
    grad_out = torch.randn_like(expected)
    g_op = grads(out, t, grad_out)
    g_ex = grads(expected, t, grad_out)
    assert set(g_op) == {"input", "offset", "mask", "weight"} | ({"bias"} if case.bias else set())
    for k in g_ex:
        assert_same(g_op[k], g_ex[k], atol, rtol, f"grad {k}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_torchvision(case):
    check_against(run_tv, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_reference(case):
    check_against(run_ref, case)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=lambda c: c.id)
def test_float32_matches_torchvision(case):
    check_against(run_tv, case, dtype=torch.float32, atol=1e-4, rtol=1e-4)


def test_far_outside_offsets_give_bias_only():
    """All samples more than a pixel outside the map: output is the bias, offset grads are 0."""
    case = Case(2, 4, 3, (5, 6), (3, 3), 1, 1, 1, 1, 2, 1.0, True)
    t = make_inputs(case)
    with torch.no_grad():
        sign = torch.where(torch.rand_like(t["offset"]) < 0.5, -1.0, 1.0)
        t["offset"].copy_(sign * (50 + torch.rand_like(t["offset"])))
    out = run_op(t, case)
    assert_same(out, t["bias"].view(1, -1, 1, 1).expand_as(out), 0, 0, "output")
    g = grads(out, t, torch.randn_like(out))
    for k in ("input", "offset", "mask", "weight"):
        assert torch.count_nonzero(g[k]) == 0, f"grad {k} should be zero"


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), 1e30, -1e30])
def test_extreme_offsets_sample_zero(value):
    """Offsets far beyond any int range must not overflow a floor-to-int index (no crash, no garbage)."""
    case = Case(2, 4, 3, (5, 6), (3, 3), 1, 1, 1, 1, 2, 1.0, True)
    t = make_inputs(case, dtype=torch.float32)
    with torch.no_grad():
        t["offset"].fill_(value)
    out = run_op(t, case)
    assert_same(out, t["bias"].detach().view(1, -1, 1, 1).expand_as(out), 0, 0, "output")
    for k, g in grads(out, t, torch.ones_like(out)).items():
        if k != "bias":
            assert torch.count_nonzero(g) == 0, f"grad {k} should be zero"


@pytest.mark.parametrize("where", ["offset", "mask"])
def test_nan_offset_or_mask_propagates_to_its_output_position_only(where):
    """A NaN offset or mask value gives NaN at its own output position (never a silent zero), and
    NaN gradients for that position's offsets and for the input."""
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 18, 6, 6, dtype=torch.float64) * 0.5
    mask = torch.rand(1, 9, 6, 6, dtype=torch.float64)
    if where == "offset":
        offset[0, 4, 2, 3] = float("nan")  # tap 2, dy, at output (2, 3)
    else:
        mask[0, 2, 2, 3] = float("nan")  # tap 2 at output (2, 3)
    offset.requires_grad_()
    out = modulated_deform_conv2d(x, offset, mask, w, padding=1)
    nan = torch.isnan(out)
    assert nan[0, :, 2, 3].all() and nan.sum() == out.shape[1]  # that position only
    out.sum().backward()
    assert torch.isnan(offset.grad[0, :, 2, 3]).any() and torch.isnan(x.grad).any()


def test_nan_feature_map_propagates():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    offset = torch.zeros(1, 2, 5, 5)
    out = modulated_deform_conv2d(x, offset, None, torch.ones(1, 1, 1, 1))
    nan = {tuple(i) for i in torch.isnan(out[0, 0]).nonzero().tolist()}
    # the sample at (2, 2) and those whose bilinear cell has (2, 2) as a zero-weight corner
    assert (2, 2) in nan and nan <= {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_mask_none_means_ones():
    case = CASES[1]
    t = make_inputs(case, requires_grad=False)
    out_none = run_op(dict(t, mask=None), case)
    t["mask"] = torch.ones_like(t["mask"])
    assert_same(out_none, run_op(t, case), 1e-12, 1e-12, "output")


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,dg",
    [(1, 0, 1, 1, 1), (2, 1, 1, 2, 1), ((1, 2), (2, 1), 2, 2, 4), (1, 2, (2, 1), 4, 2)],
)
def test_zero_offset_unit_mask_equals_conv2d(stride, padding, dilation, groups, dg):
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    w = torch.randn(4, 8 // groups, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    Ho, Wo = expected.shape[-2:]
    offset = torch.zeros(2, 2 * dg * 6, Ho, Wo, dtype=torch.float64)
    mask = torch.ones(2, dg * 6, Ho, Wo, dtype=torch.float64)
    out = modulated_deform_conv2d(x, offset, mask, w, b, stride, padding, dilation, groups, dg)
    assert_same(out, expected, 1e-10, 1e-10, "output")


def test_int_and_pair_arguments_agree():
    case = CASES[0]
    t = make_inputs(case, requires_grad=False)
    a = modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], 1, 1, 1)
    b = modulated_deform_conv2d(
        t["input"], t["offset"], t["mask"], t["weight"], t["bias"], (1, 1), (1, 1), (1, 1)
    )
    assert_same(a, b, 0, 0, "output")


def test_non_contiguous_inputs():
    case = CASES[1]
    t = make_inputs(case, requires_grad=False)
    nc = {}
    # input: every second column of a wider tensor; offset/mask/weight: channels-last style permuted views
    wide = torch.randn(*t["input"].shape[:-1], 2 * t["input"].shape[-1], dtype=torch.float64)
    wide[..., ::2] = t["input"]
    nc["input"] = wide[..., ::2]
    for k in ("offset", "mask", "weight"):
        nc[k] = t[k].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    bias_wide = torch.stack([t["bias"], t["bias"]], 1)
    nc["bias"] = bias_wide[:, 0]
    for k, v in nc.items():
        assert not v.is_contiguous(), k
        v.requires_grad_(True)
        t[k].requires_grad_(True)
    out_c = run_op(t, case)
    out_nc = run_op(nc, case)
    assert_same(out_nc, out_c, 1e-12, 1e-12, "output")
    grad_out = (
        torch.randn_like(out_c).transpose(2, 3).contiguous().transpose(2, 3)
    )  # non-contiguous too
    g_c = grads(out_c, t, grad_out.contiguous())
    g_nc = grads(out_nc, nc, grad_out)
    for k in g_c:
        assert_same(g_nc[k], g_c[k], 1e-12, 1e-12, f"grad {k}")


def test_autocast_cpu_computes_in_float32():
    """Under autocast a bfloat16 activation meets float32 parameters: the op runs in float32."""
    case = CASES[1]
    t = make_inputs(case, dtype=torch.float32)
    x16 = t["input"].detach().bfloat16().requires_grad_()
    args = (t["offset"], t["mask"], t["weight"], t["bias"])
    kw = dict(groups=case.groups, deformable_groups=case.dg, **conv_kwargs(case))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_deform_conv2d(x16, *args, **kw)
    assert out.dtype == torch.float32
    x32 = x16.detach().float().requires_grad_()
    expected = modulated_deform_conv2d(x32, *args, **kw)
    assert_same(out, expected, 1e-6, 1e-6, "output")
    g = torch.randn_like(out)
    (g16,) = torch.autograd.grad(out, (x16,), g)
    (g32,) = torch.autograd.grad(expected, (x32,), g)
    assert g16.dtype == torch.bfloat16
    assert_same(g16.float(), g32.bfloat16().float(), 0, 0, "grad input")


def test_batch_zero():
    case = Case(0, 4, 6, (8, 9), (3, 2), (2, 1), (1, 0), 1, 2, 4, 1.0, True)
    t = make_inputs(case)
    out = run_op(t, case)
    assert out.shape == (0, 6, 4, 8)
    assert out.dtype == torch.float64
    g = grads(out, t, torch.randn_like(out))
    for k, v in t.items():
        assert g[k].shape == v.shape, k
        assert torch.count_nonzero(g[k]) == 0, k


@pytest.mark.parametrize(
    "images_per_block",
    [None, 1, 5, 7 / 30, 1 / 30],
    ids=["default", "block1", "block5", "tile7", "tile1"],
)
def test_large_batch_matches_torchvision(images_per_block, monkeypatch):
    """33 images, run with 2 threads; the column buffer bound (DCNV2_MAX_COLUMN_ELEMENTS, read per
    call) forces blocks of 1 or 5 images (6 full blocks + a remainder of 3), or tiles of 7 output
    positions (4 full tiles + a remainder of 2 per image) or of a single position."""
    case = Case(33, 4, 4, (5, 6), (3, 3), 1, 1, 1, 2, 2, 1.5, True)
    if images_per_block is not None:
        per_image = case.cin * 9 * 5 * 6  # channels * taps * H_out * W_out
        monkeypatch.setenv("DCNV2_MAX_COLUMN_ELEMENTS", str(round(images_per_block * per_image)))
    torch.set_num_threads(2)
    check_against(run_tv, case)


def test_gradcheck_float64():
    case = Case(2, 4, 2, (4, 5), (3, 2), (1, 2), 1, (2, 1), 2, 2, 1.0, True)
    t = make_inputs(case)

    def f(x, o, m, w, b):
        return modulated_deform_conv2d(
            x, o, m, w, b, case.stride, case.padding, case.dilation, case.groups, case.dg
        )

    assert torch.autograd.gradcheck(f, (t["input"], t["offset"], t["mask"], t["weight"], t["bias"]))


def test_gradcheck_float64_no_mask_no_bias():
    case = Case(1, 2, 2, (4, 4), (2, 2), 1, 1, 1, 1, 1, 0.8, False)
    t = make_inputs(case)

    def f(x, o, w):
        return modulated_deform_conv2d(x, o, None, w, None, 1, 1, 1, 1, 1)

    assert torch.autograd.gradcheck(f, (t["input"], t["offset"], t["weight"]))


def test_gradcheck_float64_strided_offset_mask_views_against_reference():
    """Offset and mask as the Pack layer passes them: channel slices of one (N, 3 * dg * K, Ho, Wo)
    tensor (a batch stride that is not C * H * W). The op's gradients (float64 gradcheck) and its
    output and gradients against the reference on the same views."""
    g = torch.Generator().manual_seed(3)
    n, cin, cout, dg, k = 2, 4, 3, 2, 9
    x = torch.randn(n, cin, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    packed = torch.randn(n, 3 * dg * k, 5, 6, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=g, requires_grad=True)

    def split(p):
        offset, mask = p[:, : 2 * dg * k], p[:, 2 * dg * k :].sigmoid()
        return offset, mask

    offset_view = packed[:, : 2 * dg * k]
    assert not offset_view.is_contiguous() and offset_view.stride(0) == 3 * dg * k * 30

    def f(x, p, w, b):
        offset, mask = split(p)
        return modulated_deform_conv2d(x, offset, mask, w, b, 1, 1, 1, 1, dg)

    assert torch.autograd.gradcheck(f, (x, packed, w, b))
    out = f(x, packed, w, b)
    ref = mdconv2d_ref(x, *split(packed), w, b, 1, 1, 1, 1, dg)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (x, packed, w, b), grad)
    want = torch.autograd.grad(ref, (x, packed, w, b), grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_double_backward_is_a_clear_error():
    case = Case(1, 2, 2, (4, 4), (3, 3), 1, 1, 1, 1, 1, 0.8, True)
    t = make_inputs(case)
    out = modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], 1, 1)
    (grad_x,) = torch.autograd.grad(out.sum(), t["input"], create_graph=True)
    with pytest.raises(
        RuntimeError, match="modulated_deform_conv2d: double backward .* not supported"
    ):
        grad_x.sum().backward()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias):
    case = Case(2, 4, 2, (5, 4), (3, 2), (2, 1), (1, 0), 1, 2, 2, 1.0, bias)
    t = make_inputs(case, dtype=torch.float32)
    args = (t["input"], t["offset"], t["mask"], t["weight"], t["bias"], 2, 1, 1, 0, 1, 1, 2, 2)
    torch.library.opcheck(torch.ops.dcnv2.modulated_deform_conv2d.default, args)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
def test_module_matches_functional():
    m = ModulatedDeformConv2d(
        6, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, deformable_groups=3
    )
    assert m.weight.shape == (4, 3, 3, 2)
    assert m.bias.shape == (4,)
    assert ModulatedDeformConv2d(6, 4, 3, bias=False).bias is None
    x = torch.randn(2, 6, 9, 8)
    Ho, Wo = conv_out_size(9, 3, 2, 1, 1), conv_out_size(8, 2, 1, 1, 2)
    offset = torch.randn(2, 2 * 3 * 6, Ho, Wo)
    mask = torch.rand(2, 3 * 6, Ho, Wo)
    out = m(x, offset, mask)
    expected = modulated_deform_conv2d(x, offset, mask, m.weight, m.bias, (2, 1), 1, (1, 2), 2, 3)
    assert_same(out, expected, 0, 0, "output")


def _pack_reference(pack, x, dg, K):
    """What the Pack must compute, spelled out (docs/semantics.md, "The Pack")."""
    out = F.conv2d(
        x,
        pack.conv_offset.weight,
        pack.conv_offset.bias,
        pack.conv_offset.stride,
        pack.conv_offset.padding,
        pack.conv_offset.dilation,
    )
    offset, mask = out[:, : 2 * dg * K], torch.sigmoid(out[:, 2 * dg * K :])
    return tv_deform_conv2d(
        x, offset, pack.weight, pack.bias, pack.stride, pack.padding, pack.dilation, mask=mask
    )


def test_pack_structure_and_zero_init():
    pack = ModulatedDeformConv2dPack(
        6, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2, deformable_groups=3
    )
    co = pack.conv_offset
    assert isinstance(co, nn.Conv2d)
    assert co.weight.shape == (3 * 3 * 6, 6, 3, 2)
    assert co.bias is not None and co.bias.shape == (3 * 3 * 6,)
    assert pair(co.stride) == (2, 2) and pair(co.padding) == (1, 0) and pair(co.dilation) == (1, 2)
    assert co.groups == 1
    assert torch.count_nonzero(co.weight) == 0 and torch.count_nonzero(co.bias) == 0
    assert set(pack.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_pack_at_init_is_half_conv(bias):
    pack = ModulatedDeformConv2dPack(
        4, 6, 3, stride=(2, 1), padding=1, dilation=1, groups=2, deformable_groups=2, bias=bias
    ).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    expected = 0.5 * F.conv2d(x, pack.weight, None, (2, 1), 1, 1, 2)
    if bias:
        expected = expected + pack.bias.view(1, -1, 1, 1)  # the bias is not modulated
    assert_same(pack(x), expected, 1e-10, 1e-10, "output")


def test_pack_forward_splits_offset_and_mask():
    torch.manual_seed(1)
    pack = ModulatedDeformConv2dPack(
        4, 4, (3, 2), stride=1, padding=1, deformable_groups=2
    ).double()
    with torch.no_grad():
        pack.conv_offset.weight.normal_(0, 0.5)
        pack.conv_offset.bias.normal_(0, 0.5)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    out = pack(x)
    expected = _pack_reference(pack, x, 2, 6)
    assert_same(out, expected, 1e-10, 1e-8, "output")
    g_out = torch.randn_like(out)
    params = [x, pack.weight, pack.bias, pack.conv_offset.weight, pack.conv_offset.bias]
    for name, a, b in zip(
        ["x", "weight", "bias", "conv_offset.weight", "conv_offset.bias"],
        torch.autograd.grad(out, params, g_out),
        torch.autograd.grad(expected, params, g_out),
    ):
        assert_same(a, b, 1e-9, 1e-7, f"grad {name}")


def test_pack_nan_input_propagates():
    """A NaN pixel reaches the offset predictor and the samples: NaN out, never a silent 0."""
    pack = ModulatedDeformConv2dPack(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    nan = torch.isnan(pack(x))
    assert nan[0, :, 3, 3].all()  # the centre tap of this position samples the NaN
    assert not nan[0, :, 0, 0].any()  # far enough away, the NaN is not sampled


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = ModulatedDeformConv2dPack(4, 4, 3, padding=1, deformable_groups=2, bias=False)


def test_pack_loads_current_keys():
    src, dst = _Parent(), _Parent()
    with torch.no_grad():
        src.conv2.conv_offset.weight.normal_()
        src.conv2.conv_offset.bias.normal_()
    dst.load_state_dict(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


class _GrandParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Parent()


def _legacy_state_dict(prefix):
    return {
        f"{prefix}conv2.weight": torch.randn(4, 4, 3, 3),
        f"{prefix}conv2_offset.weight": torch.randn(2 * 3 * 9, 4, 3, 3),
        f"{prefix}conv2_offset.bias": torch.randn(2 * 3 * 9),
    }  # a plain dict: no _metadata, i.e. no version


@pytest.mark.parametrize("nested", [False, True], ids=["child", "grandchild"])
def test_pack_loads_legacy_sibling_offset_keys(nested):
    """Legacy checkpoints store the offset conv as `<name>_offset.*` next to `<name>.weight` (docs/semantics.md, "mdconv").

    nn.Module.load_state_dict hands a child only the keys under its own prefix, so the rename is done
    on the root's state dict by `upgrade_legacy_offset_keys` before loading.
    """
    root = _GrandParent() if nested else _Parent()
    parent = root.block if nested else root
    prefix = "block." if nested else ""
    sd = _legacy_state_dict(prefix)
    expected = dict(sd)
    upgrade_legacy_offset_keys(root, sd)
    assert set(sd) == {
        f"{prefix}conv2.weight",
        f"{prefix}conv2.conv_offset.weight",
        f"{prefix}conv2.conv_offset.bias",
    }
    result = root.load_state_dict(sd)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(parent.conv2.weight, expected[f"{prefix}conv2.weight"])
    assert torch.equal(parent.conv2.conv_offset.weight, expected[f"{prefix}conv2_offset.weight"])
    assert torch.equal(parent.conv2.conv_offset.bias, expected[f"{prefix}conv2_offset.bias"])


def test_upgrade_legacy_offset_keys_leaves_current_keys_alone():
    parent = _Parent()
    sd = {k: v.clone() for k, v in parent.state_dict().items()}
    sd["conv2_offset.weight"] = torch.ones(
        2 * 3 * 9, 4, 3, 3
    )  # stale legacy copy next to the current key
    upgrade_legacy_offset_keys(parent, sd)
    assert torch.equal(sd["conv2.conv_offset.weight"], parent.conv2.conv_offset.weight)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.dcn = ModulatedDeformConv2dPack(
            4, 6, (3, 2), stride=(2, 1), padding=1, deformable_groups=2
        )
        with torch.no_grad():
            self.dcn.conv_offset.weight.normal_(0, 0.3)
            self.dcn.conv_offset.bias.normal_(0, 0.3)

    def forward(self, x):
        return torch.relu(self.dcn(x)) * 2.0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    net = _Net()
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    outs, gs = [], []
    for fn in (net, compiled):
        out = fn(x)
        g_out = torch.ones_like(out)
        outs.append(out)
        gs.append(torch.autograd.grad(out, [x] + list(net.parameters()), g_out))
    assert_same(outs[1], outs[0], 1e-5, 1e-5, "output")
    names = ["x"] + [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, gs[1], gs[0]):
        assert_same(a, b, 1e-4, 1e-4, f"grad {name}")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_avx2_cpu_loops_chosen_where_the_cpu_has_avx2():
    """A Linux x86-64 build carries the AVX2+FMA loops; they must be the ones in use on such a CPU
    (a build that dropped modulated_deform_conv2d_kernel_avx2.cpp would still pass every value test)."""
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip(
            "no /proc/cpuinfo with avx2 and fma here: the portable loops are the right choice"
        )
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("ATEN_CPU_CAPABILITY=default selects the portable loops")
    assert torch.ops.dcnv2._cpu_kernels() == "avx2"


def test_portable_cpu_loops_pass_the_op_tests():
    """The CPU loops are compiled twice, portable and AVX2+FMA (csrc/ops/cpu/), and an AVX2 machine runs
    the AVX2 instance; so the op tests run again in a process whose PyTorch CPU capability is DEFAULT,
    which selects the portable loops."""
    if torch.ops.dcnv2._cpu_kernels() != "avx2":
        pytest.skip(
            "this process already runs the portable CPU loops: no AVX2 instance in use here"
        )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    probe = "import torch, projects_dcnv2.layers; print(torch.ops.dcnv2._cpu_kernels())"
    chosen = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert chosen.stdout.strip() == "generic"
    files = [os.path.join(tests, f) for f in ("test_mdconv.py", "test_determinism.py")]
    # torch.compile's inductor cannot build its own C++ under ATEN_CPU_CAPABILITY=default; the compile
    # tests check the op's registration, which does not depend on the loops
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *files,
            "-k",
            "not compile and not portable_cpu_loops",
        ],
        env=env,
        cwd=os.path.dirname(tests),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
