"""One gradient fusion inside ComfyUI: validate, look up the disk cache, record and solve
(fusion.gradient_fusion with :class:`~.fusion_recording.ComfyRecorder`), patch clones, store the result.

Inputs are the BASE MODEL/CLIP (checkpoint loader outputs). Patches they carry on a fused weight (e.g.
because the Load ED-LoRA outputs were connected) are dropped from the working clones and the outputs,
with a warning; patches on other weights are kept (and are part of the cache key).

Cache: folder ``$MIXOFSHOW_FUSION_CACHE`` or ``models/edloras/.fusion_cache``, at most
``$MIXOFSHOW_FUSION_CACHE_MAX_MB`` MiB (default 2048), least recently used entries evicted. An entry
is a version-2 fused bundle (the same file Save Fused Bundle writes) named by
:func:`~.fusion_recording.recording_keys`.
"""
from __future__ import annotations

import os
import time
from typing import Any, TypedDict

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ...fusion.errors import BundleError, ConceptError
from ...fusion.files.bundle import load_bundle, save_bundle
from ...fusion.log import log
from ...fusion.merge import cache as fc
from ...fusion.merge import gradient_fusion as gf
from ...fusion.prompts.concepts import ConceptSet, concept_label
from ..names import CACHE_ENV, CACHE_MAX_ENV, EDLORA_FOLDER
from .family import check_base, model_family
from .fused_patches import (
    base_digest,
    base_of,
    bundle_of,
    deltas_of_bundle,
    fused_clones,
    fused_concepts,
    original_weight,
)
from .fusion_recording import ComfyRecorder, recording_keys


class _Stats(TypedDict):
    cache: str  # "off", "miss" or "hit"
    seconds: dict[str, float]  # step -> seconds
    recorded: dict[str, int]  # stage -> inputs recorded
    unrecorded: list[str]  # fused weights that never received an input
    result: gf.FusionResult | None  # None on a cache hit; with keep_problems it holds the solved problems


class FusionStats(_Stats, total=False):
    """What :func:`fuse` reports; ``cache_file`` once a result was written to the cache."""
    cache_file: str | None


def fusion_cache() -> fc.FusionCache:
    folder = os.environ.get(CACHE_ENV) or os.path.join(folder_paths.get_folder_paths(EDLORA_FOLDER)[0], ".fusion_cache")
    return fc.FusionCache(folder, fc.max_bytes_from_env(os.environ.get(CACHE_MAX_ENV)))


def _shapes(root, keys) -> dict[str, tuple[int, ...]]:
    out = {}
    for key in keys:
        try:
            out[key] = tuple(comfy.utils.get_attr(root, key).shape)
        except AttributeError:
            pass
    return out


def plan_for(model, clip, concepts: ConceptSet) -> gf.FusionPlan:
    """The fusion plan of a concept set (every concept checked against this MODEL/CLIP first)."""
    family = model_family(model, "Gradient Fusion")
    for c in concepts.concepts:
        check_base(c.edlora.name, c.edlora.family, model, clip)
    loras = [gf.ConceptLoRA(concept_label(c), c.text_factors, c.unet_factors, c.text_encoder_strength,
                            c.unet_strength) for c in concepts.concepts]
    return gf.make_plan(loras, _shapes(clip.cond_stage_model, {k for c in loras for k in c.text}),
                        _shapes(model.model, {k for c in loras for k in c.unet}), family)


def _weight_digests(patcher) -> dict[str, str]:
    """Digest of every original weight of a patcher (in full: see fusion.cache.tensor_digests)."""
    return fc.tensor_digests({k: original_weight(v) for k, v in patcher.get_key_patches().items()})


def _identity(model, clip, concepts: ConceptSet, settings: gf.FusionSettings,
              plan: gf.FusionPlan) -> tuple[str, str, list[str]]:
    """(bundle base digest, cache key, earlier releases' keys of the same result); every base weight is hashed
    once for all."""
    model_d, clip_d = _weight_digests(model), _weight_digests(clip.patcher)
    base = base_of({k: model_d[k] for k in plan.keys("model")}, {k: clip_d[k] for k in plan.keys("clip")})
    return (base, *recording_keys(model, clip, concepts, settings, plan, model_d, clip_d))


def _fusion_info(base: str, concepts: ConceptSet, settings: gf.FusionSettings) -> dict:
    return {"base": base, "settings": settings.as_dict(),
            "concepts": [{"name": c.edlora.name, "digest": c.edlora.digest, "tokens": c.edlora.tokens,
                          "trigger_words": c.trigger_words, "text_encoder_strength": c.text_encoder_strength,
                          "unet_strength": c.unet_strength} for c in concepts.concepts]}


def _from_cache(path: str, plan: gf.FusionPlan, model, clip):
    """A cache entry's deltas; raises (= a miss) unless it is a readable bundle with exactly the plan's
    weights and shapes."""
    b = load_bundle(path)
    if b.version != "2":
        raise BundleError(f"format version {b.version}")
    model_deltas, clip_deltas = deltas_of_bundle(b, model, clip, os.path.basename(path))
    if set(model_deltas) != plan.keys("model") or set(clip_deltas) != plan.keys("clip"):
        raise BundleError("it fuses other weights than this concept set has")
    return model_deltas, clip_deltas


def fuse(model, clip, concepts: ConceptSet | None, settings: gf.FusionSettings, use_cache: bool = True,
         progress: gf.Progress | None = None, *, keep_problems: bool = False,
         tap: gf.Tap | None = None) -> tuple[Any, Any, ConceptSet, FusionStats]:
    """Gradient fusion of ``concepts`` on the base ``model``/``clip``; returns (fused MODEL, fused CLIP,
    fused concept set, statistics). ``progress(done, total, text)`` as in
    :func:`fusion.gradient_fusion.run_fusion` (plus the interrupt check); ``keep_problems``/``tap`` for tests
    and benchmarks (``stats["result"]`` then holds the solved problems)."""
    if concepts is None or not concepts.concepts:
        raise ConceptError("Gradient Fusion needs at least one concept: connect the concepts output of Load ED-LoRA "
                           "or LoRA as Concept (chain several loaders for several concepts)")
    t0 = time.perf_counter()
    plan = plan_for(model, clip, concepts)
    model_keys, clip_keys = plan.keys("model"), plan.keys("clip")
    dropped = [k for k in model_keys if model.patches.get(k)] + [k for k in clip_keys if clip.patcher.patches.get(k)]
    if dropped:
        log.warning("Mix-of-Show fusion: the input MODEL/CLIP already carry patches on %d of the weights being fused "
                    "(were the loader outputs connected instead of the checkpoint's?); they are ignored -- fusion "
                    "starts from the original weights", len(dropped))
    stats: FusionStats = {"cache": "off", "seconds": {}, "recorded": {s: 0 for s in gf.STAGES}, "unrecorded": [],
                          "result": None}
    store = fusion_cache() if use_cache and plan.targets and plan.concepts > 1 else None  # one concept: a merge
    if store is not None:
        base, key, legacy_keys = _identity(model, clip, concepts, settings, plan)
    else:
        base = base_digest(model, clip, model_keys, clip_keys)
    info = _fusion_info(base, concepts, settings)
    out_concepts = fused_concepts([(c.edlora, c.trigger_words) for c in concepts.concepts])
    stats["seconds"]["identity"] = time.perf_counter() - t0

    if store is not None:
        if not os.path.isfile(store.path(key)):
            for legacy in legacy_keys:  # an entry of an earlier release with the same recording and solve
                if store.adopt(legacy, key):
                    log.info("Mix-of-Show fusion: cache entry %s of an earlier release renamed to %s", legacy, key)
                    break
        hit = store.load(key, lambda path: _from_cache(path, plan, model, clip))
        stats["cache"] = "miss"
        if hit is not None:
            stats["cache"] = "hit"
            if progress is not None:
                progress(1, 1, "fused result loaded from the cache")
            m, c = fused_clones(model, clip, hit[0], hit[1], info, out_concepts, strip=True)
            return m, c, out_concepts, stats

    def checked(done: int, total: int, text: str) -> None:
        mm.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress(done, total, text)

    recorder = ComfyRecorder(model, clip, concepts, settings, plan)
    result = gf.run_fusion(plan, recorder, settings, checked, keep_problems=keep_problems, tap=tap)
    if result.unrecorded:
        log.warning("Mix-of-Show fusion: %d fused weights never received an input while recording (e.g. %s; CLIP "
                    "layers past the CLIP skip?); they keep their original weights", len(result.unrecorded),
                    result.unrecorded[0])
    model_deltas = {k: v for k, v in result.deltas.items() if k in model_keys}
    clip_deltas = {k: v for k, v in result.deltas.items() if k in clip_keys}
    m, c = fused_clones(model, clip, model_deltas, clip_deltas, info, out_concepts, strip=True)
    stats.update({"seconds": {**stats["seconds"], **result.seconds}, "recorded": dict(recorder.recorded),
                  "unrecorded": result.unrecorded, "result": result})
    if store is not None:
        t = time.perf_counter()
        bundle = bundle_of(model_deltas, clip_deltas, model, clip, info, concepts)
        stats["cache_file"] = store.store(key, lambda path: save_bundle(bundle, path))
        stats["seconds"]["cache_write"] = time.perf_counter() - t
    mm.soft_empty_cache()
    return m, c, out_concepts, stats


class NodeProgress:
    """One progress bar over the whole fusion, and the current stage as text on the node."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.text = None
        self.server = None
        if node_id is not None:
            try:
                from server import PromptServer
                self.server = getattr(PromptServer, "instance", None)
            except ImportError:  # ComfyUI used without its server (scripts, in-process tests)
                pass

    def __call__(self, done: int, total: int, text: str) -> None:
        self.bar.update_absolute(done, total)
        if text != self.text and self.server is not None:
            self.text = text
            self.server.send_progress_text(text, self.node_id)
