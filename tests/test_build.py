"""The built extension itself: how it is linked, that its error messages survive formatting, and
what setup.py compiles (the default CUDA architectures, the emulated CUDA ops only when asked).

A relocated GCC without libstdc++.so (the GPU image's CXX=/opt/gcc/bin/g++) once linked libstdc++
statically into the extension; the private copy's iostreams then crashed (or truncated) the first
number formatted into a TORCH_CHECK message, i.e. every error of our ops. setup.py now links the
shared libstdc++ and refuses such a build; these tests pin both symptoms.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch

import projects_dcnv2.ops._C as ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its setup() call runs only as __main__); environment left as it was."""
    spec = importlib.util.spec_from_file_location("dcnv2_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):
        spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("readelf") is None,
    reason="needs Linux and readelf (binutils)",
)
def test_extension_links_the_shared_libstdcxx():
    dynamic = subprocess.run(
        ["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert "libstdc++.so" in dynamic, (
        f"{ext.__file__}: libstdc++ linked statically (no libstdc++.so in NEEDED)"
    )


def test_error_message_keeps_its_numbers():
    """A formatted number in a TORCH_CHECK message: the whole message arrives, nothing truncated."""
    with pytest.raises(RuntimeError, match=r"got a 3-D tensor of shape \[4, 6, 5\]$"):
        torch.ops.dcnv2.modulated_deform_conv2d(
            torch.randn(4, 6, 5),
            torch.randn(2, 18, 6, 5),
            torch.rand(2, 9, 6, 5),
            torch.randn(6, 4, 3, 3),
            None,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
        )
    with pytest.raises(
        RuntimeError, match=r"batch indices \(column 0\) in \[0, 2\), got values in \[0, 5\]"
    ):
        torch.ops.dcnv2.deform_roi_pool(
            torch.randn(2, 3, 8, 8),
            torch.tensor([[0.0, 1, 1, 4, 4], [5.0, 1, 1, 4, 4]]),
            None,
            2,
            2,
            1.0,
            0,
            0.1,
        )


def test_default_arch_list_is_torchs_with_ptx_for_the_newest(setup_py):
    torch_archs = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert setup_py.default_cuda_arch_list(torch_archs) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    # order, PTX entries and arch-specific variants as torch may list them
    assert (
        setup_py.default_cuda_arch_list(["compute_90", "sm_90a", "sm_120", "sm_80", "sm_90"])
        == "8.0;9.0;12.0+PTX"
    )
    # an nvcc older than torch's CUDA: what it cannot compile is left out, PTX moves to its newest
    nvcc = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    assert setup_py.default_cuda_arch_list(torch_archs, nvcc) == "7.5;8.0;8.6;9.0+PTX"
    assert setup_py.default_cuda_arch_list([]) is None
    assert setup_py.default_cuda_arch_list(["sm_120"], ["sm_80"]) is None


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is built without CUDA")
def test_default_arch_list_covers_the_installed_torch(setup_py):
    archs = setup_py.default_cuda_arch_list(torch.cuda.get_arch_list())
    assert archs.endswith("+PTX")
    built = {float(a) for a in archs.removesuffix("+PTX").split(";")}
    want = {int(a[3:].rstrip("af")) / 10 for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    assert built == want


@pytest.mark.parametrize("flag", ["0", "1"])
def test_emulated_cuda_ops_are_built_only_when_asked(setup_py, flag):
    env = {"DCNV2_BUILD_EMULATED_CUDA": flag, "DCNV2_WITH_CUDA": "0"}
    with mock.patch.dict(os.environ, env):
        sources = setup_py._extension().sources
    emulated = [s for s in sources if os.sep + "emulated_cuda" + os.sep in s]
    assert bool(emulated) == (flag == "1"), sources
    assert not any(s.endswith(".cu") for s in sources)


def test_this_build_has_no_private_cuda_twins():
    """The column path is the public operators' CUDA kernel (registered in C++): no _cuda_* twins."""
    assert not hasattr(torch.ops.dcnv2, "_cuda_modulated_deform_conv2d")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dcnv2::modulated_deform_conv2d", "CPU")
