"""An embedded COCO-format data set of geometrically deformed shapes, for CPU-only machines.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB PNGs with 1-4 non-overlapping filled shapes
(circle, triangle, square, star) on a noisy background; each shape is rotated, sheared and
scaled anisotropically, so a detector gains from sampling off the regular grid. Every instance
has a box and an exact polygon mask. Generation is deterministic (fixed seeds per split).

Registered datasets (on ``import projects_dcnv2``, nothing is written then):

* ``dcnv2_shapes_train``: ``SPLIT_SIZES["train"]`` images,
* ``dcnv2_shapes_val``: ``SPLIT_SIZES["val"]`` held-out images (other seed), the quick configs'
  evaluation split,
* ``dcnv2_shapes_test``: ``SPLIT_SIZES["test"]`` further held-out images (third seed), large
  enough that a model's AP on it varies little with the images drawn: the seed study measures the
  training spread on it (``tools/seed_study.py``).

Files live in ``$DETECTRON2_DATASETS/dcnv2_shapes`` (default ``./datasets/dcnv2_shapes``)::

    annotations/instances_{train,val}.json
    {train,val}/000000.png ...

Each split is generated on first use: when its dataset is loaded (``DatasetCatalog.get``) or when its
``json_file`` is resolved through Detectron2's ``PathManager`` (as ``COCOEvaluator`` does;
``json_file`` is a ``dcnv2_shapes://`` path served by :class:`ShapesPathHandler`, the same
mechanism as Detectron2's ``detectron2://`` model-zoo paths). A split is generated into a
temporary folder and renamed into place, its annotation file last, so concurrent processes (one
per GPU) are safe and a folder from an older version gains the splits it lacks. Delete the
folder to regenerate.
"""

import json
import logging
import os
import shutil
import tempfile

import numpy as np
from iopath.common.file_io import PathHandler
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils.file_io import PathManager

__all__ = ["CLASSES", "SPLIT_SIZES", "shapes_root", "generate_shapes_dataset", "ShapesPathHandler"]

logger = logging.getLogger(__name__)

CLASSES = ("circle", "triangle", "square", "star")
IMAGE_SIZE = 128
SPLIT_SIZES = {"train": 600, "val": 500, "test": 2000}
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
_PREFIX = "dcnv2_shapes://"


def shapes_root():
    """The data set folder: ``$DETECTRON2_DATASETS/dcnv2_shapes`` (default ``./datasets``)."""
    return os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "dcnv2_shapes"
    )


def _unit_polygon(name):
    """(V, 2) vertices of a shape of circumradius 1 centred at the origin."""
    if name == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.ones_like(angles)
    elif name == "triangle":
        angles = np.linspace(0, 2 * np.pi, 3, endpoint=False) - np.pi / 2
        radii = np.ones_like(angles)
    elif name == "square":
        angles = np.linspace(0, 2 * np.pi, 4, endpoint=False) + np.pi / 4
        radii = np.ones_like(angles)
    elif name == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        radii = np.tile([1.0, 0.45], 5)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _random_deformation(rng, radius):
    """2x2 matrix: rotation x shear x anisotropic scale x radius."""
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shear = np.array([[1.0, rng.uniform(-0.4, 0.4)], [0.0, 1.0]])
    scale = np.diag(rng.uniform(0.7, 1.3, size=2))
    return radius * rotation @ shear @ scale


def _render_image(rng, image_id, file_name):
    """Draw one image; returns (PIL image, image record, annotation records)."""
    size = IMAGE_SIZE
    background = rng.uniform(0, 255, size=3)
    pixels = background + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, annotations = [], []
    for _ in range(rng.randint(1, 5)):
        category = rng.randint(len(CLASSES))
        for _attempt in range(30):
            vertices = (
                _unit_polygon(CLASSES[category]) @ _random_deformation(rng, rng.uniform(12, 34)).T
            )
            lo, hi = vertices.min(0), vertices.max(0)
            if np.any(hi - lo > size - 4):
                continue
            vertices += rng.uniform(2 - lo, size - 2 - hi)
            x0, y0 = vertices.min(0)
            x1, y1 = vertices.max(0)
            if all(x0 > b[2] + 2 or x1 < b[0] - 2 or y0 > b[3] + 2 or y1 < b[1] - 2 for b in boxes):
                break
        else:
            continue
        while True:  # a colour that stands out from the background
            colour = rng.randint(0, 256, size=3)
            if np.abs(colour - background).sum() > 150:
                break
        draw.polygon([tuple(v) for v in vertices.tolist()], fill=tuple(int(c) for c in colour))
        boxes.append((x0, y0, x1, y1))
        x, y = vertices[:, 0], vertices[:, 1]
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category + 1,
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "segmentation": [[round(float(v), 2) for v in vertices.reshape(-1)]],
                "area": round(
                    float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))), 2
                ),
                "iscrowd": 0,
            }
        )
    record = {"id": image_id, "file_name": file_name, "width": size, "height": size}
    return image, record, annotations


def _write_split(folder, split):
    """Write ``folder/<split>/*.png`` and ``folder/instances_<split>.json``."""
    rng = np.random.RandomState(_SPLIT_SEEDS[split])
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for index in range(SPLIT_SIZES[split]):
        file_name = f"{index:06d}.png"
        image, record, anns = _render_image(rng, index + 1, file_name)
        image.save(os.path.join(folder, split, file_name))
        images.append(record)
        annotations.extend(anns)
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    coco = {
        "info": {"description": f"projects_dcnv2 synthetic shapes, {split} split"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    with open(os.path.join(folder, f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)


def _annotation_file(root, split):
    return os.path.join(root, "annotations", f"instances_{split}.json")


def generate_shapes_dataset(root=None, splits=None):
    """Write the ``splits`` (default: all of ``SPLIT_SIZES``) under ``root`` (default
    :func:`shapes_root`) that are not there yet; a split is there once its annotation file is.

    Returns:
        str: ``root``.
    """
    root = root or shapes_root()
    splits = list(SPLIT_SIZES) if splits is None else list(splits)
    for split in splits:
        if split not in SPLIT_SIZES:
            raise ValueError(f"split: expected one of {list(SPLIT_SIZES)}, got {split!r}")
    missing = [s for s in splits if not os.path.isfile(_annotation_file(root, s))]
    if not missing:
        return root
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split in missing:
        tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=root)
        try:
            _write_split(tmp, split)
            try:  # atomic; fails when another process moved its identical copy first
                os.rename(os.path.join(tmp, split), os.path.join(root, split))
            except OSError:
                if not os.path.isdir(os.path.join(root, split)):
                    raise
            # The annotation file last: its presence says the split is complete.
            os.replace(os.path.join(tmp, f"instances_{split}.json"), _annotation_file(root, split))
            logger.info(f"Generated the shapes data set's {split} split in {root}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _split_of(relative_path):
    """The split a ``dcnv2_shapes://`` path belongs to, or None (then every split is made)."""
    name = os.path.basename(relative_path)
    for split in SPLIT_SIZES:
        if name == f"instances_{split}.json" or relative_path.startswith(f"{split}/"):
            return split
    return None


class ShapesPathHandler(PathHandler):
    """Resolves ``dcnv2_shapes://<relative path>`` to a file under :func:`shapes_root`,
    generating the data set first if needed."""

    def _get_supported_prefixes(self):
        return [_PREFIX]

    def _get_local_path(self, path, force=False, **kwargs):
        relative = path[len(_PREFIX) :]
        split = _split_of(relative)
        root = generate_shapes_dataset(splits=None if split is None else [split])
        return os.path.join(root, relative)

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        return PathManager.open(self._get_local_path(path), mode, buffering, **kwargs)

    def _exists(self, path, **kwargs):
        return os.path.exists(self._get_local_path(path))

    def _isfile(self, path, **kwargs):
        return os.path.isfile(self._get_local_path(path))


def _load_split(split, dataset_name):
    root = generate_shapes_dataset(splits=[split])
    return load_coco_json(
        _annotation_file(root, split),
        os.path.join(root, split),
        dataset_name,
    )


def register_shapes_datasets():
    """Register ``dcnv2_shapes_{train,val,test}`` (lazy: nothing is generated here)."""
    PathManager.register_handler(ShapesPathHandler())
    root = shapes_root()
    for split in SPLIT_SIZES:
        name = f"dcnv2_shapes_{split}"
        DatasetCatalog.register(name, lambda split=split, name=name: _load_split(split, name))
        MetadataCatalog.get(name).set(
            json_file=f"{_PREFIX}annotations/instances_{split}.json",
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=list(CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASSES))},
        )
