"""Bad data: unreadable images and invalid annotations raise errors naming the image file
(train_net.py's loader, projects_dcnv2/data/checks.py); images without instances and degenerate
boxes train with finite losses or fail clearly; RoIs far outside the image, huge offsets and NaN
inputs give the right result or a clear error.

Op-level non-finite cases live elsewhere: NaN offsets and feature maps in test_nonfinite.py,
offsets of +-50, +-1e30 and +-inf in test_mdconv.py / test_deform_roi_pool.py
(``test_far_outside_offsets_give_bias_only``, ``test_extreme_offsets_sample_zero``), RoIs
crossing the border in ``test_gradcheck_float64_border_rois``.
"""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode
from detectron2.utils.events import EventStorage

from projects_dcnv2 import add_dcnv2_config
from projects_dcnv2.data.checks import BadRecordError, CheckedMapper, check_record
from projects_dcnv2.layers import ModulatedDeformConv2dPack, deform_roi_pool
from projects_dcnv2.modeling import MDPoolROIPooler

from reference_ops import deform_roi_pool_ref

pytestmark = pytest.mark.usefixtures("op_test_env")  # seed, one thread (conftest.py)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml"
SIZE = 64
GOOD = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 30], "area": 600,
     "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 35]]},
    {"id": 2, "image_id": 2, "category_id": 3, "bbox": [10, 12, 30, 20], "area": 600,
     "iscrowd": 0, "segmentation": [[10, 12, 40, 12, 40, 32]]},
]  # fmt: skip


def _trainer_class():
    sys.path.insert(0, str(REPO))
    try:
        from train_net import Trainer
    finally:
        sys.path.remove(str(REPO))
    return Trainer


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
    cfg = get_cfg()
    add_dcnv2_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", f"('{dataset_name}',)", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", f"({SIZE},)",
            "INPUT.MAX_SIZE_TRAIN", f"{SIZE}", "INPUT.RANDOM_FLIP", "none",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            *opts,
        ]
    )  # fmt: skip
    return cfg


def _first_batch(cfg):
    return next(iter(_trainer_class().build_train_loader(cfg)))


@pytest.fixture(scope="module")
def model():
    cfg = _cfg("unused")
    torch.manual_seed(0)
    return build_model(cfg).train()


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


# -------------------------------------------------------------------------- the ops and layers
def test_rois_far_outside_the_image_pool_zeros():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 1000.0, 1000, 1030, 1020],  # beyond the bottom-right corner
            [1, -500.0, -400, -470, -380],  # beyond the top-left corner
            [0, 5000.0, -5000, 5040, -4970],
            [1, -30.0, 4, 10, 18],  # straddling the left border: partly inside
        ],
        dtype=torch.float64,
    )
    offset = ((torch.rand(4, 2, 3, 3, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    args = (rois, offset, 3, 0.5, 2, 0.1)
    out = deform_roi_pool(x, *args)
    expected = deform_roi_pool_ref(x, *args)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(out[:3]) == 0 and torch.count_nonzero(out[3]) > 0
    grad_x, grad_offset = torch.autograd.grad(out[:3].sum(), (x, offset))
    assert torch.count_nonzero(grad_x) == 0 and torch.count_nonzero(grad_offset) == 0


def test_mdpool_pooler_with_boxes_far_outside_the_image():
    torch.manual_seed(0)
    pooler = MDPoolROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 4, deform_fc_dim=16)
    features = [torch.randn(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    boxes = Boxes(torch.tensor([[900.0, 900, 940, 960], [-3000, -3000, -2000, -2000]]))
    out = pooler(features, [boxes])
    assert out.shape == (2, 4, 7, 7) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pack_with_huge_offsets_outputs_its_bias(sign):
    """Offsets of 1e4 put every sample outside: the output is the bias, every gradient finite and
    (but the bias's) zero."""
    torch.manual_seed(0)
    pack = ModulatedDeformConv2dPack(4, 3, 3, padding=1, deformable_groups=2)
    n = 2 * pack.deformable_groups * pack.num_taps
    with torch.no_grad():
        pack.conv_offset.bias[:n] = sign * 1e4
        pack.bias.normal_()
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    out = pack(x)
    assert torch.equal(out, pack.bias.view(1, -1, 1, 1).expand_as(out))
    out.square().sum().backward()
    for name, p in [("input", x), *pack.named_parameters()]:
        assert torch.isfinite(p.grad).all(), name
        assert name == "bias" or torch.count_nonzero(p.grad) == 0, name


def test_pack_nan_input_propagates():
    """A NaN pixel reaches the offset predictor and the samples: NaN out, never a silent 0."""
    torch.manual_seed(0)
    pack = ModulatedDeformConv2dPack(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    nan = torch.isnan(pack(x))
    assert nan[0, :, 3, 3].all()  # the centre tap of this position samples the NaN
    assert not nan[0, :, 0, 0].any()  # far enough away, the NaN is not sampled


def test_nan_image_stops_training_with_a_clear_error(dataset, model):
    name = dataset(GOOD)
    batch = _first_batch(_cfg(name))
    batch[0]["image"] = batch[0]["image"].float()
    batch[0]["image"][0, 10, 10] = float("nan")
    with EventStorage(), pytest.raises(FloatingPointError, match="Inf/NaN"):
        model(batch)
