"""Layer-wise (P+) conditioning inside ComfyUI (design §2).

Transport (see ../shared/reference/comfyui-internals.md §2-§3):
* the encode step stores the 16 contexts as ``model_conds[LAYERWISE_KEY]`` (a :class:`LayerwiseCond`
  ``[B, 16, T, 768]``) next to a normal ``[B, T, 768]`` cross_attn (layer 0), so stock nodes and
  ControlNets still see a valid context;
* a CALC_COND_BATCH wrapper gives conds without layer-wise data (e.g. a stock negative prompt) a
  1-layer stack, so positive and negative still run in one batched UNet call;
* ComfyUI passes the stacked tensor to the UNet as a keyword; a DIFFUSION_MODEL wrapper moves it into
  ``transformer_options``; one attn2 patch picks layer ``l`` by ``extra_options["block"]``.
"""
from __future__ import annotations

import math
import numbers

import torch

import comfy.conds
import comfy.patcher_extension

from ..fusion.concepts import ConceptError, ConceptSet, substitute_concepts
from ..fusion.layers import LAYER_OF_BLOCK, NUM_LAYERS

LAYERWISE_KEY = "mixofshow_layerwise"
# Provenance: on a conditioning, the ED-LoRAs whose tokens it uses; on a MODEL's model_options, the
# ED-LoRAs it was loaded with. The regional sampler compares the two.
CONCEPTS_USED_KEY = "mixofshow_concepts"
PROMPT_KEY = "mixofshow_prompt"  # the prompt text (labels in region previews)
WRAPPER_KEY = "mixofshow.layerwise"
_PLACEHOLDERS = ("sks", "olis", "zxq", "qxv")
_MAX_TOKEN_REPEAT = 4  # same padding limit as ComfyUI's CONDCrossAttn


class LayerwiseCond(comfy.conds.CONDRegular):
    """``[B, L, T, C]`` contexts with L = 16 (one per layer) or 1 (same context everywhere).

    Concatenates like CONDCrossAttn: token axes are padded to their lcm by repetition (attention over
    a repeated context is unchanged) and 1-layer stacks broadcast to 16.
    """

    def can_concat(self, other) -> bool:
        a, b = self.cond.shape, other.cond.shape
        if a[0] != b[0] or a[3] != b[3] or self.cond.device != other.cond.device:
            return False
        return math.lcm(a[2], b[2]) // min(a[2], b[2]) <= _MAX_TOKEN_REPEAT

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        tokens = math.lcm(*[c.shape[2] for c in conds])
        layers = max(c.shape[1] for c in conds)
        return torch.cat([c.expand(-1, layers, -1, -1).repeat(1, 1, tokens // c.shape[2], 1) for c in conds])


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


def encode_with_concepts(clip, text: str, concepts: ConceptSet) -> list:
    """CONDITIONING for ``text``: identical to the stock CLIP Text Encode when no concept token is
    present (one text-encoder pass); otherwise 16 layer-wise contexts from one batched pass."""
    tokens, positions, vectors = tokenize_with_concepts(clip, text, concepts)
    if not vectors:
        return [[c, {**d, PROMPT_KEY: text}] for c, d in clip.encode_from_tokens_scheduled(tokens)]
    tables = concepts.tables
    layered = {}
    for key, sections in tokens.items():
        copies = []
        for layer in range(NUM_LAYERS):
            copy = [list(section) for section in sections]
            for (s, j), (tok, v) in zip(positions[key], vectors):
                pair = copy[s][j]
                copy[s][j] = (tables[tok][layer, v], *pair[1:])
            copies.extend(copy)
        layered[key] = copies
    out = clip.encode_from_tokens(layered, return_pooled=True, return_dict=True)
    cond = out.pop("cond")  # [1, 16 * sections * 77, C], layer-major
    stack = cond.reshape(NUM_LAYERS, -1, cond.shape[-1]).unsqueeze(0)
    out["model_conds"] = {LAYERWISE_KEY: LayerwiseCond(stack)}
    out[CONCEPTS_USED_KEY] = concepts.labels_for(tok for tok, _ in vectors)
    out[PROMPT_KEY] = text
    return [[stack[:, 0].contiguous(), out]]


def layerwise_of(cond_dict: dict) -> torch.Tensor | None:
    """The ``[B, 16|1, T, C]`` stack carried by one CONDITIONING entry, if any."""
    c = cond_dict.get("model_conds", {}).get(LAYERWISE_KEY)
    return None if c is None else c.cond


def _uniform_layerwise_conds(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: when any cond is layer-wise, give the others a 1-layer stack so that
    all of them keep batching together (different model_conds keys never batch in ComfyUI)."""
    has = any(c is not None and any(LAYERWISE_KEY in x.get("model_conds", {}) for x in c) for c in conds)
    if has:
        fixed = []
        for cond in conds:
            if cond is None:
                fixed.append(None)
                continue
            entries = []
            for x in cond:
                mc = x.get("model_conds", {})
                if LAYERWISE_KEY not in mc and "c_crossattn" in mc:
                    x = dict(x)
                    x["model_conds"] = dict(mc, **{LAYERWISE_KEY: LayerwiseCond(mc["c_crossattn"].cond.unsqueeze(1))})
                entries.append(x)
            fixed.append(entries)
        conds = fixed
    return executor(model, conds, x_in, timestep, model_options)


def _move_to_transformer_options(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: the stacked contexts arrive as a UNet keyword; attn2 patches only see
    transformer_options."""
    stack = kwargs.pop(LAYERWISE_KEY, None)
    if stack is not None:
        transformer_options = dict(transformer_options)
        transformer_options[LAYERWISE_KEY] = stack
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class LayerwiseAttn2Patch:
    """attn2_patch: give cross-attention layer ``l`` its own context ``stack[:, l]``.

    Order-independent with other attn2 patches that only read the context; unknown blocks and
    batches without layer-wise data pass through untouched.
    """

    def __call__(self, n, context, value, extra_options):
        stack = extra_options.get(LAYERWISE_KEY)
        layer = LAYER_OF_BLOCK.get(tuple(extra_options.get("block", ())))
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
    model.set_model_attn2_patch(LayerwiseAttn2Patch())
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                               _uniform_layerwise_conds)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                               _move_to_transformer_options)
