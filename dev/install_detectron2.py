#!/usr/bin/env python
"""Install detectron2 into the Python environment that runs this script.

detectron2 is not published on PyPI, so two sources are supported:

* ``git``  -- the official repository, pinned to one commit of facebookresearch/detectron2,
  installed with ``pip install --no-build-isolation git+https://...@<commit>``. This builds
  detectron2's compiled extension ``detectron2._C`` and needs github.com, git and a C++
  (and, for GPU ops, CUDA) toolchain that matches the installed torch.
* ``pypi`` -- offline-friendly: the ``pb1-detectron2==0.6`` sdist from PyPI (its Python files
  are those of detectron2 v0.6, but it lacks ``detectron2/layers/csrc``). The sdist is
  checked against a pinned sha256, unpacked, patched with
  ``dev/patches/detectron2-v0.6-offline.patch`` (``git apply``, or ``patch`` without git) and installed as a pure-Python
  distribution named ``detectron2`` version 0.6 (no ``_C``), together with its runtime
  dependencies from PyPI.
* ``auto`` (default) -- use ``git`` when github.com answers within a few seconds, otherwise
  (or when the git install fails) fall back to ``pypi``.

The source is chosen with ``--source`` or the ``DETECTRON2_SOURCE`` environment variable
(the flag wins). Re-running is cheap: an install that already matches is detected and kept.
``--force`` reinstalls; ``--check`` only reports what is installed and imports the parts of
detectron2 this project uses (exit status 0 when a usable install is present).

This is environment bootstrap for ``make setup``, not a user tool (see docs/install_detectron2.md).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# --- pinned sources ---------------------------------------------------------------------------

GIT_REPO = "https://github.com/facebookresearch/detectron2.git"
GIT_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
GIT_REACHABILITY_TIMEOUT_S = 10

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILENAME = "pb1-detectron2-0.6.tar.gz"
# sha256 of pb1-detectron2-0.6.tar.gz as published on PyPI (also the digest PyPI's simple
# index lists for that file).
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

PATCH_FILE = Path(__file__).resolve().parent / "patches" / "detectron2-v0.6-offline.patch"

# Written into the installed package by the pypi path; lets a re-run recognise its own install.
MARKER_NAME = "_offline_install.json"

# Runtime dependencies of detectron2 v0.6 (its setup.py install_requires), all on PyPI.
# Left out on purpose: "future" and "pydot" (only used by the Caffe2 export, which needs
# caffe2 -- gone from today's torch), "dataclasses" (Python < 3.7 only). The v0.6 pin
# black==21.4b2 is dropped: that release does not import with click >= 8.1; black is only
# used to pretty-print LazyConfig.save() output.
RUNTIME_REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "black",
]

# Subprojects that v0.6's setup.py installs as detectron2.projects.<name>.
PROJECTS = {
    "point_rend": "projects/PointRend/point_rend",
    "deeplab": "projects/DeepLab/deeplab",
    "panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}


class InstallError(RuntimeError):
    pass


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def run(cmd, **kwargs):
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], **kwargs)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- what is installed now ----------------------------------------------------------------------


def probe(code, what):
    """Run ``code`` in a fresh interpreter of this environment (so that nothing imported or
    installed earlier in this process confuses the answer); its last output line, or
    :class:`InstallError` naming ``what`` failed."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise InstallError(f"{what}:\n{res.stdout}{res.stderr.strip()}")
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


_STATE = f"""
import json, importlib.metadata as md
try:
    dist = md.distribution("detectron2")
except md.PackageNotFoundError:
    print(json.dumps({{"installed": False}}))
else:
    direct = dist.read_text("direct_url.json")
    marker = [f for f in dist.files or [] if f.name == "{MARKER_NAME}"]
    print(json.dumps({{
        "installed": True,
        "version": dist.version,
        "direct_url": json.loads(direct) if direct else None,
        "marker": json.loads(marker[0].read_text()) if marker else None,
    }}))
"""

# The parts of detectron2 this project uses, imported as train_net.py and the tools do.
_IMPORTS = """
import importlib.util
import detectron2, detectron2.checkpoint, detectron2.config, detectron2.data, detectron2.engine
import detectron2.evaluation, detectron2.layers, detectron2.modeling, detectron2.structures
has_c = importlib.util.find_spec("detectron2._C") is not None
if REQUIRE_C:
    import detectron2._C
print(f"detectron2 {detectron2.__version__} at {detectron2.__file__} (_C {'present' if has_c else 'absent'})")
"""


def installed_state():
    """The detectron2 distribution installed in this interpreter's environment (a dict)."""
    return json.loads(probe(_STATE, "could not inspect the environment"))


def import_check(require_c):
    """Import detectron2 in a fresh interpreter; return a one-line summary or raise."""
    code = f"REQUIRE_C = {bool(require_c)}\n" + _IMPORTS
    return probe(code, "installed detectron2 does not import")


def require_torch():
    probe(
        "import torch, torchvision",
        "torch and torchvision must be installed in this environment before detectron2 "
        f"({sys.executable})",
    )


def git_install_matches(state):
    if not state.get("installed"):
        return False
    vcs = (state.get("direct_url") or {}).get("vcs_info") or {}
    return vcs.get("commit_id") == GIT_COMMIT


def pypi_install_matches(state):
    if not state.get("installed") or state.get("version") != SDIST_VERSION:
        return False
    marker = state.get("marker") or {}
    return marker.get("sdist_sha256") == SDIST_SHA256 and marker.get("patch_sha256") == sha256_of(
        PATCH_FILE
    )


# --- git source ---------------------------------------------------------------------------------


def github_reachable(timeout=GIT_REACHABILITY_TIMEOUT_S):
    git = shutil.which("git")
    if git is None:
        log("git is not installed: the git source is unavailable")
        return False
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        res = subprocess.run(
            [git, "ls-remote", "--exit-code", GIT_REPO, "HEAD"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        log(f"github.com did not answer within {timeout}s")
        return False
    if res.returncode != 0:
        log(f"`git ls-remote {GIT_REPO}` failed: {res.stderr.strip() or res.returncode}")
        return False
    return True


def install_from_git(force):
    state = installed_state()
    if not force and git_install_matches(state):
        log(f"detectron2 from {GIT_REPO}@{GIT_COMMIT} is already installed: nothing to do")
        return "git (already installed)"
    if shutil.which("git") is None:
        raise InstallError("the git source needs the `git` executable, which was not found")
    require_torch()
    spec = f"git+{GIT_REPO}@{GIT_COMMIT}"
    # A VCS requirement is always rebuilt and reinstalled by pip, replacing any detectron2.
    res = run([sys.executable, "-m", "pip", "install", "--no-build-isolation", spec])
    if res.returncode != 0:
        raise InstallError(
            f"`pip install {spec}` failed (exit status {res.returncode}). This path needs "
            "network access to github.com, git, and a C++ compiler (plus a CUDA toolkit for "
            "GPU ops) that matches the installed torch. Use DETECTRON2_SOURCE=pypi for the "
            "offline install without the compiled extension."
        )
    log("import check: " + import_check(require_c=True))
    return f"git ({GIT_REPO}@{GIT_COMMIT})"


# --- pypi source --------------------------------------------------------------------------------


def download_sdist(dest):
    # Preparing an sdist's metadata runs its setup.py, which imports torch: build in the
    # current environment (which has torch) instead of an isolated one (which has not).
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        f"{SDIST_NAME}=={SDIST_VERSION}",
        "-d",
        dest,
    ]
    res = run(cmd)
    path = Path(dest) / SDIST_FILENAME
    if res.returncode != 0 or not path.is_file():
        raise InstallError(
            f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip (exit status "
            f"{res.returncode}); is the PyPI index reachable?"
        )
    return path


def verify_sdist(path):
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise InstallError(
            f"refusing to install {path.name}: its sha256 is {digest}, expected the pinned "
            f"{SDIST_SHA256}. The file on the index is not the one this installer and its "
            "patch were made for."
        )
    log(f"sha256 ok: {digest}")


def safe_extract(tar_path, dest):
    dest = Path(dest).resolve()
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if dest not in target.parents and target != dest:
                raise InstallError(f"unsafe path in sdist: {member.name}")
            if not (member.isfile() or member.isdir()):
                raise InstallError(f"unexpected member type in sdist: {member.name}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.12 without the backported filters: members were checked above
            tar.extractall(dest)
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise InstallError(f"unexpected sdist layout: {[p.name for p in roots]}")
    return roots[0]


def apply_patch(patch_path, root):
    """Apply the patch in ``root`` without fuzz: ``git apply`` (works outside a repository), or
    ``patch`` where git is missing. The sdist is pinned by hash, so every hunk must apply."""
    if shutil.which("git"):
        cmd = ["git", "apply", "--verbose", "-p1", str(patch_path)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--fuzz=0", "--batch", "--forward", "-i", str(patch_path)]
    else:
        raise InstallError(
            "applying the detectron2 patch needs `git` or `patch`; neither was found"
        )
    res = run(cmd, cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise InstallError(f"{patch_path.name} does not apply:\n{res.stdout}{res.stderr}")


SETUP_PY = """\
# Generated by projects_dcnv2 dev/install_detectron2.py: packages the Python files of
# detectron2 v0.6 (from the pb1-detectron2 sdist, patched) without building detectron2._C.
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version={version!r},
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="detectron2 v0.6 Python package, installed without its C++/CUDA extension "
    "(from the pb1-detectron2 sdist, patched for current numpy/Pillow/setuptools)",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{
        "detectron2": [{marker!r}],
        "detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"],
    }},
    python_requires=">=3.7",
    install_requires={requirements!r},
    zip_safe=False,
)
"""

PYPROJECT_TOML = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
"""


def build_tree(src_root, build_dir):
    """Lay out a minimal pure-Python project with the (patched) detectron2 package."""
    build_dir = Path(build_dir)
    pkg = build_dir / "detectron2"
    shutil.copytree(src_root / "detectron2", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, rel in PROJECTS.items():
        dst = pkg / "projects" / name
        if dst.exists():
            raise InstallError(f"unexpected {dst} in the sdist")
        shutil.copytree(src_root / rel, dst, ignore=shutil.ignore_patterns("__pycache__"))
    if (pkg / "layers" / "csrc").exists():  # never build or ship C++ sources here
        shutil.rmtree(pkg / "layers" / "csrc")
    if (src_root / "LICENSE").is_file():
        shutil.copy2(src_root / "LICENSE", build_dir / "LICENSE")
    marker = {
        "source": f"pypi:{SDIST_NAME}=={SDIST_VERSION}",
        "sdist_sha256": SDIST_SHA256,
        "patch": PATCH_FILE.name,
        "patch_sha256": sha256_of(PATCH_FILE),
        "compiled_extension": False,
    }
    (pkg / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    (build_dir / "setup.py").write_text(
        SETUP_PY.format(
            version=SDIST_VERSION, marker=MARKER_NAME, requirements=RUNTIME_REQUIREMENTS
        )
    )
    (build_dir / "pyproject.toml").write_text(PYPROJECT_TOML)


def install_from_pypi(force):
    if not PATCH_FILE.is_file():
        raise InstallError(f"patch file not found: {PATCH_FILE}")
    state = installed_state()
    if not force and pypi_install_matches(state):
        log(
            f"detectron2 {SDIST_VERSION} from {SDIST_NAME} with the current patch is already "
            "installed: nothing to do"
        )
        return f"pypi ({SDIST_NAME}=={SDIST_VERSION}, already installed)"
    require_torch()
    with tempfile.TemporaryDirectory(prefix="d2-offline-") as tmp:
        tmp = Path(tmp)
        sdist = download_sdist(tmp / "dl")
        verify_sdist(sdist)
        src_root = safe_extract(sdist, tmp / "src")
        apply_patch(PATCH_FILE, src_root)
        build_dir = tmp / "build"
        build_dir.mkdir()
        build_tree(src_root, build_dir)
        # pip always (re)installs a local directory, replacing any installed detectron2;
        # dependencies already present are kept as they are.
        cmd = [sys.executable, "-m", "pip", "install"]
        if importlib.util.find_spec("setuptools") is not None:
            # Build with the environment's setuptools: no download of build requirements.
            cmd.append("--no-build-isolation")
        res = run(cmd + [build_dir])
        if res.returncode != 0:
            raise InstallError(f"pip install of the patched detectron2 failed ({res.returncode})")
    log("import check: " + import_check(require_c=False))
    return f"pypi ({SDIST_NAME}=={SDIST_VERSION} + {PATCH_FILE.name}, no _C)"


# --- main ---------------------------------------------------------------------------------------


def describe(state):
    if not state.get("installed"):
        return "detectron2 is not installed"
    if git_install_matches(state):
        return f"detectron2 {state['version']} from {GIT_REPO}@{GIT_COMMIT}"
    if pypi_install_matches(state):
        return f"detectron2 {state['version']} from {SDIST_NAME}=={SDIST_VERSION} + current patch"
    marker = state.get("marker")
    if marker:
        return f"detectron2 {state['version']} from {marker.get('source')} with an outdated patch"
    return f"detectron2 {state.get('version')} from an unknown source"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        choices=["auto", "git", "pypi"],
        default=None,
        help="where to get detectron2 (default: $DETECTRON2_SOURCE, else auto)",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    parser.add_argument("--check", action="store_true", help="only report the installed detectron2")
    args = parser.parse_args(argv)

    source = args.source or os.environ.get("DETECTRON2_SOURCE", "").strip().lower() or "auto"
    if source not in ("auto", "git", "pypi"):
        parser.error(f"DETECTRON2_SOURCE must be auto, git or pypi, not {source!r}")

    log(f"python: {sys.executable}")
    try:
        state = installed_state()
        if args.check:
            log(describe(state))
            return 0 if (git_install_matches(state) or pypi_install_matches(state)) else 1

        t0 = time.time()
        log(f"requested source: {source}")
        if source == "git":
            used = install_from_git(args.force)
        elif source == "pypi":
            used = install_from_pypi(args.force)
        else:
            if not args.force and (git_install_matches(state) or pypi_install_matches(state)):
                log(describe(state) + ": already installed, nothing to do")
                used = (
                    "git (already installed)"
                    if git_install_matches(state)
                    else (f"pypi ({SDIST_NAME}=={SDIST_VERSION}, already installed)")
                )
            elif github_reachable():
                try:
                    used = install_from_git(args.force)
                except InstallError as e:
                    log(f"git install failed, falling back to pypi: {e}")
                    used = install_from_pypi(args.force)
            else:
                log("github.com is not reachable: using the pypi source")
                used = install_from_pypi(args.force)
        log(f"detectron2 source used: {used} [{time.time() - t0:.1f}s]")
        return 0
    except InstallError as e:
        log(f"ERROR: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
