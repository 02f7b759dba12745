"""Bad data: unreadable images and invalid annotations raise errors naming the image file
(train_net.py's loader, projects_dcnv2/data/checks.py); images without instances and degenerate
boxes train with finite losses or fail clearly; a NaN image stops training with a clear error.

The ops' own hostile inputs (RoIs far outside the image, huge, infinite and NaN offsets, NaN
feature maps) are tested with each op, in test_mdconv.py and test_deform_roi_pool.py; the mdpool
pooler's far-outside boxes in test_modeling.py.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from projects_dcnv2.data.checks import BadRecordError, CheckedMapper, check_record
from projects_dcnv2.engine import DCNv2Trainer

from builders import SMALL, make_cfg, make_model

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

CONFIG = "quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml"
SIZE = 64  # the images; SMALL trains at 64 px
GOOD = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 30], "area": 600,
     "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 35]]},
    {"id": 2, "image_id": 2, "category_id": 3, "bbox": [10, 12, 30, 20], "area": 600,
     "iscrowd": 0, "segmentation": [[10, 12, 40, 12, 40, 32]]},
]  # fmt: skip


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
    (root / "garbage.png").write_bytes(np.random.default_rng(1).bytes(300))
    png = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    return root


@pytest.fixture
def dataset(image_dir, tmp_path, request):
    """Registers a COCO-format data set: dataset(annotations, files) -> its name."""
    names = []

    def register(annotations, files=("a.png", "b.png")):
        name = f"bad_data_{request.node.name}_{len(names)}"
        coco = {
            "images": [
                {"id": i + 1, "file_name": f, "width": SIZE, "height": SIZE}
                for i, f in enumerate(files)
            ],
            "annotations": annotations,
            "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3, 4)],
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(coco))
        register_coco_instances(name, {}, str(path), str(image_dir))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(dataset_name, *opts):
    return make_cfg(
        CONFIG, *SMALL, "DATASETS.TRAIN", f"('{dataset_name}',)", "INPUT.RANDOM_FLIP", "none", *opts
    )


def _first_batch(cfg):
    return next(iter(DCNv2Trainer.build_train_loader(cfg)))


@pytest.fixture(scope="module")
def model():
    return make_model(CONFIG, *SMALL)[1].train()


def _assert_trains(model, batch):
    model.zero_grad()
    with EventStorage():
        losses = model(batch)
    for key, value in losses.items():
        assert torch.isfinite(value), key
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    return losses


# ------------------------------------------------------------------------------------ images
@pytest.mark.parametrize(
    "file, message",
    [("garbage.png", "cannot identify image file"), ("truncated.png", "image file is truncated")],
)
def test_unreadable_image_names_the_file(dataset, file, message):
    name = dataset(GOOD, files=(file, "b.png"))
    with pytest.raises(BadRecordError, match=message) as info:
        _first_batch(_cfg(name))
    assert f"{file} (image_id 1)" in str(info.value)


def test_detectron2_alone_does_not_name_a_truncated_image(dataset):
    """Why the loader wraps Detectron2's mapper: PIL's error for a truncated file has no name."""
    name = dataset(GOOD, files=("truncated.png", "b.png"))
    record = DatasetCatalog.get(name)[0]
    with pytest.raises(OSError, match="image file is truncated") as info:
        DatasetMapper(_cfg(name), True)(record)
    assert "truncated.png" not in str(info.value)


# ------------------------------------------------------------------------------- annotations
@pytest.mark.parametrize(
    "bbox, message",
    [
        ([5, 5, 20], r"bbox: expected 4 finite numbers \[x, y, w, h\], got \[5, 5, 20\]"),
        ("5 5 20 30", r"bbox: expected 4 finite numbers"),
        ([5, float("nan"), 20, 30], r"bbox: expected 4 finite numbers .* got \[5, nan, 20, 30\]"),
        ([5, 5, -20, 30], r"width and height >= 0, got \[5, 5, -20, 30\] \(width -20"),
    ],
    ids=["3_numbers", "string", "nan", "negative_width"],
)
def test_invalid_bbox_is_a_clear_error(dataset, bbox, message):
    annotations = copy.deepcopy(GOOD)
    annotations[0]["bbox"] = bbox
    name = dataset(annotations)
    with pytest.raises(BadRecordError, match=message) as info:
        _first_batch(_cfg(name))
    assert "a.png (image_id 1), annotation #0" in str(info.value)


def test_category_id_out_of_range_is_a_clear_error(dataset):
    name = dataset(GOOD)  # 4 categories, the config has 4 classes
    with pytest.raises(BadRecordError, match=r"category_id: expected an integer >= 0 and < 2"):
        _first_batch(_cfg(name, "MODEL.ROI_HEADS.NUM_CLASSES", "2"))


def test_unknown_category_id_is_detectron2s_clear_error(dataset):
    annotations = copy.deepcopy(GOOD)
    annotations[1]["category_id"] = 99
    name = dataset(annotations)
    with pytest.raises(KeyError, match="category_id=99 but this id does not exist"):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "segmentation",
    [[[5, 5, 25, 5, 25]], [[5, 5, 25, 5]], "xyz", [[5, 5, float("inf"), 5, 25, 35]], {"size": [1]}],
    ids=["odd", "too_short", "string", "inf", "rle_without_counts"],
)
def test_invalid_segmentation_in_a_record_is_a_clear_error(segmentation):
    """Records from custom loaders; Detectron2's COCO loader drops such instances (with a
    logged count of "instances without valid segmentation") before they get here."""
    ann = {"bbox": [5, 5, 20, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    record = {"file_name": "x.png", "image_id": 7, "annotations": [dict(ann)]}
    check_record(record)  # valid without segmentation
    record["annotations"][0]["segmentation"] = segmentation
    with pytest.raises(BadRecordError, match=r"x.png \(image_id 7\), annotation #0: segmentation"):
        check_record(record)


# --------------------------------------------------------------- empty images, degenerate boxes
@pytest.mark.parametrize("filter_empty", [True, False])
def test_image_without_instances_trains(dataset, model, filter_empty):
    name = dataset(GOOD[:1])  # b.png has no annotation
    batch = _first_batch(_cfg(name, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", str(filter_empty)))
    files = sorted(Path(d["file_name"]).name for d in batch)
    counts = sorted(len(d["instances"]) for d in batch)
    if filter_empty:  # Detectron2 drops b.png: both images of the batch are a.png
        assert files == ["a.png", "a.png"] and counts == [1, 1]
    else:
        assert files == ["a.png", "b.png"] and counts == [0, 1]
    losses = _assert_trains(model, batch)
    assert losses["loss_cls"] > 0


def test_zero_width_box_is_dropped_by_the_loader_and_trains(dataset, model):
    annotations = copy.deepcopy(GOOD)
    annotations[0]["bbox"] = [5, 5, 0, 30]
    name = dataset(annotations)
    batch = _first_batch(_cfg(name))
    by_file = {Path(d["file_name"]).name: len(d["instances"]) for d in batch}
    assert by_file == {"a.png": 0, "b.png": 1}
    _assert_trains(model, batch)


def test_mapper_keeping_a_zero_width_box_is_a_clear_error(dataset, model):
    """Detectron2's RPN turns a zero-width ground-truth box into an infinite box loss (its
    anchors match it as a low-quality match, log(0) width target), so CheckedMapper refuses a
    mapper that lets one through."""
    annotations = copy.deepcopy(GOOD)
    annotations[0]["bbox"] = [5, 5, 0, 30]
    name = dataset(annotations)
    cfg = _cfg(name)
    record = DatasetCatalog.get(name)[0]

    class KeepEverything(DatasetMapper):  # no filter_empty_instances
        def _transform_annotations(self, dataset_dict, transforms, image_shape):
            from detectron2.data import detection_utils

            annos = [
                detection_utils.transform_instance_annotations(a, transforms, image_shape)
                for a in dataset_dict.pop("annotations")
            ]
            dataset_dict["instances"] = detection_utils.annotations_to_instances(
                annos, image_shape, mask_format=self.instance_mask_format
            )

    mapped = KeepEverything(cfg, True)(copy.deepcopy(record))
    with EventStorage():
        losses = model([mapped])
    assert not torch.isfinite(losses["loss_rpn_loc"])  # what the check prevents
    with pytest.raises(BadRecordError, match=r"a.png \(image_id 1\): the mapper kept a degenerate"):
        CheckedMapper(KeepEverything(cfg, True))(copy.deepcopy(record))


def test_nan_image_stops_training_with_a_clear_error(dataset, model):
    name = dataset(GOOD)
    batch = _first_batch(_cfg(name))
    batch[0]["image"] = batch[0]["image"].float()
    batch[0]["image"][0, 10, 10] = float("nan")
    with EventStorage(), pytest.raises(FloatingPointError, match="Inf/NaN"):
        model(batch)
