"""tools/seed_study.py: its statistics against hand-computed numbers, the resume logic with a fake
runner, the rendered page against the committed one, and the paired initialisation (key matching,
loading, data order) on a narrow model."""

import importlib.util
import json

import pytest
import torch

from builders import NARROW, REPO, SMALL, make_model


def load_tool():
    spec = importlib.util.spec_from_file_location("seed_study", REPO / "tools" / "seed_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study_tool = load_tool()


@pytest.mark.parametrize(
    "p, df, expected",  # two-sided 95% (p = 0.975) and one 90% quantile, from printed t tables
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228),
     (0.975, 30, 2.042), (0.95, 5, 2.015)],
)  # fmt: skip
def test_t_quantile_matches_printed_tables(p, df, expected):
    assert study_tool.t_quantile(p, df) == pytest.approx(expected, abs=6e-4)


def test_statistics_by_hand():
    mean, std = study_tool.mean_std([1.0, 2.0, 3.0, 4.0])
    assert (mean, std) == pytest.approx((2.5, (5 / 3) ** 0.5))  # squares 2.25+.25+.25+2.25 = 5
    assert study_tool.mean_std([7.0]) == (7.0, None)
    # seeds 0-2 shared, seed 3 only in `other`: differences 3, 2, 2; mean 7/3; sd sqrt(1/3);
    # half-width t(0.975, 2) * sd / sqrt(3) = 4.303 / 3
    d = study_tool.paired_difference(
        {0: 50.0, 1: 52.0, 2: 47.0}, {0: 53.0, 1: 54.0, 2: 49.0, 3: 99.0}
    )
    assert d["n"] == 3 and d["sd"] == pytest.approx((1 / 3) ** 0.5)
    assert d["mean"] == pytest.approx(7 / 3)
    assert d["half"] == pytest.approx(4.303 / 3, abs=2e-4)
    assert d["lo"] == pytest.approx(7 / 3 - 4.303 / 3, abs=2e-4)
    with pytest.raises(ValueError, match="share no seed"):
        study_tool.paired_difference({0: 1.0}, {1: 2.0})
    # sd 2.47: n = 26 gives t(25) 2.060 * 2.47 / sqrt(26) = 0.998, n = 25 gives 2.064 * 2.47 / 5 = 1.020
    assert study_tool.seeds_for_half_width(2.47) == 26
    assert study_tool.seeds_for_half_width(0.1) == 2  # t(1) = 12.7: 12.7 * 0.1 / sqrt(2) = 0.9
    with pytest.raises(ValueError, match="expected 0.5 < p < 1, got p=0.2"):
        study_tool.t_quantile(0.2, 3)


def fake_record(config, seed):
    return {
        "config": config,
        "seed": seed,
        "box_ap": 50.0 + seed + (2.0 if config == "mdconv" else 0.0),
        "mask_ap": 40.0,
        "s_per_iter": 0.5,
        "wall_s": 200.0,
        "threads": 2,
        "build": {"commit": "a" * 40, "csrc": "b" * 40, "cpu": "CPU", "cpu_flags": ["avx2"]},
    }


def test_an_interrupted_study_resumes_without_rerunning(tmp_path):
    path = tmp_path / "study.json"
    calls, prepared = [], []

    def runner(config, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the study is stopped during its fourth run
        calls.append((config, seed))
        return fake_record(config, seed)

    def prepare(seed, study):
        prepared.append(seed)

    with pytest.raises(KeyboardInterrupt):
        study_tool.run_study(path, ["plain", "mdconv"], [0, 1, 2], runner, prepare)
    assert calls == [("plain", 0), ("mdconv", 0), ("plain", 1)]  # seed by seed, paired
    assert len(json.loads(path.read_text())["runs"]) == 3
    calls.clear(), prepared.clear()

    def runner2(config, seed):
        calls.append((config, seed))
        return fake_record(config, seed)

    study = study_tool.run_study(path, ["plain", "mdconv"], [0, 1, 2], runner2, prepare)
    assert calls == [("mdconv", 1), ("plain", 2), ("mdconv", 2)]
    assert prepared == [1, 2]  # seed 0 had nothing left to run
    assert sorted((r["config"], r["seed"]) for r in study["runs"]) == [
        (c, s) for c in ("mdconv", "plain") for s in (0, 1, 2)
    ]
    calls.clear()
    study_tool.run_study(path, ["plain", "mdconv"], [0, 1, 2], runner2, prepare)
    assert calls == []  # everything recorded: nothing reruns
    study_tool.run_study(path, ["plain"], [3], runner2, prepare)  # the plan grows
    assert calls == [("plain", 3), ("mdconv", 3)]


def test_rerun_compares_with_the_record(tmp_path, capsys):
    path = tmp_path / "study.json"
    study_tool.run_study(path, ["plain"], [0], fake_record)
    assert study_tool.rerun(path, "plain", 0, fake_record)  # the same AP
    assert "difference +0.000 (same ops build" in capsys.readouterr().out

    def drifted(config, seed):
        return dict(fake_record(config, seed), box_ap=50.2)

    assert not study_tool.rerun(path, "plain", 0, drifted)  # 0.2 AP on the same build: fails

    def other_build(config, seed):
        record = drifted(config, seed)
        record["build"] = dict(record["build"], csrc="c" * 40)
        return record

    assert study_tool.rerun(path, "plain", 0, other_build)  # another build: reported, not failed
    assert "difference +0.200 (another ops build" in capsys.readouterr().out
    kept = study_tool.load_study(path)["reruns"]  # every rerun is kept in the JSON
    assert [(e["difference"], e["same_ops_build"]) for e in kept] == [
        (0, True), (pytest.approx(0.2), True), (pytest.approx(0.2), False)
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="mdconv seed 0 is not in"):
        study_tool.rerun(path, "mdconv", 0, fake_record)


class FakeRunner:
    """The runner's interface without train_net.py: checkpoints are a dict of val box APs."""

    threads = 2

    def __init__(self, checkpoints=None, retrained=None):
        self.checkpoints = dict(checkpoints or {})  # (config, seed) -> val box AP of its log
        self.retrained = retrained or {}  # (config, seed) -> val box AP a retraining gives
        self.trained, self.evaluated = [], []

    def __call__(self, config, seed):
        self.trained.append((config, seed))
        record = fake_record(config, seed)
        record["box_ap"] = self.retrained.get((config, seed), record["box_ap"])
        self.checkpoints[(config, seed)] = record["box_ap"]
        return record

    def checkpoint_ap(self, config, seed):
        return self.checkpoints.get((config, seed))

    def evaluate(self, config, seed):
        self.evaluated.append((config, seed))
        return {"dataset": "dcnv2_shapes_test", "box_ap": 60.0 + seed, "mask_ap": 1.0}


def test_runs_get_a_test_ap_and_old_records_only_from_a_reproduced_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(study_tool, "build_info", lambda: fake_record("plain", 0)["build"])
    path = tmp_path / "study.json"
    runner = FakeRunner()
    study = study_tool.run_study(path, ["plain"], [0], runner, evaluate=runner.evaluate)
    assert study["runs"][0]["test"]["box_ap"] == 60.0 and runner.evaluated == [("plain", 0)]
    study = study_tool.run_study(path, ["plain", "mdconv"], [0, 1, 2], runner)  # no test AP
    assert sum("test" in r for r in study["runs"]) == 1

    # mdconv 0's checkpoint is still there (its log agrees); plain 1's is gone and training it
    # again reproduces it; mdconv 1 and plain 2 come back 0.3 AP away: not the recorded models.
    runner = FakeRunner(
        checkpoints={("mdconv", 0): 52.0, ("mdconv", 1): 53.3},
        retrained={("plain", 2): 52.3},
    )
    left = study_tool.fill_test(path, runner, runner.evaluate)
    assert runner.trained == [("plain", 1), ("plain", 2), ("mdconv", 2)]  # no checkpoint left
    assert sorted(left) == [("mdconv", 1), ("plain", 2)]
    study = study_tool.load_study(path)
    tested = sorted((r["config"], r["seed"]) for r in study["runs"] if "test" in r)
    assert tested == [("mdconv", 0), ("mdconv", 2), ("plain", 0), ("plain", 1)]
    reruns = {(e["config"], e["seed"]): e for e in study["reruns"]}
    assert len(reruns) == 5 and reruns[("plain", 2)]["difference"] == pytest.approx(0.3)
    assert reruns[("plain", 1)]["difference"] == 0 and reruns[("plain", 1)]["same_ops_build"]
    block = study_tool.render_markdown(study)
    assert "test split (`dcnv2_shapes_test`" in block
    assert "| 0 | 60.0 (1.0) | 60.0 (1.0) |" in block  # the test table, both configs at seed 0
    assert "- plain seed 2: 52.000 recorded, 52.300 again (+0.300), the same ops build" in block


def test_the_runner_evaluates_the_final_checkpoint_on_the_test_split(tmp_path, monkeypatch):
    runner = study_tool.TrainNetRunner(tmp_path, threads=2)
    with pytest.raises(FileNotFoundError, match="mdconv seed 1: no checkpoint"):
        runner.evaluate("mdconv", 1)
    run = runner.run_dir("mdconv", 1)
    run.mkdir(parents=True)
    (run / "model_final.pth").write_bytes(b"")
    commands = []

    def fake_run(cmd, cwd, env, stdout, stderr):
        commands.append((cmd, env))
        stdout.write(
            "copypaste: Task: bbox\ncopypaste: AP,AP50\ncopypaste: 61.5,90.0\n"
            "copypaste: Task: segm\ncopypaste: AP,AP50\ncopypaste: 63.25,91.0\n"
        )
        return study_tool.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(study_tool.subprocess, "run", fake_run)
    entry = runner.evaluate("mdconv", 1)
    assert (entry["dataset"], entry["box_ap"], entry["mask_ap"]) == (
        "dcnv2_shapes_test",
        61.5,
        63.25,
    )
    ((cmd, env),) = commands
    args = " ".join(cmd[1:])
    assert args.startswith(
        "train_net.py --config-file configs/quick_schedules/" + study_tool.CONFIGS["mdconv"]
    )
    assert f"--eval-only MODEL.WEIGHTS {run / 'model_final.pth'}" in args
    assert "DATASETS.TEST ('dcnv2_shapes_test',) SEED 1" in args
    assert f"OUTPUT_DIR {run / 'dcnv2_shapes_test'}" in args and env["OMP_NUM_THREADS"] == "2"
    assert runner.checkpoint_ap("mdconv", 1) is None  # the run's own log is not there


def test_render_states_the_finding_and_the_page_matches_its_json():
    study = {"plan": {"configs": ["plain", "mdconv"], "seeds": [0, 1, 2]}, "runs": []}
    study["runs"] = [fake_record(c, s) for c in ("plain", "mdconv") for s in (0, 1, 2)]
    study["runs"][0]["box_ap"] = 50.5  # differences 1.5, 2, 2: resolvable
    block = study_tool.render_markdown(study)
    assert "6 of 6 planned runs done" in block
    assert "| 0 | 50.5 (40.0) | 52.0 (40.0) |" in block
    assert "**mdconv: +1.8 ± 0.7 box AP over 3 seeds**" in block  # t(2) * 0.2887 / sqrt(3)
    study["runs"][3]["box_ap"] = 40.0  # differences -10.5, 2, 2: the interval spans zero
    block = study_tool.render_markdown(study)  # differences -10.5, 2, 2: sd 7.217
    assert "no difference is resolvable at this scale" in block
    assert "std 7.2, an interval of ±1.0 AP would take 203 seeds" in block
    study["runs"] = [r for r in study["runs"] if r["seed"] == 0]  # one paired seed: no interval
    assert "**mdconv vs plain: one seed so far, no interval** (-10.5 box AP)" in (
        study_tool.render_markdown(study)
    )


def test_the_results_page_matches_its_json():
    page = (REPO / study_tool.PAGE).read_text()
    recorded = study_tool.load_study(REPO / "docs" / "seed_study_shapes.json")
    assert recorded["runs"], "docs/seed_study_shapes.json holds no run"
    expected = study_tool.update_page(page, study_tool.render_markdown(recorded))
    assert page == expected, "run python tools/seed_study.py --render"


def test_parse_log_reads_detectron2s_copypaste_lines():
    log = (
        "[d2.engine.hooks]: Overall training speed: 398 iterations in 0:03:40 (0.5528 s / it)\n"
        "[d2.evaluation.testing]: copypaste: Task: bbox\n"
        "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
        "[d2.evaluation.testing]: copypaste: 54.3120,80.1,60.0,30.1,55.0,60.2\n"
        "[d2.evaluation.testing]: copypaste: Task: segm\n"
        "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
        "[d2.evaluation.testing]: copypaste: 59.2500,81.0,62.0,31.0,56.0,61.0\n"
    )
    assert study_tool.parse_log(log) == (54.312, 59.25, 0.5528)
    evaluation = log.split("\n", 1)[1]  # an --eval-only log has no training speed
    assert study_tool.parse_aps(evaluation) == (54.312, 59.25)
    with pytest.raises(RuntimeError, match="no training speed"):
        study_tool.parse_log(evaluation)
    with pytest.raises(RuntimeError, match="no bbox AP"):
        study_tool.parse_log(log.replace("Task: bbox", "Task: keypoints"))


QUICK = "quick_schedules/"
TINY = [*SMALL, *NARROW, "MODEL.RESNETS.NORM", "FrozenBN"]  # GroupNorm needs 32 channels


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_paired_initialisation_shares_every_common_parameter(tmp_path):
    _, plain = make_model(QUICK + study_tool.CONFIGS["plain"], *TINY, seed=3)
    _, mdconv = make_model(QUICK + study_tool.CONFIGS["mdconv"], *TINY, seed=4)
    _, mdpool = make_model(QUICK + study_tool.CONFIGS["mdpool"], *TINY, seed=4)
    keys = study_tool.match_init_keys(shapes(plain), shapes(mdconv))
    new = sorted(set(shapes(mdconv)) - set(shapes(plain)))
    assert keys == {"shared": len(shapes(plain)), "new": 26, "unused": 0}  # 13 blocks x (w, b)
    assert all(".conv2_offset." in k for k in new)
    # Faster R-CNN: the file's mask head has no place in it, mdpool's offset fcs are its own
    keys = study_tool.match_init_keys(shapes(plain), shapes(mdpool))
    assert keys["unused"] == sum(k.startswith("roi_heads.mask_head.") for k in shapes(plain))

    # Loaded as train_net.py loads MODEL.WEIGHTS: every shared tensor equals the file's.
    from projects_dcnv2.checkpoint import DCNv2Checkpointer

    path = tmp_path / "init.pth"
    torch.save({"model": plain.state_dict()}, path)
    DCNv2Checkpointer(mdconv).load(str(path))
    loaded, source = mdconv.state_dict(), plain.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    assert all(torch.count_nonzero(loaded[k]) == 0 for k in new)  # zero-initialised offsets

    key = "backbone.bottom_up.res4.0.conv2.weight"
    renamed = {
        k.replace("res4.0.conv2.", "res4.0.conv2.conv."): v for k, v in shapes(mdconv).items()
    }
    with pytest.raises(ValueError, match="missing from it, e.g. backbone.bottom_up.res4.0.conv2"):
        study_tool.match_init_keys(shapes(plain), renamed)
    wrong = dict(shapes(plain), **{key: (1, 2, 3, 3)})
    with pytest.raises(
        ValueError, match=r"differ in shape, e.g. .*res4.0.conv2.weight: file \(1, 2, 3, 3\)"
    ):
        study_tool.match_init_keys(wrong, shapes(mdconv))


def test_the_configs_see_the_same_training_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    opts = [*TINY, "SOLVER.IMS_PER_BATCH", "2"]
    plain = study_tool.data_fingerprint("plain", 5, batches=2, opts=opts)
    assert study_tool.data_fingerprint("mdconv", 5, batches=2, opts=opts) == plain
    assert study_tool.data_fingerprint("plain", 6, batches=2, opts=opts) != plain
