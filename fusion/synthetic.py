"""Seeded synthetic ED-LoRAs with SD1.x's exact module names (tests, benchmarks and the demo).

Shapes follow the model they are made for: ``model_channels=320`` and ``text_layers=12`` /
``text_intermediate=3072`` for full-size SD1.5; smaller values for the tiny test models.
"""
from __future__ import annotations

import torch

from .layers import CONTEXT_DIM, NUM_LAYERS

_DOWN_MULT = (1, 2, 4)        # down_blocks.0..2 (two attentions each)
_UP_MULT = {1: 4, 2: 2, 3: 1}  # up_blocks.1..3 (three attentions each)


def unet_transformer_prefixes(model_channels: int) -> list[tuple[str, int]]:
    """(diffusers prefix of each SpatialTransformer, its channel count), in layer order."""
    out = [(f"down_blocks.{b}.attentions.{a}", model_channels * _DOWN_MULT[b]) for b in range(3) for a in range(2)]
    out.append(("mid_block.attentions.0", model_channels * 4))
    out += [(f"up_blocks.{b}.attentions.{a}", model_channels * _UP_MULT[b]) for b in (1, 2, 3) for a in range(3)]
    return out


def unet_module_shapes(model_channels: int = 320, whole_block: bool = True) -> dict[str, tuple[int, ...]]:
    """diffusers module name -> weight shape for the LoRA'd UNet modules."""
    shapes = {}
    for prefix, c in unet_transformer_prefixes(model_channels):
        tb = f"{prefix}.transformer_blocks.0"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                in_dim = CONTEXT_DIM if attn == "attn2" and proj in ("to_k", "to_v") else c
                shapes[f"{tb}.{attn}.{proj}"] = (c, in_dim)
        if whole_block:
            shapes[f"{tb}.ff.net.0.proj"] = (8 * c, c)
            shapes[f"{tb}.ff.net.2"] = (c, 4 * c)
            shapes[f"{prefix}.proj_in"] = (c, c, 1, 1)
            shapes[f"{prefix}.proj_out"] = (c, c, 1, 1)
    return shapes


def text_module_shapes(text_layers: int = 12, text_intermediate: int = 3072,
                       whole_layer: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(text_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"text_model.encoder.layers.{i}.self_attn.{proj}"] = (CONTEXT_DIM, CONTEXT_DIM)
        if whole_layer:
            shapes[f"text_model.encoder.layers.{i}.mlp.fc1"] = (text_intermediate, CONTEXT_DIM)
            shapes[f"text_model.encoder.layers.{i}.mlp.fc2"] = (CONTEXT_DIM, text_intermediate)
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
                      embedding_std: float = 0.02) -> dict:
    """A Mix-of-Show-layout state dict (nested parts, optional ``params`` wrapper).

    ``spelling``: ``"main"`` (``.lora_down.weight``) or ``"research"`` (``_lora.down.weight``).
    """
    g = torch.Generator().manual_seed(seed)
    if spelling == "main":
        key = lambda module, which: f"{module}.lora_{which}.weight"  # noqa: E731
    elif spelling == "research":
        key = lambda module, which: f"{module}_lora.{which}.weight"  # noqa: E731
    else:
        raise ValueError(f"spelling must be 'main' or 'research', not {spelling!r}")
    embeddings = {tok: torch.randn(NUM_LAYERS, CONTEXT_DIM, generator=g) * embedding_std for tok in tokens}
    state: dict = {"new_concept_embedding": embeddings}
    parts = []
    if text_lora:
        parts.append(("text_encoder", text_module_shapes(text_layers, text_intermediate, whole_block)))
    if unet_lora:
        parts.append(("unet", unet_module_shapes(model_channels, whole_block)))
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
