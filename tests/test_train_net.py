"""train_net.py end to end on the embedded shapes data set (tiny schedule, CPU), and the data
set itself: valid COCO, deterministic, safe to generate from several processes at once."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from projects_dcnv2.data.shapes import CLASSES, IMAGE_SIZE, SPLIT_SIZES, generate_shapes_dataset

from builders import SMALL

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml"


def run_train_net(datasets, *args, config=CONFIG):
    # One OpenMP thread: a tiny model gains nothing from more, and on a shared 2-core machine
    # oversubscribed OpenMP threads made an iteration 25x slower.
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", config, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (4 iterations, checkpoint every 2), evaluated at the end."""
    datasets = tmp_path_factory.mktemp("datasets")
    out = tmp_path_factory.mktemp("output")
    rc, log = run_train_net(datasets, *SMALL, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out))
    assert rc == 0, log[-5000:]
    return datasets, out, log


def test_train_writes_checkpoints_and_evaluates(trained):
    _, out, log = trained
    assert (out / "model_final.pth").is_file() and (out / "model_0000001.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (
        torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"]
        == 3
    )
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log


def test_eval_only_prints_coco_metrics(trained):
    datasets, out, _ = trained
    rc, log = run_train_net(
        datasets,
        "--eval-only",
        *SMALL,
        "OUTPUT_DIR",
        str(out / "eval"),
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
    )
    assert rc == 0, log[-5000:]
    assert "Evaluation results for bbox" in log
    assert re.search(r"copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: [0-9.]+,", log), log[
        -3000:
    ]
    assert "Starting training" not in log


def test_resume_continues_from_the_saved_iteration(trained):
    datasets, out, _ = trained
    rc, log = run_train_net(
        datasets, "--resume", *SMALL, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(out)
    )
    assert rc == 0, log[-5000:]
    assert "Starting training from iteration 4" in log
    assert (
        torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"]
        == 5
    )


def test_missing_dataset_says_where_it_looked(tmp_path):
    rc, log = run_train_net(
        tmp_path,
        "--eval-only",
        "DATASETS.TEST",
        "('coco_2017_val',)",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    assert rc != 0
    assert "Data set 'coco_2017_val' not found" in log and str(tmp_path) in log
    assert "DETECTRON2_DATASETS" in log


# --------------------------------------------------------------------------- the data set
def test_shapes_dataset_is_valid_deterministic_and_race_free(tmp_path):
    shared = tmp_path / "a" / "dcnv2_shapes"
    code = "import sys, projects_dcnv2.data.shapes as s; s.generate_shapes_dataset(sys.argv[1])"
    workers = [
        subprocess.Popen([sys.executable, "-c", code, str(shared)], cwd=REPO) for _ in range(2)
    ]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    assert not [p for p in shared.parent.iterdir() if p.name != "dcnv2_shapes"]  # no temp left
    assert sorted(p.name for p in shared.iterdir()) == sorted(["annotations", *SPLIT_SIZES])
    other = generate_shapes_dataset(str(tmp_path / "b" / "dcnv2_shapes"))

    for split, size in SPLIT_SIZES.items():
        ann = shared / "annotations" / f"instances_{split}.json"
        assert (
            ann.read_bytes()
            == (Path(other) / "annotations" / f"instances_{split}.json").read_bytes()
        )
        assert len(list((shared / split).glob("*.png"))) == size
        coco = COCO(str(ann))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        assert len(coco.getImgIds()) == size and len(coco.getAnnIds()) >= size
        for a in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = a["bbox"]
            assert (
                0 <= x
                and 0 <= y
                and x + w <= IMAGE_SIZE
                and y + h <= IMAGE_SIZE
                and w > 4
                and h > 4
            )
            assert 0 < a["area"] <= w * h and len(a["segmentation"][0]) >= 6
        assert coco.annToMask(coco.loadAnns(coco.getAnnIds())[0]).sum() > 0
    assert (shared / "train" / "000007.png").read_bytes() == (
        Path(other) / "train" / "000007.png"
    ).read_bytes()
    counts = json.loads((shared / "annotations" / "instances_train.json").read_text())[
        "annotations"
    ]
    assert {a["category_id"] for a in counts} == set(range(1, len(CLASSES) + 1))


def test_shapes_splits_are_made_on_demand_one_at_a_time(tmp_path, monkeypatch):
    from detectron2.utils.file_io import PathManager

    import projects_dcnv2  # noqa: F401  (registers the dcnv2_shapes:// handler)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    root = tmp_path / "dcnv2_shapes"
    # The evaluator resolves the annotation file: only that split is made.
    local = PathManager.get_local_path("dcnv2_shapes://annotations/instances_val.json")
    assert Path(local) == root / "annotations" / "instances_val.json" and Path(local).is_file()
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "val"]
    # A folder made before a split existed gains it; the others are left as they are.
    before = (root / "annotations" / "instances_val.json").stat().st_mtime_ns
    generate_shapes_dataset(str(root), splits=["test"])
    assert (root / "annotations" / "instances_val.json").stat().st_mtime_ns == before
    assert len(list((root / "test").glob("*.png"))) == SPLIT_SIZES["test"]
    val = json.loads((root / "annotations" / "instances_val.json").read_text())
    test = json.loads((root / "annotations" / "instances_test.json").read_text())
    assert val["annotations"][:3] != test["annotations"][:3]  # another seed, other images
    assert (root / "val" / "000000.png").read_bytes() != (root / "test" / "000000.png").read_bytes()
    with pytest.raises(ValueError, match="split: expected one of .* got 'tset'"):
        generate_shapes_dataset(str(root), splits=["tset"])
