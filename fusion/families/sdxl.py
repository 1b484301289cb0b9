"""Stable Diffusion XL (SDXL 1.0 base and its fine-tunes: Pony, Illustrious, NoobAI, ...): two text encoders
(CLIP ViT-L 768 wide and OpenCLIP ViT-bigG 1280 wide, their penultimate states concatenated into a 2048-wide
context), a UNet with 70 cross-attention layers in 11 SpatialTransformers of 2 or 10 transformer blocks
(docs/design.md §13). The refiner, SD2.x and the distilled variants with fewer blocks (SSD-1B, Vega, KOALA)
are other families: none of them matches this profile."""
from __future__ import annotations

from .profile import ModelFamily, SpatialTransformer, TextEncoder


def _transformers() -> tuple[SpatialTransformer, ...]:
    # diffusers down block b, attention a <-> input_blocks.{3b+a+1}; up block b, attention a <-> output_blocks.{3b+a}
    down = [SpatialTransformer(("input", 3 * b + a + 1), f"input_blocks.{3 * b + a + 1}.1",
                               f"down_blocks.{b}.attentions.{a}", (2, 4)[b - 1], (2, 10)[b - 1])
            for b in (1, 2) for a in range(2)]
    middle = [SpatialTransformer(("middle", 0), "middle_block.1", "mid_block.attentions.0", 4, 10)]
    up = [SpatialTransformer(("output", 3 * b + a), f"output_blocks.{3 * b + a}.1", f"up_blocks.{b}.attentions.{a}",
                             (4, 2)[b], (10, 2)[b]) for b in (0, 1) for a in range(3)]
    return tuple(down + middle + up)


SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    transformers=_transformers(),
    context_dim=2048,
    text_encoders=(
        TextEncoder("clip_l", 768, "new_concept_embedding", "text_encoder", "text_encoder.", "l", "lora_te1_"),
        TextEncoder("clip_g", 1280, "new_concept_embedding_2", "text_encoder_2", "text_encoder_2.", "g", "lora_te2_"),
    ),
    xti_keys=(),  # kohya's XTI format exists for SD1.x only
    default_size=(1024, 1024),
    model_channels=320,
    size_conditioning=True,
    kohya_unet_ldm_names=True,
)
