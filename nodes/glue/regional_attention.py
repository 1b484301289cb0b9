"""The regional attention inside ComfyUI's UNet (design §4); see ../shared/reference/comfyui-internals.md §2.

* the regions (masks + each region's positive/negative contexts) travel in
  ``model_options["transformer_options"][REGIONS_KEY]``; ComfyUI hands every transformer_options key to
  the attention patches as ``extra_options``;
* one attn2_patch (:class:`RegionalAttn2Patch`, a :class:`LayerwiseAttn2Patch` so it *replaces* the
  layer-wise patch — the order of separate patches is not guaranteed) picks the global layer-``l``
  context and appends, along the token axis, each region's layer-``l`` context (positive for rows of a
  positive chunk, the region's negative for rows of a negative chunk), padded with zeros to the longest
  region prompt and masked (:class:`ContextLayout`);
* an attn2 replace patch on the 16 cross-attention blocks splits the projected k/v back into global +
  R region parts, computes ``h`` and the ``h_r`` (one batched call) and blends them with the masks
  resized to the layer's feature map (:func:`fusion.regional.blend_regions`). Box regions use the
  reference's per-layer box rule, other masks area averaging.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention

from ...fusion.regions.blend import blend_regions
from ...fusion.regions.masks import feature_hw_for_tokens, region_layer_masks
from ..names import CONCEPTS_USED_KEY
from .family import model_family
from .layerwise import LayerwiseAttn2Patch, install_layerwise
from .region_lora import install_region_loras
from .regions import context_stack

REGIONS_KEY = "mixofshow_regions"
_LAYOUT_KEY = "mixofshow_region_layout"  # set by the attn2_patch, read by the replace (same extra_options dict)


class RegionData:
    """What the patches need: the masks ``[R, H, W]`` and each region's positive/negative context stacks.

    Resized masks are cached per (feature size, device)."""

    def __init__(self, regions):
        self.masks = torch.stack([r.mask.to(torch.float32) for r in regions])
        self.boxes = [r.box for r in regions]
        self.positive = [context_stack(list(r.positive), f"region {i} positive") for i, r in enumerate(regions)]
        self.negative = [context_stack(list(r.negative), f"region {i} negative") for i, r in enumerate(regions)]
        self.control_strengths = torch.tensor([float(r.control_strength) for r in regions])
        self.context_layout: ContextLayout | None = None  # of the current layer's context, set by the attn2 patch
        self._cache = {}

    def __len__(self):
        return len(self.positive)

    def __deepcopy__(self, memo):  # immutable for our purposes; never copy the tensors
        return self

    def flat_masks(self, fh: int, fw: int, device) -> torch.Tensor:
        """``[R, fh*fw]`` per-layer masks: the reference box rule for box regions, area averaging else."""
        key = (fh, fw, str(device))
        if key not in self._cache:
            self._cache[key] = region_layer_masks(self.masks, self.boxes, fh, fw).to(device)
        return self._cache[key]

    def control_weights(self, fh: int, fw: int, device) -> torch.Tensor:
        """``[1, 1, fh, fw]`` factor for control residuals: 1 outside regions, the mask-weighted
        average of the covering regions' strengths inside (the same blend as the attention)."""
        key = ("control", fh, fw, str(device))
        if key not in self._cache:
            masks = self.flat_masks(fh, fw, "cpu")
            ones = torch.ones(1, fh * fw, 1)
            per_region = self.control_strengths[:, None, None, None].expand(-1, 1, fh * fw, 1)
            self._cache[key] = blend_regions(ones, per_region, masks).reshape(1, 1, fh, fw).to(device)
        return self._cache[key]


def _layer_context(stack: torch.Tensor, layer: int) -> torch.Tensor:
    return stack[:, layer if stack.shape[1] > 1 else 0]


@dataclass(frozen=True)
class ContextLayout:
    """How the regional attn2 patch laid out one layer's context: the global context's own tokens, then
    each region's context padded with zeros to ``region_tokens``; ``mask`` (``[R*B, 1, region_tokens]``,
    additive, region-major) hides the padding from the attention, or is None when nothing was padded.
    (Padding to the longest prompt with a mask keeps the cost bounded: repeating every context to the
    least common multiple of the lengths grows without bound, e.g. 210 chunks for 2/3/5/7.)"""
    global_tokens: int
    region_tokens: int
    mask: torch.Tensor | None

    def region_slice(self, region: int) -> slice:
        start = self.global_tokens + region * self.region_tokens
        return slice(start, start + self.region_tokens)


class RegionalAttn2Patch(LayerwiseAttn2Patch):
    """attn2_patch: global layer context, then every region's context, concatenated along the tokens."""

    def __call__(self, n, context, value, extra_options):
        n, ctx, _ = super().__call__(n, context, value, extra_options)
        data = extra_options.get(REGIONS_KEY)
        layer = self.layer(extra_options)
        extra_options.pop(_LAYOUT_KEY, None)
        if data is None or layer is None or not len(data):
            return n, ctx, ctx
        chunks = list(extra_options.get("cond_or_uncond", [0]))
        b0 = ctx.shape[0] // len(chunks)
        pieces = [[_layer_context(neg if cu == 1 else pos, layer).to(device=ctx.device, dtype=ctx.dtype)
                   for cu in chunks] for pos, neg in zip(data.positive, data.negative)]  # per region, per chunk
        tokens = max(c.shape[1] for region in pieces for c in region)
        parts, valid = [ctx], []
        for region in pieces:
            parts.append(torch.cat([F.pad(c, (0, 0, 0, tokens - c.shape[1])).expand(b0, -1, -1) for c in region]))
            valid.append(torch.cat([torch.arange(tokens, device=ctx.device).expand(b0, -1) < c.shape[1]
                                    for c in region]))
        mask = None
        if not all(bool(v.all()) for v in valid):
            hidden = torch.full((), torch.finfo(ctx.dtype).min, dtype=ctx.dtype, device=ctx.device)
            mask = torch.where(torch.cat(valid), torch.zeros((), dtype=ctx.dtype, device=ctx.device), hidden)[:, None]
        layout = ContextLayout(ctx.shape[1], tokens, mask)
        extra_options[_LAYOUT_KEY] = layout
        data.context_layout = layout
        full = torch.cat(parts, dim=1)
        return n, full, full


class RegionalAttn2Replace:
    """attn2 replace: ``blend_regions(h, [h_r], masks)`` from the concatenated k/v.

    ``previous`` is the attn2 replace another node had installed on this block (e.g. an IPAdapter):
    it computes the global attention ``h`` (given the global context's k/v only), so its effect is kept
    where no region covers a pixel and blended like ``h`` inside regions."""

    def __init__(self, previous=None):
        self.previous = previous

    def _attention(self, q, k, v, heads, extra_options, kwargs):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return optimized_attention(q, k, v, heads, **kwargs)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}
        data = extra_options.get(REGIONS_KEY)
        layout = extra_options.get(_LAYOUT_KEY)
        n_regions = len(data) if data is not None else 0
        if layout is None or k.shape[1] != layout.global_tokens + n_regions * layout.region_tokens:
            return self._attention(q, k, v, heads, extra_options, kwargs)
        b, n_tok, _ = q.shape
        g, t = layout.global_tokens, layout.region_tokens
        h = self._attention(q, k[:, :g], v[:, :g], heads, extra_options, kwargs)
        # [B, R*T, D] -> [R*B, T, D], region-major
        kr = k[:, g:].reshape(b, n_regions, t, -1).transpose(0, 1).reshape(n_regions * b, t, -1)
        vr = v[:, g:].reshape(b, n_regions, t, -1).transpose(0, 1).reshape(n_regions * b, t, -1)
        qr = q.repeat(n_regions, 1, 1)
        h_regions = optimized_attention(qr, kr, vr, heads, mask=layout.mask, **kwargs).reshape(n_regions, b, n_tok, -1)
        shape = extra_options.get("activations_shape")
        fh, fw = int(shape[-2]), int(shape[-1])
        if fh * fw != n_tok:
            fh, fw = feature_hw_for_tokens(n_tok, data.masks.shape[1], data.masks.shape[2])
        return blend_regions(h, h_regions, data.flat_masks(fh, fw, q.device))

    def to(self, device_or_dtype):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self


class RegionalControlScale:
    """DIFFUSION_MODEL wrapper: scale every ControlNet/T2I-Adapter residual per pixel by the regions'
    control strengths (core ComfyUI has one strength per ControlNet)."""

    def __init__(self, data: RegionData):
        self.data = data

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if control:
            control = {kind: [None if r is None else r * self.data.control_weights(r.shape[-2], r.shape[-1], r.device)
                              .to(r.dtype) for r in residuals] for kind, residuals in control.items()}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def check_concepts(model, regions) -> None:
    """Refuse regions whose prompts use concepts neither the sampling MODEL nor the region's own MODEL
    was loaded with (e.g. encoded with the CLIP of another Load ED-LoRA chain)."""
    loaded = set(model.model_options.get(CONCEPTS_USED_KEY, ()))
    for i, region in enumerate(regions):
        own = set(region.model.model_options.get(CONCEPTS_USED_KEY, ())) if region.model is not None else set()
        for what, cond in (("prompt", region.positive), ("negative prompt", region.negative)):
            used = {name for entry in cond for name in entry[1].get(CONCEPTS_USED_KEY, ())}
            missing = used - loaded - own
            if missing:
                raise ValueError(f"region {i}: its {what} was encoded with ED-LoRA(s) {', '.join(sorted(missing))} "
                                 f"that neither the sampler's MODEL nor the region's model was loaded with — encode "
                                 f"each region with the CLIP and concepts of the chain whose MODEL samples it")


def _chained_replaces(options: dict, family) -> dict:
    """The regional attn2 replace for each cross-attention layer, chained to a replace that another node
    installed there; keyed as ComfyUI looks them up first, ``(block, number, block_index)``."""
    installed = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    out = {}
    for kind, number, index in family.layers:
        previous = installed.get((kind, number, index), installed.get((kind, number)))
        if isinstance(previous, RegionalAttn2Replace):
            raise ValueError(f"the MODEL already carries Mix-of-Show's regional attention on {kind} block {number} "
                             f"(regions installed twice?); sample from the model without regions")
        out[(kind, number, index)] = RegionalAttn2Replace(previous)
    return out


def install_regions(model, regions):
    """A patched clone of ``model`` (a ModelPatcher) for ``regions``; ``model`` itself when there are none.

    The clone's options are copied where they change (never edited in place: newer ComfyUI does not
    deep-copy them on clone)."""
    regions = tuple(regions or ())
    if not regions:
        return model
    check_concepts(model, regions)
    data = RegionData(regions)
    family = model_family(model, "regional sampling")
    replaces = _chained_replaces(model.model_options, family)
    clone = model.clone()
    if any(r.control_strength != 1.0 for r in regions):
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "mixofshow.regional_control",
                                   RegionalControlScale(data))
    install_region_loras(clone, model, regions, data)
    install_layerwise(clone)  # wrappers for layer-wise conds (idempotent)
    to = dict(clone.model_options.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["attn2_patch"] = [p for p in patches.get("attn2_patch", []) if not isinstance(p, LayerwiseAttn2Patch)]
    patches["attn2_patch"].append(RegionalAttn2Patch(family))
    to["patches"] = patches
    patches_replace = dict(to.get("patches_replace", {}))
    patches_replace["attn2"] = {**patches_replace.get("attn2", {}), **replaces}
    to["patches_replace"] = patches_replace
    to[REGIONS_KEY] = data
    clone.model_options = {**clone.model_options, "transformer_options": to}
    return clone
