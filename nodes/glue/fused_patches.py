"""Fused results as ComfyUI LoRA patches, and fused bundles (fusion/bundle.py) to and from MODEL/CLIP.

A fused weight is the base weight plus an ordinary LoRA patch, ``W0 + up @ down`` at strength 1
(:class:`FusedLoRA`, a ``comfy.weight_adapter.LoRAAdapter``): no weight is replaced or copied, so every
sampler, low-VRAM offloading and the stock Checkpoint Save see a normal LoRA'd model. The patch carries
the fusion's description (``.fusion``) so that Save Fused Bundle finds it after any cloning.
"""
from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import comfy.lora
import comfy.utils
import torch
from comfy import weight_adapter

from ...fusion.errors import BundleError
from ...fusion.families import ModelFamily
from ...fusion.files.bundle import FusedBundle, load_bundle
from ...fusion.log import log
from ...fusion.merge.cache import digest, tensor_digests
from ...fusion.prompts.concepts import Concept, ConceptSet
from ..names import CONCEPTS_USED_KEY
from .family import check_base, model_family
from .layerwise import install_layerwise

Delta = tuple[torch.Tensor, torch.Tensor]  # (up, down) of one fused weight


class FusedLoRA(weight_adapter.LoRAAdapter):
    """A fused change ``up @ down`` (scale 1) as a LoRA patch; ``fusion`` describes where it came from
    (base digest, concepts, settings)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, fusion: dict):
        super().__init__(set(), (up, down, None, None, None, None))
        self.fusion = fusion


def shaped(up: torch.Tensor, down: torch.Tensor, weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors in the weight's layout: 2-D for linears, ``[out, R, 1, 1]`` / ``[R, in, 1, 1]`` for
    1×1 convs (kohya's layout, so that files load anywhere)."""
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if len(weight_shape) == 4:
        return up[:, :, None, None], down.reshape(down.shape[0], *weight_shape[1:])
    return up, down


def strip_patches(patcher, keys) -> list[str]:
    """Remove a clone's patches on ``keys`` (its own lists: the original keeps its patches)."""
    dropped = [k for k in keys if patcher.patches.pop(k, None)]
    patcher.patches_uuid = uuid.uuid4()
    return dropped


def add_fused(patcher, deltas: Mapping[str, Delta], fusion: dict) -> None:
    """Add ``deltas`` (key -> (up, down)) to a clone as :class:`FusedLoRA` patches at strength 1."""
    patches = {}
    for key, (up, down) in deltas.items():
        weight = comfy.utils.get_attr(patcher.model, key)
        patches[key] = FusedLoRA(*shaped(up, down, weight.shape), fusion)
    applied = patcher.add_patches(patches, 1.0)
    if len(applied) != len(patches):
        raise BundleError(f"could not patch {len(patches) - len(applied)} fused weights (unknown keys)")


def fused_of(patcher) -> tuple[dict[str, Delta], dict]:
    """(key -> (up, down), fusion description) of the :class:`FusedLoRA` patches a patcher carries (the
    patch strength folded into ``up``); other patches on those keys are reported, not saved."""
    out, info, extra = {}, {}, []
    for key, plist in patcher.patches.items():
        fused = [p for p in plist if isinstance(p[1], FusedLoRA)]
        if not fused:
            continue
        strength, value = fused[0][0], fused[0][1]
        up, down = value.weights[0], value.weights[1]
        out[key] = (up * strength if strength != 1.0 else up, down)
        info = value.fusion
        if len(plist) > 1:
            extra.append(key)
    if extra:
        log.warning("Mix-of-Show: %d fused weights carry further patches (other LoRAs applied after fusion); "
                    "only the fused part is saved (e.g. %s)", len(extra), extra[0])
    return out, info


def lora_names(model, clip, family: ModelFamily) -> tuple[dict[str, str], dict[str, str]]:
    """Weight key -> LoRA module name in kohya's layout for ``family`` (SD1.x: ``lora_unet_<diffusers name>``,
    ``lora_te_…``; SDXL: ``lora_unet_<ldm name>``, ``lora_te1_…``, ``lora_te2_…``), from ComfyUI's own key maps (so
    that the stock loader maps them back); keys without a kohya name get the generic names ComfyUI also reads
    (``diffusion_model.…``, ``text_encoders.…``)."""
    def invert(key_map: dict, prefer, fallback) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, key in key_map.items():
            if not isinstance(key, str) or not key.endswith(".weight"):
                continue
            best = out.get(key)
            if best is None or (prefer(name, key) and not prefer(best, key)):
                out[key] = name
        kohya = ("lora_unet_", *(e.kohya_prefix for e in family.text_encoders))
        for key in list(out):
            if not out[key].startswith(kohya):
                out[key] = fallback(key)
        return out

    def unet_prefer(name: str, key: str) -> bool:  # the family's kohya naming: ldm- or diffusers-named
        ldm_named = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        return name.startswith("lora_unet_") and (name == ldm_named) == family.kohya_unet_ldm_names

    def text_prefer(name: str, key: str) -> bool:  # the kohya prefix of the key's own text encoder
        return any(key.startswith(e.name + ".") and name.startswith(e.kohya_prefix) for e in family.text_encoders)

    unet = invert(comfy.lora.model_lora_keys_unet(model.model, {}), unet_prefer, lambda k: k[:-len(".weight")])
    text = invert(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), text_prefer,
                  lambda k: "text_encoders." + k[:-len(".weight")])
    return unet, text


def bundle_of(model_deltas: Mapping[str, Delta], clip_deltas: Mapping[str, Delta], model, clip, fusion: dict,
              concepts: ConceptSet) -> FusedBundle:
    """A version-2 bundle of fused deltas (with the concepts' tables for every text encoder) for
    ``model``/``clip``'s family and layout."""
    family = model_family(model, "Save Fused ED-LoRA Bundle")
    unet_names, text_names = lora_names(model, clip, family)
    lora = {}
    for deltas, names, root in ((model_deltas, unet_names, model.model),
                                (clip_deltas, text_names, clip.cond_stage_model)):
        for key, (up, down) in deltas.items():
            lora[names[key]] = shaped(up, down, comfy.utils.get_attr(root, key).shape)
    tokens = [t for c in fusion["concepts"] for t in c["tokens"]]
    tables = {e.name: concepts.tables_of(e.name) for e in family.text_encoders}
    missing = [t for t in tokens if any(t not in per_token for per_token in tables.values())]
    if missing:
        raise BundleError(f"the concept set has no tables for {missing}: connect the concepts output of "
                          f"Gradient Fusion")
    return FusedBundle(lora=lora, concepts=fusion["concepts"],
                       tables={e: {t: per_token[t] for t in tokens} for e, per_token in tables.items()},
                       base=fusion.get("base", ""), settings=fusion.get("settings", {}), family=family)


def original_weight(entry) -> torch.Tensor:
    """The unpatched weight of a ``get_key_patches()`` entry (ComfyUI's backup, never module.weight)."""
    w, convert = entry[0]
    return convert(w, inplace=False) if convert is not None else w


def base_of(model_digests: Mapping[str, str], clip_digests: Mapping[str, str]) -> str:
    """The bundle's ``base``: one digest of the fused weights' original-weight digests."""
    return digest(sorted(model_digests.items()), sorted(clip_digests.items()))


def base_digest(model, clip, model_keys, clip_keys) -> str:
    """:func:`base_of` the original weights the fused deltas were solved against (every byte of them)."""
    mk, ck = model.get_key_patches(), clip.patcher.get_key_patches()
    return base_of(tensor_digests({k: original_weight(mk[k]) for k in model_keys}),
                   tensor_digests({k: original_weight(ck[k]) for k in clip_keys}))


def deltas_of_bundle(b: FusedBundle, model, clip, source: str) -> tuple[dict[str, Delta], dict[str, Delta]]:
    """(MODEL key -> (up, down), CLIP key -> (up, down)) of a version-2 bundle, through the same key maps
    as the stock Load LoRA; every module must exist here with the bundle's shapes."""
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    model_deltas: dict[str, Delta]
    clip_deltas: dict[str, Delta]
    model_deltas, clip_deltas = {}, {}
    parts = ((unet_map, model.model, model_deltas, "MODEL"), (clip_map, clip.cond_stage_model, clip_deltas, "CLIP"))
    for name, (up, down) in b.lora.items():
        found = next(((key_map[name], root, out, part) for key_map, root, out, part in parts
                      if isinstance(key_map.get(name), str)), None)
        if found is None:
            raise BundleError(f"{source}: LoRA module '{name}' is not in this MODEL or CLIP -- the bundle is for "
                              f"another base model")
        key, root, out, part = found
        shape = tuple(comfy.utils.get_attr(root, key).shape)
        if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]):
            raise BundleError(f"{source}: {part} weight {key} is {shape} here but {tuple(up.shape)} @ "
                              f"{tuple(down.shape)} in the bundle -- the bundle is for another base model")
        out[key] = (up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
    return model_deltas, clip_deltas


def fused_concepts(entries) -> ConceptSet:
    """The fused concept set: tokens, tables and trigger words, no LoRA (it is merged: strengths 0)."""
    out = ConceptSet()
    for edlora, words in entries:
        out = out.add(Concept(edlora, 0.0, 0.0, trigger_words=words))
    return out


def fused_clones(model, clip, model_deltas, clip_deltas, fusion: dict, concepts: ConceptSet, strip: bool):
    """Clones of MODEL/CLIP with the fused deltas as :class:`FusedLoRA` patches (``strip``: first drop the
    clones' patches on those keys -- fusion starts from the original weights) and the layer-wise patch."""
    m, c = model.clone(), clip.clone()
    if strip:
        strip_patches(m, model_deltas)
        strip_patches(c.patcher, clip_deltas)
    add_fused(m, model_deltas, fusion)
    add_fused(c.patcher, clip_deltas, fusion)
    install_layerwise(m)
    m.model_options = {**m.model_options, CONCEPTS_USED_KEY: concepts.labels}  # regions encoded with these are accepted
    return m, c


def apply_bundle(model, clip, path: str):
    """Load ED-LoRA for a fused bundle: clones of MODEL/CLIP with its fused weights (version 2: LoRA patches;
    version 1 from 0.1.0: "set" patches of the full weights), and its concepts (embeddings only)."""
    name = os.path.basename(path)
    b = load_bundle(path)
    check_base(name, b.family, model, clip)  # names both families before any key is looked up
    concepts = fused_concepts(b.edloras())
    fusion = {"base": b.base, "settings": b.settings, "concepts": b.concepts}
    if b.version == "1":
        return _apply_full_weights(model, clip, b, name, concepts)
    model_deltas, clip_deltas = deltas_of_bundle(b, model, clip, name)
    if b.base and base_digest(model, clip, model_deltas, clip_deltas) != b.base:
        log.warning("Mix-of-Show: %s was fused on other base weights than this MODEL/CLIP's; its fused "
                    "layers are applied as LoRA deltas anyway", name)
    m, c = fused_clones(model, clip, model_deltas, clip_deltas, fusion, concepts, strip=False)
    return m, c, concepts


def _apply_full_weights(model, clip, b: FusedBundle, name: str, concepts: ConceptSet):
    """A 0.1.0 bundle: its fused weights replace the base weights ("set" patches)."""
    parts: dict[str, tuple[Any, dict[str, tuple[str, tuple[torch.Tensor]]]]] = {  # part: (patcher, "set" patches)
        "model": (model, {}), "clip": (clip.patcher, {})}
    for key, w in b.weights.items():
        part, _, rest = key.partition(".")
        patcher, out = parts[part]
        try:
            here = comfy.utils.get_attr(patcher.model, rest)
        except AttributeError:
            raise BundleError(f"{name}: {part.upper()} has no weight {rest} -- the bundle is for another base "
                              f"model") from None
        if tuple(here.shape) != tuple(w.shape):
            raise BundleError(f"{name}: {part.upper()} weight {rest} is {tuple(here.shape)} here but "
                              f"{tuple(w.shape)} in the bundle -- the bundle is for another base model")
        out[rest] = ("set", (w,))
    m, c = model.clone(), clip.clone()
    for patcher, out in ((m, parts["model"][1]), (c.patcher, parts["clip"][1])):
        strip_patches(patcher, out)
        patcher.add_patches(out, 1.0)
    install_layerwise(m)
    m.model_options = {**m.model_options, CONCEPTS_USED_KEY: concepts.labels}
    return m, c, concepts
