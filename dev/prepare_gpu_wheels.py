#!/usr/bin/env python
"""Prepare, on a machine with PyPI, the wheels an offline GPU machine needs to run detectron2.

    python dev/prepare_gpu_wheels.py [--dest .gpu_wheels] [--python-version 3.12] [--verify]

The GPU machine (python3 3.12, torch, torchvision, Triton, numpy, opencv, matplotlib, tensorboard;
its package list is dev/gpu_image_packages.txt) has no detectron2 and cannot reach a registry.
What detectron2 v0.6 (as dev/install_detectron2.py's pypi source builds it) and this project import
while training, evaluating with COCOEvaluator and benchmarking, and the image lacks, is KIT below.
hydra-core and black, in detectron2's install_requires, are left out: only LazyConfig uses them.

Into DEST (emptied of wheels first, so that there is one version of each) go:

* each KIT package at the version installed in the interpreter running this script (make setup's
  .venv, the one the test suite passes with): the wheel for CPython X.Y on manylinux x86_64 where
  PyPI has one, else a wheel built from the sdist, which must come out pure Python (py3-none-any);
* detectron2-0.6-py3-none-any.whl, built as dev/install_detectron2.py installs it: the pinned
  pb1-detectron2 sdist, checked against its sha256, patched, packaged without detectron2._C;
* manifest.txt: the Python version, each wheel's sha256, and the install command.

On the GPU machine (tools/gpu_check.sh does this when detectron2 does not import):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_wheels/*.whl
    export PYTHONPATH=/tmp/site

``--verify`` (only where this interpreter is CPython X.Y) then installs the kit that way into a
scratch environment which sees, from this interpreter's site-packages, only the distributions the
GPU image has, imports detectron2 and runs train_net.py for two iterations with COCO evaluation.
"""

import argparse
import hashlib
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_detectron2 as d2_install  # noqa: E402  (dev/ sibling: the same sdist, patch, tree)

# Imported at run time (detectron2, fvcore, pycocotools and their imports) and absent from the
# GPU image; the rest of what they import (numpy, PyYAML, Pillow, tqdm, tabulate, portalocker,
# cloudpickle, tensorboard, opencv) is there.
KIT = [
    "yacs",
    "termcolor",
    "iopath",
    "fvcore",
    "omegaconf",
    "antlr4-python3-runtime",
    "pycocotools",
]
IMAGE_PACKAGES = Path(__file__).resolve().parent / "gpu_image_packages.txt"
# pip matches each manylinux_2_N tag exactly: name every glibc up to the image's (2.39).
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]
INSTALL = "python3 -m pip install -q --no-index --no-deps --no-compile --target {site} {dest}/*.whl"


def log(msg):
    print(f"[prepare_gpu_wheels] {msg}", flush=True)


def pip(*args, **kwargs):
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, **kwargs)


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(
            f"{name} is not installed in {sys.executable}: the kit takes the versions of the "
            "environment the tests pass in (run make setup, then this script with .venv/bin/python)"
        )


def fetch(name, version, python_version, dest):
    """The wheel of name==version for CPython ``python_version`` into ``dest``; its path."""
    tag = python_version.replace(".", "")
    before = set(dest.glob("*.whl"))
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    res = pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none",
        *platforms, "--platform", "any", "-d", str(dest), f"{name}=={version}",
    )  # fmt: skip
    if res.returncode != 0:  # no wheel on the index for that Python: build one from the sdist
        res = pip("wheel", "--no-deps", "-w", str(dest), f"{name}=={version}")
        new = set(dest.glob("*.whl")) - before
        if res.returncode != 0 or len(new) != 1:
            sys.exit(f"could not download or build a wheel of {name}=={version}")
        wheel = new.pop()
        if not wheel.name.endswith("-py3-none-any.whl"):
            sys.exit(
                f"{name}=={version} has no wheel for CPython {python_version} on the index and its "
                f"sdist built {wheel.name}, which is not pure Python: it would not run there"
            )
        return wheel
    new = set(dest.glob("*.whl")) - before
    if len(new) != 1:
        sys.exit(f"expected one new wheel for {name}=={version} in {dest}, found {sorted(new)}")
    return new.pop()


def build_detectron2(dest):
    """detectron2-0.6-py3-none-any.whl from the pinned, patched sdist (dev/install_detectron2.py)."""
    with tempfile.TemporaryDirectory(prefix="d2-wheel-") as tmp:
        tmp = Path(tmp)
        sdist = d2_install.download_sdist(tmp / "dl")
        d2_install.verify_sdist(sdist)
        src = d2_install.safe_extract(sdist, tmp / "src")
        d2_install.apply_patch(d2_install.PATCH_FILE, src)
        (tmp / "build").mkdir()
        d2_install.build_tree(src, tmp / "build")
        res = pip("wheel", "--no-deps", "-w", str(dest), str(tmp / "build"))
        if res.returncode != 0:
            sys.exit("building the detectron2 wheel failed")
    wheels = list(dest.glob("detectron2-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(dest, python_version):
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    wheels = [fetch(n, installed_version(n), python_version, dest) for n in KIT]
    wheels.append(build_detectron2(dest))
    lines = [
        f"# wheels for CPython {python_version} (manylinux x86_64), made by dev/prepare_gpu_wheels.py",
        f"python {python_version}",
        "install " + INSTALL.format(site="/tmp/site", dest=dest.name),
    ]
    lines += [f"wheel {w.name} {w.stat().st_size} {sha256(w)}" for w in sorted(wheels)]
    (dest / "manifest.txt").write_text("\n".join(lines) + "\n")
    total = sum(w.stat().st_size for w in wheels)
    log(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB in {dest}")
    return wheels


def image_view(view):
    """A folder of links to the distributions of this interpreter's site-packages that the GPU
    image also has (each distribution's top-level files and its .dist-info)."""
    wanted = set()
    for line in IMAGE_PACKAGES.read_text().splitlines():
        if not line.startswith("#"):
            wanted.update(normalise(n) for n in line.split())
    linked = []
    for dist in metadata.distributions():
        if normalise(dist.metadata["Name"]) not in wanted:
            continue
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            if (base / top).exists() and not (view / top).exists():
                (view / top).symlink_to(base / top)
        linked.append(dist.metadata["Name"])
    return linked


def verify(dest, python_version):
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != python_version:
        sys.exit(
            f"--verify needs a CPython {python_version} interpreter with torch; this one is {here}"
        )
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        tmp = Path(tmp)
        view, site = tmp / "image", tmp / "site"
        view.mkdir()
        linked = image_view(view)
        lacking = [n for n in KIT + ["detectron2"] if (view / n.replace("-", "_")).exists()]
        assert not lacking, f"the image view already holds {lacking}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "env"], check=True)
        python = tmp / "env" / "bin" / "python"
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        Path(purelib, "gpu_image.pth").write_text(str(view) + "\n")
        log(f"scratch environment sees {len(linked)} distributions of the image (pip, torch, ...)")
        # one OpenMP thread: oversubscribed threads on a busy machine slow a tiny model many times
        env = dict(
            os.environ, PYTHONPATH=f"{site}:{ROOT}", PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1"
        )
        for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
            env.pop(key, None)
        install = INSTALL.format(site=site, dest=dest).replace("python3", str(python), 1)
        log("$ " + install)
        subprocess.run(install, shell=True, check=True, env=env)
        probe = (
            "import detectron2, fvcore, pycocotools, projects_dcnv2, torch; "
            "print('detectron2', detectron2.__version__, 'from', detectron2.__file__)"
        )
        subprocess.run([python, "-c", probe], check=True, env=env, cwd=tmp)
        t0 = time.time()
        tiny = [
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
            "OUTPUT_DIR", str(tmp / "out"),
        ]  # fmt: skip
        config = "configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml"
        run = subprocess.run(
            [python, "train_net.py", "--config-file", config, *tiny],
            cwd=ROOT, env=dict(env, DETECTRON2_DATASETS=str(tmp / "datasets")),
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0 or "copypaste: AP" not in run.stdout + run.stderr:
            sys.exit(f"train_net.py failed in the scratch environment:\n{run.stderr[-3000:]}")
        log(f"train_net.py trained 2 iterations and ran COCOEvaluator ({time.time() - t0:.0f} s)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", default=str(ROOT / ".gpu_wheels"), help="the wheel folder")
    parser.add_argument("--python-version", default="3.12", help="CPython X.Y of the GPU machine")
    parser.add_argument("--verify", action="store_true", help="install and run it here after")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version: expected 3.N, got {args.python_version!r}")
    dest = Path(args.dest).resolve()
    prepare(dest, args.python_version)
    if args.verify:
        verify(dest, args.python_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
