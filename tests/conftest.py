"""Shared pytest setup: this folder is importable (``reference_ops``, ``builders``, ``crash_guard``),
the process-wide state a test may change is put back after it, and op tests can opt into
``op_test_env`` (``pytestmark = pytest.mark.usefixtures("op_test_env")``)."""

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the fused Triton kernels run on CPU tensors in Triton's interpreter, which must be
# chosen before any test imports projects_dcnv2 (tests/test_triton_mdconv.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _global_state():
    return {
        "threads": torch.get_num_threads(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "environ": dict(os.environ),
    }


@contextlib.contextmanager
def global_state_restored():
    """Thread count, deterministic-algorithms mode, default dtype, grad mode and environment
    variables are put back as they were on entry, whatever the body changed."""
    before = _global_state()
    try:
        yield
    finally:
        if _global_state() != before:
            torch.set_num_threads(before["threads"])
            mode, warn_only = before["deterministic"]
            torch.use_deterministic_algorithms(mode, warn_only=warn_only)
            torch.set_default_dtype(before["default_dtype"])
            torch.set_grad_enabled(before["grad_enabled"])
            for key in set(os.environ) - set(before["environ"]):
                del os.environ[key]
            os.environ.update(before["environ"])


@pytest.fixture(autouse=True)
def restore_global_state():
    with global_state_restored():
        yield


@pytest.fixture
def op_test_env():
    """Fixed seed and one intra-op thread: the op tests use tiny tensors, for which OpenMP start-up
    dominates on a busy machine. Tests of the multi-threaded kernels call torch.set_num_threads(2)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
