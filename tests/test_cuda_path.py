"""The CUDA path (kernels, launchers, the column driver, the pooling driver) under one matrix, on every
machine: through the host emulation of the same .cu sources (``torch.ops.dcnv2._emulated_cuda_*``, CPU
tensors, csrc/ops/emulated_cuda/, built by make setup) always, and on the device whenever a GPU is
present.

References: the CPU ops in float64 (their own driver and loops), the pure-PyTorch reference
(tests/reference_ops.py), and on a GPU also torchvision's CUDA ``deform_conv2d``.

Bounds are per element, in units of the dtype's epsilon relative to the sum of |terms| that make the
element (S): the reference run on |input|, |weight|, |grad_output| (offsets and masks as they are)
gives S for outputs and for input, weight and mask gradients; an offset gradient's terms carry the
bilinear rule's derivative weights (-hx, -lx, hx, lx), whose |.|-sum over the corners is twice the
bilinear value at the cell's middle row (column), so S there is 2 * mask * the mask gradient on |.|
inputs sampled at floor(y) + 1/2 (floor(x) + 1/2). For the pool's offset gradient S is bounded by
2 * gamma * RoI size * sum_c |grad_output| * max |input_c|.
"""

import math

import pytest
import torch
import torchvision

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)
from projects_dcnv2.layers import modulated_deform_conv2d

from reference_ops import deform_roi_pool_ref, mdconv2d_ref

OPS = torch.ops.dcnv2
HAS_CUDA = torch.cuda.is_available() and projects_dcnv2.layers.WITH_CUDA
HAS_EMULATION = hasattr(OPS, "_emulated_cuda_modulated_deform_conv2d")
needs_emulation = pytest.mark.skipif(
    not HAS_EMULATION,
    reason="this build of the extension has no _emulated_cuda_* ops (host-run CUDA kernels): "
    "rebuild with DCNV2_BUILD_EMULATED_CUDA=1, as make setup does",
)


class Backend:
    """The four CUDA-path ops of one back-end: the emulated kernels on CPU tensors, or the device."""

    def __init__(self, name, device, prefix, backward_prefix):
        self.name, self.device = name, device
        self.conv = getattr(OPS, prefix + "modulated_deform_conv2d")
        self.conv_backward = getattr(OPS, backward_prefix + "modulated_deform_conv2d_backward")
        self.pool = getattr(OPS, prefix + "deform_roi_pool")
        self.pool_backward = getattr(OPS, backward_prefix + "deform_roi_pool_backward")


BACKENDS = {
    "emulated": lambda: Backend("emulated", "cpu", "_emulated_cuda_", "_emulated_cuda_"),
    "cuda": lambda: Backend("cuda", "cuda", "", "_"),
}
BACKEND_PARAMS = [
    pytest.param("emulated", id="emulated", marks=needs_emulation),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: device run skipped"),
    ),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float64", "float32", "float16", "bfloat16"]
# allowed error, in units of finfo(dtype).eps, relative to S + |reference|
UNITS = {torch.float64: 256, torch.float32: 256, torch.float16: 4, torch.bfloat16: 4}


def assert_within(actual, expected, scale, dtype, what):
    """|actual - expected| <= UNITS * eps * (scale + |expected|) per element; NaNs must coincide."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e, s = (
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        scale.detach().cpu().double(),
    )
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan), (
        f"{what}: NaN at {int(torch.isnan(a).sum())} elements, expected {int(nan.sum())}"
    )
    a, e, s = a[~nan], e[~nan], s[~nan]
    assert torch.isfinite(a).all(), f"{what}: non-finite values where the reference is finite"
    bound = UNITS[dtype] * torch.finfo(dtype).eps * (s.abs() + e.abs()) + 1e-300
    err = (a - e).abs()
    worst = int(torch.argmax(err / bound)) if err.numel() else 0
    assert (err <= bound).all(), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements out of bounds; worst: got {a[worst].item():.6g}, "
        f"expected {e[worst].item():.6g}, bound {bound[worst].item():.3g} ({UNITS[dtype]} eps of S + |ref|)"
    )


# ------------------------------------------------------------------------------------------------
# modulated_deform_conv2d
# ------------------------------------------------------------------------------------------------
# n, c_in, c_out, (H, W), (kh, kw), stride, padding, dilation, groups, deformable groups, offsets
CONV_CASES = {
    "basic": (2, 4, 6, (9, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "inside"),
    "batch1": (1, 4, 4, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, "inside"),
    "awkward": (3, 6, 4, (10, 7), (3, 2), (2, 1), (1, 0), (2, 2), 2, 3, "inside"),
    "batch33_far": (33, 3, 3, (5, 6), (3, 3), (2, 2), (2, 2), (1, 1), 1, 3, "far"),
    "nan_and_1e4": (2, 4, 2, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, "nonfinite"),
}


def conv_inputs(case, dtype):
    """float64 tensors whose values are exactly representable in `dtype` (both sides see the same)."""
    n, cin, cout, (H, W), (kh, kw), s, p, d, groups, dg, mode = CONV_CASES[case]
    Ho = (H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    K = kh * kw
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    x = torch.randn(n, cin, H, W, generator=g)
    # inside: offsets within a pixel or two, so that most samples land inside the map
    offset = torch.randn(n, 2 * dg * K, Ho, Wo, generator=g) * (20.0 if mode == "far" else 1.5)
    if mode == "nonfinite":
        offset.view(-1)[::7] = 1e4
        offset.view(-1)[3::29] = float("nan")
    mask = torch.rand(n, dg * K, Ho, Wo, generator=g)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=g) / math.sqrt(cin // groups * K)
    bias = torch.randn(cout, generator=g)
    grad = torch.randn(n, cout, Ho, Wo, generator=g)
    ts = [t.to(dtype).double() for t in (x, offset, mask, weight, bias, grad)]
    params = (*s, *p, *d, groups, dg)
    return ts, params


def conv_reference(ts, params):
    """CPU op in float64: output and the five gradients, plus their S (see the module docstring)."""
    x, offset, mask, weight, bias, grad = ts
    out = OPS.modulated_deform_conv2d(x, offset, mask, weight, bias, *params)
    grads = OPS._modulated_deform_conv2d_backward(grad, x, offset, mask, weight, bias, *params)
    ax, aw, ab, ag = x.abs(), weight.abs(), bias.abs(), grad.abs()
    s_out = OPS.modulated_deform_conv2d(ax, offset, mask, aw, ab, *params)
    s_grads = list(OPS._modulated_deform_conv2d_backward(ag, ax, offset, mask, aw, ab, *params))
    # offset gradient: |wy|-sums are 2 * the bilinear value at floor(y) + 1/2 (and likewise for x)
    o = offset.view(offset.shape[0], -1, 2, *offset.shape[2:])
    s_off = torch.empty_like(o)
    for axis in (0, 1):
        moved = o.clone()
        moved[:, :, axis] = o[:, :, axis] - _frac_of_sample(o, axis, params, weight.shape[2:]) + 0.5
        moved = moved.view_as(offset)
        gm = OPS._modulated_deform_conv2d_backward(ag, ax, moved, mask, aw, ab, *params)[2]
        s_off[:, :, axis] = 2 * mask.view_as(gm) * gm
    s_grads[1] = s_off.view_as(offset).nan_to_num(nan=0.0)
    return (out, *grads), (s_out, *s_grads)


def _frac_of_sample(o, axis, params, kernel_size):
    """frac(y) (axis 0) or frac(x) (axis 1) of every sample position, o = offset as (N, dg*K, 2, Ho, Wo)."""
    sh, sw, ph, pw, dh, dw, _, dg = params
    Ho, Wo = o.shape[-2:]
    kh, kw = kernel_size
    K = kh * kw
    if axis == 0:
        base = (torch.arange(Ho, dtype=o.dtype) * sh - ph).view(1, 1, Ho, 1)
        tap = (
            (torch.arange(kh, dtype=o.dtype) * dh)
            .repeat_interleave(kw)
            .repeat(dg)
            .view(1, dg * K, 1, 1)
        )
    else:
        base = (torch.arange(Wo, dtype=o.dtype) * sw - pw).view(1, 1, 1, Wo)
        tap = (torch.arange(kw, dtype=o.dtype) * dw).repeat(kh).repeat(dg).view(1, dg * K, 1, 1)
    pos = base + tap + o[:, :, axis]
    return pos - torch.floor(pos)


_conv_cache = {}


def conv_case_data(case, dtype):
    key = (case, dtype)
    if key not in _conv_cache:
        ts, params = conv_inputs(case, dtype)
        ref, scale = conv_reference(ts, params)
        _conv_cache[key] = (ts, params, ref, scale)
    return _conv_cache[key]


# column budgets, as DCNV2_MAX_COLUMN_ELEMENTS: (C*kh*kw) * this many columns
BUDGETS = {
    "one_image_per_block": lambda hw, n: hw,  # nb == 1, p0 == 0: the batch-1 / COCO res3 branch
    "several_blocks_per_image": lambda hw, n: max(1, hw // 3),  # tiles of one image (p0 > 0)
    "several_images_per_block": lambda hw, n: hw * n,  # nb == n > 1: the bmm branch
}


def run_conv(backend, ts, params, dtype):
    x, offset, mask, weight, bias, grad = (t.to(device=backend.device, dtype=dtype) for t in ts)
    out = backend.conv(x, offset, mask, weight, bias, *params)
    grads = backend.conv_backward(grad, x, offset, mask, weight, bias, *params)
    return (out, *grads)


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_conv_matches_cpu_float64(backend, case, dtype, budget, monkeypatch):
    be = BACKENDS[backend]()
    ts, params, ref, scale = conv_case_data(case, dtype)
    x, weight = ts[0], ts[3]
    hw = ref[0].shape[2] * ref[0].shape[3]
    columns = BUDGETS[budget](hw, x.shape[0])
    monkeypatch.setenv(
        "DCNV2_MAX_COLUMN_ELEMENTS", str(x.shape[1] * weight.shape[2] * weight.shape[3] * columns)
    )
    got = run_conv(be, ts, params, dtype)
    names = ["output", "grad input", "grad offset", "grad mask", "grad weight", "grad bias"]
    for name, g, r, s in zip(names, got, ref, scale):
        assert g.dtype == dtype and g.device.type == be.device, f"{name}: {g.dtype} on {g.device}"
        assert_within(g, r, s, dtype, f"{backend} {case} {name}")


@pytest.mark.parametrize("case", ["basic", "awkward", "batch1"])
def test_conv_cpu_reference_matches_pure_pytorch(case):
    """The float64 reference of the matrix against the pure-PyTorch reference (autograd for gradients)."""
    ts, params, ref, scale = conv_case_data(case, torch.float64)
    x, offset, mask, weight, bias, grad = [t.clone().requires_grad_() for t in ts[:5]] + [ts[5]]
    out = mdconv2d_ref(
        x,
        offset,
        mask,
        weight,
        bias,
        stride=params[0:2],
        padding=params[2:4],
        dilation=params[4:6],
        groups=params[6],
        deformable_groups=params[7],
    )
    grads = torch.autograd.grad(out, (x, offset, mask, weight, bias), grad)
    for name, a, r, s in zip(
        ["output", "input", "offset", "mask", "weight", "bias"], (out, *grads), ref, scale
    ):
        assert_within(a, r, s, torch.float64, f"pure reference {case} {name}")


@needs_emulation
def test_emulated_grid_stride_loops_cover_a_capped_grid(monkeypatch):
    """With the grid capped at 1 and 3 blocks, every kernel's grid-stride loop must cover the rest."""
    be = BACKENDS["emulated"]()
    ts, params, ref, scale = conv_case_data("awkward", torch.float64)
    for blocks in ("1", "3"):
        monkeypatch.setenv("DCNV2_EMULATED_MAX_BLOCKS", blocks)
        for name, g, r, s in zip(
            ["output", "input", "offset", "mask", "weight", "bias"],
            run_conv(be, ts, params, torch.float64),
            ref,
            scale,
        ):
            assert_within(g, r, s, torch.float64, f"max {blocks} blocks, {name}")
        x, rois, offset, grad, pp = pool_inputs("mixed", (3, 2), torch.float64)
        got = (
            be.pool(x, rois, offset, 3, 2, *pp),
            *be.pool_backward(grad, x, rois, offset, 3, 2, *pp),
        )
        pool_ref = (
            OPS.deform_roi_pool(x, rois, offset, 3, 2, *pp),
            *OPS._deform_roi_pool_backward(grad, x, rois, offset, 3, 2, *pp),
        )
        pool_s = pool_scale(x, rois, offset, grad, 3, 2, pp)
        for name, g, r, s in zip(["output", "grad input", "grad offset"], got, pool_ref, pool_s):
            assert_within(g, r, s, torch.float64, f"max {blocks} blocks, pool {name}")


def non_contiguous_views(x, offset, mask, weight):
    """The same values in non-contiguous layouts (input channels-last, the others transposed)."""
    views = [
        x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),  # channels-last memory
        offset.transpose(2, 3).contiguous().transpose(2, 3),
        mask.transpose(0, 1).contiguous().transpose(0, 1),
        weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1),
    ]
    assert not any(v.is_contiguous() for v in views)
    return views


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_conv_non_contiguous_inputs(backend):
    be = BACKENDS[backend]()
    ts, params, ref, scale = conv_case_data("basic", torch.float32)
    x, offset, mask, weight, bias, grad = (t.to(be.device, torch.float32) for t in ts)
    views = non_contiguous_views(x, offset, mask, weight)
    out = be.conv(*views, bias, *params)
    grads = be.conv_backward(
        grad.transpose(2, 3).contiguous().transpose(2, 3), *views, bias, *params
    )
    for name, g, r, s in zip(
        ["output", "input", "offset", "mask", "weight", "bias"], (out, *grads), ref, scale
    ):
        assert_within(g, r, s, torch.float32, f"non-contiguous {name}")


# ------------------------------------------------------------------------------------------------
# deform_roi_pool
# ------------------------------------------------------------------------------------------------
def pool_inputs(
    kind, P, dtype, n=3, c=5, H=12, W=15, scale=0.5, sampling_ratio=0, gamma=0.1, with_offset=True
):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, H, W, generator=g)
    img_w, img_h = W / scale, H / scale
    boxes = [
        [0, 4.0, 6.0, 20.0, 18.0],  # inside
        [1, 2.0, 2.0, 2.6, 2.3],  # tiny (under a pixel)
        [2, 20.0, 15.0, 8.0, 5.0],  # inverted (x2 < x1, y2 < y1)
        [0, -6.0, -4.0, 10.0, 9.0],  # partly outside (top left)
        [1, img_w - 5, img_h - 3, img_w + 9, img_h + 7],  # partly outside (bottom right)
        [2, img_w + 10, img_h + 10, img_w + 30, img_h + 25],  # wholly outside
        [1, 0.0, 0.0, img_w, img_h],  # the whole image
    ]
    rois = torch.tensor(boxes if kind == "mixed" else [], dtype=torch.float64).view(-1, 5)
    offset = (torch.rand(rois.shape[0], 2, *P, generator=g) * 2 - 1) if with_offset else None
    grad = torch.randn(rois.shape[0], c, *P, generator=g)
    ts = [t.to(dtype).double() if t is not None else None for t in (x, rois, offset, grad)]
    return (*ts, (scale, sampling_ratio, gamma))


def pool_scale(x, rois, offset, grad, ph, pw, pp):
    """S of the output and the input gradient (reference on |x|, |grad|), and the offset bound."""
    s_out = OPS.deform_roi_pool(x.abs(), rois, offset, ph, pw, *pp)
    s_gin = OPS._deform_roi_pool_backward(grad.abs(), x.abs(), rois, offset, ph, pw, *pp)[0]
    s_off = None
    if offset is not None:
        scale, _, gamma = pp
        xmax = x.abs().amax(dim=(2, 3))[rois[:, 0].long()]  # (R, C)
        per_bin = (grad.abs() * xmax[:, :, None, None]).sum(1)  # (R, PH, PW)
        roi_w = ((rois[:, 3] - rois[:, 1]) * scale).abs().view(-1, 1, 1)
        roi_h = ((rois[:, 4] - rois[:, 2]) * scale).abs().view(-1, 1, 1)
        s_off = 2 * gamma * torch.stack([roi_w * per_bin, roi_h * per_bin], 1)
    return s_out, s_gin, s_off


POOL_CASES = {
    # name: (rois, output size, sampling ratio, offset)
    "mixed_adaptive": ("mixed", (7, 5), 0, True),
    "mixed_ratio2": ("mixed", (3, 4), 2, True),
    "mixed_1x1_no_offset": ("mixed", (1, 1), 3, False),
    "no_rois": ("none", (2, 2), 0, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_pool_matches_cpu_float64(backend, case, dtype):
    be = BACKENDS[backend]()
    kind, (ph, pw), ratio, with_offset = POOL_CASES[case]
    x, rois, offset, grad, pp = pool_inputs(
        kind, (ph, pw), dtype, sampling_ratio=ratio, with_offset=with_offset
    )
    ref_out = OPS.deform_roi_pool(x, rois, offset, ph, pw, *pp)
    ref_gin, ref_goff = OPS._deform_roi_pool_backward(grad, x, rois, offset, ph, pw, *pp)
    s_out, s_gin, s_off = pool_scale(x, rois, offset, grad, ph, pw, pp)
    d = dict(device=be.device, dtype=dtype)
    dx, drois, dgrad = x.to(**d), rois.to(**d), grad.to(**d)
    doff = offset.to(**d) if offset is not None else None
    out = be.pool(dx, drois, doff, ph, pw, *pp)
    gin, goff = be.pool_backward(dgrad, dx, drois, doff, ph, pw, *pp)
    assert out.dtype == dtype and out.device.type == be.device
    assert_within(out, ref_out, s_out, dtype, f"{backend} {case} output")
    assert_within(gin, ref_gin, s_gin, dtype, f"{backend} {case} grad input")
    if offset is not None:
        assert_within(goff, ref_goff, s_off, dtype, f"{backend} {case} grad offset")
    else:
        assert goff.numel() == 0


@pytest.mark.parametrize("case", ["mixed_adaptive", "mixed_ratio2"])
def test_pool_cpu_reference_matches_pure_pytorch(case):
    kind, (ph, pw), ratio, with_offset = POOL_CASES[case]
    x, rois, offset, grad, pp = pool_inputs(kind, (ph, pw), torch.float64, sampling_ratio=ratio)
    xl, ol = x.clone().requires_grad_(), offset.clone().requires_grad_()
    out = deform_roi_pool_ref(xl, rois, ol, (ph, pw), pp[0], pp[1], pp[2])
    gin, goff = torch.autograd.grad(out, (xl, ol), grad)
    s_out, s_gin, s_off = pool_scale(x, rois, offset, grad, ph, pw, pp)
    assert_within(
        out, OPS.deform_roi_pool(x, rois, offset, ph, pw, *pp), s_out, torch.float64, "pure output"
    )
    ref_gin, ref_goff = OPS._deform_roi_pool_backward(grad, x, rois, offset, ph, pw, *pp)
    assert_within(gin, ref_gin, s_gin, torch.float64, "pure grad input")
    assert_within(goff, ref_goff, s_off, torch.float64, "pure grad offset")


# ------------------------------------------------------------------------------------------------
# Only on a real device
# ------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: device-only test skipped")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ["basic", "batch1", "batch33_far"])
def test_conv_cuda_matches_torchvision_cuda(case, dtype):
    """An independent second implementation on the same device."""
    ts, params, ref, scale = conv_case_data(case, dtype)
    x, offset, mask, weight, bias, _ = (t.to("cuda", dtype) for t in ts)
    sh, sw, ph, pw, dh, dw, groups, dg = params
    ours = modulated_deform_conv2d(
        x,
        offset,
        mask,
        weight,
        bias,
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=groups,
        deformable_groups=dg,
    )
    tv = torchvision.ops.deform_conv2d(
        x, offset, weight, bias, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), mask=mask
    )
    assert_within(ours, tv, scale[0].to("cuda", dtype), dtype, f"vs torchvision {case}")


@needs_cuda
def test_conv_autocast_with_float32_inputs():
    """float32 inputs under float16 autocast: the op's CUDA autocast rule casts them down, as for
    F.conv2d (float16 result equal to the op on the float16 values); without it, float32."""
    ts, params, ref, scale = conv_case_data("basic", torch.float16)
    full = [t.to("cuda", torch.float32) for t in ts[:5]]
    sh, sw, ph, pw, dh, dw, groups, dg = params
    kw = dict(
        stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups, deformable_groups=dg
    )
    with torch.autocast("cuda", dtype=torch.float16):
        out = modulated_deform_conv2d(*full, **kw)
    assert out.dtype == torch.float16
    expected = modulated_deform_conv2d(*[t.half() for t in full], **kw)
    assert torch.equal(out, expected)
    assert_within(out, ref[0], scale[0], torch.float16, "autocast output")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_conv_batch_zero_and_empty_image(backend):
    """No image, and an image of width 0 with padding: the output is the bias, every gradient zero."""
    be = BACKENDS[backend]()
    for shape, pad, out_hw in (((0, 4, 5, 5), 1, (5, 5)), ((2, 4, 0, 3), 2, (2, 5))):
        x = torch.randn(*shape, device=be.device)
        n = shape[0]
        offset = torch.randn(n, 18, *out_hw, device=be.device)
        mask = torch.rand(n, 9, *out_hw, device=be.device)
        weight, bias = torch.randn(6, 4, 3, 3, device=be.device), torch.randn(6, device=be.device)
        params = (1, 1, pad, pad, 1, 1, 1, 1)
        out = be.conv(x, offset, mask, weight, bias, *params)
        assert out.shape == (n, 6, *out_hw)
        assert torch.equal(out, bias.view(1, 6, 1, 1).expand_as(out))
        grads = be.conv_backward(torch.ones_like(out), x, offset, mask, weight, bias, *params)
        for g, t in zip(grads[:4], (x, offset, mask, weight)):
            assert g.shape == t.shape and torch.count_nonzero(g) == 0
        assert torch.equal(grads[4].cpu(), torch.full((6,), float(out_hw[0] * out_hw[1] * n)))


@needs_cuda
def test_conv_pack_cuda_matches_cpu():
    from projects_dcnv2.layers import ModulatedDeformConv2dPack

    pack = ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, deformable_groups=2)
    with torch.no_grad():
        pack.conv_offset.weight.normal_(0, 0.3)
        pack.conv_offset.bias.normal_(0, 0.3)
    x = torch.randn(2, 4, 11, 9)
    expected = pack.double()(x.double())
    out = pack.float().cuda()(x.cuda())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_pool_pack_cuda_matches_cpu():
    from projects_dcnv2.layers import ModulatedDeformRoIPoolPack

    pack = ModulatedDeformRoIPoolPack(
        output_size=7, output_channels=5, deform_fc_channels=32, spatial_scale=0.5
    )
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_(0, 0.05)
    x, rois, _, _, _ = pool_inputs("mixed", (7, 7), torch.float32)
    expected = pack.double()(x, rois)
    out = pack.float().cuda()(x.float().cuda(), rois.float().cuda())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-5)
