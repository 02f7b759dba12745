"""Bad inputs raise ValueError/RuntimeError naming the argument, with "expected" and "got" in the message.

Each case runs through the Python functional API and through the raw dispatcher op (whose C++ checks
must hold on their own: torch.compile and other callers reach the op without the Python wrapper).
"""
import re

import pytest
import torch

import projects_dcnv2.layers  # noqa: F401  (loads the extension: registers torch.ops.dcnv2)
from projects_dcnv2.layers import deform_roi_pool, modulated_deform_conv2d

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: device-mismatch tests skipped"
)


def _check_message(excinfo, name):
    msg = str(excinfo.value)
    assert re.search(name, msg), f"message does not name {name!r}: {msg}"
    assert "expected" in msg.lower(), f"message lacks 'expected': {msg}"
    assert "got" in msg.lower(), f"message lacks 'got': {msg}"


# ------------------------------------------------------------------------------------------------
# modulated_deform_conv2d
# ------------------------------------------------------------------------------------------------
def conv_args(**over):
    """Valid arguments (N=2, C=4, 6x5 input, 3x3 kernel, padding 1, groups 2, dg 2), then overrides."""
    a = dict(
        input=torch.randn(2, 4, 6, 5),
        offset=torch.randn(2, 2 * 2 * 9, 6, 5),
        mask=torch.rand(2, 2 * 9, 6, 5),
        weight=torch.randn(3 * 2, 2, 3, 3),
        bias=torch.randn(6),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=2,
        deformable_groups=2,
    )
    a.update(over)
    return a


def call_conv(api, a):
    if api == "functional":
        return modulated_deform_conv2d(**a)
    return torch.ops.dcnv2.modulated_deform_conv2d(
        a["input"], a["offset"], a["mask"], a["weight"], a["bias"], *a["stride"], *a["padding"], *a["dilation"],
        a["groups"], a["deformable_groups"],
    )


CONV_CASES = {
    # id: (overrides, regex the message must contain)
    "input_ndim": (dict(input=torch.randn(4, 6, 5)), "input"),
    "offset_ndim": (dict(offset=torch.randn(2 * 2 * 9, 6, 5)), "offset"),
    "mask_ndim": (dict(mask=torch.randn(2, 2 * 9, 30)), "mask"),
    "weight_ndim": (dict(weight=torch.randn(6, 2, 9)), "weight"),
    "channels_not_divisible_by_groups": (
        dict(input=torch.randn(2, 5, 6, 5), groups=2, deformable_groups=1, offset=torch.randn(2, 18, 6, 5),
             mask=torch.rand(2, 9, 6, 5), weight=torch.randn(6, 2, 3, 3)),
        "groups|input|in_channels|weight",
    ),
    "channels_not_divisible_by_deformable_groups": (
        dict(input=torch.randn(2, 6, 6, 5), groups=1, deformable_groups=4, offset=torch.randn(2, 72, 6, 5),
             mask=torch.rand(2, 36, 6, 5), weight=torch.randn(6, 6, 3, 3)),
        "deformable_groups|input|in_channels",
    ),
    "weight_channel_mismatch": (dict(weight=torch.randn(6, 3, 3, 3)), "weight"),
    "out_channels_not_divisible_by_groups": (dict(weight=torch.randn(5, 2, 3, 3), bias=torch.randn(5)),
                                             "weight|groups"),
    "offset_spatial_size": (dict(offset=torch.randn(2, 36, 6, 4)), "offset"),
    "mask_spatial_size": (dict(mask=torch.rand(2, 18, 5, 5)), "mask"),
    "offset_channels": (dict(offset=torch.randn(2, 38, 6, 5)), "offset"),
    "mask_channels": (dict(mask=torch.rand(2, 9, 6, 5)), "mask"),
    "offset_batch": (dict(offset=torch.randn(3, 36, 6, 5)), "offset"),
    "mask_batch": (dict(mask=torch.rand(1, 18, 6, 5)), "mask"),
    "bias_shape": (dict(bias=torch.randn(5)), "bias"),
    "integer_dtype": (
        dict(input=torch.ones(2, 4, 6, 5, dtype=torch.long), offset=torch.zeros(2, 36, 6, 5, dtype=torch.long),
             mask=torch.ones(2, 18, 6, 5, dtype=torch.long), weight=torch.ones(6, 2, 3, 3, dtype=torch.long),
             bias=torch.ones(6, dtype=torch.long)),
        "input",
    ),
    "weight_dtype": (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), "weight"),
    "offset_dtype": (dict(offset=torch.randn(2, 36, 6, 5, dtype=torch.float64)), "offset"),
    "mask_dtype": (dict(mask=torch.rand(2, 18, 6, 5, dtype=torch.float64)), "mask"),
    "bias_dtype": (dict(bias=torch.randn(6, dtype=torch.float64)), "bias"),
    "zero_stride": (dict(stride=(0, 1), offset=torch.randn(2, 36, 6, 5)), "stride"),
    "output_too_small": (dict(input=torch.randn(2, 4, 1, 1), padding=(0, 0), offset=torch.randn(2, 36, 1, 1),
                              mask=torch.rand(2, 18, 1, 1)), "input|output|kernel|weight"),
}


def test_valid_conv_arguments_run():
    for api in ("functional", "raw_op"):
        assert call_conv(api, conv_args()).shape == (2, 6, 6, 5)


@pytest.mark.parametrize("api", ["functional", "raw_op"])
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_bad_input(case, api):
    over, name = CONV_CASES[case]
    with pytest.raises((ValueError, RuntimeError), match=name) as excinfo:
        call_conv(api, conv_args(**over))
    _check_message(excinfo, name)


# ------------------------------------------------------------------------------------------------
# deform_roi_pool
# ------------------------------------------------------------------------------------------------
def pool_args(**over):
    a = dict(
        input=torch.randn(2, 3, 8, 9),
        rois=torch.tensor([[0, 1.0, 2.0, 10.0, 12.0], [1, 0.0, 0.0, 5.0, 4.0], [1, 3.0, 3.0, 16.0, 14.0]]),
        offset=torch.zeros(3, 2, 3, 4),
        output_size=(3, 4),
        spatial_scale=0.5,
        sampling_ratio=0,
        gamma=0.1,
    )
    a.update(over)
    return a


def call_pool(api, a):
    if api == "functional":
        return deform_roi_pool(**a)
    return torch.ops.dcnv2.deform_roi_pool(
        a["input"], a["rois"], a["offset"], *a["output_size"], a["spatial_scale"], a["sampling_ratio"], a["gamma"]
    )


POOL_CASES = {
    "input_ndim": (dict(input=torch.randn(3, 8, 9)), "input"),
    "rois_ndim": (dict(rois=torch.tensor([0, 1.0, 2.0, 10.0, 12.0])), "rois"),
    "rois_columns": (dict(rois=torch.randn(3, 4)), "rois"),
    "offset_ndim": (dict(offset=torch.zeros(3, 2, 12)), "offset"),
    "offset_num_rois": (dict(offset=torch.zeros(2, 2, 3, 4)), "offset"),
    "offset_channels": (dict(offset=torch.zeros(3, 1, 3, 4)), "offset"),
    "offset_spatial_size": (dict(offset=torch.zeros(3, 2, 4, 3)), "offset"),
    "integer_input": (dict(input=torch.ones(2, 3, 8, 9, dtype=torch.long),
                           rois=torch.tensor([[0, 1, 2, 10, 12]]), offset=None), "input|rois"),
    "offset_dtype": (dict(offset=torch.zeros(3, 2, 3, 4, dtype=torch.float64)), "offset"),
    "integer_rois": (dict(rois=torch.tensor([[0, 1, 2, 10, 12]]), offset=None), "rois"),
    "rois_batch_index_too_large": (dict(rois=torch.tensor([[2, 1.0, 2.0, 10.0, 12.0]]), offset=None), "rois"),
    "rois_negative_batch_index": (dict(rois=torch.tensor([[-1, 1.0, 2.0, 10.0, 12.0]]), offset=None), "rois"),
    "rois_not_finite": (dict(rois=torch.tensor([[0, 1.0, float("nan"), 10.0, 12.0]]), offset=None), "rois"),
}


def test_valid_pool_arguments_run():
    for api in ("functional", "raw_op"):
        assert call_pool(api, pool_args()).shape == (3, 3, 3, 4)
        assert call_pool(api, pool_args(offset=None)).shape == (3, 3, 3, 4)


@pytest.mark.parametrize("api", ["functional", "raw_op"])
@pytest.mark.parametrize("case", list(POOL_CASES), ids=list(POOL_CASES))
def test_pool_bad_input(case, api):
    over, name = POOL_CASES[case]
    with pytest.raises((ValueError, RuntimeError), match=name) as excinfo:
        call_pool(api, pool_args(**over))
    _check_message(excinfo, name)


# ------------------------------------------------------------------------------------------------
# different devices (needs a GPU)
# ------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("api", ["functional", "raw_op"])
@pytest.mark.parametrize("arg", ["offset", "mask", "weight", "bias"])
def test_conv_device_mismatch(arg, api):
    a = conv_args()
    for k in ("input", "offset", "mask", "weight", "bias"):
        if k != arg:
            a[k] = a[k].cuda()
    with pytest.raises((ValueError, RuntimeError), match=arg) as excinfo:
        call_conv(api, a)
    _check_message(excinfo, arg)


@needs_cuda
@pytest.mark.parametrize("api", ["functional", "raw_op"])
@pytest.mark.parametrize("arg", ["rois", "offset"])
def test_pool_device_mismatch(arg, api):
    a = pool_args()
    for k in ("input", "rois", "offset"):
        if k != arg:
            a[k] = a[k].cuda()
    with pytest.raises((ValueError, RuntimeError), match=arg) as excinfo:
        call_pool(api, a)
    _check_message(excinfo, arg)
