"""Mixed precision: the DCNv2 ops and layers under ``torch.autocast`` against float32.

The C++ autocast kernels (csrc/ops/autocast/) run both ops in float32 under autocast on CPU, and
deform_roi_pool on CUDA too: whatever the dtype of their inputs, they compute and return float32.
On CUDA modulated_deform_conv2d runs in the autocast dtype, as F.conv2d (csrc/ops/autocast/).
Around them, the layers' own ``nn.Conv2d`` / ``nn.Linear`` (offset and mask predictors) run in
the autocast dtype. The op-level policy for one bfloat16 input is pinned in test_mdconv.py /
test_deform_roi_pool.py (``test_autocast_cpu_computes_in_float32``); here all inputs come in low
precision, the layers run end to end, and a whole model trains one step.

Tolerances, as a fraction of the largest magnitude of the float32 result: bfloat16 keeps 8
significant bits (a rounding error up to 2^-9 = 0.2% per value), float16 11 bits (0.03%).
Outputs must agree within 2.5% (bfloat16) / 0.5% (float16), gradients within 5% / 1%: the
roundings of inputs, offsets and masks, summed over the taps and channels (measured on CPU,
bfloat16: at most 0.9% for outputs, 0.9% for gradients). Against float32 run on the rounded
inputs (what the policy promises) the outputs agree to float32 rounding, and the gradients to
one rounding into the leaf's dtype.
"""

import pytest
import torch

from projects_dcnv2.layers import (
    WITH_CUDA,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
    modulated_deform_conv2d,
)

from builders import SMALL, make_cfg, make_model, training_batch

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

TOL = {torch.bfloat16: (2.5e-2, 5e-2), torch.float16: (5e-3, 1e-2)}  # (output, gradient)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and WITH_CUDA), reason="CUDA not available: CUDA AMP skipped"
)
DEVICES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=needs_cuda),
]


def _error(actual, expected):
    """Largest deviation as a fraction of the largest magnitude of ``expected``."""
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out)


# ----------------------------------------------------------------------------------- the ops
def _conv_inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 7, generator=g)
    # dg 2, stride 2. Sampling points sit at integer positions plus the offsets, and the offset
    # gradient jumps where a point crosses a pixel row or column: keep every offset's fractional
    # part in [0.2, 0.8], far from any crossing the rounding (< 0.02 here) could cause.
    shape = (2, 2 * 2 * 9, 5, 4)
    whole = torch.randint(-2, 3, shape, generator=g)
    offset = whole + 0.2 + 0.6 * torch.rand(shape, generator=g)
    mask = torch.rand(2, 2 * 9, 5, 4, generator=g)
    weight = torch.randn(6, 4, 3, 3, generator=g) * 0.2  # groups 2
    bias = torch.randn(6, generator=g)
    return [t.to(device) for t in (x, offset, mask, weight, bias)]


def _conv(x, offset, mask, weight, bias):
    return modulated_deform_conv2d(
        x, offset, mask, weight, bias, stride=2, padding=1, groups=2, deformable_groups=2
    )


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_mdconv_low_precision_inputs_under_autocast(device, dtype):
    """Every input in the autocast dtype (as an earlier autocast layer hands them over)."""
    ref = [t.requires_grad_() for t in _conv_inputs(device)]
    low = [t.detach().to(dtype).requires_grad_() for t in ref]
    upcast = [t.detach().float().requires_grad_() for t in low]
    expected, exact = _conv(*ref), _conv(*upcast)
    # on CUDA the op runs in the autocast dtype, as F.conv2d (csrc/ops/autocast)
    if device == "cuda":
        upcast = [t.detach().clone().requires_grad_() for t in low]
        exact = _conv(*upcast)
    with torch.autocast(device, dtype=dtype):
        out = _conv(*low)
    # the registered autocast policy: float32 compute and result on CPU, the autocast dtype on CUDA
    assert out.dtype == (dtype if device == "cuda" else torch.float32)
    assert _error(out, exact) < 1e-6
    assert _error(out, expected) < TOL[dtype][0]
    grad_out = torch.randn_like(expected)
    for name, g, g_exact, g32 in zip(
        ("input", "offset", "mask", "weight", "bias"),
        _grads(out, low, grad_out.to(out.dtype)),
        _grads(exact, upcast, grad_out.to(exact.dtype)),
        _grads(expected, ref, grad_out),
    ):
        assert g.dtype == dtype, name  # a gradient has its leaf's dtype
        assert _error(g, g_exact) <= 2**-8, name  # the float32 gradient, rounded once
        assert _error(g, g32) < TOL[dtype][1], name


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_deform_roi_pool_low_precision_inputs_under_autocast(device, dtype):
    """Features and offsets in the autocast dtype; RoIs in float32, as Detectron2 keeps boxes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 10, generator=g).to(device).requires_grad_()
    rois = torch.tensor([[0, 1.0, 2, 17, 15], [1, 4.0, 0, 19, 23], [1, 0, 0, 8, 8]]).to(device)
    offset = (torch.randn(3, 2, 3, 3, generator=g) * 0.3).to(device).requires_grad_()
    kw = dict(output_size=3, spatial_scale=0.5, sampling_ratio=2)
    low = [t.detach().to(dtype).requires_grad_() for t in (x, offset)]
    upcast = [t.detach().float().requires_grad_() for t in low]
    expected = deform_roi_pool(x, rois, offset, **kw)
    exact = deform_roi_pool(upcast[0], rois, upcast[1], **kw)
    with torch.autocast(device, dtype=dtype):
        out = deform_roi_pool(low[0], rois, low[1], **kw)
    assert out.dtype == torch.float32
    assert _error(out, exact) < 1e-6
    assert _error(out, expected) < TOL[dtype][0]
    grad_out = torch.randn_like(expected)
    grads, grads_exact = _grads(out, low, grad_out), _grads(exact, upcast, grad_out)
    grads32 = _grads(expected, (x, offset), grad_out)
    for name, g16, g_exact in zip(("input", "offset"), grads, grads_exact):
        assert g16.dtype == dtype, name
        assert _error(g16, g_exact) <= 2**-8, name
    # The offset gradient jumps where a sampling point crosses a pixel row or column, which the
    # rounded offsets can make happen: only the input gradient is compared with float32 inputs.
    assert _error(grads[0], grads32[0]) < TOL[dtype][1]


# -------------------------------------------------------------------------------- the layers
def _randomise(module, std):
    """Give the zero-initialised predictors weights, so the deformation under test is not 0."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std)
    return module


def _compare_module(module, inputs, device, dtype, out_dtype=torch.float32):
    """The module's output (of ``out_dtype``) and parameter gradients under autocast against
    float32."""
    module = module.to(device)
    expected = module(*inputs)
    grad_out = torch.randn_like(expected)
    params = [p for p in module.parameters()]
    grads32 = _grads(expected, params, grad_out)
    with torch.autocast(device, dtype=dtype):
        out = module(*inputs)
    assert out.dtype == out_dtype
    assert _error(out, expected) < TOL[dtype][0]
    names = [n for n, _ in module.named_parameters()]
    for name, g, g32 in zip(names, _grads(out, params, grad_out.to(out.dtype)), grads32):
        assert g.dtype == torch.float32, name  # float32 master weights get float32 gradients
        assert g.abs().sum() > 0, name
        assert _error(g, g32) < TOL[dtype][1], name


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_modulated_deform_conv2d_pack_under_autocast(device, dtype):
    torch.manual_seed(0)
    pack = ModulatedDeformConv2dPack(8, 6, 3, stride=1, padding=1, deformable_groups=2)
    n = 2 * pack.deformable_groups * pack.num_taps  # offset channels, then mask channels
    with torch.no_grad():
        # Offsets of (integer + 0.5) +- 0.3 over the inputs: sampling points stay clear of pixel
        # rows and columns, where the offset gradient jumps (as in _conv_inputs).
        pack.conv_offset.weight[:n].normal_(0, 0.004)
        pack.conv_offset.bias[:n] = torch.randint(-1, 2, (n,)) + 0.5 + 0.2 * torch.rand(n) - 0.1
        pack.conv_offset.weight[n:].normal_(0, 0.1)
        pack.conv_offset.bias[n:].normal_(0, 0.5)
    x = torch.randn(2, 8, 10, 9)
    offsets = pack.conv_offset(x)[:, :n]
    assert ((offsets - offsets.floor() - 0.5).abs() < 0.3).all()
    out_dtype = dtype if device == "cuda" else torch.float32  # mdconv's autocast policy
    _compare_module(pack, [x.to(device)], device, dtype, out_dtype)


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_modulated_deform_roi_pool_pack_under_autocast(device, dtype):
    torch.manual_seed(0)
    pack = ModulatedDeformRoIPoolPack(
        output_size=3, output_channels=4, deform_fc_channels=16, spatial_scale=0.5, sampling_ratio=2
    )
    _randomise(pack, 0.05)
    x = torch.randn(2, 4, 12, 10).to(device)
    rois = torch.tensor([[0, 1.0, 2, 17, 15], [1, 4.0, 0, 19, 23], [0, 2, 2, 10, 12]]).to(device)
    _compare_module(pack, [x, rois], device, dtype)


# ------------------------------------------------------------------------------- a whole model
def test_fp16_seed_config_enables_amp():
    assert make_cfg("mask_rcnn_R50_FPN_mdconv_fp16").SOLVER.AMP.ENABLED
    assert not make_cfg("mask_rcnn_R50_FPN_mdconv").SOLVER.AMP.ENABLED


def test_fp16_model_trains_one_cpu_step_under_bfloat16_autocast():
    """Detectron2's AMPTrainer needs CUDA; on CPU the same step runs under bfloat16 autocast."""
    from detectron2.utils.events import EventStorage

    half_width = [  # as the quick configs: ResNet-50 (13 DCNv2 blocks) at half width, 64-ch FPN
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "128",
        "MODEL.RESNETS.WIDTH_PER_GROUP", "32", "MODEL.FPN.OUT_CHANNELS", "64",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    ]  # fmt: skip
    _, model = make_model("mask_rcnn_R50_FPN_mdconv_fp16", *SMALL, *half_width)
    model.train()
    seen = []  # dtype of each mdconv output (the input of the norm that follows it)
    for m in model.modules():
        if hasattr(m, "conv2_offset"):
            m.conv2.norm.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].dtype))
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(training_batch(True, size=64))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    for key, value in losses.items():
        assert torch.isfinite(value), key
    assert seen == [torch.float32] * 13
    sum(losses.values()).backward()
    offsets = [m.conv2_offset for m in model.modules() if hasattr(m, "conv2_offset")]
    for conv in offsets:
        assert conv.weight.grad.dtype == torch.float32
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
