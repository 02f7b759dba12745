"""Shared pytest setup: the reference implementations in this folder are importable, and op tests
can opt into `op_test_env` (e.g. ``pytestmark = pytest.mark.usefixtures("op_test_env")``)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def op_test_env():
    """Fixed seed and one intra-op thread: the op tests use tiny tensors, for which OpenMP start-up
    dominates on a busy machine. Tests of the multi-threaded kernels call torch.set_num_threads(2)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The seed table's configs and their plain twins, shared by the config and modeling tests.
SEED_CONFIGS = [
    "faster_rcnn_R50_FPN.yaml",
    "faster_rcnn_R50_FPN_mdconv.yaml",
    "faster_rcnn_R50_FPN_mdconv_dg4.yaml",
    "faster_rcnn_R50_FPN_mdpool.yaml",
    "mask_rcnn_R50_FPN.yaml",
    "mask_rcnn_R50_FPN_mdconv.yaml",
    "mask_rcnn_R50_FPN_mdconv_fp16.yaml",
]
