"""A model-family profile's layer of a diffusers-named UNet module, for the tests (moved out of the pack,
which looks layers up by ComfyUI's weight names only: ``ModelFamily.layer_of_weight``)."""
from __future__ import annotations

from fusion.families import SD15, ModelFamily


def layer_of_unet_module(diffusers_name: str, family: ModelFamily = SD15) -> int | None:
    """The first layer of the SpatialTransformer holding a diffusers-named module (its own layer when the
    module is inside ``transformer_blocks.j``), else None."""
    try:
        return family.layer_of_weight(family.ldm_unet_module(diffusers_name))
    except KeyError:  # not inside one of the family's SpatialTransformers
        return None
