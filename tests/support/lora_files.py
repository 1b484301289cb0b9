"""Plain LoRA files for tests, written the way trainers write them: kohya keys
(``lora_unet_<diffusers module>`` / ``lora_te_…``, ``.lora_down/.lora_up.weight`` + ``.alpha``),
diffusers/PEFT keys (``unet.<module with .processor.to_*>.lora_A/B.weight``, ``text_encoder.…``) and
kohya LoHa (``hada_w1_a`` …). The same seed gives the same low-rank deltas in every format."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save_file
from synthetic import text_module_shapes, unet_module_shapes

from fusion.families import SD15, ModelFamily

# LoCon layers of the tiny "narrow" UNet's ResNet blocks (diffusers names -> weight shape): 3x3 convs,
# a strided downsampler conv and time-embedding projections (the embedding is 4 x 32 = 128 wide).
TINY_LOCON = {"down_blocks.0.resnets.0.conv1": (32, 32, 3, 3), "up_blocks.3.resnets.1.conv2": (32, 32, 3, 3),
              "down_blocks.0.downsamplers.0.conv": (32, 32, 3, 3),
              "down_blocks.1.resnets.0.time_emb_proj": (64, 128), "up_blocks.3.resnets.0.time_emb_proj": (32, 128)}


def lora_factors(seed: int, *, model_channels: int = 32, text_layers: int = 2, text_intermediate: int = 512,
                 rank: int = 4, scale: float = 0.5, unet: bool = True, text: bool = True, convs: dict | None = None,
                 attention_only: bool = False, family: ModelFamily = SD15,
                 text_sizes: Mapping[str, tuple[int, int]] | None = None
                 ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """diffusers module name (``text_2:<name>`` for the second encoder's) -> (part, up, down); convs get 4-D
    factors ([out, r, 1, 1], [r, in, kh, kw]). Parts: ``unet``, ``text`` (the family's first text encoder),
    ``text_2`` (SDXL's second); ``text_sizes``: encoder name -> (layers, MLP width), as in make_edlora_state."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    if unet:
        shapes.update({m: ("unet", s) for m, s in unet_module_shapes(model_channels, not attention_only,
                                                                     family).items()})
        shapes.update({m: ("unet", s) for m, s in (convs or {}).items()})  # e.g. TINY_LOCON
    if text:
        for i, encoder in enumerate(family.text_encoders):
            part = "text" if i == 0 else f"text_{i + 1}"
            layers, intermediate = (text_sizes or {}).get(encoder.name, (text_layers, text_intermediate))
            shapes.update({(part, m): (part, s) for m, s in text_module_shapes(
                layers, intermediate, not attention_only, encoder.width).items()})
    out = {}
    for name, (part, shape) in shapes.items():
        module = name[1] if isinstance(name, tuple) else name
        up = torch.randn(shape[0], rank, generator=g) * (scale / rank ** 0.5)
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        down = torch.randn(rank, *shape[1:], generator=g) / fan_in ** 0.5 if len(shape) == 4 \
            else torch.randn(rank, shape[1], generator=g) / fan_in ** 0.5
        if len(shape) == 4:
            up = up[:, :, None, None]
            if shape[2] == 1:
                down = down.reshape(rank, shape[1], 1, 1)
        out[module if part in ("unet", "text") else f"{part}:{module}"] = (part, up, down)
    return out


def write_kohya_lora(path, factors: dict, alpha: float | None = None) -> None:
    """kohya keys; ``alpha`` (default: the rank, i.e. scale 1) is stored per module."""
    sd = {}
    two_encoders = any(part == "text_2" for part, _, _ in factors.values())
    prefix = {"unet": "lora_unet_", "text": "lora_te1_" if two_encoders else "lora_te_", "text_2": "lora_te2_"}
    for key, (part, up, down) in factors.items():
        name = prefix[part] + key.rpartition(":")[2].replace(".", "_")
        sd[f"{name}.lora_up.weight"] = up.contiguous()
        sd[f"{name}.lora_down.weight"] = down.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(sd, str(path))


def write_diffusers_lora(path, factors: dict) -> None:
    """diffusers/PEFT keys (no alpha: scale 1, as kohya with alpha = rank)."""
    sd = {}
    for key, (part, up, down) in factors.items():
        module = key.rpartition(":")[2]
        if part == "unet":
            name = "unet." + module.replace(".to_", ".processor.to_")
            name = name[:-2] if name.endswith(".to_out.0") else name
        else:
            name = ("text_encoder." if part == "text" else "text_encoder_2.") + module
        sd[f"{name}.lora_B.weight"] = up.contiguous()
        sd[f"{name}.lora_A.weight"] = down.contiguous()
    save_file(sd, str(path))


def write_loha(path, factors: dict) -> None:
    """A kohya LoHa file on the same modules (Hadamard product of two low-rank pairs)."""
    sd = {}
    for module, (part, up, down) in factors.items():
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")  # SD1.x files
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        sd[f"{name}.hada_w1_a"], sd[f"{name}.hada_w1_b"] = up2.contiguous(), down2.contiguous()
        sd[f"{name}.hada_w2_a"], sd[f"{name}.hada_w2_b"] = up2.flip(0).contiguous(), down2.flip(0).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(sd, str(path))
