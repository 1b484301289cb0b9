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
# At most this many 77-token sequences go through the text encoders at once (memory stays bounded), and a
# concept prompt may have at most MAX_SECTIONS sections (it is encoded once per cross-attention layer; a prompt
# without concept tokens is the stock encoder's, at any length).
_SEQUENCES_PER_PASS = 64
MAX_SECTIONS = 32
MAX_PROMPT_CHARS = 20000  # refused before tokenizing (a 100,000-character prompt costs nothing)


def _placeholder_positions(tokens: dict, placeholder_id: int) -> dict[str, list[tuple[int, int]]]:
    return {key: [(s, j) for s, section in enumerate(sections) for j, pair in enumerate(section)
                  if isinstance(pair[0], numbers.Integral) and int(pair[0]) == placeholder_id]
            for key, sections in tokens.items()}


def tokenize_with_concepts(clip, text: str, concepts: ConceptSet):
    """Tokenize with ComfyUI's own tokenizer (weights, long prompts, ``embedding:``), concept tokens
    replaced by a placeholder word. Returns (tokens, placeholder positions per tokenizer key, vectors):
    the k-th position of every key takes ``vectors[k]`` = (token, vector index)."""
    tables = concepts.tables
    last_error = None
    special: set[int] | None = None  # start, end and padding ids: what an empty prompt is made of
    for word in _PLACEHOLDERS:
        sub = substitute_concepts(text, tables, word)
        if not sub.vectors:
            return clip.tokenize(text), {}, ()
        if special is None:
            special = {int(p[0]) for stream in clip.tokenize("").values() for sec in stream for p in sec}
        probe = clip.tokenize(word)
        ids = [int(p[0]) for sec in next(iter(probe.values())) for p in sec
               if isinstance(p[0], numbers.Integral)]
        content = [i for i in ids if i not in special]
        if len(content) != 1:
            continue
        tokens = clip.tokenize(sub.text)
        positions = _placeholder_positions(tokens, content[0])
        if all(len(p) == len(sub.vectors) for p in positions.values()):
            return tokens, positions, sub.vectors
        last_error = f"placeholder '{word}' also occurs in the prompt"
    raise ConceptError(f"could not place concept tokens in this prompt ({last_error or 'no single-token placeholder'})")


class _Stream:
    """One token stream of the prompt (``l``; SDXL also ``g``) and the distinct sequences its layer copies need.

    Copy ``l`` of section ``s`` has each concept placeholder replaced by row ``l`` of its token's table for this
    stream's text encoder. Two copies of a section are the same sequence when those rows are equal at every
    placeholder of the section: a section without concept tokens is one sequence for every layer, and layers whose
    rows repeat share one. (CLIP's attention is causal, so copies also agree before their first concept token;
    that part is recomputed, since ComfyUI's text encoders take whole 77-token sequences.) With ``every_copy``
    each copy of each section is its own sequence (what fusion's recording hooks expect).
    """

    def __init__(self, sections: list, positions: list, vectors, tables: dict, layer_count: int,
                 every_copy: bool):
        self.sections, self.tables = sections, tables
        per_section: list[list[tuple[int, str, int]]] = [[] for _ in sections]
        for (s, j), (tok, v) in zip(positions, vectors, strict=True):
            per_section[s].append((j, tok, v))
        # the distinct rows of each (token, vector): layer -> the first layer with the same row
        same_row: dict[tuple[str, int], list[int]] = {}
        for tok, v in {(tok, v) for _, tok, v in (p for sec in per_section for p in sec)}:
            _, inverse = torch.unique(tables[tok][:, v], dim=0, return_inverse=True)
            first: dict[int, int] = {}
            same_row[tok, v] = [first.setdefault(int(i), layer) for layer, i in enumerate(inverse)]
        self.sequences: list[tuple[int, int]] = []  # (section, the layer whose rows it holds)
        self.index = [[0] * len(sections) for _ in range(layer_count)]  # [layer][section] -> sequence
        found: dict[tuple, int] = {}
        for layer in range(layer_count):
            for s, placeholders in enumerate(per_section):
                key = (s, layer) if every_copy else (s, *(same_row[tok, v][layer] for _, tok, v in placeholders))
                if key not in found:
                    found[key] = len(self.sequences)
                    self.sequences.append((s, layer))
                self.index[layer][s] = found[key]
        self.placeholders = per_section

    def sequence(self, i: int) -> list:
        """Token list of distinct sequence ``i`` (the last one past the end: streams are padded to one count)."""
        s, layer = self.sequences[min(i, len(self.sequences) - 1)]
        section = list(self.sections[s])
        for j, tok, v in self.placeholders[s]:
            section[j] = (self.tables[tok][layer, v], *section[j][1:])
        return section


def encode_with_concepts(clip, text: str, concepts: ConceptSet, where: str = "", extra: dict | None = None,
                         every_copy: bool = False) -> list:
    """CONDITIONING for ``text``: identical to the stock CLIP Text Encode when no concept token is
    present (one text-encoder pass, any length; ``extra`` is added to each entry's dict as ``add_dict``, e.g.
    SDXL's size conditioning); otherwise one entry per CLIP hook keyframe (as the stock encoder) whose tensor is a
    :class:`LayerwiseContext` with one context per cross-attention layer of the CLIP's family. ``where`` (the node
    and input, e.g. ``"Text Encode with Concepts, input 'text'"``) starts every error's message.

    Every text encoder's stream gets its own rows (``l``: CLIP-L tables; SDXL's ``g``: bigG tables); only the
    distinct sequences are encoded (:class:`_Stream`), all streams together through ComfyUI's own encoder in
    passes of at most ``_SEQUENCES_PER_PASS`` (a stream with fewer distinct sequences repeats its last), and the
    streams' outputs are concatenated per layer as the family's CLIP concatenates them. The pooled output is
    that of copy 0 (ComfyUI's rule: its first section's end token)."""
    try:
        return _encode(clip, text, concepts, dict(extra or {}), every_copy)
    except ConceptError as e:
        if not where:
            raise
        raise ConceptError(f"{where}: {e}") from e


def _too_long(length: str) -> ConceptError:
    return ConceptError(f"this prompt holds concept tokens and is {length} long; a prompt with concept tokens may be "
                        f"at most {MAX_PROMPT_CHARS:,} characters and {MAX_SECTIONS} × 77 tokens (it is encoded once "
                        f"per cross-attention layer, and every region's context is padded to the longest) — shorten "
                        f"it, or encode the part without concept tokens with another node and combine the two")


def _encode(clip, text: str, concepts: ConceptSet, extra: dict, every_copy: bool) -> list:
    if len(text) > MAX_PROMPT_CHARS and find_concept_tokens(text):  # refused before tokenizing
        raise _too_long(f"{len(text):,} characters")
    tokens, positions, vectors = tokenize_with_concepts(clip, text, concepts)
    sections = max(len(v) for v in tokens.values())
    if vectors and sections > MAX_SECTIONS:
        raise _too_long(f"{sections} × 77 tokens")
    if not vectors:
        return [[c, {**d, PROMPT_KEY: text}] for c, d in clip.encode_from_tokens_scheduled(tokens, add_dict=extra)]
    family = clip_family(clip, "Text Encode with Concepts")
    streams = {}
    for key, stream_sections in tokens.items():
        encoder = family.text_encoder_of(tokenizer_key=key)
        if encoder is None:
            raise ConceptError(f"the CLIP's token stream '{key}' belongs to no text encoder of {family.label}")
        tables = concepts.tables_of(encoder.name)
        lacking = next((tok for tok, _ in vectors if tok not in tables or tables[tok].shape[0] != family.layer_count),
                       None)
        if lacking is not None:
            owner = next(c.edlora for c in concepts.concepts if lacking in c.edlora.tokens)
            raise ConceptError(f"{lacking} ({owner.name}) is an {owner.family.label} concept; this CLIP is "
                               f"{family.label}: encode it with the CLIP of the chain that loaded it")
        streams[key] = (_Stream(stream_sections, positions[key], vectors, tables, family.layer_count, every_copy),
                        encoder)
    count = max(len(stream.sequences) for stream, _ in streams.values())
    passes = [clip.encode_from_tokens_scheduled({key: [stream.sequence(i) for i in range(first, min(
        first + _SEQUENCES_PER_PASS, count))] for key, (stream, _) in streams.items()}, add_dict=extra)
        for first in range(0, count, _SEQUENCES_PER_PASS)]
    offsets, width = {}, 0
    for encoder in family.text_encoders:  # the order the family's CLIP concatenates its encoders' outputs in
        offsets[encoder.name] = width
        width += encoder.width
    section_tokens = len(next(iter(tokens.values()))[0])  # 77: every section of every stream
    used = concepts.labels_for(tok for tok, _ in vectors)
    out = []
    for k, (_, info) in enumerate(passes[0]):
        encoded = torch.cat([p[k][0].reshape(-1, section_tokens, p[k][0].shape[-1]) for p in passes])
        per_stream = []  # in the order the family's CLIP concatenates its encoders (not the tokenizer's key order)
        for stream, encoder in sorted(streams.values(), key=lambda se: offsets[se[1].name]):
            part = encoded[..., offsets[encoder.name]:offsets[encoder.name] + encoder.width]
            index = torch.tensor(stream.index, device=part.device)  # [layers, sections]
            per_stream.append(part[index].flatten(1, 2))  # [layers, sections * tokens, width]
        tokens_kept = min(p.shape[1] for p in per_stream)  # as the family's CLIP cuts its streams to one length
        stack = torch.cat([p[:, :tokens_kept] for p in per_stream], dim=-1).unsqueeze(0)
        out.append([LayerwiseContext(stack), {**info, CONCEPTS_USED_KEY: used, PROMPT_KEY: text}])
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
