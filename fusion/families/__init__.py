"""Model-family profiles: everything that differs between base model families (SD1.x, SDXL), in one
object per family. Every other module asks the profile; none knows a layer count, a width or a layer
name of its own.

* :class:`~fusion.families.profile.ModelFamily` — the cross-attention layers in UNet run order keyed
  by ComfyUI's ``(block, id, block_index)``, the text encoders and their widths, the diffusers <-> ldm
  module names, the XTI layer keys, default sizes, and how to recognise the family from a MODEL, a CLIP
  and a file;
* :data:`FAMILIES` — the families the pack knows, in the order recognition tries them.
"""
from __future__ import annotations

from collections.abc import Mapping

from .profile import LayerKey, ModelFamily, SpatialTransformer, TextEncoder
from .sd15 import SD15
from .sdxl import SDXL

FAMILIES: tuple[ModelFamily, ...] = (SD15, SDXL)


def family_named(name: str) -> ModelFamily:
    """The family of a name as files and caches store it (``"sd15"``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]  # part -> token or module -> shape


def recognise_file(tables: Shapes, loras: Shapes) -> tuple[list[ModelFamily], dict[str, list[str]]]:
    """Which families an ED-LoRA file's content points to (see :meth:`ModelFamily.file_markers`): the families
    with a marker that not every family shares, and those markers by family name. One family: the file is
    for it (its own checks then say what else is wrong); none: the file is for no family the pack knows;
    several: the file is inconsistent."""
    markers = {f.name: f.file_markers(tables, loras) for f in FAMILIES}
    shared = set.intersection(*(set(m) for m in markers.values()))
    telling = {name: [m for m in found if m not in shared] for name, found in markers.items()}
    return [f for f in FAMILIES if telling[f.name]], telling


__all__ = ["FAMILIES", "SD15", "SDXL", "LayerKey", "ModelFamily", "SpatialTransformer", "TextEncoder", "family_named",
           "recognise_file"]
