"""Inspection of trained DCNv2 models (sampling locations, deformed RoI bins); no drawing."""

from .sampling import (
    DeformField,
    capture_deform_fields,
    compose_sampling_locations,
    deformable_blocks,
    deformed_bins,
    field_from_conv_offset,
    select_fields,
    unit_centres,
)

__all__ = [
    "DeformField",
    "capture_deform_fields",
    "compose_sampling_locations",
    "deformable_blocks",
    "deformed_bins",
    "field_from_conv_offset",
    "select_fields",
    "unit_centres",
]
