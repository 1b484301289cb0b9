"""Regions of a regional sampling (docs/design.md §8): what a region is and how one is built and checked.

A region is a mask with its own prompts. Masks made from a box (the box nodes, Regions from Pose,
Pose Box to Mask, the Regions Editor) carry the box itself, so that every layer rasterises it the
way Mix-of-Show does (hard 0/1, :func:`fusion.regions.masks.box_layer_mask`); other masks are area-averaged
to each layer (docs/design.md §8.2-§8.3). A region may also carry a MODEL: its character's LoRA then acts
inside the region only (§10).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import torch

from ...fusion.errors import RegionError
from ...fusion.prompts.concepts import ConceptSet, find_concept_tokens
from ...fusion.regions.editor_boxes import clamp_box, parse_boxes
from ...fusion.regions.masks import box_to_mask
from ...fusion.regions.pose import find_pose_boxes
from ..names import BOX_ATTR, PROMPT_KEY
from .layerwise import encode_with_concepts, layerwise_of
from .previews import regions_preview


@dataclass(frozen=True)
class Region:
    """One region.

    ``mask``: ``[H, W]`` float in [0, 1] (pixels of the output image); ``positive``/``negative``: the
    CONDITIONING lists used inside it; ``control_strength``: factor on ControlNet/T2I-Adapter residuals
    inside it; ``box``: ``(top, left, bottom, right)`` when the mask is exactly that box; ``model``: a
    MODEL whose extra weight patches (beyond the sampling MODEL's) apply inside the region only;
    ``label``: short name for previews."""
    mask: torch.Tensor
    positive: tuple
    negative: tuple
    control_strength: float = 1.0
    box: tuple[int, int, int, int] | None = None
    model: Any = None
    label: str = ""


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    """A ``[1, height, width]`` MASK of a box that remembers the box (see the module text)."""
    mask = box_to_mask(height, width, top, left, bottom, right)[None]
    clamped = (max(0, min(int(top), height)), max(0, min(int(left), width)),
               max(0, min(int(bottom), height)), max(0, min(int(right), width)))
    setattr(mask, BOX_ATTR, clamped)
    return mask


def box_of(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The box a MASK was made from, if it still is exactly that box (an edited mask is not)."""
    box = getattr(mask, BOX_ATTR, None)
    if box is None:
        return None
    m = mask[0] if mask.dim() == 3 else mask
    if m.dim() != 2 or not torch.equal(m.to("cpu", torch.float32), box_to_mask(m.shape[0], m.shape[1], *box)):
        return None
    return box


def context_stack(conditioning, what: str) -> torch.Tensor:
    """``[1, 16|1, T, C]`` contexts of the first entry of a CONDITIONING."""
    if not conditioning:
        raise RegionError(f"{what}: empty CONDITIONING")
    stack = layerwise_of(conditioning[0])
    if stack is None:
        stack = conditioning[0][0].unsqueeze(1)
    return stack[:1]


def prompt_label(conditioning, default: str) -> str:
    """The first concept token of the prompt, else its first words (for previews)."""
    text = ""
    if conditioning:
        text = str(conditioning[0][1].get(PROMPT_KEY, ""))
    tokens = find_concept_tokens(text)
    if tokens:
        return tokens[0]
    words = re.sub(r"[(),:\[\]]", " ", text).split()
    return " ".join(words[:3]) or default


def region_name(index: int, label: str = "") -> str:
    """How messages name the region at ``index`` (from 0 in the chain): counted from 1, as the Regions Editor
    and the previews count, with its label when it has one of its own (``region 2 (<potter1>)``)."""
    name = f"region {index + 1}"
    return f"{name} ({label})" if label and label != name else name


def make_region(positive, negative, mask: torch.Tensor, index: int, control_strength: float = 1.0,
                model=None, label: str = "") -> Region:
    """A validated :class:`Region` (``index``, from 0, names it in errors as :func:`region_name` does): one
    ``[H, W]`` or ``[1, H, W]`` mask, finite, not all zero; both prompts present."""
    label = label or prompt_label(positive, region_name(index))
    where = region_name(index, label)
    m = mask
    if m.dim() == 3:
        if m.shape[0] != 1:
            raise RegionError(f"{where}: the mask must be a single mask, got a batch of {m.shape[0]}")
        m = m[0]
    if m.dim() != 2:
        raise RegionError(f"{where}: the mask must be [H, W] or [1, H, W], got {tuple(mask.shape)}")
    m = m.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise RegionError(f"{where}: the mask has NaN or infinite values")
    m = m.clamp(0.0, 1.0).clone()
    if not bool((m > 0).any()):
        raise RegionError(f"{where}: the mask is all zero (the region covers no pixel)")
    context_stack(positive, f"{where}: positive")
    context_stack(negative, f"{where}: negative")
    return Region(m, tuple(positive), tuple(negative), float(control_strength), box_of(mask), model, label)


def editor_regions(clip, regions_json: str, width: int, height: int, image=None, concepts=None, regions=None):
    """Regions, masks ``[R, H, W]`` and preview IMAGE of the editor's boxes (see RegionsEditor)."""
    boxes = parse_boxes(regions_json)
    if image is not None:
        height, width = int(image.shape[-3]), int(image.shape[-2])
    concepts = concepts or ConceptSet()
    earlier = len(regions or ())
    negatives: dict[str, list] = {}
    masks = []
    for i, box in enumerate(boxes):
        mask = box_mask(height, width, *clamp_box(box, height, width, i))
        positive = encode_with_concepts(clip, box.prompt, concepts, f"Regions Editor box {i + 1}, prompt")
        if box.negative not in negatives:
            negatives[box.negative] = encode_with_concepts(clip, box.negative, concepts,
                                                           f"Regions Editor box {i + 1}, negative prompt")
        regions = add_region(regions, positive, negatives[box.negative], mask, box.control_strength, None,
                             box.label)
        masks.append(mask)
    colors = [None] * earlier + [b.color for b in boxes]
    preview = regions_preview(regions, image, colors, size=(height, width))
    return regions, torch.cat(masks), preview


def add_region(regions, positive, negative, mask, control_strength: float = 1.0, model=None, label: str = ""):
    """``regions`` (a tuple, possibly empty or None) plus one validated region; never mutates."""
    regions = tuple(regions or ())
    return regions + (make_region(positive, negative, mask, len(regions), control_strength, model, label),)


def first_image(image: torch.Tensor) -> torch.Tensor:
    """The first image of an IMAGE batch, ``[H, W, C]`` on the CPU."""
    return (image[0] if image.dim() == 4 else image).detach().cpu()


def pose_regions(image, clip, prompts: str, negative: str, margin: float, concepts=None, regions=None,
                 control_strength: float = 1.0):
    """One region per OpenPose skeleton (left to right), prompt line ``i`` for person ``i``;
    returns (regions, masks ``[R, H, W]``)."""
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    img = first_image(image)
    boxes = find_pose_boxes(img, margin=margin,
                            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
    if len(boxes) != len(lines):
        raise ValueError(f"Pose Regions: found {len(boxes)} skeleton(s) at {boxes} (top, left, bottom, right) but "
                         f"{len(lines)} prompt line(s); write one line per person, left to right")
    concepts = concepts or ConceptSet()
    neg = encode_with_concepts(clip, negative, concepts, "Regions from Pose, input 'negative'")
    height, width = int(img.shape[0]), int(img.shape[1])
    masks = [box_mask(height, width, *b) for b in boxes]
    for n, (mask, line) in enumerate(zip(masks, lines, strict=True), start=1):
        where = f"Regions from Pose, input 'prompts' (the line of person {n})"
        regions = add_region(regions, encode_with_concepts(clip, line, concepts, where), neg, mask, control_strength)
    return regions, torch.cat(masks)


def pose_box_mask(image, index: int, margin: float) -> tuple:
    """The box MASK of the ``index``-th skeleton (left to right, from 0) and how many were found."""
    img = first_image(image)
    boxes = find_pose_boxes(img, margin=margin,
                            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
    if index >= len(boxes):
        nth = index + 1
        suffix = "th" if 10 <= nth % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(nth % 10, "th")
        found = "1 person was" if len(boxes) == 1 else f"{len(boxes)} people were"
        raise RegionError(f"Pose Box to Mask: index {index} is the {nth}{suffix} person from the left, but only "
                          f"{found} found in the image")
    return box_mask(int(img.shape[0]), int(img.shape[1]), *boxes[index]), len(boxes)
