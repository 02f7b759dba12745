"""A clear error when a registered COCO-style data set is missing from disk.

Detectron2 registers its builtin data sets (``coco_2017_train`` ...) under
``$DETECTRON2_DATASETS`` (default ``./datasets``) without checking that the files exist; a
missing file then fails deep inside data loading. :func:`check_datasets_on_disk` fails early
and says where it looked.
"""

import os

from detectron2.data import MetadataCatalog

__all__ = ["check_datasets_on_disk"]


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
