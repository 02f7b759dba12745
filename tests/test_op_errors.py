"""Bad inputs raise ValueError/RuntimeError naming the argument, with "expected" and "got" in the message.

Each case runs through the Python functional API and through the raw dispatcher op (whose C++ checks
must hold on their own: torch.compile and other callers reach the op without the Python wrapper).
"""

import re

import pytest
import torch

import projects_dcnv2.layers  # (also loads the extension: registers torch.ops.dcnv2)
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
        a["input"],
        a["offset"],
        a["mask"],
        a["weight"],
        a["bias"],
        *a["stride"],
        *a["padding"],
        *a["dilation"],
        a["groups"],
        a["deformable_groups"],
    )


CONV_CASES = {
    # id: (overrides, regex the message must contain)
    "input_ndim": (dict(input=torch.randn(4, 6, 5)), "input"),
    "offset_ndim": (dict(offset=torch.randn(2 * 2 * 9, 6, 5)), "offset"),
    "mask_ndim": (dict(mask=torch.randn(2, 2 * 9, 30)), "mask"),
    "weight_ndim": (dict(weight=torch.randn(6, 2, 9)), "weight"),
    "channels_not_divisible_by_groups": (
        dict(
            input=torch.randn(2, 5, 6, 5),
            groups=2,
            deformable_groups=1,
            offset=torch.randn(2, 18, 6, 5),
            mask=torch.rand(2, 9, 6, 5),
            weight=torch.randn(6, 2, 3, 3),
        ),
        "groups|input|in_channels|weight",
    ),
    "channels_not_divisible_by_deformable_groups": (
        dict(
            input=torch.randn(2, 6, 6, 5),
            groups=1,
            deformable_groups=4,
            offset=torch.randn(2, 72, 6, 5),
            mask=torch.rand(2, 36, 6, 5),
            weight=torch.randn(6, 6, 3, 3),
        ),
        "deformable_groups|input|in_channels",
    ),
    "weight_channel_mismatch": (dict(weight=torch.randn(6, 3, 3, 3)), "weight"),
    "out_channels_not_divisible_by_groups": (
        dict(weight=torch.randn(5, 2, 3, 3), bias=torch.randn(5)),
        "weight|groups",
    ),
    "offset_spatial_size": (dict(offset=torch.randn(2, 36, 6, 4)), "offset"),
    "mask_spatial_size": (dict(mask=torch.rand(2, 18, 5, 5)), "mask"),
    "offset_channels": (dict(offset=torch.randn(2, 38, 6, 5)), "offset"),
    "mask_channels": (dict(mask=torch.rand(2, 9, 6, 5)), "mask"),
    "offset_batch": (dict(offset=torch.randn(3, 36, 6, 5)), "offset"),
    "mask_batch": (dict(mask=torch.rand(1, 18, 6, 5)), "mask"),
    "bias_shape": (dict(bias=torch.randn(5)), "bias"),
    "integer_dtype": (
        dict(
            input=torch.ones(2, 4, 6, 5, dtype=torch.long),
            offset=torch.zeros(2, 36, 6, 5, dtype=torch.long),
            mask=torch.ones(2, 18, 6, 5, dtype=torch.long),
            weight=torch.ones(6, 2, 3, 3, dtype=torch.long),
            bias=torch.ones(6, dtype=torch.long),
        ),
        "input",
    ),
    "weight_dtype": (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), "weight"),
    "offset_dtype": (dict(offset=torch.randn(2, 36, 6, 5, dtype=torch.float64)), "offset"),
    "mask_dtype": (dict(mask=torch.rand(2, 18, 6, 5, dtype=torch.float64)), "mask"),
    "bias_dtype": (dict(bias=torch.randn(6, dtype=torch.float64)), "bias"),
    "zero_stride": (dict(stride=(0, 1), offset=torch.randn(2, 36, 6, 5)), "stride"),
    "output_too_small": (
        dict(
            input=torch.randn(2, 4, 1, 1),
            padding=(0, 0),
            offset=torch.randn(2, 36, 1, 1),
            mask=torch.rand(2, 18, 1, 1),
        ),
        "input|output|kernel|weight",
    ),
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
        rois=torch.tensor(
            [[0, 1.0, 2.0, 10.0, 12.0], [1, 0.0, 0.0, 5.0, 4.0], [1, 3.0, 3.0, 16.0, 14.0]]
        ),
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
        a["input"],
        a["rois"],
        a["offset"],
        *a["output_size"],
        a["spatial_scale"],
        a["sampling_ratio"],
        a["gamma"],
    )


POOL_CASES = {
    "input_ndim": (dict(input=torch.randn(3, 8, 9)), "input"),
    "rois_ndim": (dict(rois=torch.tensor([0, 1.0, 2.0, 10.0, 12.0])), "rois"),
    "rois_columns": (dict(rois=torch.randn(3, 4)), "rois"),
    "offset_ndim": (dict(offset=torch.zeros(3, 2, 12)), "offset"),
    "offset_num_rois": (dict(offset=torch.zeros(2, 2, 3, 4)), "offset"),
    "offset_channels": (dict(offset=torch.zeros(3, 1, 3, 4)), "offset"),
    "offset_spatial_size": (dict(offset=torch.zeros(3, 2, 4, 3)), "offset"),
    "integer_input": (
        dict(
            input=torch.ones(2, 3, 8, 9, dtype=torch.long),
            rois=torch.tensor([[0, 1, 2, 10, 12]]),
            offset=None,
        ),
        "input|rois",
    ),
    "offset_dtype": (dict(offset=torch.zeros(3, 2, 3, 4, dtype=torch.float64)), "offset"),
    "integer_rois": (dict(rois=torch.tensor([[0, 1, 2, 10, 12]]), offset=None), "rois"),
    "rois_batch_index_too_large": (
        dict(rois=torch.tensor([[2, 1.0, 2.0, 10.0, 12.0]]), offset=None),
        "rois",
    ),
    "rois_negative_batch_index": (
        dict(rois=torch.tensor([[-1, 1.0, 2.0, 10.0, 12.0]]), offset=None),
        "rois",
    ),
    "rois_not_finite": (
        dict(rois=torch.tensor([[0, 1.0, float("nan"), 10.0, 12.0]]), offset=None),
        "rois",
    ),
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


def test_input_smaller_than_the_kernel_is_an_error_at_every_stride():
    """A 1x1 input, a 3x3 kernel, no padding: there is no output position, whatever the stride.
    (F.conv2d raises; the fake kernel's floor division gives a 0x0 output.)"""
    x = torch.randn(1, 1, 1, 1)
    for stride in (1, 2, 4):
        with pytest.raises(RuntimeError, match="input") as excinfo:
            torch.ops.dcnv2.modulated_deform_conv2d(
                x,
                torch.zeros(1, 18, 1, 1),
                torch.ones(1, 9, 1, 1),
                torch.ones(1, 1, 3, 3),
                None,
                stride,
                stride,
                0,
                0,
                1,
                1,
                1,
                1,
            )
        _check_message(excinfo, "input")


# ------------------------------------------------------------------------------------------------
# layer constructors: a bad argument fails at construction, not at the first forward
# ------------------------------------------------------------------------------------------------
CONV_LAYER_CASES = {
    # id: (keyword overrides of ModulatedDeformConv2d(4, 6, 3, groups=2, deformable_groups=2), name)
    "in_channels_zero": (dict(in_channels=0), "in_channels"),
    "in_channels_negative": (dict(in_channels=-4), "in_channels"),
    "in_channels_float": (dict(in_channels=4.0), "in_channels"),
    "out_channels_zero": (dict(out_channels=0), "out_channels"),
    "kernel_size_zero": (dict(kernel_size=0), "kernel_size"),
    "kernel_size_pair_with_zero": (dict(kernel_size=(3, 0)), "kernel_size"),
    "kernel_size_triple": (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    "stride_zero": (dict(stride=0), "stride"),
    "stride_negative": (dict(stride=(1, -2)), "stride"),
    "padding_negative": (dict(padding=-1), "padding"),
    "dilation_zero": (dict(dilation=(0, 1)), "dilation"),
    "groups_zero": (dict(groups=0), "groups"),
    "groups_not_dividing_in_channels": (dict(groups=3, out_channels=6), "in_channels.*groups=3"),
    "groups_not_dividing_out_channels": (
        dict(in_channels=8, groups=4, out_channels=6),
        "out_channels.*groups=4",
    ),
    "deformable_groups_zero": (dict(deformable_groups=0), "deformable_groups"),
    "deformable_groups_negative": (dict(deformable_groups=-2), "deformable_groups"),
    "deformable_groups_not_dividing": (
        dict(deformable_groups=3),
        "in_channels.*deformable_groups=3",
    ),
    "deformable_groups_bool": (dict(deformable_groups=True), "deformable_groups"),
}


@pytest.mark.parametrize("cls", ["ModulatedDeformConv2d", "ModulatedDeformConv2dPack"])
@pytest.mark.parametrize("case", list(CONV_LAYER_CASES), ids=list(CONV_LAYER_CASES))
def test_conv_layer_bad_argument(case, cls):
    over, name = CONV_LAYER_CASES[case]
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, deformable_groups=2)
    kwargs.update(over)
    with pytest.raises((ValueError, TypeError), match=name) as excinfo:
        getattr(projects_dcnv2.layers, cls)(**kwargs)
    _check_message(excinfo, name)


POOL_LAYER_CASES = {
    # id: (keyword overrides of the layer's valid arguments, name)
    "output_size_zero": (dict(output_size=0), "output_size"),
    "output_size_pair_with_negative": (dict(output_size=(7, -1)), "output_size"),
    "output_size_float": (dict(output_size=7.5), "output_size"),
    "spatial_scale_zero": (dict(spatial_scale=0.0), "spatial_scale"),
    "spatial_scale_negative": (dict(spatial_scale=-0.25), "spatial_scale"),
    "spatial_scale_nan": (dict(spatial_scale=float("nan")), "spatial_scale"),
    "sampling_ratio_negative": (dict(sampling_ratio=-1), "sampling_ratio"),
    "sampling_ratio_float": (dict(sampling_ratio=2.5), "sampling_ratio"),
    "gamma_inf": (dict(gamma=float("inf")), "gamma"),
}
PACK_LAYER_CASES = {
    "output_channels_zero": (dict(output_channels=0), "output_channels"),
    "deform_fc_channels_negative": (dict(deform_fc_channels=-8), "deform_fc_channels"),
}


@pytest.mark.parametrize(
    "cls", ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"]
)
@pytest.mark.parametrize("case", list(POOL_LAYER_CASES) + list(PACK_LAYER_CASES))
def test_pool_layer_bad_argument(case, cls):
    if case in PACK_LAYER_CASES and cls == "DeformRoIPool":
        pytest.skip(
            "DeformRoIPool has no fully connected layers (output_channels, deform_fc_channels)"
        )
    over, name = {**POOL_LAYER_CASES, **PACK_LAYER_CASES}[case]
    kwargs = dict(output_size=3, spatial_scale=0.25, sampling_ratio=2, gamma=0.1)
    if cls != "DeformRoIPool":
        kwargs.update(output_channels=4, deform_fc_channels=8)
    kwargs.update(over)
    with pytest.raises((ValueError, TypeError), match=name) as excinfo:
        getattr(projects_dcnv2.layers, cls)(**kwargs)
    _check_message(excinfo, name)


def test_valid_layer_arguments_build():
    layers = projects_dcnv2.layers
    conv = layers.ModulatedDeformConv2dPack(
        4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2, deformable_groups=4
    )
    assert conv.weight.shape == (6, 2, 3, 1) and conv.conv_offset.out_channels == 3 * 4 * 3
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 3, 5)
    pool = layers.ModulatedDeformRoIPoolPack(
        (2, 3), output_channels=4, deform_fc_channels=8, sampling_ratio=0
    )
    assert pool(torch.randn(1, 4, 6, 6), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]])).shape == (
        1,
        4,
        2,
        3,
    )


def test_pool_huge_roi_with_adaptive_grid_is_an_error():
    """sampling_ratio=0 samples ceil(RoI size / output size) per bin side: a RoI 3e4 pixels wide would run for
    minutes per bin (and past 2^31 pixels overflow the grid size): an error naming the argument and the way out."""
    x, huge = torch.randn(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 3e4, 3e4]])
    with pytest.raises(
        RuntimeError,
        match=r"rois: expected RoIs whose adaptive sampling grid .* got one with 9e\+08",
    ):
        deform_roi_pool(x, huge, None, 1, 1.0, 0)
    assert deform_roi_pool(x, huge, None, 1, 1.0, 2).shape == (1, 1, 1, 1)  # a fixed grid is fine
    assert deform_roi_pool(x, huge / 30, None, 7, 1.0, 0).shape == (
        1,
        1,
        7,
        7,
    )  # 143 x 143 samples per bin
