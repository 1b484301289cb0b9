"""Layer-wise (P+) conditioning inside ComfyUI (docs/design.md §4).

Transport (docs/design.md §4.4-§4.5):
* the encode step returns a CONDITIONING whose tensor is a :class:`LayerwiseContext`: the ordinary
  ``[B, T, 768]`` layer-0 context, carrying the ``[B, 16, T, 768]`` stack of all 16 layers. Stock
  conditioning edits (Average, Concat, Zero Out, ...) and ComfyUI's batching (cond + uncond in one
  UNet call, token padding) act on the stack too (fusion/prompts/layerwise_tensor.py), and stock nodes and
  ControlNets see a valid context;
* a DIFFUSION_MODEL wrapper takes the stack off the UNet's context into ``transformer_options``; one
  attn2 patch picks layer ``l`` by ``extra_options["block"]``.
"""
from __future__ import annotations

import numbers

import comfy.patcher_extension
import torch

from ...fusion.errors import ConceptError
from ...fusion.families import ModelFamily
from ...fusion.prompts.concepts import ConceptSet, find_concept_tokens, substitute_concepts
from ...fusion.prompts.layerwise_tensor import LayerwiseContext, layers_of
from ..names import CONCEPTS_USED_KEY, LAYERWISE_KEY, LAYERWISE_WRAPPER, PROMPT_KEY
from .family import clip_family, model_family

_PLACEHOLDERS = ("sks", "olis", "zxq", "qxv")
# A concept prompt is encoded 16 times: at most this many 77-token sections go through the text
# encoder at once (memory stays bounded), and a concept prompt may have at most MAX_SECTIONS sections
# (a prompt without concept tokens is the stock encoder's, at any length).
_SECTIONS_PER_PASS = 64
MAX_SECTIONS = 32
MAX_PROMPT_CHARS = 20000  # refused before tokenizing (a 100,000-character prompt costs nothing)


def _placeholder_positions(tokens: dict, placeholder_id: int) -> dict[str, list[tuple[int, int]]]:
    return {key: [(s, j) for s, section in enumerate(sections) for j, pair in enumerate(section)
                  if isinstance(pair[0], numbers.Integral) and int(pair[0]) == placeholder_id]
            for key, sections in tokens.items()}


def tokenize_with_concepts(clip, text: str, concepts: ConceptSet):
    """Tokenize with ComfyUI's own tokenizer (weights, long prompts, ``embedding:``), concept tokens
    replaced by a placeholder word. Returns (tokens, placeholder positions per tokenizer key, vectors):
    the k-th position takes ``vectors[k]`` = (token, vector index)."""
    tables = concepts.tables
    last_error = None
    for word in _PLACEHOLDERS:
        sub = substitute_concepts(text, tables, word)
        if not sub.vectors:
            return clip.tokenize(text), {}, ()
        probe = clip.tokenize(word)
        ids = [int(p[0]) for sec in next(iter(probe.values())) for p in sec
               if isinstance(p[0], numbers.Integral)]
        content = [i for i in ids[1:] if i not in (ids[0], ids[-1])]
        if len(content) != 1:
            continue
        tokens = clip.tokenize(sub.text)
        positions = _placeholder_positions(tokens, content[0])
        if all(len(p) == len(sub.vectors) for p in positions.values()):
            return tokens, positions, sub.vectors
        last_error = f"placeholder '{word}' also occurs in the prompt"
    raise ConceptError(f"could not place concept tokens in this prompt ({last_error or 'no single-token placeholder'})")


def _layered_tokens(tokens: dict, positions: dict, vectors, tables, layers) -> dict:
    """The token sections of ``layers`` copies of the prompt, layer-major; in copy ``l`` each concept
    placeholder takes row ``l`` of its token's table."""
    layered = {}
    for key, sections in tokens.items():
        copies = []
        for layer in layers:
            copy = [list(section) for section in sections]
            for (s, j), (tok, v) in zip(positions[key], vectors, strict=True):
                pair = copy[s][j]
                copy[s][j] = (tables[tok][layer, v], *pair[1:])
            copies.extend(copy)
        layered[key] = copies
    return layered


def encode_with_concepts(clip, text: str, concepts: ConceptSet, where: str = "") -> list:
    """CONDITIONING for ``text``: identical to the stock CLIP Text Encode when no concept token is
    present (one text-encoder pass, any length); otherwise one entry per CLIP hook keyframe (as the stock
    encoder) whose tensor is a :class:`LayerwiseContext` with one context per cross-attention layer of the
    CLIP's family, encoded in batches of at most ``_SECTIONS_PER_PASS`` sequences. ``where`` (the node and
    input, e.g. ``"Text Encode with Concepts, input 'text'"``) starts every error's message."""
    try:
        return _encode(clip, text, concepts)
    except ConceptError as e:
        if not where:
            raise
        raise ConceptError(f"{where}: {e}") from e


def _too_long(length: str) -> ConceptError:
    return ConceptError(f"this prompt holds concept tokens and is {length} long; a prompt with concept tokens may be "
                        f"at most {MAX_PROMPT_CHARS:,} characters and {MAX_SECTIONS} × 77 tokens (it is encoded once "
                        f"per cross-attention layer, and every region's context is padded to the longest) — shorten "
                        f"it, or encode the part without concept tokens with another node and combine the two")


def _encode(clip, text: str, concepts: ConceptSet) -> list:
    if len(text) > MAX_PROMPT_CHARS and find_concept_tokens(text):  # refused before tokenizing
        raise _too_long(f"{len(text):,} characters")
    tokens, positions, vectors = tokenize_with_concepts(clip, text, concepts)
    sections = len(next(iter(tokens.values())))
    if vectors and sections > MAX_SECTIONS:
        raise _too_long(f"{sections} × 77 tokens")
    if not vectors:
        return [[c, {**d, PROMPT_KEY: text}] for c, d in clip.encode_from_tokens_scheduled(tokens)]
    layer_count = clip_family(clip, "Text Encode with Concepts").layer_count
    tables = concepts.tables
    per_pass = max(1, _SECTIONS_PER_PASS // sections)
    groups = [range(first, min(first + per_pass, layer_count)) for first in range(0, layer_count, per_pass)]
    # per group of layers: the scheduled entries [[cond [1, copies * tokens, C], dict], ...]
    passes = [clip.encode_from_tokens_scheduled(_layered_tokens(tokens, positions, vectors, tables, layers))
              for layers in groups]
    used = concepts.labels_for(tok for tok, _ in vectors)
    out = []
    for k, (_, extra) in enumerate(passes[0]):
        stack = torch.cat([p[k][0].reshape(len(layers), -1, p[k][0].shape[-1])
                           for p, layers in zip(passes, groups, strict=True)]).unsqueeze(0)
        out.append([LayerwiseContext(stack), {**extra, CONCEPTS_USED_KEY: used, PROMPT_KEY: text}])
    return out


def layerwise_of(entry) -> torch.Tensor | None:
    """The ``[B, L, T, C]`` stack of one CONDITIONING entry (``[tensor, dict]``) or context tensor,
    if it carries one."""
    return layers_of(entry[0] if isinstance(entry, (list, tuple)) else entry)


def _move_to_transformer_options(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: the UNet sees the plain layer-0 context; the attn2 patches find the stack
    in transformer_options."""
    stack = layers_of(context)
    if stack is not None:
        transformer_options = dict(transformer_options)
        transformer_options[LAYERWISE_KEY] = stack.to(context.dtype)
        context = context.plain()
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class LayerwiseAttn2Patch:
    """attn2_patch: give cross-attention layer ``l`` its own context ``stack[:, l]``.

    Order-independent with other attn2 patches that only read the context; unknown blocks and
    batches without layer-wise data pass through untouched. ``family`` names the layers.
    """

    def __init__(self, family: ModelFamily):
        self.family = family

    def layer(self, extra_options: dict) -> int | None:
        """The cross-attention layer an attn2 patch is called for."""
        return self.family.layer_of(extra_options.get("block", ()), extra_options.get("block_index", 0))

    def __call__(self, n, context, value, extra_options):
        stack = extra_options.get(LAYERWISE_KEY)
        layer = self.layer(extra_options)
        if stack is None or layer is None or stack.shape[0] != context.shape[0]:
            return n, context, value
        ctx = stack[:, layer if stack.shape[1] > 1 else 0].to(context.dtype)
        return n, ctx, ctx

    def to(self, device_or_dtype):  # ModelPatcher moves patch objects with the model
        return self


def install_layerwise(model) -> None:
    """Make a (cloned!) ModelPatcher understand layer-wise conditioning; idempotent."""
    options = model.model_options
    patches = options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    if any(isinstance(p, LayerwiseAttn2Patch) for p in patches):
        return
    model.set_model_attn2_patch(LayerwiseAttn2Patch(model_family(model, "layer-wise conditioning")))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, LAYERWISE_WRAPPER,
                               _move_to_transformer_options)
