"""Stable Diffusion 1.x (SD1.5 and its fine-tunes): CLIP ViT-L/14 (768 wide, one encoder), a UNet with 16
cross-attention layers of one transformer block each (docs/design.md §1.2)."""
from __future__ import annotations

from .profile import ModelFamily, SpatialTransformer, TextEncoder


def _transformers() -> tuple[SpatialTransformer, ...]:
    down = [SpatialTransformer(("input", 3 * b + a + 1), f"input_blocks.{3 * b + a + 1}.1",
                               f"down_blocks.{b}.attentions.{a}", (1, 2, 4)[b]) for b in range(3) for a in range(2)]
    middle = [SpatialTransformer(("middle", 0), "middle_block.1", "mid_block.attentions.0", 4)]
    up = [SpatialTransformer(("output", 3 * b + a), f"output_blocks.{3 * b + a}.1", f"up_blocks.{b}.attentions.{a}",
                             (4, 4, 2, 1)[b]) for b in (1, 2, 3) for a in range(3)]
    return tuple(down + middle + up)


SD15 = ModelFamily(
    name="sd15",
    label="SD1.x",
    transformers=_transformers(),
    context_dim=768,
    text_encoders=(TextEncoder("clip_l", 768, "new_concept_embedding", "text_encoder", "text_encoder.", "l",
                               "lora_te_"),),
    # kohya XTI (P+) embedding files name the 16 layers like this
    xti_keys=("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
              "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    default_size=(512, 512),
    model_channels=320,
)
