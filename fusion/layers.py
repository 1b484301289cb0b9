"""SD1.x layer tables: the 16 cross-attention layers and module-name mappings.

Mix-of-Show names modules the diffusers way (``down_blocks.0.attentions.0...``); ComfyUI keeps
the original ldm layout (``input_blocks.1.1...``). Both orders below are the order in which the
UNet runs its cross-attention layers, which is also the row order of an ED-LoRA token table.
"""
from __future__ import annotations

import re

NUM_LAYERS = 16
CONTEXT_DIM = 768

# ComfyUI's extra_options["block"] for each cross-attention layer, in ED-LoRA row order.
CROSS_ATTN_BLOCKS: tuple[tuple[str, int], ...] = (
    ("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
    ("middle", 0),
    ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
    ("output", 9), ("output", 10), ("output", 11),
)
LAYER_OF_BLOCK: dict[tuple[str, int], int] = {b: i for i, b in enumerate(CROSS_ATTN_BLOCKS)}

# ldm module prefix of each layer's SpatialTransformer (where attn2 lives).
LDM_TRANSFORMER_PREFIXES: tuple[str, ...] = tuple(
    f"input_blocks.{n}.1" if kind == "input" else ("middle_block.1" if kind == "middle" else f"output_blocks.{n}.1")
    for kind, n in CROSS_ATTN_BLOCKS
)

# kohya XTI (P+) embedding files name the 16 layers like this.
XTI_LAYER_KEYS: tuple[str, ...] = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)

_DOWN = re.compile(r"^down_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_TEXT = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def diffusers_unet_to_ldm(name: str) -> str:
    """``down_blocks.0.attentions.1.proj_in`` -> ``input_blocks.2.1.proj_in`` (SD1.x UNet).

    Raises KeyError for names outside SD1.x's transformer blocks.
    """
    m = _DOWN.match(name)
    if m and int(m[1]) < 3 and int(m[2]) < 2:
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    m = _MID.match(name)
    if m:
        return f"middle_block.1.{m[1]}"
    m = _UP.match(name)
    if m and 1 <= int(m[1]) <= 3 and int(m[2]) < 3:
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    raise KeyError(name)


def is_text_encoder_module(name: str) -> bool:
    """True for the CLIP linears an ED-LoRA may carry (q/k/v/out_proj, fc1, fc2)."""
    return _TEXT.match(name) is not None


def layer_of_unet_module(name: str) -> int | None:
    """Cross-attention layer index (0..15) of a diffusers UNet module name, else None."""
    try:
        ldm = diffusers_unet_to_ldm(name)
    except KeyError:
        return None
    for i, prefix in enumerate(LDM_TRANSFORMER_PREFIXES):
        if ldm.startswith(prefix + "."):
            return i
    return None
