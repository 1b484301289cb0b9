"""Nodes: Region, Box to Mask, Regional Guider, Regional KSampler (design §4).

How the regional attention runs inside ComfyUI's UNet (see ../shared/reference/comfyui-internals.md §2):

* the regions (masks + each region's positive/negative contexts) travel in
  ``model_options["transformer_options"][REGIONS_KEY]``; ComfyUI hands every transformer_options key to
  the attention patches as ``extra_options``;
* one attn2_patch (:class:`RegionalAttn2Patch`, a :class:`LayerwiseAttn2Patch` so it *replaces* the
  layer-wise patch — the order of separate patches is not guaranteed) picks the global layer-``l``
  context and appends, along the token axis, each region's layer-``l`` context (positive for rows of a
  positive chunk, the region's negative for rows of a negative chunk), all padded to one token length
  by repetition (attention over a repeated context is unchanged);
* an attn2 replace patch on the 16 cross-attention blocks splits the projected k/v back into global +
  R region parts, computes ``h`` and the ``h_r`` (one batched call) and blends them with the masks
  resized to the layer's feature map (:func:`fusion.regional.blend_regions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import comfy.samplers
import nodes as comfy_nodes
from comfy.ldm.modules.attention import optimized_attention

from ..fusion.layers import CROSS_ATTN_BLOCKS, LAYER_OF_BLOCK
import comfy.patcher_extension

from ..fusion.concepts import ConceptSet
from ..fusion.regional import blend_regions, box_to_mask, feature_hw_for_tokens, find_pose_boxes, layer_masks
from .layerwise import CONCEPTS_USED_KEY, LayerwiseAttn2Patch, encode_with_concepts, install_layerwise, layerwise_of

CATEGORY = "Mix-of-Show"
REGIONS = "MIXOFSHOW_REGIONS"
REGIONS_KEY = "mixofshow_regions"
_TOKENS_KEY = "mixofshow_region_tokens"  # set by the attn2_patch, read by the replace (same extra_options dict)


@dataclass(frozen=True)
class Region:
    """One region: a ``[H, W]`` float mask in [0, 1], the CONDITIONING lists used inside it, and the
    factor applied to ControlNet/T2I-Adapter residuals inside it."""
    mask: torch.Tensor
    positive: tuple
    negative: tuple
    control_strength: float = 1.0


def _context_stack(conditioning, what: str) -> torch.Tensor:
    """``[1, 16|1, T, C]`` contexts of the first entry of a CONDITIONING."""
    if not conditioning:
        raise ValueError(f"{what}: empty CONDITIONING")
    cond, extra = conditioning[0][0], conditioning[0][1]
    stack = layerwise_of(extra)
    if stack is None:
        stack = cond.unsqueeze(1)
    return stack[:1]


class RegionData:
    """What the patches need: the masks ``[R, H, W]`` and each region's positive/negative context stacks.

    Resized masks are cached per (feature size, device)."""

    def __init__(self, regions):
        self.masks = torch.stack([r.mask.to(torch.float32) for r in regions])
        self.positive = [_context_stack(list(r.positive), f"region {i} positive") for i, r in enumerate(regions)]
        self.negative = [_context_stack(list(r.negative), f"region {i} negative") for i, r in enumerate(regions)]
        self.control_strengths = torch.tensor([float(r.control_strength) for r in regions])
        self._cache = {}

    def __len__(self):
        return len(self.positive)

    def __deepcopy__(self, memo):  # immutable for our purposes; never copy the tensors
        return self

    def flat_masks(self, fh: int, fw: int, device) -> torch.Tensor:
        key = (fh, fw, str(device))
        if key not in self._cache:
            self._cache[key] = layer_masks(self.masks, fh, fw).to(device)
        return self._cache[key]

    def control_weights(self, fh: int, fw: int, device) -> torch.Tensor:
        """``[1, 1, fh, fw]`` factor for control residuals: 1 outside regions, the mask-weighted
        average of the covering regions' strengths inside (the same blend as the attention)."""
        key = ("control", fh, fw, str(device))
        if key not in self._cache:
            masks = layer_masks(self.masks, fh, fw)
            ones = torch.ones(1, fh * fw, 1)
            per_region = self.control_strengths[:, None, None, None].expand(-1, 1, fh * fw, 1)
            self._cache[key] = blend_regions(ones, per_region, masks).reshape(1, 1, fh, fw).to(device)
        return self._cache[key]


def _layer_context(stack: torch.Tensor, layer: int) -> torch.Tensor:
    return stack[:, layer if stack.shape[1] > 1 else 0]


class RegionalAttn2Patch(LayerwiseAttn2Patch):
    """attn2_patch: global layer context, then every region's context, concatenated along the tokens."""

    def __call__(self, n, context, value, extra_options):
        n, ctx, _ = super().__call__(n, context, value, extra_options)
        data = extra_options.get(REGIONS_KEY)
        layer = LAYER_OF_BLOCK.get(tuple(extra_options.get("block", ())))
        extra_options.pop(_TOKENS_KEY, None)
        if data is None or layer is None or not len(data):
            return n, ctx, ctx
        chunks = list(extra_options.get("cond_or_uncond", [0]))
        rows = ctx.shape[0]
        b0 = rows // len(chunks)
        pieces = []  # per region: one [1, T, C] context per chunk
        for pos, neg in zip(data.positive, data.negative):
            pieces.append([_layer_context(neg if cu == 1 else pos, layer).to(device=ctx.device, dtype=ctx.dtype)
                           for cu in chunks])
        tokens = math.lcm(ctx.shape[1], *[c.shape[1] for region in pieces for c in region])

        def pad(t):
            return t if t.shape[1] == tokens else t.repeat(1, tokens // t.shape[1], 1)

        parts = [pad(ctx)] + [torch.cat([pad(c).expand(b0, -1, -1) for c in region]) for region in pieces]
        full = torch.cat(parts, dim=1)
        extra_options[_TOKENS_KEY] = tokens
        return n, full, full


class RegionalAttn2Replace:
    """attn2 replace: ``blend_regions(h, [h_r], masks)`` from the concatenated k/v."""

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}
        data = extra_options.get(REGIONS_KEY)
        tokens = extra_options.get(_TOKENS_KEY)
        if data is None or tokens is None or k.shape[1] != tokens * (len(data) + 1):
            return optimized_attention(q, k, v, heads, **kwargs)
        n_regions = len(data)
        b, n_tok, _ = q.shape
        h = optimized_attention(q, k[:, :tokens], v[:, :tokens], heads, **kwargs)
        # [B, R*T, D] -> [R*B, T, D], region-major
        kr = k[:, tokens:].reshape(b, n_regions, tokens, -1).transpose(0, 1).reshape(n_regions * b, tokens, -1)
        vr = v[:, tokens:].reshape(b, n_regions, tokens, -1).transpose(0, 1).reshape(n_regions * b, tokens, -1)
        qr = q.repeat(n_regions, 1, 1)
        h_regions = optimized_attention(qr, kr, vr, heads, **kwargs).reshape(n_regions, b, n_tok, -1)
        shape = extra_options.get("activations_shape")
        fh, fw = int(shape[-2]), int(shape[-1])
        if fh * fw != n_tok:
            fh, fw = feature_hw_for_tokens(n_tok, data.masks.shape[1], data.masks.shape[2])
        return blend_regions(h, h_regions, data.flat_masks(fh, fw, q.device))

    def to(self, device_or_dtype):
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
    """Refuse regions whose prompts use concepts the MODEL was not loaded with (e.g. encoded with the
    CLIP of another Load ED-LoRA chain)."""
    loaded = set(model.model_options.get(CONCEPTS_USED_KEY, ()))
    for i, region in enumerate(regions):
        for what, cond in (("prompt", region.positive), ("negative prompt", region.negative)):
            used = {name for entry in cond for name in entry[1].get(CONCEPTS_USED_KEY, ())}
            missing = used - loaded
            if missing:
                raise ValueError(f"region {i}: its {what} was encoded with ED-LoRA(s) {', '.join(sorted(missing))} "
                                 f"that the sampler's MODEL was not loaded with — encode every region with the CLIP "
                                 f"and concepts of the same Load ED-LoRA chain as the MODEL")


def install_regions(model, regions):
    """A patched clone of ``model`` (a ModelPatcher) for ``regions``; ``model`` itself when there are none."""
    regions = tuple(regions or ())
    if not regions:
        return model
    check_concepts(model, regions)
    data = RegionData(regions)
    clone = model.clone()
    if any(r.control_strength != 1.0 for r in regions):
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "mixofshow.regional_control",
                                   RegionalControlScale(data))
    install_layerwise(clone)  # wrappers for layer-wise conds (idempotent)
    to = clone.model_options.setdefault("transformer_options", {})
    patches = to.setdefault("patches", {})
    patches["attn2_patch"] = [p for p in patches.get("attn2_patch", []) if not isinstance(p, LayerwiseAttn2Patch)]
    patches["attn2_patch"].append(RegionalAttn2Patch())
    replace = RegionalAttn2Replace()
    for kind, number in CROSS_ATTN_BLOCKS:
        clone.set_model_attn2_replace(replace, kind, number)
    clone.model_options["transformer_options"][REGIONS_KEY] = data
    return clone


# --------------------------------------------------------------------------- nodes


class RegionNode:
    DESCRIPTION = ("One region of a regional (multi-concept) sampling: inside the mask, cross-attention uses this "
                   "region's prompts instead of the global ones (overlaps are averaged, soft masks weight). Chain "
                   "Region nodes to add more regions. Only the first entry of each CONDITIONING is used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REGIONS,)
    RETURN_NAMES = ("regions",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Prompt for this region (Text Encode with Concepts or CLIP Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt for this region."}),
                "mask": ("MASK", {"tooltip": "Where the region is, at any resolution (resized to every layer)."}),
            },
            "optional": {"regions": (REGIONS, {"tooltip": "Regions to add this one to."}),
                         "control_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                                        "tooltip": "Factor on ControlNet/T2I-Adapter residuals "
                                                                   "inside this region (1 = unchanged)."})},
        }

    def add(self, positive, negative, mask, regions=None, control_strength=1.0):
        regions = tuple(regions or ())
        index = len(regions)
        m = mask
        if m.dim() == 3:
            if m.shape[0] != 1:
                raise ValueError(f"region {index}: the mask must be a single mask, got a batch of {m.shape[0]}")
            m = m[0]
        if m.dim() != 2:
            raise ValueError(f"region {index}: the mask must be [H, W] or [1, H, W], got {tuple(mask.shape)}")
        m = m.detach().to("cpu", torch.float32).clamp(0.0, 1.0).clone()
        if not bool((m > 0).any()):
            raise ValueError(f"region {index}: the mask is all zero (the region covers no pixel)")
        _context_stack(positive, f"region {index} positive")
        _context_stack(negative, f"region {index} negative")
        return (regions + (Region(m, tuple(positive), tuple(negative), float(control_strength)),),)


_IMAGE_SIZE = {"default": 512, "min": 8, "max": 16384, "step": 8}
_PIXEL = {"default": 0, "min": 0, "max": 16384, "step": 1}


class BoxMask:
    DESCRIPTION = "A rectangular MASK [1, height, width]: 1 inside [top:bottom, left:right] (pixels), 0 outside."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", _IMAGE_SIZE), "height": ("INT", _IMAGE_SIZE),
                             "top": ("INT", _PIXEL), "left": ("INT", _PIXEL),
                             "bottom": ("INT", dict(_PIXEL, default=512)), "right": ("INT", dict(_PIXEL, default=256))}}

    def make(self, width, height, top, left, bottom, right):
        return (box_to_mask(height, width, top, left, bottom, right)[None],)


class BoxMaskXYWH(BoxMask):
    DESCRIPTION = "A rectangular MASK [1, height, width]: 1 inside the box at (x, y) of size box_width × box_height."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", _IMAGE_SIZE), "height": ("INT", _IMAGE_SIZE),
                             "x": ("INT", _PIXEL), "y": ("INT", _PIXEL),
                             "box_width": ("INT", dict(_PIXEL, default=256, min=1)),
                             "box_height": ("INT", dict(_PIXEL, default=512, min=1))}}

    def make(self, width, height, x, y, box_width, box_height):
        return (box_to_mask(height, width, y, x, y + box_height, x + box_width)[None],)


class PoseBoxMask:
    DESCRIPTION = ("The box around one person of a pose (OpenPose skeleton on black) or line-art condition image, as "
                   "a MASK the size of the image. People are numbered left to right from 0; 'count' says how many "
                   "were found.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "INT")
    RETURN_NAMES = ("mask", "count")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "index": ("INT", {"default": 0, "min": 0, "max": 63,
                                               "tooltip": "Which person, left to right, from 0."}),
                             "margin": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.5, "step": 0.01,
                                                  "tooltip": "Grow the box by this fraction of the image size."})}}

    def find(self, image, index, margin):
        img = image[0] if image.dim() == 4 else image
        boxes = find_pose_boxes(img.detach().cpu(), margin=margin)
        if index >= len(boxes):
            raise ValueError(f"pose box {index} requested but only {len(boxes)} person(s) found in the image")
        height, width = int(img.shape[0]), int(img.shape[1])
        return (box_to_mask(height, width, *boxes[index])[None], len(boxes))


class PoseRegions:
    DESCRIPTION = ("Regions straight from a pose image: one region per OpenPose skeleton found (left to right, "
                   "grown by a margin), each with the prompt on the matching line of 'prompts'. Outputs the "
                   "regions and their masks (to preview).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REGIONS, "MASK")
    RETURN_NAMES = ("regions", "masks")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "OpenPose skeletons on black, the size of the output image."}),
                "clip": ("CLIP",),
                "prompts": ("STRING", {"multiline": True, "tooltip": "One line per person, left to right, e.g. "
                                                                     "'a <potter1> <potter2>, in a robe'."}),
                "negative": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Negative prompt used in every region."}),
                "margin": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.5, "step": 0.01,
                                     "tooltip": "Grow each box by this fraction of the image size."}),
            },
            "optional": {
                "concepts": ("EDLORA_CONCEPTS", {"tooltip": "Concepts the prompts use."}),
                "regions": (REGIONS, {"tooltip": "Regions to add these to."}),
                "control_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            },
        }

    def build(self, image, clip, prompts, negative, margin, concepts=None, regions=None, control_strength=1.0):
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        img = image[0] if image.dim() == 4 else image
        boxes = find_pose_boxes(img.detach().cpu(), margin=margin)
        if len(boxes) != len(lines):
            raise ValueError(f"Pose Regions: found {len(boxes)} skeleton(s) at {boxes} (top, left, bottom, right) but "
                             f"{len(lines)} prompt line(s); write one line per person, left to right")
        concepts = concepts or ConceptSet()
        neg = encode_with_concepts(clip, negative, concepts)
        height, width = int(img.shape[0]), int(img.shape[1])
        masks = [box_to_mask(height, width, *b) for b in boxes]
        for mask, line in zip(masks, lines):
            pos = encode_with_concepts(clip, line, concepts)
            (regions,) = RegionNode().add(pos, neg, mask[None], regions, control_strength)
        return regions, torch.stack(masks)


class RegionalGuider(comfy.samplers.CFGGuider):
    """CFGGuider on a clone of the model patched for the regions."""

    def __init__(self, model_patcher, regions=()):
        super().__init__(install_regions(model_patcher, regions))


class RegionalGuiderNode:
    DESCRIPTION = "A GUIDER (for SamplerCustomAdvanced) that samples with regional prompts."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "regions": (REGIONS,),
                             "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})}}

    def get_guider(self, model, positive, negative, regions, cfg):
        guider = RegionalGuider(model, regions)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class RegionalKSampler:
    DESCRIPTION = ("The stock KSampler plus regions: inside each region's mask, cross-attention uses the region's "
                   "own prompts. Without regions it is exactly the stock KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = comfy_nodes.KSampler.INPUT_TYPES()
        inputs = {"required": dict(inputs["required"]), "optional": {"regions": (REGIONS,)}}
        return inputs

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, regions=None):
        return comfy_nodes.common_ksampler(install_regions(model, regions), seed, steps, cfg, sampler_name, scheduler,
                                           positive, negative, latent_image, denoise=denoise)


NODE_CLASS_MAPPINGS = {
    "MixOfShowRegion": RegionNode,
    "MixOfShowBoxMask": BoxMask,
    "MixOfShowBoxMaskXYWH": BoxMaskXYWH,
    "MixOfShowPoseBoxMask": PoseBoxMask,
    "MixOfShowPoseRegions": PoseRegions,
    "MixOfShowRegionalGuider": RegionalGuiderNode,
    "MixOfShowRegionalSampler": RegionalKSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MixOfShowRegion": "Region (Mix-of-Show)",
    "MixOfShowBoxMask": "Box to Mask (Mix-of-Show)",
    "MixOfShowBoxMaskXYWH": "Box to Mask, x/y/width/height (Mix-of-Show)",
    "MixOfShowPoseBoxMask": "Pose Box to Mask (Mix-of-Show)",
    "MixOfShowPoseRegions": "Regions from Pose (Mix-of-Show)",
    "MixOfShowRegionalGuider": "Regional Guider (Mix-of-Show)",
    "MixOfShowRegionalSampler": "Regional KSampler (Mix-of-Show)",
}
