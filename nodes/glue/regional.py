"""One regional sampling inside ComfyUI's UNet (docs/design.md §4-§5): a :class:`RegionalSampling` object owns
the run's regional state — each region's context per layer, the masks and blend weights per feature size,
the control weights, each region's LoRA factors — and its device moves, and provides the hooks ComfyUI calls:

* an attn2_patch (:class:`RegionalAttn2Patch`, a :class:`~.layerwise.LayerwiseAttn2Patch`, so it *replaces*
  the layer-wise patch — the order of separate patches is not guaranteed): the global layer-``l`` context, then
  each region's layer-``l`` context (positive for rows of a positive chunk, the region's negative for rows of a
  negative chunk), padded and masked (:mod:`fusion.regions.attention`);
* an attn2 replace per cross-attention layer (:class:`RegionalAttn2Replace`): splits the projected k/v, computes
  ``h`` and the ``h_r`` and blends them with the layer's masks; an attn2 replace another node installed there
  (an IPAdapter, say) is chained and computes ``h``;
* a DIFFUSION_MODEL wrapper (the object itself), installed when a region has a LoRA or a control strength: it
  scales ControlNet/T2I-Adapter residuals per pixel, and adds each region's LoRA inside its region through
  forward hooks that live for one UNet call (:mod:`fusion.regions.lowrank`).

The pure maths (layout, split, blend, masks, low-rank products) is in ``fusion/regions``.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...fusion.errors import LoRAFormatError, RegionError
from ...fusion.families import ModelFamily
from ...fusion.regions.attention import ContextLayout, RegionRows, pack_region_contexts, region_rows, regional_attention
from ...fusion.regions.blend import blend_regions, blend_weights
from ...fusion.regions.lowrank import LowRankBank
from ...fusion.regions.masks import feature_hw_for_tokens, region_layer_masks
from ..names import CONCEPTS_USED_KEY, REGIONAL_WRAPPER
from .family import model_family
from .layerwise import LayerwiseAttn2Patch, install_layerwise
from .lora_patch import low_rank_factors
from .regions import Region, context_stack, region_name

_UNET = "diffusion_model."


# --------------------------------------------------------------------------- a region's LoRA

def _source(base: Any, index: int, region: Region) -> str:
    """The region as messages name it (:func:`region_name`), plus the files its MODEL was loaded with beyond
    the sampling MODEL's when they came through the pack's loaders (stock Load LoRA records none)."""
    loaded = region.model.model_options.get(CONCEPTS_USED_KEY, ())
    own = [label for label in loaded if label not in base.model_options.get(CONCEPTS_USED_KEY, ())] or loaded
    label = region.label if region.label != region_name(index) else ""
    files = f"its MODEL has {', '.join(own)}" if own else ""
    return region_name(index, "; ".join(part for part in (label, files) if part))


def extra_patches(base: Any, region_model: Any, source: str) -> dict[str, list[tuple]]:
    """The weight patches ``region_model`` carries beyond ``base`` (patch entries are shared between
    clones, so "beyond" is by identity): weight key -> patch entries. ``source`` names the region."""
    if region_model.model is not base.model:
        raise RegionError(f"{source}: its MODEL is not the sampling MODEL's base model with a LoRA on it — load "
                          f"the region's LoRA (Load ED-LoRA, LoRA as Concept or Load LoRA) on the same checkpoint as "
                          f"the sampling MODEL")
    out = {}
    for key, entries in region_model.patches.items():
        shared = base.patches.get(key, [])
        extra = [e for e in entries if not any(e is s for s in shared)]
        if extra:
            out[key] = extra
    return out


def region_factors(base: Any, region_model: Any, source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (below ``diffusion_model``) -> ``(up, down)`` of the region's extra LoRA there,
    strength and alpha/rank folded into ``up``; several patches on one layer stack their ranks. ``source``
    names the region in errors."""
    factors = {}
    for key, entries in extra_patches(base, region_model, source).items():
        if not key.startswith(_UNET) or not key.endswith(".weight"):
            raise LoRAFormatError(f"{source}: the patch on {key} is not a LoRA on a UNet layer's weight; only those "
                                  f"can be applied per region")
        ups, downs = [], []
        for strength, value, strength_model, offset, function in entries:
            if strength_model != 1.0 or offset is not None or function is not None:
                raise LoRAFormatError(f"{source}: the patch on {key} also rescales or offsets the original weight, "
                                      f"which cannot be applied per region")
            up, down = low_rank_factors(value, key, source)
            ups.append(up.reshape(up.shape[0], up.shape[1]) * float(strength))
            downs.append(down)
        factors[key[len(_UNET):-len(".weight")]] = (torch.cat(ups, dim=1), torch.cat(downs))
    return factors


def _lora_kind(path: str, module: torch.nn.Module) -> str:
    """How a layer's output positions map to pixels (see :meth:`RegionalSampling._hook`)."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise LoRAFormatError(f"{path}: a grouped convolution cannot take a region LoRA")
        return "conv"
    if not isinstance(module, torch.nn.Linear):
        weight = getattr(module, "weight", None)
        what = f" (a {weight.ndim}-D weight)" if isinstance(weight, torch.Tensor) else ""
        raise LoRAFormatError(f"{path} is a {type(module).__name__}{what}; a region LoRA applies to linear and "
                              f"convolution layers")
    if path.endswith(("attn2.to_k", "attn2.to_v")):
        return "context"
    if path.endswith(".emb_layers.1"):
        return "emb"
    if ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out")):  # linear proj: tokens
        return "tokens"
    raise LoRAFormatError(f"{path}: a LoRA on this layer acts on the whole image (it is not per pixel), so it "
                          f"cannot be limited to a region")


# --------------------------------------------------------------------------- the run

class RegionalSampling:
    """A regional sampling's state (see the module text). ``base`` is the sampling MODEL (a ModelPatcher);
    without it, regions' own MODELs are not read (masks and contexts only)."""

    def __init__(self, regions: Sequence[Region], base: Any = None, family: ModelFamily | None = None):
        self.family = family
        self.masks = [r.mask.to(torch.float32) for r in regions]  # each its own size (docs/design.md §8.3)
        self.boxes = [r.box for r in regions]
        self.positive = [context_stack(list(r.positive), f"{region_name(i, r.label)}: positive")
                         for i, r in enumerate(regions)]
        self.negative = [context_stack(list(r.negative), f"{region_name(i, r.label)}: negative")
                         for i, r in enumerate(regions)]
        self.control_strengths = torch.tensor([float(r.control_strength) for r in regions])
        self.lora_layers = self._lora_layers(base, regions) if base is not None else []
        # each layer's cross-attention, to project the regions' contexts once per sampling (region_kv)
        self._attn2 = {} if base is None or family is None else {
            layer: module for path, module in base.model.diffusion_model.named_modules() if path.endswith(".attn2")
            and (layer := family.layer_of_weight(f"{_UNET}{path}.to_k.weight")) is not None}
        self._region_kv: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._projecting_regions = False
        self._layouts: dict[int, ContextLayout] = {}  # per layer, for the UNet call under way
        self._contexts: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        self._context_keys: dict[int, tuple] = {}  # per layer, the _contexts key of the UNet call under way
        self._context_deltas: dict[tuple, torch.Tensor] = {}  # (id(bank), _contexts key) -> k/v LoRA delta
        self._masks: dict[tuple, Any] = {}
        self._weights: dict[tuple, tuple[torch.Tensor, frozenset]] = {}
        self._latent_hw = (1, 1)
        self._block_hw: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.positive)

    def __deepcopy__(self, memo: dict) -> RegionalSampling:  # shared by the patched clone's options; never copied
        return self

    def new_sampling(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """OUTER_SAMPLE wrapper: a sampling starts, so the regions' keys and values projected by the last one
        go. The sigmas alone cannot tell samplings apart (a cached SIGMAS output is the same tensor when a
        LoRA downstream of the regions changed to_k/to_v between two queue runs)."""
        self._region_kv.clear()
        return executor(*args, **kwargs)

    @property
    def needs_wrapper(self) -> bool:
        """Region LoRAs or per-region control strengths need the DIFFUSION_MODEL wrapper."""
        return bool(self.lora_layers) or bool((self.control_strengths != 1.0).any())

    def to(self, device_or_dtype: Any) -> RegionalSampling:
        """ComfyUI moves patches with the model: keep the contexts and masks cached for the new device only."""
        if isinstance(device_or_dtype, (torch.device, str)):
            device = torch.device(device_or_dtype)
            self._contexts = {k: v for k, v in self._contexts.items() if k[-2] == device}
            self._context_deltas = {k: v for k, v in self._context_deltas.items() if k[1][-2] == device}
            self._region_kv = {k: v for k, v in self._region_kv.items() if k[-2] == device}
            self._masks = {k: v for k, v in self._masks.items() if k[-1] in (str(device), "cpu")}
        return self

    # ---- per layer
    def flat_masks(self, fh: int, fw: int, device: Any) -> torch.Tensor:
        """``[R, fh*fw]`` masks at a feature size: the reference box rule for box regions, area averaging else."""
        key = (fh, fw, str(device))
        if key not in self._masks:
            self._masks[key] = region_layer_masks(self.masks, self.boxes, fh, fw).to(device)
        return self._masks[key]

    def region_rows(self, fh: int, fw: int, device: Any) -> RegionRows:
        """Where each region's attention is needed at a feature size (decided once per size on the CPU)."""
        key = ("rows", fh, fw, str(device))
        if key not in self._masks:
            self._masks[key] = region_rows(self.flat_masks(fh, fw, "cpu")).to(device)
        return self._masks[key]

    def control_weights(self, fh: int, fw: int, device: Any) -> torch.Tensor:
        """``[1, 1, fh, fw]`` factor for control residuals: 1 outside regions, the mask-weighted average of
        the covering regions' strengths inside (the same blend as the attention)."""
        key = ("control", fh, fw, str(device))
        if key not in self._masks:
            masks = self.flat_masks(fh, fw, "cpu")
            ones = torch.ones(1, fh * fw, 1)
            per_region = self.control_strengths[:, None, None, None].expand(-1, 1, fh * fw, 1)
            self._masks[key] = blend_regions(ones, per_region, masks).reshape(1, 1, fh, fw).to(device)
        return self._masks[key]

    def lora_weights(self, fh: int, fw: int, device: Any) -> tuple[torch.Tensor, frozenset]:
        """``[R, fh*fw]`` blend weights of every region at one feature size, and the regions present there
        (decided once per size on the CPU: no device sync in the layers' hooks)."""
        key = (fh, fw, str(device))
        if key not in self._weights:
            w = blend_weights(self.flat_masks(fh, fw, "cpu"))
            present = frozenset(int(r) for r in torch.nonzero(w.amax(dim=1) > 0).flatten())
            self._weights[key] = (w.to(device), present)
        return self._weights[key]

    def context(self, layer: int, global_context: torch.Tensor, chunks: Sequence[int],
                sampling: Any = None) -> torch.Tensor:
        """The layer's context, its layout (global, then the regions') remembered for the layer's attn2
        replace and region LoRAs: the global context alone when the regions' keys and values are kept for
        the sampling under way (``sampling``: its sigmas, :meth:`region_kv`), else the concatenation."""
        rows = global_context.shape[0] // len(chunks)
        key = (layer, tuple(chunks), rows, global_context.device, global_context.dtype)
        if key not in self._contexts:
            per_region = [[_layer_of(neg if chunk == 1 else pos, layer) for chunk in chunks]
                          for pos, neg in zip(self.positive, self.negative, strict=True)]
            self._contexts[key] = pack_region_contexts(per_region, rows, global_context.device, global_context.dtype)
        regions, mask, tokens = self._contexts[key]
        self._layouts[layer] = ContextLayout(global_context.shape[1], tokens, mask)
        self._context_keys[layer] = key
        if sampling is not None and layer in self._attn2:
            return global_context
        return torch.cat([global_context, regions], dim=1)

    def region_kv(self, layer: int, sampling: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cross-attention keys and values of the regions' contexts (``[B, R * T, D]``, with the
        regions' LoRAs on to_k/to_v), projected once per sampling (``sampling``: its sigmas; :meth:`new_sampling`
        empties the cache when one starts; the weights do not change within one) and layer: the contexts are
        the same in every step. A linear layer's rows do not depend on each other, so they equal the region
        rows of the projected concatenation."""
        key = self._context_keys[layer]
        cached = self._region_kv.get(key)
        if cached is None or cached[0] is not sampling:
            attn2, regions = self._attn2[layer], self._contexts[key][0]
            self._projecting_regions = True
            try:
                cached = (sampling, attn2.to_k(regions), attn2.to_v(regions))
            finally:
                self._projecting_regions = False
            self._region_kv[key] = cached
        return cached[1], cached[2]

    def layout(self, layer: int | None) -> ContextLayout | None:
        return self._layouts.get(layer) if layer is not None else None

    # ---- region LoRAs
    def _lora_layers(self, base: Any, regions: Sequence[Region]) -> list[tuple]:
        per_module: dict[str, dict[int, tuple]] = defaultdict(dict)
        sources = {}
        for i, region in enumerate(regions):
            if region.model is not None:
                sources[i] = _source(base, i, region)
                for path, pair in region_factors(base, region.model, sources[i]).items():
                    per_module[path][i] = pair
        unet = base.model.diffusion_model
        layers = []  # (module, bank, kind, the ResNet block of an "emb" layer, its cross-attention layer)
        for path, pairs in sorted(per_module.items()):
            module = unet.get_submodule(path)
            try:
                kind = _lora_kind(path, module)
            except LoRAFormatError as e:
                raise LoRAFormatError(f"{', '.join(sources[i] for i in pairs)}: {e}") from None
            block = unet.get_submodule(path[:-len(".emb_layers.1")]) if kind == "emb" else None
            layer = self.family.layer_of_weight(f"{_UNET}{path}.weight") if self.family is not None else None
            layers.append((module, LowRankBank(pairs), kind, block, layer))
        return layers

    def _hook(self, module: torch.nn.Module, bank: LowRankBank, kind: str, layer: int | None):
        def active(present: frozenset) -> bool:
            return not present.isdisjoint(bank.regions)

        def tokens(_m, args, out):
            x = args[0]
            w, present = self.lora_weights(*feature_hw_for_tokens(x.shape[-2], *self._latent_hw), x.device)
            if not active(present):
                return out
            return bank.add_up(bank.project(x, w), out)

        def context(_m, args, out):
            x, layout = args[0], self.layout(layer)
            if layer is None or layout is None:
                return out
            if self._projecting_regions:  # region_kv: the regions' contexts alone
                start = 0
            elif x.shape[-2] == layout.total_tokens(len(self)):  # the concatenated context
                start = layout.global_tokens
            else:
                return out  # not the regional attention's layout (or the global context alone)
            # the regions' part of the context is the packed one of this layer (self.context), the same in
            # every step: its delta is computed once and added into the output's region rows
            key = (id(bank), self._context_keys[layer])
            if key not in self._context_deltas:
                t = layout.region_tokens
                self._context_deltas[key] = bank.segments(self._contexts[key[1]][0],
                                                          {r: slice(r * t, (r + 1) * t) for r in bank.regions})
            if out.dtype == x.dtype:
                out[..., start:, :].add_(self._context_deltas[key])
                return out
            return torch.cat([out[..., :start, :], out[..., start:, :] + self._context_deltas[key]], dim=-2)

        def conv(m, args, out):
            w, present = self.lora_weights(out.shape[-2], out.shape[-1], out.device)
            if not active(present):
                return out
            return out.add_(bank.conv(args[0], w, m.stride, m.padding, m.dilation, (out.shape[-2], out.shape[-1])))

        def emb(_m, args, out):
            fh, fw = self._block_hw[id(module)]
            w, present = self.lora_weights(fh, fw, out.device)
            if not active(present):
                return out
            return out[:, :, None, None] + bank.broadcast(args[0], w).reshape(out.shape[0], out.shape[1], fh, fw)

        return {"tokens": tokens, "context": context, "conv": conv, "emb": emb}[kind]

    def _block_size_hook(self, key: int):
        def remember(_m, args):
            self._block_hw[key] = tuple(args[0].shape[-2:])
        return remember

    # ---- the DIFFUSION_MODEL wrapper
    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        self._latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        self._layouts.clear()
        if control and bool((self.control_strengths != 1.0).any()):
            control = {kind: [None if r is None else r * self.control_weights(r.shape[-2], r.shape[-1], r.device)
                              .to(r.dtype) for r in residuals] for kind, residuals in control.items()}
        handles = []
        try:
            for module, bank, kind, block, layer in self.lora_layers:
                if block is not None:  # the ResNet block's feature size, seen just before its time embedding
                    handles.append(block.register_forward_pre_hook(self._block_size_hook(id(module))))
                handles.append(module.register_forward_hook(self._hook(module, bank, kind, layer)))
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()


def _layer_of(stack: torch.Tensor, layer: int) -> torch.Tensor:
    return stack[:, layer if stack.shape[1] > 1 else 0]


# --------------------------------------------------------------------------- ComfyUI's patches

class RegionalAttn2Patch(LayerwiseAttn2Patch):
    """attn2_patch: the global layer context, then every region's context, concatenated along the tokens."""

    def __init__(self, run: RegionalSampling):
        assert run.family is not None  # install_regions gives the run the model's family
        super().__init__(run.family)
        self.run = run

    def __call__(self, n, context, value, extra_options):
        n, ctx, _ = super().__call__(n, context, value, extra_options)
        layer = self.layer(extra_options)
        if layer is None or not len(self.run):
            return n, ctx, ctx
        full = self.run.context(layer, ctx, list(extra_options.get("cond_or_uncond", [0])),
                                extra_options.get("sample_sigmas"))
        return n, full, full

    def to(self, device_or_dtype):
        self.run.to(device_or_dtype)
        return self


class RegionalAttn2Replace:
    """attn2 replace of one layer: :func:`fusion.regions.attention.regional_attention` on the concatenated
    k/v. ``previous`` is the attn2 replace another node had installed on this block (e.g. an IPAdapter): it
    computes the global attention ``h`` (given the global context's k/v only), so its effect is kept where no
    region covers a pixel and blended like ``h`` inside regions."""

    def __init__(self, run: RegionalSampling, layer: int, previous=None):
        self.run, self.layer, self.previous = run, layer, previous

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}

        def attention(q_, k_, v_, heads_, mask=None):
            return optimized_attention(q_, k_, v_, heads_, mask=mask, **kwargs)

        def global_attention(q_, k_, v_, heads_):
            if self.previous is not None:
                return self.previous(q_, k_, v_, extra_options)
            return optimized_attention(q_, k_, v_, heads_, **kwargs)

        layout = self.run.layout(self.layer)
        sampling = extra_options.get("sample_sigmas")
        if layout is not None and k.shape[1] == layout.global_tokens and sampling is not None \
                and self.layer in self.run._attn2:  # the patch passed the global context alone (context)
            kr, vr = self.run.region_kv(self.layer, sampling)
            k, v = torch.cat([k, kr.to(k.dtype)], dim=1), torch.cat([v, vr.to(v.dtype)], dim=1)
        if layout is None or k.shape[1] != layout.total_tokens(len(self.run)):
            return global_attention(q, k, v, heads)
        n_tok = q.shape[1]
        shape = extra_options.get("activations_shape")
        fh, fw = (int(shape[-2]), int(shape[-1])) if shape else (0, 0)
        if fh * fw != n_tok:  # not reported, or not this layer's size: from the token count
            fh, fw = feature_hw_for_tokens(n_tok, *self.run.masks[0].shape)
        return regional_attention(q, k, v, heads, layout, len(self.run), self.run.region_rows(fh, fw, q.device),
                                  attention, global_attention)

    def to(self, device_or_dtype):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self


def check_concepts(model: Any, regions: Sequence[Region]) -> None:
    """Refuse regions whose prompts use concepts neither the sampling MODEL nor the region's own MODEL
    was loaded with (e.g. encoded with the CLIP of another Load ED-LoRA chain)."""
    loaded = set(model.model_options.get(CONCEPTS_USED_KEY, ()))
    for i, region in enumerate(regions):
        own = set(region.model.model_options.get(CONCEPTS_USED_KEY, ())) if region.model is not None else set()
        for what, cond in (("prompt", region.positive), ("negative prompt", region.negative)):
            used = {name for entry in cond for name in entry[1].get(CONCEPTS_USED_KEY, ())}
            missing = used - loaded - own
            if missing:
                raise RegionError(f"{region_name(i, region.label)}: its {what} was encoded with ED-LoRA(s) "
                                  f"{', '.join(sorted(missing))} that neither the sampler's MODEL nor the region's "
                                  f"model was loaded with — encode each region with the CLIP and concepts of the "
                                  f"chain whose MODEL samples it")


def _chained_replaces(options: dict, run: RegionalSampling, family: ModelFamily) -> dict:
    """The regional attn2 replace for each cross-attention layer, chained to a replace that another node
    installed there; keyed as ComfyUI looks them up first, ``(block, number, block_index)``."""
    installed = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    out = {}
    for layer, (kind, number, index) in enumerate(family.layers):
        previous = installed.get((kind, number, index), installed.get((kind, number)))
        if isinstance(previous, RegionalAttn2Replace):
            raise RegionError(f"the MODEL already carries Mix-of-Show's regional attention on {kind} block {number} "
                              f"(regions installed twice?); sample from the model without regions")
        out[(kind, number, index)] = RegionalAttn2Replace(run, layer, previous)
    return out


def install_regions(model: Any, regions: Sequence[Region] | None) -> Any:
    """A patched clone of ``model`` (a ModelPatcher) for ``regions``; ``model`` itself when there are none.

    The clone's options are copied where they change (never edited in place: newer ComfyUI does not
    deep-copy them on clone)."""
    regions = tuple(regions or ())
    if not regions:
        return model
    check_concepts(model, regions)
    family = model_family(model, "regional sampling")
    run = RegionalSampling(regions, model, family)
    replaces = _chained_replaces(model.model_options, run, family)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, REGIONAL_WRAPPER, run.new_sampling)
    if run.needs_wrapper:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, REGIONAL_WRAPPER, run)
    install_layerwise(clone)  # wrappers for layer-wise conds (idempotent)
    to = dict(clone.model_options.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["attn2_patch"] = [p for p in patches.get("attn2_patch", []) if not isinstance(p, LayerwiseAttn2Patch)]
    patches["attn2_patch"].append(RegionalAttn2Patch(run))
    to["patches"] = patches
    patches_replace = dict(to.get("patches_replace", {}))
    patches_replace["attn2"] = {**patches_replace.get("attn2", {}), **replaces}
    to["patches_replace"] = patches_replace
    clone.model_options = {**clone.model_options, "transformer_options": to}
    return clone
