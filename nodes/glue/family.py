"""Which model family (fusion.families) a ComfyUI MODEL or CLIP is, and the refusal of a file made for
another family. Recognition reads only configuration and module names (no weights are touched)."""
from __future__ import annotations

import weakref
from typing import Any

from ...fusion.errors import ModelFamilyError
from ...fusion.families import FAMILIES, ModelFamily

_UNETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # BaseModel -> (context_dim, attn2 count)


def unet_shape(model: Any) -> tuple[Any, int]:
    """``(context_dim, cross-attention layers)`` of a MODEL's UNet (a ModelPatcher), counted once per model."""
    base = model.model
    if base not in _UNETS:
        config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
        count = sum(1 for name, _ in base.diffusion_model.named_modules() if name.endswith(".attn2"))
        _UNETS[base] = (config.get("context_dim"), count)
    return _UNETS[base]


def clip_encoders(clip: Any) -> dict[str, int]:
    """``{encoder name: width}`` of a CLIP's text encoders (``{"clip_l": 768}``)."""
    out = {}
    for name, module in clip.cond_stage_model.named_children():
        transformer = getattr(module, "transformer", None)
        if name.startswith("clip_") and transformer is not None and hasattr(transformer, "get_input_embeddings"):
            out[name] = int(transformer.get_input_embeddings().weight.shape[-1])
    return out


def family_of_model(model: Any) -> ModelFamily | None:
    context_dim, layers = unet_shape(model)
    return next((f for f in FAMILIES if f.describes_unet(context_dim, layers)), None)


def family_of_clip(clip: Any) -> ModelFamily | None:
    encoders = clip_encoders(clip)
    return next((f for f in FAMILIES if f.describes_clip(encoders)), None)


def describe_model(model: Any) -> str:
    family = family_of_model(model)
    if family is not None:
        return family.describe_unet()
    context_dim, layers = unet_shape(model)
    return f"of no family this pack knows ({layers} cross-attention layers, context {context_dim})"


def describe_clip(clip: Any) -> str:
    family = family_of_clip(clip)
    encoders = ", ".join(f"{k} {v} wide" for k, v in clip_encoders(clip).items()) or "no CLIP text encoder"
    return f"{family.label}-type ({encoders})" if family is not None else f"of no family this pack knows ({encoders})"


def check_base(name: str, family: ModelFamily, model: Any, clip: Any) -> None:
    """Refuse a file made for ``family`` on a MODEL/CLIP of another family (before any patching)."""
    made_for = (f"made for {family.label} ({family.layer_count} cross-attention layers, "
                f"{family.context_dim}-wide context)")
    if model is not None and family_of_model(model) is not family:
        raise ModelFamilyError(f"{name}: {made_for}; the connected MODEL is {describe_model(model)}. Load it with "
                               f"an {family.label} checkpoint.")
    if clip is not None and family_of_clip(clip) is not family:
        raise ModelFamilyError(f"{name}: {made_for}; the connected CLIP is {describe_clip(clip)}. Load it with "
                               f"an {family.label} checkpoint's CLIP.")


def model_family(model: Any, what: str) -> ModelFamily:
    """The family of a MODEL the pack must understand; ``what`` names the node or input in the error."""
    family = family_of_model(model)
    if family is None:
        raise ModelFamilyError(f"{what}: the MODEL is {describe_model(model)}; the pack works with "
                               f"{', '.join(f.label for f in FAMILIES)} models")
    return family


def clip_family(clip: Any, what: str) -> ModelFamily:
    """The family of a CLIP the pack must understand; ``what`` names the node or input in the error."""
    family = family_of_clip(clip)
    if family is None:
        raise ModelFamilyError(f"{what}: the CLIP is {describe_clip(clip)}; the pack works with "
                               f"{', '.join(f.label for f in FAMILIES)} CLIPs")
    return family
