"""TEST FIXTURE (tests, benchmarks and the demo; never shipped): seeded synthetic ED-LoRAs with a model
family's exact module names (fusion.families).

Shapes follow the model they are made for: ``model_channels=320`` and ``text_layers=12`` /
``text_intermediate=3072`` for full-size SD1.5 (``family=SDXL`` with ``text_sizes=FULL_SDXL_TEXT`` for the
full-size SDXL); smaller values for the tiny test models.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from fusion.families import SD15, ModelFamily

# (layers, MLP width) of each full-size SDXL text encoder: CLIP-L and OpenCLIP-bigG
FULL_SDXL_TEXT = {"clip_l": (12, 3072), "clip_g": (32, 5120)}
# the tiny SDXL's widths (tests/support/mixofshow_test_fixtures/tiny_sdxl.py)
TINY_XL_SHAPES = dict(model_channels=64, text_layers=3, text_intermediate=128)


def unet_transformer_prefixes(model_channels: int, family: ModelFamily = SD15) -> list[tuple[str, int]]:
    """(diffusers prefix of each SpatialTransformer, its channel count), in layer order."""
    return [(t.diffusers, model_channels * t.channel_mult) for t in family.transformers]


def unet_module_shapes(model_channels: int = 320, whole_block: bool = True,
                       family: ModelFamily = SD15) -> dict[str, tuple[int, ...]]:
    """diffusers module name -> weight shape for the LoRA'd UNet modules."""
    shapes = {}
    for t in family.transformers:
        prefix, c = t.diffusers, model_channels * t.channel_mult
        for j in range(t.depth):
            tb = f"{prefix}.transformer_blocks.{j}"
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    in_dim = family.context_dim if attn == "attn2" and proj in ("to_k", "to_v") else c
                    shapes[f"{tb}.{attn}.{proj}"] = (c, in_dim)
            if whole_block:
                shapes[f"{tb}.ff.net.0.proj"] = (8 * c, c)
                shapes[f"{tb}.ff.net.2"] = (c, 4 * c)
        if whole_block:  # 1x1 convs in SD1.x; linear in SDXL (ComfyUI's use_linear_in_transformer)
            shapes[f"{prefix}.proj_in"] = (c, c, 1, 1) if family is SD15 else (c, c)
            shapes[f"{prefix}.proj_out"] = (c, c, 1, 1) if family is SD15 else (c, c)
    return shapes


def text_module_shapes(text_layers: int = 12, text_intermediate: int = 3072, whole_layer: bool = True,
                       width: int = SD15.text_width) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(text_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"text_model.encoder.layers.{i}.self_attn.{proj}"] = (width, width)
        if whole_layer:
            shapes[f"text_model.encoder.layers.{i}.mlp.fc1"] = (text_intermediate, width)
            shapes[f"text_model.encoder.layers.{i}.mlp.fc2"] = (width, text_intermediate)
    return shapes


def _factor_pair(shape: tuple[int, ...], rank: int, scale: float, g: torch.Generator):
    out_dim, in_dim = shape[0], shape[1]
    up = torch.randn(out_dim, rank, generator=g) * (scale / rank ** 0.5)
    down = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
    if len(shape) == 4:
        up, down = up[:, :, None, None], down[:, :, None, None]
    return up, down


def make_edlora_state(tokens: tuple[str, ...] = ("<c1>", "<c2>"), *, seed: int = 0, rank: int = 4,
                      model_channels: int = 320, text_layers: int = 12, text_intermediate: int = 3072,
                      whole_block: bool = True, text_lora: bool = True, unet_lora: bool = True,
                      spelling: str = "main", wrap_params: bool = True, scale: float = 0.5,
                      embedding_std: float = 0.02, family: ModelFamily = SD15,
                      text_sizes: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """A Mix-of-Show-layout state dict (nested parts, optional ``params`` wrapper) for ``family``: one table
    and one text LoRA part per text encoder (``text_sizes``: encoder name -> (layers, MLP width); default
    ``text_layers`` / ``text_intermediate`` for each), the UNet part.

    ``spelling``: ``"main"`` (``.lora_down.weight``) or ``"research"`` (``_lora.down.weight``).
    """
    g = torch.Generator().manual_seed(seed)
    if spelling == "main":
        key = lambda module, which: f"{module}.lora_{which}.weight"  # noqa: E731
    elif spelling == "research":
        key = lambda module, which: f"{module}_lora.{which}.weight"  # noqa: E731
    else:
        raise ValueError(f"spelling must be 'main' or 'research', not {spelling!r}")
    state: dict = {}
    for e in family.text_encoders:
        state[e.table_part] = {tok: torch.randn(family.layer_count, e.width, generator=g) * embedding_std
                               for tok in tokens}
    parts = []
    if text_lora:
        for e in family.text_encoders:
            layers, intermediate = (text_sizes or {}).get(e.name, (text_layers, text_intermediate))
            parts.append((e.lora_part, text_module_shapes(layers, intermediate, whole_block, e.width)))
    if unet_lora:
        parts.append(("unet", unet_module_shapes(model_channels, whole_block, family)))
    for part, shapes in parts:
        factors = {}
        for module, shape in shapes.items():
            up, down = _factor_pair(shape, rank, scale, g)
            factors[key(module, "up")] = up
            factors[key(module, "down")] = down
        state[part] = factors
    return {"params": state} if wrap_params else state


def write_edlora_pth(path: str, **kwargs) -> None:
    """Write :func:`make_edlora_state` as a plain-tensor ``.pth`` (loadable with weights_only=True)."""
    torch.save(make_edlora_state(**kwargs), path)
