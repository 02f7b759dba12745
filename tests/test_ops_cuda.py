"""CUDA kernels against the CPU kernels in float64: both ops, forward and backward, float32/float16/bfloat16."""
import pytest
import torch

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)
from projects_dcnv2.layers import (
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
    modulated_deform_conv2d,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: CUDA op tests skipped"),
    pytest.mark.usefixtures("op_test_env"),  # seed, one CPU thread (conftest.py)
]

# (atol and rtol as a fraction of the largest reference magnitude)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
DTYPES = list(TOL)
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def assert_close_scaled(actual, expected, tol, what):
    """|actual - expected| <= tol * (max|expected| + |expected|), computed in float64 on the CPU."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = (e.abs().max().item() if e.numel() else 0.0) + 1e-12
    err = (a - e).abs()
    bound = tol * (scale + e.abs())
    assert (err <= bound).all(), (
        f"{what}: max abs err {err.max().item():.3g}, largest |expected| {scale:.3g}, tol {tol}"
    )


# ------------------------------------------------------------------------------------------------
# modulated_deform_conv2d
# ------------------------------------------------------------------------------------------------
CONV_CASES = [
    # n, cin, cout, (H, W), (kh, kw), stride, padding, dilation, groups, dg, offset scale
    (2, 4, 6, (9, 8), (3, 3), 1, 1, 1, 1, 1, 1.0),
    (3, 8, 4, (10, 7), (3, 2), (2, 1), (1, 0), (1, 2), 2, 4, 2.0),
    (33, 6, 3, (5, 6), (3, 3), 2, 2, 2, 3, 3, 20.0),
]


def conv_inputs(case, dtype):
    n, cin, cout, (H, W), (kh, kw), stride, padding, dilation, groups, dg, scale = case
    s = stride if isinstance(stride, tuple) else (stride, stride)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    Ho = (H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    K = kh * kw
    ts = [
        torch.randn(n, cin, H, W),
        torch.randn(n, 2 * dg * K, Ho, Wo) * scale,
        torch.rand(n, dg * K, Ho, Wo),
        torch.randn(cout, cin // groups, kh, kw) / (cin // groups * K) ** 0.5,
        torch.randn(cout),
    ]
    # round through the low-precision dtype so that both sides see the same values
    ts = [t.to(dtype).double() for t in ts]
    return ts, dict(stride=stride, padding=padding, dilation=dilation, groups=groups, deformable_groups=dg)


def grad_output(shape, round_dtype):
    """A fixed random output gradient, rounded through round_dtype (the dtype under test)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return g.to(round_dtype).double()


def run_conv(ts, kw, device, dtype, round_dtype):
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]
    out = modulated_deform_conv2d(*leaves, **kw)
    g = grad_output(out.shape, round_dtype)
    grads = torch.autograd.grad(out, leaves, g.to(device=device, dtype=dtype))
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=["basic", "awkward", "batch33_far"])
def test_conv_cuda_matches_cpu_float64(case, dtype):
    ts, kw = conv_inputs(case, dtype)
    out, grads = run_conv(ts, kw, "cuda", dtype, dtype)
    ref, ref_grads = run_conv(ts, kw, "cpu", torch.float64, dtype)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_close_scaled(out, ref, TOL[dtype], f"output {dtype}")
    for name, g, r in zip(["input", "offset", "mask", "weight", "bias"], grads, ref_grads):
        assert g.dtype == dtype, name
        assert_close_scaled(g, r, TOL[dtype] * 3, f"grad {name} {dtype}")


def test_conv_cuda_batch_zero():
    ts, kw = conv_inputs((0, 4, 6, (9, 8), (3, 3), 1, 1, 1, 2, 2, 1.0), torch.float32)
    out, grads = run_conv(ts, kw, "cuda", torch.float32, torch.float32)
    assert out.shape == (0, 6, 9, 8)
    for g, t in zip(grads, ts):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0


def test_conv_under_autocast_close_to_float32():
    ts, kw = conv_inputs(CONV_CASES[0], torch.float32)
    leaves = [t.float().cuda() for t in ts]
    expected = modulated_deform_conv2d(*leaves, **kw)
    with torch.autocast("cuda", dtype=torch.float16):
        out = modulated_deform_conv2d(*leaves, **kw)
    assert out.dtype == torch.float32  # the op is registered to run in float32 under autocast
    assert_close_scaled(out, expected, 1e-2, "output under autocast")


def test_conv_pack_cuda_matches_cpu():
    pack = ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, deformable_groups=2)
    with torch.no_grad():
        pack.conv_offset.weight.normal_(0, 0.3)
        pack.conv_offset.bias.normal_(0, 0.3)
    x = torch.randn(2, 4, 11, 9)
    expected = pack.double()(x.double())
    out = pack.float().cuda()(x.cuda())
    assert_close_scaled(out, expected, 1e-5, "pack output")


# ------------------------------------------------------------------------------------------------
# deform_roi_pool
# ------------------------------------------------------------------------------------------------
def pool_inputs(dtype, num_rois=40, P=(7, 5), n=3, c=8, H=24, W=30, scale=0.25):
    x = torch.randn(n, c, H, W)
    img = torch.tensor([W / scale, H / scale])
    ctr = torch.rand(num_rois, 2) * 1.4 * img - 0.2 * img
    wh = torch.rand(num_rois, 2) * img * 1.2 + 1.0
    rois = torch.cat([torch.randint(0, n, (num_rois, 1)).float(), ctr - wh / 2, ctr + wh / 2], 1)
    off = torch.rand(num_rois, 2, *P) * 2 - 1
    return [t.to(dtype).double() for t in (x, rois, off)]


def run_pool(x, rois, off, device, dtype, round_dtype, P, scale, sr, gamma):
    xl = x.to(device=device, dtype=dtype).requires_grad_()
    ol = off.to(device=device, dtype=dtype).requires_grad_()
    out = deform_roi_pool(xl, rois.to(device=device, dtype=dtype), ol, P, scale, sr, gamma)
    g = grad_output(out.shape, round_dtype)
    gx, goff = torch.autograd.grad(out, (xl, ol), g.to(device=device, dtype=dtype))
    return out, gx, goff


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_pool_cuda_matches_cpu_float64(dtype, sampling_ratio):
    P, scale, gamma = (7, 5), 0.25, 0.1
    x, rois, off = pool_inputs(dtype, P=P, scale=scale)
    got = run_pool(x, rois, off, "cuda", dtype, dtype, P, scale, sampling_ratio, gamma)
    ref = run_pool(x, rois, off, "cpu", torch.float64, dtype, P, scale, sampling_ratio, gamma)
    assert got[0].dtype == dtype and got[0].device.type == "cuda"
    # gradients wrt input are sums of many atomics: looser in low precision
    for name, a, b, f in zip(["output", "grad input", "grad offset"], got, ref, [1, 3, 5]):
        assert a.dtype == dtype, name
        assert_close_scaled(a, b, TOL[dtype] * f, f"{name} {dtype}")


def test_pool_cuda_zero_rois():
    x = torch.randn(2, 3, 6, 7, device="cuda", requires_grad=True)
    out = deform_roi_pool(x, torch.zeros(0, 5, device="cuda"), None, (3, 2), 0.5)
    assert out.shape == (0, 3, 3, 2)
    (g,) = torch.autograd.grad(out.sum(), (x,))
    assert g.shape == x.shape and torch.count_nonzero(g) == 0


def test_pool_pack_cuda_matches_cpu():
    pack = ModulatedDeformRoIPoolPack(output_size=7, output_channels=8, deform_fc_channels=32, spatial_scale=0.25)
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_(0, 0.05)
    x, rois, _ = pool_inputs(torch.float32)
    expected = pack.double()(x, rois)
    out = pack.float().cuda()(x.float().cuda(), rois.float().cuda())
    assert_close_scaled(out, expected, 1e-4, "pack output")
