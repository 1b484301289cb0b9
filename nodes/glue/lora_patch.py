"""Map an ED-LoRA's diffusers-named LoRA factors onto a ComfyUI MODEL / CLIP (docs/design.md §3.1).

UNet modules go through ComfyUI's ``lora_unet_<name with _>`` key map, text-encoder modules through its
diffusers-LoRA map, per encoder (``text_encoder.<name>``, SDXL's ``text_encoder_2.<name>``); both are ComfyUI's
own maps, so the patches are ordinary LoRA patches (``W = W0 + strength · up @ down``, no alpha) that every
sampler understands.
"""
from __future__ import annotations

import math
import os

import comfy.lora
import comfy.lora_convert
import comfy.utils
from comfy import weight_adapter

from ...fusion.errors import EDLoRAError, LoRAFormatError, ModelFamilyError
from ...fusion.families import TextEncoder
from ...fusion.files.edlora import EDLoRA, read_state_dict
from ...fusion.files.filecheck import check_file_tensor, check_lora_change, shown


def unet_lora_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def text_lora_name(module: str, encoder: TextEncoder) -> str:
    """ComfyUI's diffusers-LoRA key of a text-encoder module (``text_encoder.…`` / ``text_encoder_2.…``)."""
    return encoder.comfy_lora_prefix + module


def model_key_map(model) -> dict[str, str]:
    return comfy.lora.model_lora_keys_unet(model.model, {})


def clip_key_map(clip) -> dict[str, str]:
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def _to_load(edlora: EDLoRA, part: str, factors: dict, key_map: dict, root, name_of) -> tuple[dict, dict]:
    lora_sd, to_load = {}, {}
    what = "MODEL" if part == "unet" else "CLIP"
    for module, (up, down) in factors.items():
        lora_key = name_of(module)
        target = key_map.get(lora_key)
        if target is None:
            raise EDLoRAError(f"{edlora.name}: {part} module '{module}' does not exist in this {what} — is it an "
                              f"{edlora.family.label} model?")
        weight = comfy.utils.get_attr(root, target)
        if weight.ndim not in (2, 4):
            raise EDLoRAError(f"{edlora.name}: {part} module '{module}' has a {weight.ndim}-D weight in this "
                              f"{'MODEL' if part == 'unet' else 'CLIP'} (a normalisation layer's); a LoRA's up/down "
                              f"factors apply to linear and convolution weights only")
        if weight.shape[0] != up.shape[0] or weight.shape[1] != down.shape[1]:
            raise EDLoRAError(f"{edlora.name}: {part} module '{module}' is {up.shape[0]}x{down.shape[1]} in the "
                              f"file but {weight.shape[0]}x{weight.shape[1]} in the {what} (another base model?)")
        lora_sd[lora_key + ".lora_up.weight"] = up
        lora_sd[lora_key + ".lora_down.weight"] = down
        to_load[lora_key] = target
    return lora_sd, to_load


def unet_patches(edlora: EDLoRA, model, key_map: dict | None = None) -> dict:
    """ComfyUI patch dict for the ED-LoRA's UNet factors (every module must map)."""
    lora_sd, to_load = _to_load(edlora, "unet", edlora.unet, key_map or model_key_map(model), model.model,
                                unet_lora_name)
    return comfy.lora.load_lora(lora_sd, to_load, log_missing=False) if to_load else {}


def clip_patches(edlora: EDLoRA, clip, key_map: dict | None = None) -> dict:
    """ComfyUI patch dict for the ED-LoRA's text-encoder factors, every encoder of its family (every module
    must map)."""
    key_map = key_map or clip_key_map(clip)
    lora_sd, to_load = {}, {}
    for encoder in edlora.family.text_encoders:
        sd, load = _to_load(edlora, encoder.lora_part, edlora.text.get(encoder.name, {}), key_map,
                            clip.cond_stage_model, lambda module, e=encoder: text_lora_name(module, e))
        lora_sd.update(sd)
        to_load.update(load)
    return comfy.lora.load_lora(lora_sd, to_load, log_missing=False) if to_load else {}


def low_rank_factors(adapter, key: str, source: str) -> tuple:
    """``(up · alpha/rank, down)`` of a ComfyUI LoRA patch value (what ``comfy.lora.load_lora`` makes).

    Conv factors keep their 4-D shapes (``[out, r, 1, 1]`` @ ``[r, in, kh, kw]``, LoCon). Anything else —
    LoHa, LoKr, OFT, DoRA, full diffs, set weights, Tucker mid weights, reshapes — raises
    :class:`LoRAFormatError` naming ``source`` (a file or a region), the key and the patch type."""
    kind = getattr(adapter, "name", None) or (adapter[0] if isinstance(adapter, tuple) and adapter else None) \
        or type(adapter).__name__
    if not isinstance(adapter, weight_adapter.LoRAAdapter):
        raise LoRAFormatError(f"{source}: {key} is a '{kind}' patch; only plain low-rank LoRA (up/down) patches "
                              f"can be applied per region or fused (LoHa, LoKr, DoRA and full diffs cannot)")
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if dora_scale is not None:
        raise LoRAFormatError(f"{source}: {key} is a DoRA patch (it has a dora_scale); only plain low-rank LoRA "
                              f"patches can be applied per region or fused")
    if mid is not None or reshape is not None:
        what = "a Tucker mid weight" if mid is not None else "a reshape"
        raise LoRAFormatError(f"{source}: {key} is a LoRA with {what}, which cannot be applied per region or fused")
    scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
    return up.float() * scale, down.float()


def patch_factors(patches: dict, source: str) -> dict:
    """Weight key -> :func:`low_rank_factors` for every patch of a ComfyUI patch dict."""
    return {key: low_rank_factors(value, key, source) for key, value in patches.items()}


def load_plain_lora(path: str, model, clip) -> tuple[dict, dict, list[str]]:
    """A LoRA file in any format ComfyUI's own loader reads (kohya, diffusers, ComfyUI keys), through
    ComfyUI's key maps: returns (MODEL patches, CLIP patches, the file's keys that were not used)."""
    name = os.path.basename(path)
    state, _meta = read_state_dict(path)
    state = {k: check_file_tensor(name, k, v, float32=False) for k, v in state.items()}
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    state = comfy.lora_convert.convert_lora(state)
    patches = comfy.lora.load_lora(state, key_map, log_missing=False)
    shapes = {k: v.shape for root in (model.model, clip.cond_stage_model) for k, v in root.state_dict().items()}
    for key, value in patches.items():
        if not isinstance(value, weight_adapter.LoRAAdapter):
            continue
        if len(shapes.get(key, (0, 0))) not in (2, 4):  # ComfyUI would log an error at sampling and skip it
            pair = ", ".join(k for k in (getattr(value, "loaded_keys", ()) or ()) if not k.endswith(".alpha"))
            raise EDLoRAError(f"{name}: {shown(key)} is a {len(shapes[key])}-D weight (a normalisation layer's), "
                              f"patched by {shown(pair, 200)}; a LoRA's up/down factors apply to linear and "
                              f"convolution weights only")
        up, down, alpha, mid = value.weights[:4]
        if mid is None:  # the bound on weight changes, where a change is one up/down pair
            check_lora_change(name, key, up, down, 1.0 if alpha is None else float(alpha) / down.shape[0])
    used = set()
    for value in patches.values():
        used |= set(getattr(value, "loaded_keys", ()) or ())
    used |= {f"{lora_key}.alpha" for lora_key in key_map}
    unused = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in _KNOWN_EXTRAS))
    model_keys = set(model.model.state_dict())
    unet = {k: v for k, v in patches.items() if k in model_keys}
    text = {k: v for k, v in patches.items() if k not in model_keys}
    if not unet and not text:
        raise EDLoRAError(f"{name}: no key of this file patches this MODEL or CLIP — is it a LoRA for another base "
                          f"model (SD1.x, SDXL, Flux, ...)?")
    for patches_of, root in ((unet, model.model), (text, clip.cond_stage_model)):
        for key, adapter in patches_of.items():
            _check_fits(name, key, adapter, comfy.utils.get_attr(root, key).shape)
    return unet, text, unused


def _check_fits(name: str, key: str, adapter, shape) -> None:
    """A LoRA whose factors do not multiply to the weight's shape was made for another base model (ComfyUI would
    skip that weight with a log line and apply the rest)."""
    if not isinstance(adapter, weight_adapter.LoRAAdapter):
        return  # other adapters are refused where factors are needed (low_rank_factors)
    up, down = adapter.weights[0], adapter.weights[1]
    if up.shape[0] != shape[0] or math.prod(down.shape[1:]) != math.prod(shape[1:]):
        raise ModelFamilyError(f"{name}: its LoRA on {key} is {up.shape[0]}x{math.prod(down.shape[1:])} but the "
                               f"weight is {'x'.join(str(d) for d in shape)} — a LoRA for another base model")


_KNOWN_EXTRAS = ("bundle_emb.",)  # kohya pivotal-tuning embeddings ride in the file; not patches
