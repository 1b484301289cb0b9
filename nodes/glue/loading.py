"""Loading a concept onto clones of MODEL and CLIP: an ED-LoRA (or fused bundle) file, or a plain LoRA used
as a concept (its trigger words name it). Everything is checked before anything is patched; the inputs are
never modified."""
from __future__ import annotations

import os

from ...fusion.errors import ConceptError, ModelFamilyError
from ...fusion.files.bundle import is_bundle
from ...fusion.files.edlora import EDLoRA, file_digest, load_edlora
from ...fusion.log import log
from ...fusion.prompts.concepts import Concept, ConceptSet, normalise_trigger_words
from ..names import CONCEPTS_USED_KEY
from .family import check_base, describe_model, model_family
from .fused_patches import apply_bundle
from .layerwise import install_layerwise
from .lora_patch import clip_patches, load_plain_lora, patch_factors, unet_patches


def apply_edlora(model, clip, concepts: ConceptSet | None, path: str, text_encoder_strength: float,
                 unet_strength: float):
    """Clone MODEL and CLIP, patch them with one ED-LoRA, and add its concepts to the set.

    Everything is validated before anything is patched, and the inputs are never modified. A fused
    bundle (from Save Fused ED-LoRA Bundle) loads too: its fused LoRA patches the clones and its concepts
    join the set (the strengths do not apply: the bundle is already merged).
    """
    if is_bundle(path):
        model_out, clip_out, fused = apply_bundle(model, clip, path)
        for concept in fused.concepts:
            concepts = (concepts or ConceptSet()).add(concept)
        assert concepts is not None  # load_bundle refuses a bundle without concepts
        model_out.model_options = {**model_out.model_options, CONCEPTS_USED_KEY: concepts.labels}
        return model_out, clip_out, concepts
    try:
        edlora = load_edlora(path)
    except ModelFamilyError as e:  # a file for no family, or for two: say what the model is, too
        raise ModelFamilyError(f"{e}; the connected MODEL is {describe_model(model)}") from None
    check_base(edlora.name, edlora.family, model, clip)
    unet = unet_patches(edlora, model)
    text = clip_patches(edlora, clip)
    concepts = (concepts or ConceptSet()).add(Concept(edlora, text_encoder_strength, unet_strength,
                                                      unet_factors=patch_factors(unet, edlora.name),
                                                      text_factors=patch_factors(text, edlora.name)))
    model_out = model.clone()
    clip_out = clip.clone()
    if unet and unet_strength != 0:
        model_out.add_patches(unet, unet_strength)
    if text and text_encoder_strength != 0:
        clip_out.add_patches(text, text_encoder_strength)
    install_layerwise(model_out)
    model_out.model_options[CONCEPTS_USED_KEY] = concepts.labels
    log.info("Mix-of-Show: loaded %s (%s, %s) with %d UNet and %d text-encoder LoRA modules", edlora.name,
             edlora.family.label, " ".join(edlora.tokens), len(unet), len(text))
    return model_out, clip_out, concepts


def apply_lora_concept(model, clip, concepts: ConceptSet | None, path: str, trigger_words: str,
                       strength_model: float, strength_clip: float):
    """Clone MODEL and CLIP, patch them with a plain LoRA file (any format ComfyUI reads) and add it to
    the concept set as a concept named by ``trigger_words`` (for regions and Gradient Fusion)."""
    name = os.path.basename(path)
    words = normalise_trigger_words(trigger_words)
    if not words:
        raise ConceptError(f"{name}: a LoRA used as a concept needs its trigger words (e.g. 'ohwx woman'): they "
                           f"name the character in prompts and in fusion's recordings")
    edlora = EDLoRA(name=name, digest=file_digest(path), family=model_family(model, f"{name} (LoRA as Concept)"))
    check_base(edlora.name, edlora.family, model, clip)
    try:
        unet, text, unused = load_plain_lora(path, model, clip)
    except ModelFamilyError as e:
        raise ModelFamilyError(f"{e}; the connected MODEL is {describe_model(model)}") from None
    if unused:
        log.warning("Mix-of-Show: %s: %d key(s) of the file were not applied (e.g. %s)", name, len(unused),
                    ", ".join(k[:80] for k in unused[:4]))
    concept = Concept(edlora, strength_clip, strength_model, trigger_words=words,
                      unet_factors=patch_factors(unet, name), text_factors=patch_factors(text, name))
    concepts = (concepts or ConceptSet()).add(concept)
    model_out, clip_out = model.clone(), clip.clone()
    if unet and strength_model != 0:
        model_out.add_patches(unet, strength_model)
    if text and strength_clip != 0:
        clip_out.add_patches(text, strength_clip)
    install_layerwise(model_out)
    model_out.model_options[CONCEPTS_USED_KEY] = concepts.labels
    return model_out, clip_out, concepts
