"""tools/gpu_check.sh and tools/compare_devices.py, rehearsed on CPU.

``--plan``: the user's path comes first, the steps run one at a time, each phase's limits fit its
budget. The CPU dry run of the user phase (``GPU_CHECK_DEVICE=cpu``: a 4-iteration schedule at
64 px, 8 validation images) trains, evaluates with ``--eval-only`` and finds the same AP, resumes
from the saved iteration and compares CPU (1 thread) against CPU (2 threads); the tests read its
summary. The comparison tool is then checked to fail when one side's model is altered.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from builders import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"
QUICK = "configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_shapes.yaml"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--plan"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    phases = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"phase (\w+) .*budget (\d+) s", line):
            current = phases.setdefault(m[1], {"budget": int(m[2]), "steps": [], "limits": []})
        elif m := re.match(r"  (\w+)\s+(\d+|-) s?\s", line):
            current["steps"].append(m[1])
            current["limits"].append(0 if m[2] == "-" else int(m[2]))
        elif m := re.match(r"  total of the limits: (\d+) s", line):
            current["total"] = int(m[1])
    return phases, proc.stdout


def test_plan_user_path_first_one_step_at_a_time_within_budget():
    phases, text = _plan()
    assert set(phases) == {"user", "cost"}, text
    user = phases["user"]["steps"]
    # the build, then what a user runs first, in that order; the test suites after it
    path = ["build", "data", "train", "eval_only", "ap_equal", "mimic", "resume", "compare"]
    assert [s for s in user if s in path] == path, user
    tests = ["cuda_tests", "triton_tests", "memcheck", "memcheck_fused", "racecheck", "fuzz"]
    assert all(user.index(t) > user.index("compare") for t in tests), user
    assert "models_seed" in phases["cost"]["steps"] and "profile" in phases["cost"]["steps"]
    for name, phase in phases.items():
        assert sum(phase["limits"]) == phase["total"] <= phase["budget"], (name, phase)
    assert phases["user"]["budget"] == 480 and phases["cost"]["budget"] == 360
    # no concurrent group: no step is started in the background, no step name holds a comma
    source = SCRIPT.read_text()
    assert not re.search(r"(?<!&)&\s*$|\bwait\b", source, re.MULTILINE)
    assert all("," not in s for p in phases.values() for s in p["steps"])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The user phase on CPU (GPU_CHECK_DEVICE=cpu): its output folder and work folder."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_WORK=str(work), PYTHON=sys.executable)
    env.pop("DCNV2_CUDA_IMPL", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--phase", "user", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (out / "summary.txt").read_text()
    return proc, summary, out, work


def _status(summary, name):
    m = re.search(rf"^{name}: (rc=\w+|PASS|FAIL|skipped)", summary, re.MULTILINE)
    return m[1] if m else None


def test_dry_run_trains_evaluates_resumes_and_compares(dry_run):
    proc, summary, out, work = dry_run
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for name in ("data", "train", "eval_only", "mimic", "resume", "compare"):
        assert _status(summary, name) == "rc=0", summary
    for name in ("ap_equal", "resume_continues"):
        assert _status(summary, name) == "PASS", summary
    # the copypaste lines themselves are in the summary, and equal those of the logs
    lines = re.findall(r"copypaste: .*", (out / "eval_only.log").read_text())[-6:]
    assert len(lines) == 6 and lines[1].startswith("copypaste: AP,AP50"), lines
    assert all(line in summary for line in lines), summary
    assert "Starting training from iteration 4" in (out / "resume.log").read_text()
    record = json.loads((out / "compare.json").read_text())
    assert record["agree"] and set(record["ap"]) == {"bbox", "segm"}, record["verdict"]
    assert sum(im["matched"] for im in record["images"]) > 0, record["verdict"]
    assert "compare_devices: AGREE cpu(1 threads) vs cpu(2 threads)" in summary
    assert "done in" in summary and "failed: none" in summary


def test_dry_run_test_steps_select_cuda_tests_and_skip_sanitizers(dry_run):
    _, summary, out, _ = dry_run
    for name in ("memcheck", "memcheck_fused", "racecheck"):
        assert re.search(rf"^{name}: skipped, needs a GPU", summary, re.MULTILINE), summary
    # the CUDA-only selection: every selected test skips here, each with a reason naming CUDA
    log = (out / "cuda_tests.log").read_text()
    skips = re.findall(r"^SKIPPED \[\d+\] .*$", log, re.MULTILINE)
    assert skips and all(re.search("cuda", s, re.IGNORECASE) for s in skips), log[-2000:]
    assert re.search(r"\d+ skipped, \d+ deselected", log), log[-2000:]
    assert " passed" not in log.splitlines()[-1], log[-2000:]


def test_compare_devices_fails_when_one_side_is_altered(dry_run, monkeypatch, capsys):
    _, _, out, work = dry_run
    tool = _load_tool("compare_devices")
    options = ["--config-file", str(REPO / QUICK), "--devices", "cpu,cpu", "--images", "2"]
    opts = json.loads((out / "compare.json").read_text())["opts"]  # the dry run's, with its weights
    monkeypatch.setenv("DETECTRON2_DATASETS", str(work / "datasets"))
    assert tool.main([*options, *opts]) == 0, capsys.readouterr().out

    built = []
    real = tool.build_inference_model

    def second_side_altered(cfg):
        model = real(cfg)
        built.append(model)
        if len(built) == 2:  # the class scores' bias of device B moved by 0.05
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.bias[0] += 0.05
        return model

    monkeypatch.setattr(tool, "build_inference_model", second_side_altered)
    json_path = out / "altered.json"
    assert tool.main([*options, "--json", str(json_path), *opts]) == 1
    assert "compare_devices: DISAGREE" in capsys.readouterr().out
    record = json.loads(json_path.read_text())
    assert not record["agree"] and any("unmatched" in r for r in record["reasons"]), record


def test_compare_devices_rejects_bad_arguments():
    tool = _load_tool("compare_devices")
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", QUICK, "--devices", "cpu"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", QUICK, "--devices", "cpu,cpu"])  # no MODEL.WEIGHTS
