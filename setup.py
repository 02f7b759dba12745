"""Builds projects_dcnv2 and its extension projects_dcnv2.ops._C from csrc/.

The CPU kernels are always built. The CUDA kernels are built whenever nvcc is found, GPU or not
(DCNV2_WITH_CUDA=auto, the default; 1 forces them, 0 disables them). Architectures: an explicit
TORCH_CUDA_ARCH_LIST wins; else with a visible GPU, torch's default (the visible cards); else machine
code for every architecture the installed torch was built for, and PTX for the newest
(default_cuda_arch_list). DCNV2_BUILD_EMULATED_CUDA=1 (set by `make setup`) adds the test-only
_emulated_cuda_* operators: the CUDA kernels compiled for the host.
"""

import glob
import os
import shlex
import subprocess
import sys
import sysconfig

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. The `nvcc` on PATH may be a wrapper
# script (e.g. /usr/local/bin/nvcc) from which torch would guess a CUDA home without libcudart.
if (
    "CUDA_HOME" not in os.environ
    and "CUDA_PATH" not in os.environ
    and os.path.isdir("/usr/local/cuda")
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ImportError:
    sys.exit(
        "projects_dcnv2 builds against the torch already installed, and none was found here: install torch "
        "first, then build without build isolation: pip install [-e] . --no-build-isolation"
    )
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _want_cuda():
    mode = os.environ.get("DCNV2_WITH_CUDA", os.environ.get("FORCE_CUDA", "auto")).lower()
    if mode in ("0", "false", "no", "off"):
        return False
    found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if mode in ("1", "true", "yes", "on"):
        if not found:
            sys.exit("DCNV2_WITH_CUDA=1 but no nvcc was found: set CUDA_HOME to your CUDA toolkit")
        return True
    if mode != "auto":
        sys.exit(f"DCNV2_WITH_CUDA: expected auto, 0 or 1, got {mode!r}")
    return found and torch.version.cuda is not None


def _env_flag(name):
    value = os.environ.get(name, "0").lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        sys.exit(f"{name}: expected 0 or 1, got {value!r}")
    return value in ("1", "true", "yes", "on")


def default_cuda_arch_list(torch_archs, nvcc_archs=None):
    """TORCH_CUDA_ARCH_LIST for a build that sees no GPU and was given none.

    Machine code for every architecture the installed torch was built for (torch_archs, as
    torch.cuda.get_arch_list() spells them: ["sm_75", ..., "sm_120"]) and PTX for the newest, which
    the driver compiles for any later card: "7.5;8.0;8.6;9.0;10.0;12.0+PTX". Where nvcc_archs (the
    `nvcc --list-gpu-code` of the nvcc at hand) is given, architectures it cannot compile for are left
    out. None when nothing is left (torch's own default then applies).
    """
    known = None if nvcc_archs is None else {a.rstrip("af") for a in nvcc_archs}
    versions = set()
    for arch in torch_archs:
        if not arch.startswith("sm_"):  # compute_XX: PTX, added below for the newest only
            continue
        digits = arch[3:].rstrip("af")  # sm_90a: the arch-specific variant of 9.0
        if not digits.isdigit() or (known is not None and "sm_" + digits not in known):
            continue
        versions.add((int(digits[:-1]), int(digits[-1])))
    if not versions:
        return None
    names = [f"{major}.{minor}" for major, minor in sorted(versions)]
    return ";".join(names) + "+PTX"


def _nvcc_gpu_codes():
    """The sm_XX codes the nvcc of CUDA_HOME compiles for, or None when it cannot say."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.split() or None


def _cxx_driver():
    """The C++ driver setuptools links with: $CXX when set, else Python's own."""
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def _libstdcxx_link_flags():
    """-l:libstdc++.so.6 where the C++ driver would link libstdc++ statically.

    A relocated GCC (e.g. CXX=/opt/gcc/bin/g++) may carry libstdc++.a but no libstdc++.so, and its
    implicit -lstdc++ then copies libstdc++ into the extension. That private copy's iostreams share
    locale data with the process's libstdc++.so.6 (loaded by torch) but not its facet indices: the first
    c10::str with a number (every TORCH_CHECK message) crashes or is cut short. Naming the shared
    library first leaves the archive nothing to supply.
    """
    try:
        found = subprocess.run(
            _cxx_driver() + ["-print-file-name=libstdc++.so"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [] if os.path.isabs(found) else ["-l:libstdc++.so.6"]


def _extension():
    sources = [os.path.join(CSRC, "extension.cpp")]
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cpu", "*.cpp")))
    # the Autograd and Autocast kernels (C++: no Python between the dispatcher and the kernels)
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "autograd", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "autocast", "*.cpp")))
    if _env_flag("DCNV2_BUILD_EMULATED_CUDA"):
        # The CUDA kernels and their operators compiled for the host, nvcc or not: the test-only
        # _emulated_cuda_* ops that run the CUDA path on every machine (make setup asks for them).
        print("projects_dcnv2: building the emulated CUDA operators (DCNV2_BUILD_EMULATED_CUDA=1)")
        sources += sorted(glob.glob(os.path.join(CSRC, "ops", "emulated_cuda", "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC)]
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        # Floating-point exceptions are never inspected; without this, GCC will not turn the
        # branch-free bilinear sampling (deform_math.h) into vector selects, since it may not
        # speculate a float-to-int conversion. Values are unchanged (unlike -ffast-math).
        cxx_flags.append("-fno-trapping-math")
    link_flags = _libstdcxx_link_flags() if sys.platform.startswith("linux") else []
    # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop, and every
    # CPU kernel would run on one thread. The library resolves to the libgomp torch already loaded.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    if not _want_cuda():
        print("projects_dcnv2: building the CPU kernels only")
        return cpp_extension.CppExtension(
            "projects_dcnv2.ops._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        archs = default_cuda_arch_list(torch.cuda.get_arch_list(), _nvcc_gpu_codes())
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(
        "projects_dcnv2: building the CPU and CUDA kernels "
        f"(CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})"
    )
    sources.append(os.path.join(CSRC, "ops", "cuda", "cuda_ops.cpp"))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cuda", "*.cu")))
    # ATen/cuda headers include cusparse.h etc., shipped in NVIDIA's pip packages next to torch.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    define_macros.append(("WITH_CUDA", None))
    nvcc_flags = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "projects_dcnv2.ops._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


class _BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """BuildExtension that refuses a Linux build with libstdc++ linked in statically (see above)."""

    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        if not sys.platform.startswith("linux"):
            return
        try:
            dynamic = subprocess.run(
                ["readelf", "-d", path], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return  # no binutils: nothing to check with
        if "libstdc++.so" not in dynamic:
            os.remove(path)
            sys.exit(
                f"projects_dcnv2: {path} links libstdc++ statically (no libstdc++.so in its NEEDED), "
                f"which crashes every error message; the C++ driver {' '.join(_cxx_driver())!r} finds no "
                "libstdc++.so: set CXX to a compiler that has one (e.g. CXX=g++)"
            )


# name, version, description and Python version: pyproject.toml. (setuptools runs this file as
# __main__; tests import it for default_cuda_arch_list.)
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["projects_dcnv2", "projects_dcnv2.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": _BuildExt},
        zip_safe=False,
    )
