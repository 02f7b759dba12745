"""Clear errors for bad data sets: missing from disk, unreadable images, invalid annotations.

Detectron2 registers its builtin data sets (``coco_2017_train`` ...) under
``$DETECTRON2_DATASETS`` (default ``./datasets``) without checking that the files exist; a
missing file then fails deep inside data loading. :func:`check_datasets_on_disk` fails early
and says where it looked.

Bad records fail late and vaguely in Detectron2: a truncated image raises "image file is
truncated" without naming it, a 3-number bbox fails an assertion inside ``BoxMode.convert``, a
NaN or negative-size box is silently dropped or mangled. :class:`CheckedMapper` wraps a dataset
mapper (``train_net.py`` wraps ``DatasetMapper``): it checks each record with
:func:`check_record` before mapping it, and re-raises any error of the mapper as
:class:`BadRecordError` naming the image file. Degenerate (zero-width or zero-height) boxes are
allowed in records, as COCO has a few: ``DatasetMapper`` drops them; a mapper that lets one
through gets a clear error, since Detectron2's RPN turns it into an infinite box loss.
"""

import math
import numbers
import os

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["BadRecordError", "CheckedMapper", "check_datasets_on_disk", "check_record"]


def check_datasets_on_disk(dataset_names):
    """Raise ``FileNotFoundError`` if the annotation file or image folder of a data set is
    missing. Data sets whose ``json_file`` is a URI (such as ``dcnv2_shapes://``, generated on
    first use) or that have no such metadata (other formats) are not checked.

    Args:
        dataset_names (iterable[str]): registered data set names.
    """
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        paths = [getattr(metadata, key, None) for key in ("json_file", "image_root")]
        if any(p and "://" in p for p in paths):
            continue  # served by a PathManager handler (generated or downloaded on use)
        missing = [p for p in paths if p and not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"Data set '{name}' not found: looked for {' and '.join(missing)}. "
                f"Detectron2 resolves data sets under $DETECTRON2_DATASETS (now "
                f"{os.getenv('DETECTRON2_DATASETS', 'unset, so ./datasets')}); set it to the "
                "folder that holds e.g. coco/annotations/instances_train2017.json and "
                "coco/train2017/, or use the embedded dcnv2_shapes_train / dcnv2_shapes_val."
            )


class BadRecordError(ValueError):
    """A data set record (an image and its annotations) that cannot be used; the message names
    the image file."""


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _where(record, index=None) -> str:
    where = f"{record.get('file_name', '<no file_name>')} (image_id {record.get('image_id')})"
    return where if index is None else f"{where}, annotation #{index}"


_BOX_FORMS = {  # bbox_mode -> (form, number of values)
    BoxMode.XYWH_ABS: ("[x, y, w, h]", 4),
    BoxMode.XYXY_ABS: ("[x1, y1, x2, y2]", 4),
    BoxMode.XYWHA_ABS: ("[x_center, y_center, w, h, angle]", 5),
}


def _check_bbox(record, index, ann) -> None:
    bbox, mode = ann.get("bbox"), ann.get("bbox_mode")
    if mode not in _BOX_FORMS:
        raise BadRecordError(
            f"{_where(record, index)}: bbox_mode: expected one of "
            f"{[m.name for m in _BOX_FORMS]}, got {mode!r}"
        )
    form, n = _BOX_FORMS[mode]
    if (
        not isinstance(bbox, (list, tuple, np.ndarray))
        or len(bbox) != n
        or not all(map(_is_number, bbox))
    ):
        raise BadRecordError(
            f"{_where(record, index)}: bbox: expected {n} finite numbers {form}, got {bbox!r}"
        )
    w, h = (bbox[2] - bbox[0], bbox[3] - bbox[1]) if mode == BoxMode.XYXY_ABS else bbox[2:4]
    if w < 0 or h < 0:
        raise BadRecordError(
            f"{_where(record, index)}: bbox: expected {form} with width and height >= 0, "
            f"got {list(bbox)} (width {w}, height {h})"
        )


def _check_segmentation(record, index, segm) -> None:
    if isinstance(segm, dict):  # RLE
        if "counts" in segm and "size" in segm:
            return
        got = sorted(segm)
    elif isinstance(segm, list) and segm:
        bad = [
            p
            for p in segm
            if not isinstance(p, (list, tuple))
            or len(p) < 6
            or len(p) % 2
            or not all(map(_is_number, p))
        ]
        if not bad:
            return
        got = bad[0]
    else:
        got = segm
    raise BadRecordError(
        f"{_where(record, index)}: segmentation: expected polygons (lists of an even number >= 6 "
        f"of finite coordinates) or an RLE dict with 'counts' and 'size', got {got!r}"
    )


def check_record(record, num_classes=None) -> None:
    """Raise :class:`BadRecordError` if a Detectron2 data set record (a dict of
    ``DatasetCatalog``) has an invalid annotation: a bbox that is not 4 (rotated: 5) finite
    numbers or has a negative width or height, an unknown ``bbox_mode``, a ``category_id``
    that is not an integer in ``[0, num_classes)``, or a malformed segmentation.

    Args:
        record (dict): with ``file_name`` and optionally ``annotations``.
        num_classes (int or None): number of classes, if the range of ``category_id`` is known.
    """
    if "file_name" not in record:
        raise BadRecordError(f"record of image_id {record.get('image_id')}: has no 'file_name'")
    for index, ann in enumerate(record.get("annotations", ())):
        _check_bbox(record, index, ann)
        cat = ann.get("category_id")
        if (
            not isinstance(cat, numbers.Integral)
            or isinstance(cat, bool)
            or cat < 0
            or (num_classes is not None and cat >= num_classes)
        ):
            limit = f" and < {num_classes}" if num_classes is not None else ""
            raise BadRecordError(
                f"{_where(record, index)}: category_id: expected an integer >= 0{limit}, "
                f"got {cat!r}"
            )
        if "segmentation" in ann:
            _check_segmentation(record, index, ann["segmentation"])


class CheckedMapper:
    """Wraps a dataset mapper (such as Detectron2's ``DatasetMapper``): checks each record with
    :func:`check_record` first, re-raises any error of the mapper (an unreadable or truncated
    image, a size mismatch ...) as :class:`BadRecordError` naming the image file, and rejects
    mapped instances with a degenerate box (width or height <= 1e-5; ``DatasetMapper`` removes
    those, Detectron2's RPN makes them an infinite loss).

    Args:
        mapper (callable): dataset dict -> model input dict.
        num_classes (int or None): passed to :func:`check_record`.
    """

    def __init__(self, mapper, num_classes=None):
        self.mapper = mapper
        self.num_classes = num_classes

    def __call__(self, record):
        check_record(record, self.num_classes)
        try:
            mapped = self.mapper(record)
        except Exception as e:
            raise BadRecordError(f"{_where(record)}: {type(e).__name__}: {e}") from e
        instances = mapped.get("instances") if isinstance(mapped, dict) else None
        if instances is not None and instances.has("gt_boxes"):
            keep = instances.gt_boxes.nonempty()
            if not keep.all():
                box = instances.gt_boxes.tensor[~keep][0].tolist()
                raise BadRecordError(
                    f"{_where(record)}: the mapper kept a degenerate box {box} (x1, y1, x2, y2); "
                    "remove empty boxes, e.g. with detectron2.data.detection_utils."
                    "filter_empty_instances, as DatasetMapper does"
                )
        return mapped
