"""Recording layer inputs for gradient fusion inside ComfyUI (docs/design.md §5.3-§5.5), and the cache key
built from everything the recordings read (docs/design.md §7.1).

:class:`ComfyRecorder` is the :class:`fusion.merge.gradient_fusion.Recorder` of the nodes. Per stage and
concept it works on clones of the base MODEL/CLIP whose patches on the fused weights are dropped (fusion
starts from the original weights) and hooks the shared modules (forward pre-hooks, always removed):

1. text encoder: the CLIP with that concept's own text LoRA encodes ``photo of a <words>`` and
   ``<words>`` (an ED-LoRA's 16 layer-wise copies, unpadded: start token to end token); the inputs of
   every fused CLIP linear are recorded. Identical rows (the 16 copies agree before the concept tokens:
   causal attention) are kept once with their multiplicity as weight (``√m·row``: same Gram). A plain
   LoRA's prompt is encoded once and weighted as 16 copies, so that every concept weighs the same.
2. cross-attention k/v: the CLIP with the fused text deltas encodes the same prompts; the rows are its
   outputs at the concept's positions (the tokens after ``photo of a``: an ED-LoRA's tokens or a plain
   LoRA's trigger words, however many vectors ComfyUI's tokenizer makes of them, e.g. ``embedding:``)
   plus the end token, from the layer-``l`` copy for cross-attention layer ``l``.
3. other UNet layers: the base UNet with the concept's own LoRA, except attn2 k/v which carry the deltas
   fused in stage 2, samples ``photo of a <words>`` (encoded by the fused CLIP) at cfg 1 (no unconditional
   rows) with noise seed + i; the inputs of every fused layer are recorded at every step. Sampler: the
   reference's DPM-Solver++ on linspace timesteps (``reference``) or any ComfyUI sampler/scheduler.

Targets are never taken from outputs or ``module.weight`` (the solver works from the LoRA factors), and
recording works whatever way ComfyUI applies patches (in place, low-VRAM, per module).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import torch
from comfy import weight_adapter

from ...fusion.errors import FusionError
from ...fusion.merge import cache as fc
from ...fusion.merge import gradient_fusion as gf
from ...fusion.merge.heap import release_free_heap
from ...fusion.prompts.concepts import ConceptSet
from ..names import CONCEPTS_USED_KEY, LAYERWISE_WRAPPER
from .fused_patches import add_fused, strip_patches
from .layerwise import (
    LayerwiseAttn2Patch,
    encode_with_concepts,
    install_layerwise,
    layerwise_of,
    tokenize_with_concepts,
)


class _Hooks:
    """Forward pre-hooks on shared modules; always removed (use as a context manager)."""

    def __init__(self):
        self.handles = []

    def add(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False


def _lora_patches(factors: Mapping[str, tuple]) -> dict:
    """A concept's own factors (alpha/rank folded in) as ComfyUI LoRA patches (scale 1, strength apart)."""
    return {k: weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))
            for k, (up, down) in factors.items()}


def _first_section(tokens: dict) -> list:
    sections = next(iter(tokens.values()))
    if len(sections) != 1:
        raise FusionError(f"a recording prompt is longer than one {len(sections[0])}-token section; "
                             f"shorten the trigger words")
    return sections[0]


def _end_position(section: list, end_token: int) -> int:
    for j, pair in enumerate(section):
        if j > 0 and isinstance(pair[0], numbers.Integral) and int(pair[0]) == end_token:
            return j
    return len(section) - 1


def _end_token(clip) -> int:
    tk = getattr(clip.tokenizer, "clip_l", None)
    return int(getattr(tk, "end_token", 49407))


def concept_positions(clip, concepts: ConceptSet, prompt: str, words: str) -> list[int]:
    """Positions of ``words`` in ``prompt``'s tokens (the prompt is ``prefix + words``) plus the end token,
    found with ComfyUI's tokenizer: the content tokens after the prefix's own (an ED-LoRA token is one
    position per vector, ``embedding:name`` as many as the embedding has)."""
    end = _end_token(clip)
    section = _first_section(tokenize_with_concepts(clip, prompt, concepts)[0])
    stop = _end_position(section, end)
    prefix = prompt[:len(prompt) - len(words)]
    skip = 0
    if prefix.strip():
        own = _first_section(clip.tokenize(prefix))
        skip = _end_position(own, end) - 1
        if [p[0] for p in own[1:1 + skip]] != [p[0] for p in section[1:1 + skip]]:
            raise FusionError(f"could not find '{words}' in the tokens of '{prompt}'")
    positions = list(range(1 + skip, stop)) + [stop]
    if len(positions) < 2:
        raise FusionError(f"'{words}' makes no tokens")
    return positions


def _weighted_unique(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Distinct rows, each scaled by √(summed weight): ``Σ w r rᵀ`` is unchanged, with fewer rows."""
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    total = torch.zeros(uniq.shape[0], dtype=rows.dtype, device=rows.device).index_add_(0, inverse, weights)
    return uniq * total.sqrt()[:, None]


def reference_sigmas(model, steps: int) -> torch.Tensor:
    """The reference schedule's sigmas: DPM-Solver with linspace timesteps (diffusers'
    ``round(linspace(0, T-1, steps+1))[::-1][:-1]``) through the model's own noise schedule, then 0."""
    sampling = model.get_model_object("model_sampling")
    t_max = len(sampling.sigmas) - 1
    timesteps = torch.linspace(0, t_max, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    sigmas = sampling.sigma(timesteps.float()).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class ComfyRecorder:
    """Records a concept set's layer inputs in ComfyUI (module text). ``prompts`` makes a concept's
    recording prompts from its words (held-out benchmarks pass others)."""

    def __init__(self, model, clip, concepts: ConceptSet, settings: gf.FusionSettings, plan: gf.FusionPlan,
                 prompts: Callable[[str], tuple[str, str]] = gf.concept_prompts):
        self.model, self.clip, self.concepts, self.settings, self.plan = model, clip, concepts, settings, plan
        self.prompts = prompts
        self.model_keys, self.clip_keys = plan.keys("model"), plan.keys("clip")
        self.recorded = {stage: 0 for stage in gf.STAGES}
        # (which deltas, clone): one fused CLIP per stage, not per concept
        self._fused_clip: tuple[tuple[tuple[str, int, int], ...] | None, Any] = (None, None)

    def record(self, stage, concept, fused, groups, sink, on_step) -> None:
        if stage == "text":
            self._text(concept, groups, sink)
        elif stage == "cross_kv":
            self._cross_kv(concept, fused, groups, sink)
        else:
            self._unet(concept, fused, groups, sink, on_step)
        release_free_heap()

    # ---- clones
    def _own_clip(self, concept: int):
        """The base CLIP with the concept's own text LoRA (stage 1)."""
        c = self.clip.clone()
        strip_patches(c.patcher, self.clip_keys)
        own = self.concepts.concepts[concept]
        if own.text_factors and own.text_encoder_strength != 0:
            c.add_patches(_lora_patches(own.text_factors), own.text_encoder_strength)
        return c

    def _fused_clip_for(self, fused):
        """The base CLIP with the fused text deltas (stages 2 and 3), made once per set of deltas (a clone
        of its own would be patched again for every concept)."""
        text = {k: v for k, v in fused.items() if k in self.clip_keys}
        which = tuple((k, id(v[0]), id(v[1])) for k, v in sorted(text.items()))
        if self._fused_clip[0] != which:
            c = self.clip.clone()
            strip_patches(c.patcher, self.clip_keys)
            add_fused(c.patcher, text, {})
            self._fused_clip = (which, c)
        return self._fused_clip[1]

    def _model(self, concept: int, fused):
        """The base UNet with the concept's own LoRA, except on the weights already fused (stage 2's k/v),
        which carry the fused deltas (stage 3)."""
        m = self.model.clone()
        strip_patches(m, self.model_keys)
        own = self.concepts.concepts[concept]
        kv = {k: v for k, v in fused.items() if k in self.model_keys}
        mine = {k: v for k, v in own.unet_factors.items() if k not in kv}
        if mine and own.unet_strength != 0:
            m.add_patches(_lora_patches(mine), own.unet_strength)
        add_fused(m, kv, {})
        install_layerwise(m)
        return m

    def _words(self, concept: int) -> str:
        return self.concepts.concepts[concept].prompt_words

    # ---- stage 1
    def _text(self, concept, groups, sink) -> None:
        clip_i = self._own_clip(concept)
        root = clip_i.cond_stage_model
        rows: dict[str, list] = {g: [] for g in groups}
        weights: dict[str, list] = {g: [] for g in groups}
        state = {"batch": 0, "length": 0, "weight": 1.0}

        def hook_for(g):
            def hook(_mod, args):
                x = args[0][:state["batch"], :state["length"]]  # the prompt's copies, start..end token
                rows[g].append(x.reshape(-1, x.shape[-1]).float())
                weights[g].append(torch.full((rows[g][-1].shape[0],), state["weight"], device=x.device))
                self.recorded["text"] += 1
            return hook

        end = _end_token(clip_i)
        layer_count = self.plan.family.layer_count
        with _Hooks() as hooks:
            for g in groups:
                hooks.add(_linear(root, g), hook_for(g))
            for prompt in self.prompts(self._words(concept)):
                mm.throw_exception_if_processing_interrupted()
                tokens, _, vectors = tokenize_with_concepts(clip_i, prompt, self.concepts)
                state["batch"] = layer_count if vectors else 1
                state["length"] = _end_position(_first_section(tokens), end) + 1
                state["weight"] = layer_count / state["batch"]
                encode_with_concepts(clip_i, prompt, self.concepts, every_copy=True)
        for g in groups:
            if rows[g]:
                sink(g, _weighted_unique(torch.cat(rows[g]), torch.cat(weights[g])), False)

    # ---- stage 2
    def _cross_kv(self, concept, fused, groups, sink) -> None:
        clip_f = self._fused_clip_for(fused)
        words = self._words(concept)
        for prompt in self.prompts(words):
            mm.throw_exception_if_processing_interrupted()
            positions = concept_positions(clip_f, self.concepts, prompt, words)
            cond = encode_with_concepts(clip_f, prompt, self.concepts)
            stack = layerwise_of(cond[0])
            for g, layer in groups.items():
                ctx = stack[0, layer] if stack is not None else cond[0][0][0]
                sink(g, ctx[positions].float(), False)
                self.recorded["cross_kv"] += 1

    # ---- stage 3
    def _unet(self, concept, fused, groups, sink, on_step) -> None:
        s = self.settings
        fused_clip = self._fused_clip_for(fused)
        model_i = self._model(concept, fused)
        root = model_i.model
        # a UNet that reads the image size (SDXL's y) is told the recording size, uncropped
        sizes = {"width": s.width, "height": s.height, "crop_w": 0, "crop_h": 0, "target_width": s.width,
                 "target_height": s.height} if self.plan.family.size_conditioning else {}
        positive = encode_with_concepts(fused_clip, self.prompts(self._words(concept))[0], self.concepts,
                                        extra=sizes)
        channels = getattr(model_i.get_model_object("latent_format"), "latent_channels", 4)
        latent = torch.zeros(1, channels, s.height // 8, s.width // 8)
        seed = (s.seed + concept) % (1 << 64)  # each concept its own noise
        noise = comfy.sample.prepare_noise(latent, seed)

        def hook_for(g, conv):
            def hook(_mod, args):
                sink(g, args[0], conv)
                self.recorded["unet"] += 1
            return hook

        def callback(step, _x0, _x, total):
            release_free_heap()  # the step's activations, freed between the kept rows and Grams (design §5.7)
            on_step(step + 1, total)

        with _Hooks() as hooks:
            for g in groups:
                module = _linear(root, g)
                hooks.add(module, hook_for(g, isinstance(module, torch.nn.Conv2d)))
            mm.throw_exception_if_processing_interrupted()
            if s.sampler == gf.REFERENCE_SAMPLER:
                comfy.sample.sample_custom(model_i, noise, 1.0, comfy.samplers.sampler_object("dpmpp_2m"),
                                           reference_sigmas(model_i, s.steps), positive, positive, latent,
                                           callback=callback, disable_pbar=True, seed=seed)
            else:
                comfy.sample.sample(model_i, noise, s.steps, 1.0, s.sampler, s.scheduler, positive, positive, latent,
                                    callback=callback, disable_pbar=True, seed=seed)


def _linear(root, path: str):
    """The module at ``path``; fusion records linear and 1×1-conv inputs only."""
    module = root.get_submodule(path)
    if isinstance(module, torch.nn.Linear):
        return module
    if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1) \
            and module.groups == 1 and tuple(module.dilation) == (1, 1) and module.padding in ((0, 0), 0, "valid"):
        return module
    raise FusionError(f"'{path}' is a {type(module).__name__}; gradient fusion records linear and 1x1-conv "
                         f"layers only")


# --------------------------------------------------------------------------- what the recordings read

def host_version() -> str:
    """ComfyUI's version, as the cache keys hold it."""
    try:
        import comfyui_version
        return f"ComfyUI {comfyui_version.__version__}"
    except ImportError:
        return "ComfyUI unknown"


def _forward_options(model):
    """The MODEL's options as the recording clones run with them, described: the pack's own layer-wise patch
    and wrappers (every recording clone installs them anyway) and its provenance labels left out, so that the
    checkpoint's MODEL and a loader's output give one key."""
    def own(v) -> bool:
        return isinstance(v, LayerwiseAttn2Patch)

    def strip(obj):
        if isinstance(obj, dict):
            out = {k: strip(v) for k, v in obj.items() if k not in (CONCEPTS_USED_KEY, LAYERWISE_WRAPPER)}
            return {k: v for k, v in out.items() if v not in ({}, [])}
        if isinstance(obj, list):
            return [strip(v) for v in obj if not own(v)]
        return obj

    return fc.describe(strip(model.model_options), depth=10)


def _patches_off(patcher, fused_keys) -> dict:
    """The patches a patcher carries on weights that are not fused (they change what is recorded)."""
    return {k: fc.describe([(p[0], p[1], p[2], p[3], p[4]) for p in v]) for k, v in patcher.patches.items()
            if k not in fused_keys and v}


def recording_keys(model, clip, concepts: ConceptSet, settings: gf.FusionSettings, plan: gf.FusionPlan,
                   model_digests: Mapping[str, str], clip_digests: Mapping[str, str]) -> tuple[str, list[str]]:
    """The fusion cache key: everything a fusion's recordings and solves read.

    * the base: every MODEL and CLIP weight in full (``model_digests`` / ``clip_digests``: key -> digest of
      the original weight), CLIP skip (``clip.layer_idx``), the patches on weights that are not fused, the
      MODEL's model options (wrappers, attention patches of other packs, ...; the pack's own layer-wise
      patch aside) and object patches (e.g. ModelSamplingDiscrete's v-prediction), described by
      :func:`fusion.merge.cache.describe`;
    * each concept: name, file digest, strengths, trigger words, its LoRA factors and tables (tensor
      digests: in-memory concepts too) and its recording prompts as ComfyUI's tokenizer makes them
      (``embedding:`` files included);
    * all settings, and the code version (:func:`fusion.merge.cache.code_version`).

    Returns the key and the keys earlier releases stored the same result under (still valid entries)."""
    prompts = []
    for c in concepts.concepts:
        toks = [tokenize_with_concepts(clip, p, concepts)[0] for p in gf.concept_prompts(c.prompt_words)]
        prompts.append(fc.describe(toks, depth=8))
    per_concept = [{
        "name": c.edlora.name, "file": c.edlora.digest, "strengths": [c.text_encoder_strength, c.unet_strength],
        "words": c.trigger_words, "tokens": c.edlora.tokens,
        "factors": fc.describe({"text": dict(c.text_factors), "unet": dict(c.unet_factors)}, depth=4),
        "tables": fc.describe(dict(c.edlora.embeddings), depth=2), "prompts": p,
    } for c, p in zip(concepts.concepts, prompts, strict=True)]
    host = host_version()
    rest = (sorted(model_digests.items()), sorted(clip_digests.items()), {
        "model_class": [k.__qualname__ for k in type(model.model).__mro__],
        "model_options": _forward_options(model),
        "object_patches": fc.describe(model.object_patches, depth=10),
        "model_patches": _patches_off(model, plan.keys("model")),
        "clip_layer": clip.layer_idx,
        "clip_patches": _patches_off(clip.patcher, plan.keys("clip")),
    }, per_concept, settings.as_dict())
    return (fc.digest("mixofshow-fusion", fc.code_version(host), *rest),
            [fc.digest("mixofshow-fusion", legacy, *rest) for legacy in fc.legacy_code_versions(host)])
