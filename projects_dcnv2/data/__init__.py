"""Data sets: the embedded synthetic shapes set (registered on import) and a check that
registered COCO-style data sets are on disk."""

from .checks import check_datasets_on_disk
from .shapes import register_shapes_datasets

register_shapes_datasets()

__all__ = ["check_datasets_on_disk"]
