"""Checkpoints survive crashes: the trainer's ``AtomicCheckpointer`` (projects_dcnv2/engine.py)
writes atomically (a fault while writing leaves the previous checkpoint and ``last_checkpoint``
intact), and train_net.py killed with SIGKILL mid-run resumes from its last checkpoint with the
optimizer and scheduler state."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from projects_dcnv2.engine import AtomicCheckpointer

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- atomic saving, in-process
def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # a momentum buffer per parameter: optimizer state worth keeping
    return model, optimizer


def _torch_save_that_dies(obj, f, *args, **kwargs):
    """A torch.save that gets part of the way, as a process killed or a disk filling up would."""
    f.write(b"PK\x03\x04 the first bytes of a zip archive, then nothing")
    raise OSError(28, "No space left on device (simulated)")


def _assert_holds(path, model, optimizer):
    """``path`` is a complete checkpoint of ``model`` and ``optimizer``."""
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    momentum = [s["momentum_buffer"] for s in optimizer.state_dict()["state"].values()]
    saved = [s["momentum_buffer"] for s in loaded["optimizer"]["state"].values()]
    assert len(saved) == len(momentum) == 4
    assert all(torch.equal(a, b) for a, b in zip(saved, momentum))


@pytest.mark.parametrize("name", ["model_0000001", "model_final"], ids=["new_name", "overwrite"])
def test_fault_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, name):
    """The "overwrite" case is the dangerous one for an in-place write: the file replaced is the
    one ``last_checkpoint`` names (a resumed run saving ``model_final`` again)."""
    model, optimizer = _model_and_optimizer(0)
    checkpointer = AtomicCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_final", iteration=9)
    before = (tmp_path / "model_final.pth").read_bytes()

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the state the failed save would have written
    monkeypatch.setattr(torch, "save", _torch_save_that_dies)
    with pytest.raises(OSError, match="simulated"):
        checkpointer.save(name, iteration=10)
    monkeypatch.undo()

    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]
    fresh, fresh_optimizer = _model_and_optimizer(1)
    resumed = AtomicCheckpointer(fresh, str(tmp_path), optimizer=fresh_optimizer)
    extra = resumed.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    reference, reference_optimizer = _model_and_optimizer(0)
    _assert_holds(tmp_path / "model_final.pth", reference, reference_optimizer)
    for a, b in zip(fresh.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_the_same_fault_truncates_detectron2s_in_place_write(tmp_path, monkeypatch):
    """Control for the test above: the injected fault does destroy a checkpoint written in place."""
    model, optimizer = _model_and_optimizer(0)
    checkpointer = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_final")
    monkeypatch.setattr(torch, "save", _torch_save_that_dies)
    with pytest.raises(OSError):
        checkpointer.save("model_final")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    with pytest.raises(
        (RuntimeError, EOFError, pickle.UnpicklingError)
    ):  # a truncated zip or pickle
        torch.load(tmp_path / "model_final.pth", weights_only=False)


def test_fault_while_tagging_keeps_last_checkpoint(tmp_path, monkeypatch):
    """The checkpoint is complete before ``last_checkpoint`` moves; a failure in between leaves the
    old tag (pointing at a complete file) and the new complete file."""
    model, optimizer = _model_and_optimizer(0)
    checkpointer = AtomicCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000001")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("killed before the rename (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        checkpointer.save("model_0000003")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]
    _assert_holds(tmp_path / "model_0000001.pth", model, optimizer)
    _assert_holds(tmp_path / "model_0000003.pth", model, optimizer)


# --------------------------------------------------------------- train_net.py killed and resumed
CONFIG = "configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml"
TINY = [
    "MODEL.MASK_ON", "False", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
    "SOLVER.WARMUP_ITERS", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
]  # fmt: skip


def _train_net(datasets, log, *opts, flags=()):
    # One OpenMP thread: on a busy 2-core machine two spinning threads per process made each
    # iteration about 20x slower.
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train_net.py", "--config-file", CONFIG, *flags, *TINY, *opts]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill_while_saving(proc, out, timeout=240):
    """SIGKILL ``proc`` once one checkpoint is complete, preferably while the next one is being
    written (its temporary file exists). Returns the temporary files seen at the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "train_net.py ended before it could be killed"
        tagged = (out / "last_checkpoint").is_file()
        tmp = [p.name for p in out.glob(".*.tmp")] if tagged else []
        late = tagged and (out / "last_checkpoint").read_text() >= "model_0000007.pth"
        if tmp or late:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return tmp
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _optimizer_state(checkpoint):
    return checkpoint["trainer"]["_trainer"]["optimizer"]["state"]


def _scheduler_steps(checkpoint):
    return checkpoint["trainer"]["hooks"]["LRScheduler"]["last_epoch"]


def _resumed_trainer(out, max_iter):
    """train_net.py's trainer as `--resume` builds it, in this process."""
    sys.path.insert(0, str(REPO))
    try:
        from train_net import DCNv2Trainer, setup
    finally:
        sys.path.remove(str(REPO))
    from detectron2.engine import default_argument_parser

    opts = TINY + ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"]
    argv = ["--config-file", str(REPO / CONFIG), "--resume", *opts]
    args = default_argument_parser().parse_args(argv)
    trainer = DCNv2Trainer(setup(args))
    trainer.resume_or_load(resume=True)
    return trainer


def test_sigkill_mid_run_then_resume(tmp_path, monkeypatch):
    datasets, out = tmp_path / "datasets", tmp_path / "output"
    with open(tmp_path / "run1.log", "w") as log:
        proc = _train_net(datasets, log, "SOLVER.MAX_ITER", "200", "OUTPUT_DIR", str(out))
        tmp_at_kill = _kill_while_saving(proc, out)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()
    # Every checkpoint in sight is complete, whatever the kill interrupted.
    last = (out / "last_checkpoint").read_text()
    for path in out.glob("*.pth"):
        torch.load(path, map_location="cpu", weights_only=False)
    for name in tmp_at_kill:  # ".model_0000005.pth.<pid>-<id>.tmp": the save the kill cut short
        target = name[1:].split(".pth.")[0] + ".pth"
        if not (out / target).exists():
            assert last < target
    saved = torch.load(out / last, map_location="cpu", weights_only=False)
    k = saved["iteration"]
    assert last == f"model_{k:07d}.pth" and (k + 1) % 2 == 0
    assert _scheduler_steps(saved) == k + 1  # one scheduler step per iteration
    momentum = {i: s["momentum_buffer"] for i, s in _optimizer_state(saved).items()}
    assert len(momentum) > 100 and all(m.abs().sum() > 0 for m in momentum.values())

    # What `--resume` restores: iteration, scheduler, optimizer (momentum buffers).
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    trainer = _resumed_trainer(out, k + 4)
    assert trainer.start_iter == k + 1
    assert trainer.scheduler.last_epoch == k + 1
    restored = trainer.optimizer.state_dict()["state"]
    assert restored.keys() == momentum.keys()
    for i, m in momentum.items():
        assert torch.equal(restored[i]["momentum_buffer"], m), i
    del trainer

    # The same in train_net.py: resume and train 3 more iterations (k+1, k+2, k+3).
    with open(tmp_path / "run2.log", "w") as log:
        proc = _train_net(
            datasets, log, "SOLVER.MAX_ITER", str(k + 4), "OUTPUT_DIR", str(out), flags=["--resume"]
        )
        assert proc.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()[-5000:]
    log = (tmp_path / "run2.log").read_text()
    assert f"Loading trainer from {out / last}" in log
    assert f"Starting training from iteration {k + 1}" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == k + 3
    # A scheduler started afresh would have stepped 3 times; the resumed one continues from k + 1.
    assert _scheduler_steps(final) == k + 4
    after = _optimizer_state(final)
    assert after.keys() == momentum.keys()
    assert all(not torch.equal(after[i]["momentum_buffer"], m) for i, m in momentum.items())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
