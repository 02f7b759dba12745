"""Tests of deform_roi_pool (CPU) and its modules against torchvision's roi_align and a naive reference.

The offset gradient is compared with the exact derivative of the forward (what gradcheck checks).
MMCV's kernel evaluates it at unclamped coordinates, which differs only for samples in the one-pixel
border band (docs/semantics.md, "Where we differ from MMCV");
`reference_ops.deform_roi_pool_ref(offset_grad="mmcv")` models that.
"""

from typing import NamedTuple, Tuple, Union

import pytest
import torch
import torch.nn as nn
from torchvision.ops import roi_align

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)
from projects_dcnv2.layers import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
)

from reference_ops import assert_same, deform_roi_pool_ref, pair

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

Pair = Union[int, Tuple[int, int]]

# The offset-gradient convention required at the border (see the module docstring).
OFFSET_GRAD = "exact"


def make_rois(
    kind: str,
    num: int,
    n_img: int,
    feat_hw: Tuple[int, int],
    spatial_scale: float,
    dtype=torch.float64,
):
    """Random (num, 5) RoIs in input-image pixels for a feature map of size feat_hw.

    kind: "inside" (well inside the map), "partial" (crossing the border), "tiny" (< 1 feature pixel),
    "huge" (2-4 times the map), "mixed" (all four, plus a zero-width and a zero-height RoI).
    """
    H, W = feat_hw
    size = torch.tensor([W, H], dtype=dtype)
    if kind == "mixed":
        kinds = ["inside", "partial", "tiny", "huge"]
        parts = [
            make_rois(k, (num + i) // 4, n_img, feat_hw, spatial_scale, dtype)
            for i, k in enumerate(kinds)
        ]
        odd = torch.tensor(
            [
                [0, 0.2 * W, 0.6 * H, 0.7 * W, 0.6 * H],  # zero height
                [n_img - 1, 0.3 * W, 0.2 * H, 0.3 * W, 0.8 * H],
            ],
            dtype=dtype,
        )  # zero width
        odd[:, 1:] /= spatial_scale
        return torch.cat(parts + [odd], 0)
    if kind == "inside":
        wh = (0.2 + 0.5 * torch.rand(num, 2, dtype=dtype)) * size
        ctr = wh / 2 + 0.05 * size + torch.rand(num, 2, dtype=dtype) * (0.9 * size - wh)
    elif kind == "partial":
        wh = (0.3 + 0.6 * torch.rand(num, 2, dtype=dtype)) * size
        side = torch.where(torch.rand(num, 2) < 0.5, 0.0, 1.0).to(dtype)
        ctr = side * size + (torch.rand(num, 2, dtype=dtype) - 0.5) * wh
    elif kind == "tiny":
        wh = 0.05 + 0.85 * torch.rand(num, 2, dtype=dtype)
        ctr = torch.rand(num, 2, dtype=dtype) * size
    elif kind == "huge":
        wh = (2 + 2 * torch.rand(num, 2, dtype=dtype)) * size
        ctr = (torch.rand(num, 2, dtype=dtype) - 0.5) * size + size / 2
    else:
        raise ValueError(kind)
    b = torch.randint(0, n_img, (num, 1)).to(dtype)
    return torch.cat([b, (ctr - wh / 2) / spatial_scale, (ctr + wh / 2) / spatial_scale], 1)


class Case(NamedTuple):
    n: int
    c: int
    hw: Tuple[int, int]
    output_size: Pair
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    rois: str
    num_rois: int

    @property
    def id(self):
        return (
            f"n{self.n}-c{self.c}-hw{self.hw[0]}x{self.hw[1]}-P{self.output_size}-s{self.spatial_scale}"
            f"-sr{self.sampling_ratio}-g{self.gamma}-{self.rois}{self.num_rois}"
        ).replace(" ", "")


CASES = [
    Case(1, 3, (10, 12), 7, 1.0, 0, 0.1, "inside", 4),
    Case(3, 2, (9, 11), (3, 5), 0.25, 0, 0.1, "partial", 6),
    Case(2, 3, (8, 8), 4, 0.25, 2, 0.3, "tiny", 5),
    Case(2, 2, (7, 9), (5, 3), 0.5, 0, 0.3, "huge", 3),
    Case(3, 2, (12, 10), (2, 3), 0.25, 2, 0.1, "mixed", 8),
    Case(2, 2, (6, 13), 7, 1.0, 2, 0.3, "partial", 4),
]


def make_inputs(case: Case, dtype=torch.float64, offset=True, requires_grad=True):
    H, W = case.hw
    Ph, Pw = pair(case.output_size)
    x = torch.randn(case.n, case.c, H, W, dtype=dtype, requires_grad=requires_grad)
    rois = make_rois(case.rois, case.num_rois, case.n, (H, W), case.spatial_scale, dtype)
    off = None
    if offset:
        off = (2 * torch.rand(rois.shape[0], 2, Ph, Pw, dtype=dtype) - 1).requires_grad_(
            requires_grad
        )
    return x, rois, off


def run_op(case: Case, x, rois, off):
    return deform_roi_pool(
        x, rois, off, case.output_size, case.spatial_scale, case.sampling_ratio, case.gamma
    )


def run_ref(case: Case, x, rois, off, offset_grad=OFFSET_GRAD):
    args = (case.output_size, case.spatial_scale, case.sampling_ratio, case.gamma, offset_grad)
    return deform_roi_pool_ref(x, rois, off, *args)


def assert_grads_same(out, expected, inputs, names, atol, rtol):
    """d out / d inputs equals d expected / d inputs, for one random output gradient."""
    g = torch.randn_like(out)
    grads = zip(
        names, torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)
    )
    for name, a, b in grads:
        assert_same(a, b, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_reference(case):
    x, rois, off = make_inputs(case)
    out = run_op(case, x, rois, off)
    expected = run_ref(case, x, rois, off)
    Ph, Pw = pair(case.output_size)
    assert out.shape == (rois.shape[0], case.c, Ph, Pw)
    assert_same(out, expected, 1e-10, 1e-8, "output")
    g = torch.randn_like(expected)
    gx, goff = torch.autograd.grad(out, (x, off), g)
    ex, eoff = torch.autograd.grad(expected, (x, off), g)
    assert_same(gx, ex, 1e-10, 1e-8, "grad input")
    assert_same(goff, eoff, 1e-9, 1e-7, "grad offset")


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_inverted_rois_match_reference(sampling_ratio):
    """x2 < x1 or y2 < y1: no minimum size (docs/semantics.md, "mdpool"); an adaptive grid has no samples (0)."""
    x = torch.randn(2, 2, 8, 9, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 30.0, 4.0, 6.0, 20.0],
            [1, 5.0, 28.0, 25.0, 3.0],
            [1, 30.0, 27.0, 2.0, 3.0],
            [0, 10.0, 12.0, 10.5, 13.2],
        ],
        dtype=torch.float64,
    )  # the last is a normal tiny RoI
    off = (torch.rand(4, 2, 3, 2, dtype=torch.float64) - 0.5).requires_grad_()
    out = deform_roi_pool(x, rois, off, (3, 2), 0.25, sampling_ratio, 0.1)
    expected = deform_roi_pool_ref(x, rois, off, (3, 2), 0.25, sampling_ratio, 0.1, OFFSET_GRAD)
    assert_same(out, expected, 1e-10, 1e-8, "output")
    if sampling_ratio == 0:
        assert torch.count_nonzero(out[:3]) == 0
    assert_grads_same(out, expected, (x, off), ["input", "offset"], 1e-10, 1e-8)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c.id)
def test_float32_matches_reference(case):
    x, rois, off = make_inputs(case, dtype=torch.float32)
    out = run_op(case, x, rois, off)
    expected = run_ref(case, x.double(), rois.double(), off.double()).float()
    assert_same(out, expected, 1e-4, 1e-4, "output")
    g = torch.randn_like(out)
    gx, goff = torch.autograd.grad(out, (x, off), g)
    xd, offd = x.detach().double().requires_grad_(), off.detach().double().requires_grad_()
    ex, eoff = torch.autograd.grad(run_ref(case, xd, rois.double(), offd), (xd, offd), g.double())
    assert_same(gx, ex.float(), 1e-4, 1e-4, "grad input")
    assert_same(goff, eoff.float(), 1e-3, 1e-3, "grad offset")


def test_many_rois_two_threads_match_reference():
    """Parallel loops over outputs, channels and bins (scatter-adds into input and offset gradients)."""
    torch.set_num_threads(2)
    case = Case(3, 16, (10, 12), 3, 0.5, 0, 0.1, "mixed", 40)
    x, rois, off = make_inputs(case)
    out = run_op(case, x, rois, off)
    expected = run_ref(case, x, rois, off)
    assert_same(out, expected, 1e-10, 1e-8, "output")
    assert_grads_same(out, expected, (x, off), ["input", "offset"], 1e-10, 1e-8)


def test_no_grad_for_rois():
    case = CASES[0]
    x, rois, off = make_inputs(case)
    rois.requires_grad_(True)
    out = run_op(case, x, rois, off)
    (grx,) = torch.autograd.grad(out.sum(), (rois,), allow_unused=True)
    assert grx is None or torch.count_nonzero(grx) == 0


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("use_none", [True, False], ids=["offset_none", "offset_zero"])
def test_zero_offset_equals_roi_align_aligned(sampling_ratio, use_none):
    case = Case(3, 3, (11, 13), (7, 5), 0.25, sampling_ratio, 0.1, "mixed", 12)
    x, rois, off = make_inputs(case, offset=not use_none)
    if off is not None:
        off = torch.zeros_like(off)
    out = run_op(case, x, rois, off)
    expected = roi_align(
        x, rois, case.output_size, case.spatial_scale, sampling_ratio, aligned=True
    )
    assert_same(out, expected, 1e-12, 1e-10, "output")
    g = torch.randn_like(out)
    assert_same(
        torch.autograd.grad(out, x, g)[0],
        torch.autograd.grad(expected, x, g)[0],
        1e-12,
        1e-10,
        "grad input",
    )


def test_constant_offset_shifts_the_roi():
    """A constant (dx, dy) moves the whole RoI by gamma * (dx * roi_w, dy * roi_h); channel 0 is x."""
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    rois = make_rois("inside", 5, 2, (10, 12), 0.5)
    gamma, d = 0.3, torch.tensor([0.37, -0.61], dtype=torch.float64)
    off = d.view(1, 2, 1, 1).expand(5, 2, 3, 4)
    out = deform_roi_pool(x, rois, off, (3, 4), 0.5, 2, gamma)
    shifted = rois.clone()
    shifted[:, [1, 3]] += (gamma * d[0] * (rois[:, 3] - rois[:, 1])).unsqueeze(1)
    shifted[:, [2, 4]] += (gamma * d[1] * (rois[:, 4] - rois[:, 2])).unsqueeze(1)
    expected = roi_align(x, shifted, (3, 4), 0.5, 2, aligned=True)
    assert_same(out, expected, 1e-10, 1e-10, "output")


def test_autocast_cpu_computes_in_float32():
    case = CASES[4]
    x, rois, off = make_inputs(case, dtype=torch.float32, requires_grad=False)
    x16 = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_op(case, x16, rois, off)
    assert out.dtype == torch.float32
    x32 = x16.detach().float().requires_grad_()
    expected = run_op(case, x32, rois, off)
    assert_same(out, expected, 1e-6, 1e-6, "output")
    g = torch.randn_like(out)
    (g16,) = torch.autograd.grad(out, (x16,), g)
    (g32,) = torch.autograd.grad(expected, (x32,), g)
    assert g16.dtype == torch.bfloat16
    assert_same(g16.float(), g32.bfloat16().float(), 0, 0, "grad input")


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), 1e30, -1e30])
def test_extreme_offsets_sample_zero(value):
    """Offsets far beyond any int range must not overflow a floor-to-int index (no crash, no garbage)."""
    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 10.0, 12.0], [1, 3.0, 1.0, 7.0, 9.5]])
    off = torch.full((2, 2, 2, 3), value, requires_grad=True)
    out = deform_roi_pool(x, rois, off, (2, 3), 0.5)
    assert torch.count_nonzero(out) == 0
    for name, g in zip(["input", "offset"], torch.autograd.grad(out.sum(), (x, off))):
        assert torch.count_nonzero(g) == 0, f"grad {name} should be zero"


def test_nan_offset_propagates_to_its_bin_only():
    x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    offset[0, 0, 1, 2] = float("nan")
    nan = torch.isnan(deform_roi_pool(x, rois, offset, 3))
    assert nan[0, :, 1, 2].all() and nan.sum() == nan.shape[1]


def test_nan_feature_map_propagates_to_the_bins_sampling_it():
    """One sample per bin, at 0.5 + 2 * bin over a 10 x 10 map: only bin (2, 2) reads pixel (5, 5)."""
    x = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    x[0, 0, 5, 5] = float("nan")
    rois = torch.tensor([[0, 0.0, 0, 10, 10], [0, 0.0, 0, 3, 3]], dtype=torch.float64)
    nan = torch.isnan(deform_roi_pool(x, rois, None, 5, 1.0, 1))
    assert nan[0, 0, 2, 2] and nan.sum() == 1


def test_rois_far_outside_the_image_pool_zeros():
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 1000.0, 1000, 1030, 1020],  # beyond the bottom-right corner
            [1, -500.0, -400, -470, -380],  # beyond the top-left corner
            [0, 5000.0, -5000, 5040, -4970],
            [1, -30.0, 4, 10, 18],  # straddling the left border: partly inside
        ],
        dtype=torch.float64,
    )
    offset = ((torch.rand(4, 2, 3, 3, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    args = (rois, offset, 3, 0.5, 2, 0.1)
    out = deform_roi_pool(x, *args)
    assert_same(out, deform_roi_pool_ref(x, *args), 1e-10, 1e-10, "output")
    assert torch.count_nonzero(out[:3]) == 0 and torch.count_nonzero(out[3]) > 0
    grad_x, grad_offset = torch.autograd.grad(out[:3].sum(), (x, offset))
    assert torch.count_nonzero(grad_x) == 0 and torch.count_nonzero(grad_offset) == 0


def test_int_and_pair_output_size_agree():
    case = CASES[0]
    x, rois, off = make_inputs(case, requires_grad=False)
    assert_same(
        deform_roi_pool(x, rois, off, 7), deform_roi_pool(x, rois, off, (7, 7)), 0, 0, "output"
    )


def test_non_contiguous_inputs():
    case = CASES[4]
    x, rois, off = make_inputs(case, requires_grad=False)
    x_nc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    rois_nc = torch.stack([rois, rois], 2)[:, :, 0]
    off_nc = off.transpose(2, 3).contiguous().transpose(2, 3)
    for t in (x_nc, rois_nc, off_nc):
        assert not t.is_contiguous()
    for t in (x, off, x_nc, off_nc):
        t.requires_grad_(True)
    out = run_op(case, x, rois, off)
    out_nc = run_op(case, x_nc, rois_nc, off_nc)
    assert_same(out_nc, out, 1e-12, 1e-12, "output")
    g = torch.randn_like(out)
    g_nc = (
        g.transpose(2, 3).contiguous().transpose(2, 3) if g.shape[2] > 1 and g.shape[3] > 1 else g
    )
    for name, a, b in zip(
        ["input", "offset"],
        torch.autograd.grad(out_nc, (x_nc, off_nc), g_nc),
        torch.autograd.grad(out, (x, off), g),
    ):
        assert_same(a, b, 1e-12, 1e-12, f"grad {name}")


@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
def test_zero_rois(with_offset):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.zeros(0, 5, dtype=torch.float64)
    off = torch.zeros(0, 2, 3, 2, dtype=torch.float64, requires_grad=True) if with_offset else None
    out = deform_roi_pool(x, rois, off, (3, 2), 0.5)
    assert out.shape == (0, 3, 3, 2) and out.dtype == torch.float64
    inputs = (x, off) if with_offset else (x,)
    for t, g in zip(inputs, torch.autograd.grad(out.sum(), inputs)):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0


def test_empty_batch_and_zero_rois():
    x = torch.randn(0, 3, 6, 7, requires_grad=True)
    out = deform_roi_pool(x, torch.zeros(0, 5), None, 2)
    assert out.shape == (0, 3, 2, 2)
    (g,) = torch.autograd.grad(out.sum(), (x,))
    assert g.shape == x.shape


def _interior_case():
    """RoIs whose samples all stay in (0, H-1) x (0, W-1): every offset-gradient convention agrees."""
    x = torch.randn(2, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 8.3, 8.1, 22.9, 24.2], [1, 12.7, 6.4, 27.1, 21.9], [0, 9.9, 10.2, 11.3, 11.0]],
        dtype=torch.float64,
    )  # spatial_scale 0.25 -> roughly [1.6, 6.5] in feature pixels
    off = ((torch.rand(3, 2, 2, 3, dtype=torch.float64) - 0.5) * 0.4).requires_grad_()
    return x, rois, off


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_interior_offset_grad_matches_both_conventions(sampling_ratio):
    x, rois, off = _interior_case()
    out = deform_roi_pool(x, rois, off, (2, 3), 0.25, sampling_ratio, 0.3)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, off), g)
    for mode in ("exact", "mmcv"):
        ref = deform_roi_pool_ref(x, rois, off, (2, 3), 0.25, sampling_ratio, 0.3, offset_grad=mode)
        exp = torch.autograd.grad(ref, (x, off), g)
        assert_same(got[0], exp[0], 1e-10, 1e-8, f"grad input ({mode})")
        assert_same(got[1], exp[1], 1e-10, 1e-8, f"grad offset ({mode})")


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck_float64(sampling_ratio):
    x, rois, off = _interior_case()

    def f(inp, o):
        return deform_roi_pool(inp, rois, o, (2, 3), 0.25, sampling_ratio, 0.3)

    assert torch.autograd.gradcheck(f, (x, off))


def test_gradcheck_float64_border_rois():
    """RoIs crossing the border: the offset gradient must be the derivative of the forward."""
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, -9.0, -7.0, 13.0, 10.0], [0, 15.0, 12.0, 40.0, 33.0]], dtype=torch.float64
    )
    off = ((torch.rand(2, 2, 2, 2, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()

    def f(inp, o):
        return deform_roi_pool(inp, rois, o, 2, 0.5, 2, 0.1)

    assert torch.autograd.gradcheck(f, (x, off))


@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
def test_opcheck(with_offset):
    case = CASES[4]
    x, rois, off = make_inputs(case, dtype=torch.float32)
    Ph, Pw = pair(case.output_size)
    args = (
        x,
        rois,
        off if with_offset else None,
        Ph,
        Pw,
        case.spatial_scale,
        case.sampling_ratio,
        case.gamma,
    )
    torch.library.opcheck(torch.ops.dcnv2.deform_roi_pool.default, args)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
def test_module_matches_functional():
    case = CASES[1]
    m = DeformRoIPool(case.output_size, case.spatial_scale, case.sampling_ratio, case.gamma)
    x, rois, off = make_inputs(case, requires_grad=False)
    assert_same(m(x, rois, off), run_op(case, x, rois, off), 0, 0, "output")
    assert_same(m(x, rois), run_op(case, x, rois, None), 0, 0, "output (no offset)")


def test_deform_pack_keys_and_zero_init():
    pack = DeformRoIPoolPack(
        output_size=3, output_channels=4, deform_fc_channels=16, spatial_scale=0.5
    )
    sd = pack.state_dict()
    assert set(sd) == {f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert sd["offset_fc.0.weight"].shape == (16, 3 * 3 * 4)
    assert sd["offset_fc.2.weight"].shape == (16, 16)
    assert sd["offset_fc.4.weight"].shape == (3 * 3 * 2, 16)
    assert isinstance(pack.offset_fc[1], nn.ReLU) and isinstance(pack.offset_fc[3], nn.ReLU)
    assert (
        torch.count_nonzero(sd["offset_fc.4.weight"]) == 0
        and torch.count_nonzero(sd["offset_fc.4.bias"]) == 0
    )
    x = torch.randn(2, 4, 8, 9)
    rois = make_rois("mixed", 8, 2, (8, 9), 0.5, torch.float32)
    assert_same(
        pack(x, rois), roi_align(x, rois, 3, 0.5, 0, aligned=True), 1e-5, 1e-5, "output at init"
    )


def test_modulated_pack_keys_and_zero_init():
    pack = ModulatedDeformRoIPoolPack(
        output_size=(3, 3),
        output_channels=4,
        deform_fc_channels=16,
        spatial_scale=0.5,
        sampling_ratio=2,
    )
    sd = pack.state_dict()
    expected_keys = {f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    expected_keys |= {f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(sd) == expected_keys
    assert sd["mask_fc.0.weight"].shape == (16, 3 * 3 * 4)
    assert sd["mask_fc.2.weight"].shape == (3 * 3, 16)
    assert isinstance(pack.mask_fc[1], nn.ReLU) and isinstance(pack.mask_fc[3], nn.Sigmoid)
    for k in ("offset_fc.4.weight", "offset_fc.4.bias", "mask_fc.2.weight", "mask_fc.2.bias"):
        assert torch.count_nonzero(sd[k]) == 0, k
    x = torch.randn(2, 4, 8, 9)
    rois = make_rois("mixed", 8, 2, (8, 9), 0.5, torch.float32)
    assert_same(
        pack(x, rois),
        0.5 * roi_align(x, rois, 3, 0.5, 2, aligned=True),
        1e-5,
        1e-5,
        "output at init",
    )


def _randomise(module, std=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def _two_pass_reference(pack, x, rois, P, scale, sr, gamma, modulated):
    """The two passes of docs/semantics.md ("Deformable RoI pooling") spelled out with the reference op."""
    feat = deform_roi_pool_ref(x, rois, None, P, scale, sr, gamma)
    flat = feat.flatten(1)
    offset = pack.offset_fc(flat).view(rois.shape[0], 2, *pair(P))
    out = deform_roi_pool_ref(x, rois, offset, P, scale, sr, gamma, OFFSET_GRAD)
    if modulated:
        out = out * pack.mask_fc(flat).view(rois.shape[0], 1, *pair(P))
    return out


@pytest.mark.parametrize(
    "modulated", [False, True], ids=["DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"]
)
def test_pack_forward_two_pass(modulated):
    cls = ModulatedDeformRoIPoolPack if modulated else DeformRoIPoolPack
    P, scale, sr, gamma = (3, 2), 0.25, 0, 0.3
    pack = cls(
        output_size=P,
        output_channels=3,
        deform_fc_channels=8,
        spatial_scale=scale,
        sampling_ratio=sr,
        gamma=gamma,
    ).double()
    _randomise(pack, 0.3)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    rois = make_rois("inside", 5, 2, (9, 8), scale)
    out = pack(x, rois)
    expected = _two_pass_reference(pack, x, rois, P, scale, sr, gamma, modulated)
    assert_same(out, expected, 1e-10, 1e-8, "output")
    names = ["input"] + [n for n, _ in pack.named_parameters()]
    assert_grads_same(out, expected, [x, *pack.parameters()], names, 1e-9, 1e-7)


def test_compile_fullgraph_modulated_pack_matches_eager():
    torch._dynamo.reset()
    pack = ModulatedDeformRoIPoolPack(
        output_size=3, output_channels=4, deform_fc_channels=8, spatial_scale=0.5
    )
    _randomise(pack, 0.2)
    x = torch.randn(2, 4, 8, 9, requires_grad=True)
    rois = make_rois("mixed", 8, 2, (8, 9), 0.5, torch.float32)
    compiled = torch.compile(pack, backend="aot_eager", fullgraph=True)
    outs, gs = [], []
    params = [x] + list(pack.parameters())
    for fn in (pack, compiled):
        out = fn(x, rois)
        outs.append(out)
        gs.append(torch.autograd.grad(out, params, torch.ones_like(out)))
    assert_same(outs[1], outs[0], 1e-5, 1e-5, "output")
    names = ["input"] + [n for n, _ in pack.named_parameters()]
    for name, a, b in zip(names, gs[1], gs[0]):
        assert_same(a, b, 1e-4, 1e-4, f"grad {name}")
