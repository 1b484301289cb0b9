"""Model-family profiles: everything that differs between base model families (SD1.x today), in one
object per family. Every other module asks the profile; none knows a layer count, a width or a layer
name of its own.

* :class:`~fusion.families.profile.ModelFamily` — the cross-attention layers in UNet run order keyed
  by ComfyUI's ``(block, id, block_index)``, the text encoders and their widths, the diffusers <-> ldm
  module names, the XTI layer keys, default sizes, and how to recognise the family from a MODEL, a CLIP
  and a file;
* :data:`FAMILIES` — the families the pack knows, in the order recognition tries them.
"""
from __future__ import annotations

from .profile import LayerKey, ModelFamily, SpatialTransformer, TextEncoder
from .sd15 import SD15

FAMILIES: tuple[ModelFamily, ...] = (SD15,)


def family_named(name: str) -> ModelFamily:
    """The family of a name as files and caches store it (``"sd15"``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


__all__ = ["FAMILIES", "SD15", "LayerKey", "ModelFamily", "SpatialTransformer", "TextEncoder", "family_named"]
