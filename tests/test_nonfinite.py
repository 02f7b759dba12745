"""Non-finite inputs: NaN propagates (never silently becomes zero), infinite offsets sample outside."""

import torch

from projects_dcnv2.layers import deform_roi_pool, modulated_deform_conv2d


def test_mdconv_nan_offset_propagates_to_its_output_position_only():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 18, 6, 6, dtype=torch.float64) * 0.5
    offset[0, 4, 2, 3] = float("nan")  # tap 2, dy, at output (2, 3)
    offset.requires_grad_()
    mask = torch.rand(1, 9, 6, 6, dtype=torch.float64)
    out = modulated_deform_conv2d(x, offset, mask, w, padding=1)
    nan = torch.isnan(out)
    assert nan[0, :, 2, 3].all()
    assert nan.sum() == out.shape[1]  # only that position
    out.sum().backward()
    assert torch.isnan(offset.grad[0, :, 2, 3]).any()
    assert torch.isnan(x.grad).any()


def test_deform_roi_pool_nan_offset_propagates_to_its_bin_only():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    offset[0, 0, 1, 2] = float("nan")
    out = deform_roi_pool(x, rois, offset, 3)
    nan = torch.isnan(out)
    assert nan[0, :, 1, 2].all()
    assert nan.sum() == out.shape[1]


def test_nan_feature_map_propagates():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    offset = torch.zeros(1, 2, 5, 5)
    out = modulated_deform_conv2d(x, offset, None, torch.ones(1, 1, 1, 1))
    nan = {tuple(i) for i in torch.isnan(out[0, 0]).nonzero().tolist()}
    # the sample at (2, 2) and those whose bilinear cell has (2, 2) as a zero-weight corner
    assert (2, 2) in nan and nan <= {(1, 1), (1, 2), (2, 1), (2, 2)}
