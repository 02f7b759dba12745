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
  ``tools/patches/detectron2-v0.6-offline.patch`` and installed as a pure-Python
  distribution named ``detectron2`` version 0.6 (no ``_C``), together with its runtime
  dependencies from PyPI.
* ``auto`` (default) -- use ``git`` when github.com answers within a few seconds, otherwise
  (or when the git install fails) fall back to ``pypi``.

The source is chosen with ``--source`` or the ``DETECTRON2_SOURCE`` environment variable
(the flag wins). Re-running is cheap: an install that already matches is detected and kept.
``--force`` reinstalls; ``--check`` only reports what is installed (exit status 0 when a
usable install is present).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
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


def installed_state():
    """Describe the detectron2 distribution installed in this interpreter's environment.

    Runs in a fresh interpreter so that a module imported (or installed) earlier in this
    process cannot confuse the answer.
    """
    probe = textwrap.dedent(
        f"""
        import json, importlib.metadata as md
        out = {{"installed": False}}
        try:
            dist = md.distribution("detectron2")
        except md.PackageNotFoundError:
            dist = None
        if dist is not None:
            out["installed"] = True
            out["version"] = dist.version
            direct = dist.read_text("direct_url.json")
            out["direct_url"] = json.loads(direct) if direct else None
            marker = None
            for f in dist.files or []:
                if str(f).replace("\\\\", "/") == "detectron2/{MARKER_NAME}":
                    try:
                        marker = json.loads(f.read_text())
                    except Exception:
                        marker = None
            out["marker"] = marker
        print(json.dumps(out))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise InstallError(f"could not inspect the environment:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def git_install_matches(state):
    if not state.get("installed"):
        return False
    vcs = (state.get("direct_url") or {}).get("vcs_info") or {}
    return vcs.get("commit_id") == GIT_COMMIT


def pypi_install_matches(state):
    if not state.get("installed") or state.get("version") != SDIST_VERSION:
        return False
    marker = state.get("marker") or {}
    return (
        marker.get("sdist_sha256") == SDIST_SHA256
        and marker.get("patch_sha256") == sha256_of(PATCH_FILE)
    )


def import_check(require_c):
    """Import detectron2 in a fresh interpreter; return a one-line summary or raise."""
    code = textwrap.dedent(
        f"""
        import importlib.util
        import detectron2, detectron2.layers, detectron2.modeling, detectron2.engine
        import detectron2.evaluation, detectron2.model_zoo
        has_c = importlib.util.find_spec("detectron2._C") is not None
        if {require_c!r}:
            import detectron2._C
        print(f"detectron2 {{detectron2.__version__}} at {{detectron2.__file__}} "
              f"(_C {{'present' if has_c else 'absent'}})")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise InstallError(f"installed detectron2 does not import:\n{res.stdout}{res.stderr}")
    return res.stdout.strip().splitlines()[-1]


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


def require_torch():
    res = subprocess.run(
        [sys.executable, "-c", "import torch, torchvision"], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise InstallError(
            "torch and torchvision must be installed in this environment before detectron2 "
            f"({sys.executable}):\n{res.stderr.strip()}"
        )


def download_sdist(dest):
    # Preparing an sdist's metadata runs its setup.py, which imports torch: build in the
    # current environment (which has torch) instead of an isolated one (which has not).
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--no-build-isolation", f"{SDIST_NAME}=={SDIST_VERSION}", "-d", dest,
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


# A unified diff applier: exact context, no fuzz, no offsets -- the sdist is pinned by hash,
# so every hunk must apply exactly where the patch says.
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_path(header_path, strip):
    p = header_path.split("\t")[0].strip()
    if p == "/dev/null":
        return None
    return "/".join(p.split("/")[strip:])


def parse_patch(text):
    """Return [(old_path, new_path, [hunk, ...])]; a hunk is (old_start, old_len, lines)."""
    files = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old_path = _strip_path(line[4:], 1)
            new_path = _strip_path(lines[i + 1][4:], 1)
            hunks = []
            i += 2
            while i < len(lines) and lines[i].startswith("@@"):
                m = _HUNK_RE.match(lines[i])
                if not m:
                    raise InstallError(f"malformed hunk header: {lines[i]!r}")
                old_start = int(m.group(1))
                old_len = int(m.group(2) or 1)
                new_len = int(m.group(4) or 1)
                body = []
                seen_old = seen_new = 0
                i += 1
                while i < len(lines) and (seen_old < old_len or seen_new < new_len):
                    l = lines[i]
                    if l.startswith("\\"):  # "\ No newline at end of file"
                        if body:
                            body[-1] = (body[-1][0], body[-1][1].rstrip("\n"))
                        i += 1
                        continue
                    tag, content = l[:1], l[1:]
                    if tag == "" and l in ("\n", ""):  # some tools drop the space of empty lines
                        tag, content = " ", "\n"
                    if tag not in (" ", "-", "+"):
                        raise InstallError(f"malformed hunk line: {l!r}")
                    body.append((tag, content))
                    seen_old += tag in (" ", "-")
                    seen_new += tag in (" ", "+")
                    i += 1
                while i < len(lines) and lines[i].startswith("\\"):
                    if body:
                        body[-1] = (body[-1][0], body[-1][1].rstrip("\n"))
                    i += 1
                if seen_old != old_len or seen_new != new_len:
                    raise InstallError(f"truncated hunk in patch for {new_path or old_path}")
                hunks.append((old_start, old_len, body))
            files.append((old_path, new_path, hunks))
            continue
        i += 1
    if not files:
        raise InstallError("the patch file contains no file diffs")
    return files


def apply_patch(patch_path, root):
    root = Path(root)
    for old_path, new_path, hunks in parse_patch(patch_path.read_text()):
        rel = new_path or old_path
        target = root / rel
        if old_path is None:
            if target.exists():
                raise InstallError(f"patch creates {rel}, which already exists")
            src = []
        else:
            src = (root / old_path).read_text().splitlines(keepends=True)
        out = []
        pos = 0  # index into src of the next line to copy
        for old_start, old_len, body in hunks:
            start = old_start - 1 if old_len > 0 else old_start
            expected = [c for t, c in body if t in (" ", "-")]
            if start < pos or src[start : start + len(expected)] != expected:
                raise InstallError(
                    f"hunk at line {old_start} of {rel} does not apply: the source differs "
                    "from what the patch expects"
                )
            out.extend(src[pos:start])
            out.extend(c for t, c in body if t in (" ", "+"))
            pos = start + len(expected)
        out.extend(src[pos:])
        if new_path is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(out))
        log(f"patched {rel} ({len(hunks)} hunk{'s' if len(hunks) != 1 else ''})")


SETUP_PY = '''\
# Generated by projects_dcnv2 tools/install_detectron2.py: packages the Python files of
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
'''

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


def has_module(name):
    res = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True
    )
    return res.returncode == 0


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
        if has_module("setuptools"):
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
    parser.add_argument(
        "--check", action="store_true", help="only report the installed detectron2"
    )
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
                used = "git (already installed)" if git_install_matches(state) else (
                    f"pypi ({SDIST_NAME}=={SDIST_VERSION}, already installed)"
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
