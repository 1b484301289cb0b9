"""Fusion nodes: Gradient Fusion (design §3), Save Fused ED-LoRA Bundle; `apply_bundle` lets Load ED-LoRA load bundles.

Design decisions (see also fusion/gradient_fusion.py):

* **W0** of a module is the checkpoint's original weight: the first element of
  ``patcher.get_key_patches()[key]`` (ComfyUI's unpatched backup), never ``module.weight``.
  Targets are ``W_i = W0 + α_i · up_i @ down_i`` from the raw factors (α_i = the concept's own
  text-encoder / UNet strength from its Load ED-LoRA node).
* **Inputs are the base MODEL/CLIP** (checkpoint loader outputs). Patches that the inputs carry on a
  module being fused (e.g. because the Load ED-LoRA outputs were connected) are dropped from the
  working clones and outputs, with a warning; patches on other keys are kept.
* Stage 1 records, for each concept, its CLIP (only its own text LoRA) on the layer-wise prompts
  ``photo of a <c1> <c2>`` and ``<c1> <c2>`` (16 copies each, unpadded); stage 2 takes the fused CLIP's
  outputs at the concept and end-token positions (layer l's copy for attn2 layer l); stage 3 samples
  ``photo of a <c1> <c2>`` with the base UNet + that concept's whole UNet LoRA (its own attn2 k/v
  included, as in the spec) and the fused CLIP, at cfg 1.0 with ``dpmpp_2m``/``normal`` (ComfyUI's
  multistep DPM-Solver++, the closest to the reference's DPM-Solver), recording Gram matrices.
* **Solving**: each concept's ``α_i ΔW_i`` goes to the solver factored, ``(α_i·up, down)``; the inputs
  go as :class:`fusion.solver.GramAccumulator` objects (stage 1: one per input group and concept,
  built once from the distinct rows, duplicates weighted) or rows. Accumulators keep the rows while
  there are at most ``in`` of them, so the few-rows layers (text encoder, cross-attention k/v, UNet
  blocks recorded at low resolution, the mid block's 5120-wide ff.net.2) are solved in the row
  space (``n × n``) instead of through a d×d eigendecomposition; modules of one input group
  (q/k/v) are solved together. The lbfgs mode runs on raw rows where they exist.
  ``stats["seconds"]`` has, per stage, the total and ``<stage>_record`` / ``<stage>_solve``.
* One concept: nothing is recorded; the result is its merged model (``W0 + α ΔW``, objective 0).
* **Caching** (folder ``models/edloras/.fusion_cache``, or ``$MIXOFSHOW_FUSION_CACHE``; file
  extensions ``.fused`` / ``.rows`` so they never show up in the ED-LoRA lists):
  - the whole result (fused weights + embeddings, bundle format) keyed by sha256 over the base
    MODEL/CLIP fingerprint, each ED-LoRA file digest with its strengths, and the settings;
  - per concept, the stage-1 recordings (raw input rows; a few hundred per module) keyed by the base
    CLIP fingerprint, the ED-LoRA digest and its text strength. Stage 2/3 inputs depend on the fused
    text encoder, i.e. on every concept of the set, so they are re-recorded whenever the set changes
    (stage 2 is one CLIP pass per prompt; stage 3 — the sampling — dominates).
* **Fused concept set**: same ED-LoRAs' tokens and tables, with the LoRA factors removed and both
  strengths 0 — "already merged into MODEL/CLIP": encoding uses the embeddings only.
* Fused weights are ComfyUI ``"set"`` patches on clones, tagged (:class:`FusedWeight`) so that the
  Save Fused Bundle node finds them even after further cloning.
"""
from __future__ import annotations

import logging
import numbers
import os
import time
import uuid

import torch
from safetensors.torch import load_file, save_file

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..fusion import gradient_fusion as gf
from ..fusion.bundle import FusedBundle, load_bundle, save_bundle
from ..fusion.concepts import Concept, ConceptError, ConceptSet
from ..fusion.edlora import EDLoRA, EDLoRAError
from ..fusion.layers import layer_of_unet_module
from ..fusion.solver import GramAccumulator
from .common import CONCEPTS, FUSION, PackNode, check_choices, schema
from .edlora_nodes import EDLORA_FOLDER
from .layerwise import (CONCEPTS_USED_KEY, encode_with_concepts, install_layerwise, layerwise_of,
                        tokenize_with_concepts)
from .lora_patch import check_base, clip_key_map, clip_patches, model_key_map, text_lora_name, unet_lora_name, \
    unet_patches

log = logging.getLogger("mixofshow")
UNET_ROOT = "diffusion_model."
CACHE_ENV = "MIXOFSHOW_FUSION_CACHE"


class FusionError(ValueError):
    pass


class FusedWeight(tuple):
    """Value of a fused ``("set", FusedWeight((W,)))`` patch; ``.info`` = base identity etc."""
    info: dict = {}


# --------------------------------------------------------------------------- helpers

def cache_dir() -> str:
    path = os.environ.get(CACHE_ENV) or os.path.join(folder_paths.get_folder_paths(EDLORA_FOLDER)[0],
                                                     ".fusion_cache")
    os.makedirs(path, exist_ok=True)
    return path


def _strip(patcher, keys) -> list[str]:
    dropped = [k for k in keys if patcher.patches.pop(k, None)]
    patcher.patches_uuid = uuid.uuid4()
    return dropped


def _set_patches(patcher, weights: dict, info: dict) -> None:
    _strip(patcher, weights)
    patches = {}
    for k, w in weights.items():
        value = FusedWeight((w,))
        value.info = info
        patches[k] = ("set", value)
    applied = patcher.add_patches(patches, 1.0)
    if len(applied) != len(patches):
        raise FusionError(f"could not set {len(patches) - len(applied)} fused weights (unknown keys)")


def fused_weights_of(patcher) -> tuple[dict, dict]:
    """(key -> fused weight, info) of the tagged "set" patches a (possibly cloned) patcher carries."""
    out, info = {}, {}
    for k, plist in patcher.patches.items():
        if plist and isinstance(plist[-1][1], tuple) and len(plist[-1][1]) == 2 and plist[-1][1][0] == "set" \
                and isinstance(plist[-1][1][1], FusedWeight):
            out[k] = plist[-1][1][1][0]
            info = plist[-1][1][1].info
    return out, info


def _original(entry) -> torch.Tensor:
    w, convert = entry[0]
    return convert(w, inplace=False) if convert is not None else w


def _fingerprint_value(v, h: list) -> None:
    if torch.is_tensor(v):
        h.append(gf.tensor_fingerprint(v))
    elif isinstance(v, (tuple, list)):
        for x in v:
            _fingerprint_value(x, h)
    elif hasattr(v, "weights"):
        _fingerprint_value(v.weights, h)
    else:
        h.append(repr(v) if isinstance(v, (int, float, str, type(None))) else type(v).__name__)


def base_identity(patcher, all_patches: dict, exclude: set) -> str:
    """Fingerprint of a patcher's original weights plus the patches it carries outside ``exclude``."""
    parts = []
    for k in sorted(all_patches):
        entry = all_patches[k]
        parts.append(f"{k}:{gf.tensor_fingerprint(_original(entry))}")
        if k not in exclude and len(entry) > 1:
            fp = []
            _fingerprint_value(entry[1:], fp)
            parts.append("patch:" + ",".join(fp))
    return gf._h(type(patcher.model).__name__, parts)


def _check_interrupt():
    mm.throw_exception_if_processing_interrupted()


class _Target:
    __slots__ = ("module", "key", "path", "kind")

    def __init__(self, module, key, path, kind):
        self.module, self.key, self.path, self.kind = module, key, path, kind


def _end_position(tokens: dict, end_token: int) -> int:
    section = next(iter(tokens.values()))[0]
    for j, pair in enumerate(section):
        if j > 0 and isinstance(pair[0], numbers.Integral) and int(pair[0]) == end_token:
            return j
    return len(section) - 1


def _end_token(clip) -> int:
    tk = getattr(clip.tokenizer, "clip_l", None)
    return int(getattr(tk, "end_token", 49407))


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


# --------------------------------------------------------------------------- fusion

class GradientFusion:
    """The whole §3 procedure; one instance per run."""

    def __init__(self, model, clip, concepts: ConceptSet, settings: gf.FusionSettings, use_cache: bool = True):
        if concepts is None or not concepts.concepts:
            raise ConceptError("Gradient Fusion needs at least one concept: connect the concepts output of "
                               "Load ED-LoRA (chain several loaders for several concepts)")
        self.model, self.clip, self.concepts, self.settings, self.use_cache = \
            model, clip, concepts, settings, use_cache
        self.device = mm.get_torch_device()
        self.stats = {"recorded": {"text": 0, "cross_kv": 0, "unet": 0}, "cache": "miss", "seconds": {}}
        self._validate()

    # ---- validation (before any work)
    def _validate(self):
        kmap, cmap = model_key_map(self.model), clip_key_map(self.clip)
        self.unet_p, self.text_p = [], []
        for c in self.concepts.concepts:
            check_base(c.edlora, self.model, self.clip)
            self.unet_p.append(unet_patches(c.edlora, self.model, kmap))
            self.text_p.append(clip_patches(c.edlora, self.clip, cmap))
        text_mods = sorted({m for c in self.concepts.concepts for m in c.edlora.text_encoder})
        unet_mods = sorted({m for c in self.concepts.concepts for m in c.edlora.unet})
        self.text_targets = []
        for m in text_mods:
            key = cmap[text_lora_name(m)]
            self.text_targets.append(_Target(m, key, key[:-len(".weight")], "text"))
        self.kv_targets, self.unet_targets = [], []
        for m in unet_mods:
            key = kmap[unet_lora_name(m)]
            t = _Target(m, key, key[len(UNET_ROOT):-len(".weight")],
                        "cross_kv" if m.endswith(("attn2.to_k", "attn2.to_v")) else "unet")
            (self.kv_targets if t.kind == "cross_kv" else self.unet_targets).append(t)
        self.text_keys = {t.key for t in self.text_targets}
        self.unet_keys = {t.key for t in self.kv_targets + self.unet_targets}
        dropped = [k for k in self.unet_keys if self.model.patches.get(k)] + \
                  [k for k in self.text_keys if self.clip.patcher.patches.get(k)]
        if dropped:
            log.warning("Mix-of-Show fusion: the input MODEL/CLIP already carry patches on %d of the modules being "
                        "fused (were the Load ED-LoRA outputs connected instead of the checkpoint's?); they are "
                        "ignored — fusion starts from the original weights", len(dropped))

    # ---- small utilities
    def _alpha(self, i, part):
        c = self.concepts.concepts[i]
        return c.text_encoder_strength if part == "text" else c.unet_strength

    def _delta(self, i, target):
        c = self.concepts.concepts[i]
        factors = c.edlora.text_encoder if target.kind == "text" else c.edlora.unet
        if target.module not in factors:
            return None
        alpha = self._alpha(i, "text" if target.kind == "text" else "unet")
        return gf.lora_factors(*factors[target.module], alpha)  # (α·up, down): the solver stays low-rank

    def _clip_clone(self, i=None, fused=None):
        c = self.clip.clone()
        _strip(c.patcher, self.text_keys)
        if fused:
            _set_patches(c.patcher, fused, self.info)
        elif i is not None and self.text_p[i] and self._alpha(i, "text") != 0:
            c.add_patches({k: v for k, v in self.text_p[i].items()}, self._alpha(i, "text"))
        return c

    def _model_clone(self, i=None, fused=None):
        m = self.model.clone()
        _strip(m, self.unet_keys)
        if fused:
            _set_patches(m, fused, self.info)
        elif i is not None and self.unet_p[i] and self._alpha(i, "unet") != 0:
            m.add_patches(self.unet_p[i], self._alpha(i, "unet"))
        install_layerwise(m)
        return m

    # ---- identity and cache
    def _identities(self):
        self.model_kp = self.model.get_key_patches(UNET_ROOT)
        self.clip_kp = self.clip.patcher.get_key_patches()
        self.clip_identity = base_identity(self.clip.patcher, self.clip_kp, self.text_keys)
        self.model_identity = base_identity(self.model, self.model_kp, self.unet_keys)
        self.base_id = gf._h(self.model_identity, self.clip_identity)
        cs = [(c.edlora.digest or gf._h(c.edlora.name), c.text_encoder_strength, c.unet_strength)
              for c in self.concepts.concepts]
        self.key = gf.cache_key(self.base_id, cs, self.settings)
        self.info = {"base": self.base_id, "settings": self.settings.as_dict(),
                     "concepts": [{"name": c.edlora.name, "tokens": c.edlora.tokens, "digest": c.edlora.digest,
                                   "text_encoder_strength": c.text_encoder_strength,
                                   "unet_strength": c.unet_strength} for c in self.concepts.concepts]}

    def _w0(self, target):
        kp = self.clip_kp if target.kind == "text" else self.model_kp
        return _original(kp[target.key])

    # ---- stage 1
    def _text_rows(self, i) -> dict[str, torch.Tensor]:
        """Input rows of every text input group for concept i (cached per concept)."""
        c = self.concepts.concepts[i]
        groups = gf.group_modules(t.path for t in self.text_targets)
        path = os.path.join(cache_dir(), "text-" + gf.text_stats_key(
            self.clip_identity, c.edlora.digest or gf._h(c.edlora.name), c.text_encoder_strength) + ".rows")
        if self.use_cache and os.path.isfile(path):
            cached = load_file(path)
            if all(g in cached for g in groups):
                return cached
        clip_i = self._clip_clone(i)
        root = clip_i.cond_stage_model
        rows = {g: [] for g in groups}
        state = {"n": 0}
        end = _end_token(clip_i)

        def hook_for(g):
            def hook(_mod, args):
                x = args[0]
                rows[g].append(x[:, :state["n"]].reshape(-1, x.shape[-1]).float().cpu())
                self.stats["recorded"]["text"] += 1
            return hook

        with _Hooks() as hooks:
            for g in groups:
                hooks.add(root.get_submodule(g), hook_for(g))
            for prompt in gf.concept_prompts(c.edlora.tokens):
                _check_interrupt()
                tokens, *_ = tokenize_with_concepts(clip_i, prompt, self.concepts)
                state["n"] = _end_position(tokens, end) + 1
                encode_with_concepts(clip_i, prompt, self.concepts)
        out = {g: torch.cat(r) for g, r in rows.items() if r}
        missing = [g for g in groups if g not in out]
        if missing:
            raise FusionError(f"text-encoder modules never ran while recording: {missing[:3]}")
        if self.use_cache:
            save_file({k: v.contiguous() for k, v in out.items()}, path + ".part")
            os.replace(path + ".part", path)
        return out

    def _stage_text(self):
        n = len(self.concepts.concepts)
        targets = self.text_targets
        if not targets:
            return {}
        single = n == 1
        pbar = comfy.utils.ProgressBar((0 if single else n) + len(targets))
        per_concept = []
        if not single:
            for i in range(n):
                per_concept.append(self._text_rows(i))
                pbar.update(1)
        inputs = per_concept
        if not single and self.settings.solver == "closed_form":
            inputs = [{g: self._gram_of(r) for g, r in rows.items()} for rows in per_concept]
        self._lap("text", "record")
        problems = []
        for t in targets:
            g = gf.input_group(t.path)
            recorded = None if single else [r[g] for r in inputs]
            problems.append(gf.LayerProblem(t.key, self._w0(t), [self._delta(i, t) for i in range(n)],
                                            grams=recorded if recorded and not torch.is_tensor(recorded[0]) else None,
                                            rows=recorded if recorded and torch.is_tensor(recorded[0]) else None,
                                            kind="text"))
        out = gf.solve_layers(problems, self.settings.solver, self.device, on_layer=lambda _: self._tick(pbar))
        self._lap("text", "solve")
        return out

    def _gram_of(self, rows):
        """Gram accumulator of recorded rows, built from the *distinct* rows: the 16 layer-wise copies
        of a prompt give bit-identical rows before the concept tokens (causal attention), and ``m``
        copies of a row ``r`` add ``m·r rᵀ = (√m r)(√m r)ᵀ`` — same Gram, fewer rows. The count is then
        the number of distinct rows, so most text layers fit the closed form's row-space path."""
        rows = rows.reshape(-1, rows.shape[-1]).float()
        uniq, mult = torch.unique(rows, dim=0, return_counts=True)
        return gf.accumulate(uniq * mult.to(uniq.dtype).sqrt()[:, None], self.device)

    def _lap(self, stage, part):
        """Adds the time since the previous lap to ``stats["seconds"][f"{stage}_{part}"]``."""
        now = time.perf_counter()
        key = f"{stage}_{part}"
        self.stats["seconds"][key] = self.stats["seconds"].get(key, 0.0) + now - self._t
        self._t = now

    def _tick(self, pbar):
        pbar.update(1)
        _check_interrupt()

    # ---- stage 2
    def _stage_kv(self, fused_clip):
        n = len(self.concepts.concepts)
        targets = self.kv_targets
        if not targets:
            return {}
        single = n == 1
        pbar = comfy.utils.ProgressBar((0 if single else n) + len(targets))
        per_concept = []  # concept -> layer -> rows [k, 768]
        if not single:
            end = _end_token(fused_clip)
            for i, c in enumerate(self.concepts.concepts):
                layer_rows = [[] for _ in range(16)]
                for prompt in gf.concept_prompts(c.edlora.tokens):
                    _check_interrupt()
                    tokens, positions, _ = tokenize_with_concepts(fused_clip, prompt, self.concepts)
                    width = len(next(iter(tokens.values()))[0])
                    idx = [s * width + j for s, j in next(iter(positions.values()))]
                    idx.append(_end_position(tokens, end))
                    stack = layerwise_of(encode_with_concepts(fused_clip, prompt, self.concepts)[0])[0]
                    for layer in range(16):
                        layer_rows[layer].append(stack[layer, idx].float())
                    self.stats["recorded"]["cross_kv"] += 1
                per_concept.append([torch.cat(r) for r in layer_rows])
                pbar.update(1)
        self._lap("cross_kv", "record")
        problems = []
        for t in targets:
            layer = layer_of_unet_module(t.module)
            problems.append(gf.LayerProblem(t.key, self._w0(t), [self._delta(i, t) for i in range(n)],
                                            rows=None if single else [pc[layer] for pc in per_concept],
                                            kind="cross_kv"))
        out = gf.solve_layers(problems, self.settings.solver, self.device, on_layer=lambda _: self._tick(pbar))
        self._lap("cross_kv", "solve")
        return out

    # ---- stage 3
    def _stage_unet(self, fused_clip):
        n = len(self.concepts.concepts)
        targets = self.unet_targets
        if not targets:
            return {}
        single = n == 1
        s = self.settings
        pbar = comfy.utils.ProgressBar((0 if single else n * s.steps) + len(targets))
        groups = gf.group_modules(t.path for t in targets)
        per_concept = []
        if not single:
            for i, c in enumerate(self.concepts.concepts):
                model_i = self._model_clone(i)
                root = model_i.model.diffusion_model
                accs = {}
                for g in groups:
                    mod = root.get_submodule(g)
                    accs[g] = GramAccumulator(mod.in_channels if isinstance(mod, torch.nn.Conv2d) else mod.in_features)

                def hook_for(g, conv):
                    def hook(_mod, args):
                        accs[g].add(args[0], channels_first=True) if conv else accs[g].add(args[0])
                        self.stats["recorded"]["unet"] += 1
                    return hook

                positive = encode_with_concepts(fused_clip, gf.concept_prompts(c.edlora.tokens)[0], self.concepts)
                latent = torch.zeros(1, 4, s.height // 8, s.width // 8)
                noise = comfy.sample.prepare_noise(latent, s.seed)

                def callback(step, x0, x, total):
                    pbar.update(1)
                    _check_interrupt()

                with _Hooks() as hooks:
                    for g in groups:
                        mod = root.get_submodule(g)
                        hooks.add(mod, hook_for(g, isinstance(mod, torch.nn.Conv2d)))
                    _check_interrupt()
                    comfy.sample.sample(model_i, noise, s.steps, 1.0, s.sampler, s.scheduler, positive, positive,
                                        latent, callback=callback, disable_pbar=True, seed=s.seed)
                per_concept.append(accs)
                del model_i
        self._lap("unet", "record")
        problems = []
        for t in targets:
            g = gf.input_group(t.path)
            problems.append(gf.LayerProblem(t.key, self._w0(t), [self._delta(i, t) for i in range(n)],
                                            grams=None if single else [pc[g] for pc in per_concept], kind="unet"))
        out = gf.solve_layers(problems, self.settings.solver, self.device, on_layer=lambda _: self._tick(pbar))
        self._lap("unet", "solve")
        return out

    # ---- outputs
    def _fused_concepts(self) -> ConceptSet:
        out = ConceptSet()
        for c in self.concepts.concepts:
            e = EDLoRA(name=c.edlora.name, embeddings=dict(c.edlora.embeddings), digest=c.edlora.digest)
            out = out.add(Concept(e, 0.0, 0.0))
        return out

    def _outputs(self, text_w, unet_w):
        concepts = self._fused_concepts()
        model = self._model_clone(fused=unet_w)
        model.model_options[CONCEPTS_USED_KEY] = concepts.labels  # regions encoded with these are accepted
        return model, self._clip_clone(fused=text_w), concepts

    def run(self):
        t0 = time.perf_counter()
        self._identities()
        self.stats["seconds"]["identity"] = time.perf_counter() - t0
        path = os.path.join(cache_dir(), self.key + ".fused")
        if self.use_cache and os.path.isfile(path):
            b = load_bundle(path)
            if set(b.model) == self.unet_keys and set(b.clip) == self.text_keys:
                self.stats["cache"] = "hit"
                return self._outputs(b.clip, b.model)
        _check_interrupt()
        t = self._t = time.perf_counter()
        text_w = self._stage_text()
        self.stats["seconds"]["text"] = time.perf_counter() - t
        fused_clip = self._clip_clone(fused=text_w) if text_w else self._clip_clone()
        t = self._t = time.perf_counter()
        kv_w = self._stage_kv(fused_clip)
        self.stats["seconds"]["cross_kv"] = time.perf_counter() - t
        t = self._t = time.perf_counter()
        unet_w = self._stage_unet(fused_clip)
        self.stats["seconds"]["unet"] = time.perf_counter() - t
        unet_w.update(kv_w)
        text_w = {k: v.cpu() for k, v in text_w.items()}
        unet_w = {k: v.cpu() for k, v in unet_w.items()}
        if self.use_cache:
            save_bundle(self.bundle(text_w, unet_w), path)
        mm.soft_empty_cache()
        return self._outputs(text_w, unet_w)

    def bundle(self, text_w, unet_w) -> FusedBundle:
        return FusedBundle(model=unet_w, clip=text_w, concepts=self.info["concepts"],
                           embeddings=dict(self.concepts.tables), base=self.base_id, settings=self.info["settings"])


def fuse(model, clip, concepts, settings: gf.FusionSettings, use_cache: bool = True):
    """Run gradient fusion; returns (fused MODEL, fused CLIP, fused concept set, run statistics)."""
    run = GradientFusion(model, clip, concepts, settings, use_cache)
    m, c, cs = run.run()
    return m, c, cs, run.stats


# --------------------------------------------------------------------------- nodes

class GradientFusionNode(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowGradientFusion", display_name="Gradient Fusion (Mix-of-Show)", category=FUSION,
            description="Mix-of-Show gradient fusion: merges every ED-LoRA of the concept set into ONE model (no "
                        "per-concept LoRA left) so that each fused layer reproduces every concept's own tuned layer on "
                        "the inputs that concept produces. Three stages: text encoder, cross-attention k/v, other UNet "
                        "layers (by sampling each concept's prompt). Results are cached on disk "
                        "(models/edloras/.fusion_cache).",
            search_aliases=("merge LoRA", "fuse ED-LoRA", "multi character", "multi concept", "gradient fusion"),
            inputs=[
                io.Model.Input("model", tooltip="The BASE model: the checkpoint loader's MODEL, not Load ED-LoRA's "
                                                "output (LoRA patches on fused modules are ignored)."),
                io.Clip.Input("clip", tooltip="The BASE CLIP: the checkpoint loader's CLIP."),
                CONCEPTS.Input("concepts", tooltip="Concept set from chained Load ED-LoRA nodes; each concept's "
                                                   "strengths are its fusion weights (1.0 in the paper)."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampling steps per concept for recording the UNet layers' inputs."),
                io.Int.Input("width", default=512, min=64, max=2048, step=8,
                             tooltip="Width of the images sampled for recording."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8,
                             tooltip="Height of the images sampled for recording."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed of the recording samples (concept i uses seed + i)."),
                io.Combo.Input("solver", options=list(gf.SOLVERS), default="closed_form",
                               tooltip="closed_form: exact minimiser (fast). lbfgs: the reference optimiser, for "
                                       "comparison (slow)."),
                io.Boolean.Input("cache", default=True, tooltip="Reuse fused results and per-concept text-encoder "
                                                                "recordings from disk."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Fused model (layer-wise conditioning installed)."),
                io.Clip.Output(display_name="clip", tooltip="Fused CLIP."),
                CONCEPTS.Output(display_name="concepts", tooltip="Fused concept set: every concept's embeddings, LoRA "
                                                                 "strengths 0 (already merged)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, solver) -> bool | str:
        return check_choices(cls, solver=solver)

    @classmethod
    def execute(cls, model, clip, concepts, steps, width, height, seed, solver, cache) -> io.NodeOutput:
        settings = gf.FusionSettings(steps=steps, width=width, height=height, seed=seed, solver=solver)
        m, c, cs, stats = fuse(model, clip, concepts, settings, cache)
        log.info("Mix-of-Show fusion: %s (cache %s, recorded %s)", cs.describe(), stats["cache"], stats["recorded"])
        return io.NodeOutput(m, c, cs)


def _output_path(prefix: str) -> str:
    folder = folder_paths.get_folder_paths(EDLORA_FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(prefix.strip() or "fused_edlora").removesuffix(".safetensors")
    counter = 1
    while True:
        path = os.path.join(folder, f"{stem}_{counter:05d}.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


class SaveFusedBundle(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowSaveFusedBundle", display_name="Save Fused ED-LoRA Bundle (Mix-of-Show)",
            category=FUSION, is_output_node=True,
            description="Saves the fused weights (only the changed ones), every concept's embeddings and metadata "
                        "(base model, concepts, settings) as one .safetensors in models/edloras. Load it with "
                        "Load ED-LoRA on the same base checkpoint.",
            search_aliases=("save fused", "fused bundle", "export fusion"),
            inputs=[
                io.Model.Input("model", tooltip="Fused MODEL from Gradient Fusion."),
                io.Clip.Input("clip", tooltip="Fused CLIP from Gradient Fusion."),
                CONCEPTS.Input("concepts", tooltip="Fused concept set from Gradient Fusion."),
                io.String.Input("filename_prefix", default="fused_edlora",
                                tooltip="File name prefix in models/edloras; a counter is appended."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="Name of the written bundle.")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, filename_prefix) -> io.NodeOutput:
        unet_w, info = fused_weights_of(model)
        text_w, info2 = fused_weights_of(clip.patcher)
        if not unet_w and not text_w:
            raise FusionError("Save Fused Bundle: the MODEL/CLIP carry no fused weights — connect the outputs of "
                              "Gradient Fusion (Mix-of-Show)")
        info = info or info2
        b = FusedBundle(model={k: v.cpu() for k, v in unet_w.items()}, clip={k: v.cpu() for k, v in text_w.items()},
                        concepts=[{"name": c.edlora.name, "tokens": c.edlora.tokens, "digest": c.edlora.digest}
                                  for c in concepts.concepts],
                        embeddings=dict(concepts.tables), base=info.get("base", ""),
                        settings=info.get("settings", {}))
        strengths = {x["name"]: x for x in info.get("concepts", [])}
        for c in b.concepts:
            src = strengths.get(c["name"], {})
            c["text_encoder_strength"] = src.get("text_encoder_strength")
            c["unet_strength"] = src.get("unet_strength")
        path = _output_path(filename_prefix)
        save_bundle(b, path)
        name = os.path.basename(path)
        return io.NodeOutput(name, ui={"text": [f"{name}: {concepts.describe()}"]})


def apply_bundle(model, clip, path: str):
    """Clones of the base MODEL/CLIP with a bundle's fused weights, plus its (embeddings-only) concept set."""
    b = load_bundle(path)
    name = os.path.basename(path)
    msd = model.get_key_patches(UNET_ROOT)
    csd = clip.patcher.get_key_patches()
    for part, weights, sd in (("MODEL", b.model, msd), ("CLIP", b.clip, csd)):
        for k, w in weights.items():
            if k not in sd:
                raise EDLoRAError(f"{name}: {part} has no weight {k} — the bundle is for another base model")
            if tuple(_original(sd[k]).shape) != tuple(w.shape):
                raise EDLoRAError(f"{name}: {part} weight {k} is {tuple(_original(sd[k]).shape)} here but "
                                  f"{tuple(w.shape)} in the bundle — the bundle is for another base model")
    info = {"base": b.base, "settings": b.settings, "concepts": b.concepts}
    m, c = model.clone(), clip.clone()
    _set_patches(m, b.model, info)
    _set_patches(c.patcher, b.clip, info)
    install_layerwise(m)
    concepts = ConceptSet()
    for e in b.edloras():
        concepts = concepts.add(Concept(e, 0.0, 0.0))
    m.model_options[CONCEPTS_USED_KEY] = concepts.labels
    base_now = gf._h(base_identity(model, msd, set(b.model)), base_identity(clip.patcher, csd, set(b.clip)))
    if b.base and base_now != b.base:
        log.warning("Mix-of-Show: %s was fused on a different base model (or one with other patches)", name)
    return m, c, concepts


NODES = [GradientFusionNode, SaveFusedBundle]
