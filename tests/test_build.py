"""The built extension itself: how it is linked, and that its error messages survive formatting.

A relocated GCC without libstdc++.so (the GPU image's CXX=/opt/gcc/bin/g++) once linked libstdc++
statically into the extension; the private copy's iostreams then crashed (or truncated) the first
number formatted into a TORCH_CHECK message, i.e. every error of our ops. setup.py now links the
shared libstdc++ and refuses such a build; these tests pin both symptoms.
"""

import shutil
import subprocess
import sys

import pytest
import torch

import projects_dcnv2._C as ext


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
