"""Determinism: CPU gradients are deterministic (and allowed under use_deterministic_algorithms);
CUDA backward passes, which accumulate input gradients with atomics, raise PyTorch's standard error.
The thread count and deterministic mode these tests set are put back by conftest.py, checked last."""

import os

import pytest
import torch

from projects_dcnv2.layers import deform_roi_pool, modulated_deform_conv2d


def _conv_grads(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g).to(device).requires_grad_()
    offset = (torch.randn(2, 18 * 2, 9, 9, generator=g) * 2).to(device).requires_grad_()
    mask = torch.rand(2, 9 * 2, 9, 9, generator=g).to(device).requires_grad_()
    w = torch.randn(4, 8, 3, 3, generator=g).to(device).requires_grad_()
    modulated_deform_conv2d(
        x, offset, mask, w, padding=1, deformable_groups=2
    ).square().sum().backward()
    return [t.grad.clone() for t in (x, offset, mask, w)]


def _pool_grads(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 12, generator=g).to(device).requires_grad_()
    rois = torch.tensor(
        [[0, 1.0, 1.0, 9.0, 9.0], [1, 0.0, 2.0, 7.0, 11.0], [0, 2.0, 2.0, 6.0, 6.0]]
    ).to(device)
    offset = (torch.randn(3, 2, 3, 3, generator=g) * 0.2).to(device).requires_grad_()
    deform_roi_pool(x, rois, offset, 3, sampling_ratio=2).square().sum().backward()
    return [x.grad.clone(), offset.grad.clone()]


@pytest.mark.parametrize("grads", [_conv_grads, _pool_grads], ids=["mdconv", "deform_roi_pool"])
def test_cpu_backward_is_deterministic(grads):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    first, second = grads("cpu"), grads("cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: CUDA determinism test skipped"
)
@pytest.mark.parametrize("grads", [_conv_grads, _pool_grads], ids=["mdconv", "deform_roi_pool"])
def test_cuda_backward_raises_under_deterministic_mode(grads):
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        grads("cuda")


def test_conftest_restores_the_global_state():
    """What the tests above change (and a default dtype, grad mode, environment variables) comes back."""
    from conftest import _global_state, global_state_restored

    before = _global_state()
    with global_state_restored():
        torch.set_num_threads(before["threads"] + 1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        os.environ["DCNV2_STATE_PROBE"] = "1"
        os.environ.pop("PATH")
        assert _global_state() != before
    assert _global_state() == before
