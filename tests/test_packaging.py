"""The package as users get it: the operator library without detectron2, registration on import
with it, and `pip install` into a user's own environment (pyproject.toml + setup.py).

Each check runs in a fresh interpreter, so what it sees comes from the import under test and
not from modules an earlier test imported.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Makes `import detectron2` (and any detectron2.* import) raise ImportError, as on a machine where
# it is not installed.
NO_DETECTRON2 = 'import sys; sys.modules["detectron2"] = None\n'


def run_python(code, *, python=sys.executable, cwd=ROOT, timeout=300, env=None):
    """Run ``code`` in a fresh interpreter; return its stdout, failing the test with its output."""
    res = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert res.returncode == 0, f"exit status {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


LAYERS_AGAINST_REFERENCE = """
import sys
import torch
sys.path.insert(0, {tests!r})
from reference_ops import deform_roi_pool_ref, mdconv2d_ref

from projects_dcnv2.layers import ModulatedDeformConv2dPack, ModulatedDeformRoIPoolPack

torch.manual_seed(0)
dtype = torch.float64

# mdconv: the Pack's own offset/mask conv (randomised, it starts at zero) drives the op.
conv = ModulatedDeformConv2dPack(4, 6, 3, padding=1, deformable_groups=2).to(dtype)
with torch.no_grad():
    conv.conv_offset.weight.normal_(0, 0.3)
    conv.conv_offset.bias.normal_(0, 0.3)
x = torch.randn(2, 4, 7, 6, dtype=dtype, requires_grad=True)
out = conv(x)
out.square().sum().backward()
ours = (out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.conv_offset.weight.grad.clone())
x.grad = None
conv.zero_grad()
o = conv.conv_offset(x)
split = 2 * 2 * 9
ref = mdconv2d_ref(x, o[:, :split], o[:, split:].sigmoid(), conv.weight, conv.bias, padding=1,
                   deformable_groups=2)
ref.square().sum().backward()
expected = (ref.detach(), x.grad, conv.weight.grad, conv.conv_offset.weight.grad)
for name, a, b in zip(("output", "input grad", "weight grad", "offset conv grad"), ours, expected):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"mdconv {{name}}")

# mdpool: a plain pass feeds offset_fc / mask_fc, the deformed pass is modulated by the mask.
pool = ModulatedDeformRoIPoolPack(3, 4, 8, spatial_scale=0.5).to(dtype)
with torch.no_grad():
    for p in pool.parameters():
        p.normal_(0, 0.2)
feat = torch.randn(2, 4, 9, 11, dtype=dtype, requires_grad=True)
rois = torch.tensor([[0, 1.0, 2.0, 15.0, 12.0], [1, 4.0, 0.5, 20.0, 17.0]], dtype=dtype)
out = pool(feat, rois)
out.square().sum().backward()
ours = (out.detach(), feat.grad.clone(), pool.offset_fc[0].weight.grad.clone())
feat.grad = None
pool.zero_grad()
plain = deform_roi_pool_ref(feat, rois, None, 3, 0.5)
offset = pool.offset_fc(plain.flatten(1)).view(-1, 2, 3, 3)
mask = pool.mask_fc(plain.flatten(1)).view(-1, 1, 3, 3)
ref = deform_roi_pool_ref(feat, rois, offset, 3, 0.5) * mask
ref.square().sum().backward()
expected = (ref.detach(), feat.grad, pool.offset_fc[0].weight.grad)
for name, a, b in zip(("output", "input grad", "offset_fc grad"), ours, expected):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"mdpool {{name}}")
print("layers ok")
"""


def test_layers_work_without_detectron2():
    """``projects_dcnv2`` and ``projects_dcnv2.layers`` import and compute (forward and
    backward, against the pure-PyTorch references) where ``import detectron2`` fails."""
    out = run_python(
        NO_DETECTRON2
        + LAYERS_AGAINST_REFERENCE.format(tests=str(TESTS))
        + """
import projects_dcnv2
assert projects_dcnv2.HAS_DETECTRON2 is False
assert not [m for m in sys.modules if m.startswith("detectron2.")], "detectron2 was imported"
assert not [m for m in sys.modules if m.startswith(("projects_dcnv2.modeling", "projects_dcnv2.config"))]
try:
    projects_dcnv2.add_dcnv2_config
except ImportError as e:
    assert "needs detectron2" in str(e), e
else:
    raise AssertionError("add_dcnv2_config without detectron2 did not raise")
print("package ok")
"""
    )
    assert out.split() == ["layers", "ok", "package", "ok"]


def test_import_registers_the_detectron2_components():
    """With detectron2 installed, ``import projects_dcnv2`` alone fills Detectron2's registries."""
    out = run_python(
        """
        from detectron2.data import DatasetCatalog
        from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
        before = set(BACKBONE_REGISTRY._obj_map) | set(ROI_HEADS_REGISTRY._obj_map)
        import projects_dcnv2
        assert projects_dcnv2.HAS_DETECTRON2 is True
        added = (set(BACKBONE_REGISTRY._obj_map) | set(ROI_HEADS_REGISTRY._obj_map)) - before
        shapes = sorted(n for n in DatasetCatalog.list() if n.startswith("dcnv2_shapes"))
        print(" ".join(sorted(added)), "|", " ".join(shapes), "|", projects_dcnv2.add_dcnv2_config.__name__)
        """
    )
    added, shapes, config = (part.split() for part in out.split("|"))
    assert {
        "build_dcnv2_resnet_backbone",
        "build_dcnv2_resnet_fpn_backbone",
        "MDPoolROIHeads",
    } <= set(added)
    assert shapes and config == ["add_dcnv2_config"]


# ------------------------------------------------------------------------------------------------
# pip install into a user's own environment.
#
# A pairwise cover of (pip, setuptools, wheel). pip 23.2.1 + setuptools 80 + wheel is the
# combination in which `pip install -e .` once fell back to `setup.py develop` (which re-ran pip
# with build isolation: "No module named 'torch'"); it installs both ways. The other cases install
# `.` only: they share the copy's build/ folder and one venv path (its include folder is on the
# compile line), so ninja compiles nothing after the first build, while each editable build
# compiles from scratch in a temporary folder (minutes on 2 cores); `make setup` itself is the
# editable install with pip 23.2.1, setuptools 84 and no wheel.
# Each case is a fresh venv that sees the torch of the interpreter running the tests through a
# .pth file (the way `--system-site-packages` would show a system-wide torch), installs with
# --no-build-isolation and imports the result from outside the source tree. The .pth names a view
# of the outer site-packages without the packages under test (pip, setuptools, wheel and this
# project), so that a case sees only its own, whatever the outer environment has installed. The extension is
# built CPU-only (DCNV2_WITH_CUDA=0) to keep CI's time.
PIP_MATRIX = [
    ("23.2.1", "80.9.0", True, (False, True)),
    ("23.2.1", "84.0.0", False, (False,)),
    ("26.2.1", "80.9.0", False, (False,)),
    ("26.2.1", "84.0.0", True, (False,)),
]

IMPORT_CHECK = """
import sys
import torch
import torch.nn.functional as F
import projects_dcnv2
from projects_dcnv2.layers import modulated_deform_conv2d
# Zero offsets and unit mask: a plain convolution.
x, w, b = torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
offset, mask = torch.zeros(1, 18, 6, 5), torch.ones(1, 9, 6, 5)
torch.testing.assert_close(modulated_deform_conv2d(x, offset, mask, w, b, padding=1),
                           F.conv2d(x, w, b, padding=1))
# the op library: the extension lives in projects_dcnv2/ops/, and the layers re-export its ops
import projects_dcnv2.ops as ops
assert ops._C.__name__ == "projects_dcnv2.ops._C" and ops.modulated_deform_conv2d is modulated_deform_conv2d
print(projects_dcnv2.__file__)
"""


def _copy_tree(dest: Path) -> Path:
    """The files a fresh clone would have (tracked and untracked-but-not-ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the source files from build outputs")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    return _copy_tree(tmp_path_factory.mktemp("source"))


UNDER_TEST = {"pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel", "projects_dcnv2"}


def _outer_site_view(view: Path) -> Path:
    """Links to everything in the site-packages folders this interpreter imports from (its own, a
    system-wide or user one, one named by a .pth file), but the packages under test."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    sites = [Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for site in filter(Path.is_dir, sites):
        for entry in site.iterdir():
            name = entry.name.split("-")[0].split(".")[0].lower()
            if (
                name not in UNDER_TEST
                and entry.suffix != ".pth"
                and not (view / entry.name).exists()
            ):
                (view / entry.name).symlink_to(entry)
    return view


def _venv(path: Path, pip: str, setuptools: str, wheel: bool) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python)
    outer = _outer_site_view(path.parent / f"{path.name}-outer-site")
    Path(site.strip(), "zz_reuse_torch.pth").write_text(f"{outer}\n")
    tools = [f"pip=={pip}", f"setuptools=={setuptools}"] + (["wheel"] if wheel else [])
    # The outer pip installs the venv's build tools (the new venv has no pip of its own yet).
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--ignore-installed",
            *tools,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(
            f"could not fetch {' '.join(tools)} from the package index: {res.stderr[-300:]}"
        )
    return python


@pytest.mark.parametrize(
    "pip,setuptools,wheel,modes",
    PIP_MATRIX,
    ids=[f"pip{p}-setuptools{s}-{'wheel' if w else 'nowheel'}" for p, s, w, _ in PIP_MATRIX],
)
def test_pip_install_into_own_environment(source_copy, tmp_path, pip, setuptools, wheel, modes):
    venv = source_copy.parent / "venv"  # one path for every case
    python = _venv(venv, pip, setuptools, wheel)
    versions = run_python(
        "import importlib.util as u, importlib.metadata as m;"
        " print(m.version('pip'), m.version('setuptools'), u.find_spec('wheel') is not None)",
        python=python,
    ).split()
    assert versions == [pip, setuptools, str(wheel)]
    env = dict(os.environ, DCNV2_WITH_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    for editable in modes:
        cmd = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps"]
        cmd += ["-e", str(source_copy)] if editable else [str(source_copy)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert res.returncode == 0, (
            f"{' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
        assert "setup.py develop" not in res.stdout + res.stderr  # the legacy path
        location = Path(run_python(IMPORT_CHECK, python=python, cwd=tmp_path).strip())
        expected_root = source_copy if editable else venv
        assert expected_root in location.parents, (editable, location)
