"""The training set of one concept and what each training step draws from it (docs/design.md §14.2).

A training set is images (``[H, W, 3]`` in [0, 1], any sizes), optional subject masks (``[H, W]``, the
image's size) and captions holding ``<TOK>`` where the concept's tokens go. Each step draws examples in
epochs (:class:`ExampleOrder`) and augments each one (:func:`augment`): the reference's resize / crop /
paste rule on a square canvas, with the masks carried along and downsampled to the latent's size. Its
caption is built by :func:`build_caption`: ``<TOK>`` replaced, the comma-separated pieces after the first
``keep_first`` shuffled, then wrapped in a random template. All randomness comes from one
``random.Random`` given by the caller, so a seed fixes everything.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TrainingError

TOKEN_PLACEHOLDER = "<TOK>"

# Caption templates, by what the concept is: "{}" is the caption. Written for this pack (the reference uses
# lists of the same kind).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "human": (
        "a photo of {}", "a close-up photo of {}", "a cropped photo of {}", "a portrait of {}",
        "a picture of {}", "a good photo of {}", "a bright photo of {}", "a dark photo of {}",
        "a blurry photo of {}", "a clean photo of {}", "a nice photo of {}", "a rendering of {}",
        "a snapshot of {}", "an image of {}", "a candid photo of {}", "a full-body photo of {}",
        "a low-resolution photo of {}", "a high-quality photo of {}", "a sharp photo of {}",
    ),
    "object": (
        "a photo of {}", "a rendering of {}", "a cropped photo of {}", "a photo of the small {}",
        "a photo of the large {}", "a close-up photo of {}", "a bright photo of {}", "a dark photo of {}",
        "a blurry photo of {}", "a clean photo of {}", "a good photo of {}", "a photo of one {}",
        "a picture of {}", "an image of {}", "a snapshot of {}", "a photo of a nice {}",
        "a photo of a weird {}", "a photo of a cool {}", "a photo of a dirty {}", "a photo of a shiny {}",
        "a low-resolution photo of {}", "a high-quality photo of {}", "a detailed photo of {}",
        "a photo of {} on a table", "a photo of {} in the sun", "a photo of {} indoors", "a photo of {} outdoors",
    ),
    "style": (
        "a painting in the style of {}", "a picture in the style of {}", "an illustration in the style of {}",
        "a drawing in the style of {}", "a rendering in the style of {}", "a sketch in the style of {}",
        "art in the style of {}", "a poster in the style of {}", "a portrait in the style of {}",
        "a landscape in the style of {}", "a still life in the style of {}", "a scene in the style of {}",
        "a cropped painting in the style of {}", "a close-up painting in the style of {}",
        "a bright painting in the style of {}", "a dark painting in the style of {}",
        "a small painting in the style of {}", "a large painting in the style of {}", "{} style artwork",
    ),
    "none": ("{}",),
}


@dataclass(frozen=True)
class TrainingExample:
    image: Tensor            # [3, H, W] float32 in [0, 1]
    mask: Tensor | None      # [H, W] float32 in [0, 1], the subject
    caption: str             # with <TOK> where the concept goes


@dataclass(frozen=True)
class TrainingSet:
    """What the training-set node passes on (socket type ``EDLORA_TRAINSET``): nothing is encoded yet."""
    examples: tuple[TrainingExample, ...]
    templates: str = "human"
    keep_first: int = 1
    crop_p: float = 0.5

    @property
    def has_masks(self) -> bool:
        return self.examples[0].mask is not None

    def describe(self) -> str:
        sizes = sorted({(e.image.shape[2], e.image.shape[1]) for e in self.examples})
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        return (f"{len(self.examples)} image{'s' * (len(self.examples) != 1)} ({shown}), "
                f"{'with' if self.has_masks else 'without'} masks, templates: {self.templates}")


def make_training_set(images: Sequence[Tensor], masks: Sequence[Tensor] | None = None,
                      captions: Sequence[str] | None = None, templates: str = "human", keep_first: int = 1,
                      crop_p: float = 0.5) -> TrainingSet:
    """Check and hold a training set. ``images`` are ``[H, W, C]`` (C >= 3, the first three are RGB) in [0, 1];
    ``masks`` ``[H, W]`` of the same sizes, one per image, or None; ``captions`` one per image (an empty one
    becomes ``<TOK>``), or None. Raises :class:`TrainingError` naming the image (counted from 1)."""
    if not images:
        raise TrainingError("the training set has no images: connect at least one IMAGE")
    if templates not in TEMPLATES:
        raise TrainingError(f"unknown caption templates {templates!r} (choose {', '.join(TEMPLATES)})")
    if not 0.0 <= crop_p <= 1.0 or keep_first < 0:
        raise TrainingError(f"crop_p must be in [0, 1] and keep_first >= 0 (got {crop_p}, {keep_first})")
    if masks is not None and len(masks) != len(images):
        raise TrainingError(f"{len(masks)} masks for {len(images)} images: give one mask per image, or none")
    if captions is not None and len(captions) != len(images):
        raise TrainingError(f"{len(captions)} captions for {len(images)} images: give one caption per image "
                            f"(one per line), or none")
    examples = []
    for i, image in enumerate(images):
        where = f"image {i + 1}"
        if image.ndim != 3 or image.shape[-1] < 3 or min(image.shape[:2]) < 1:
            raise TrainingError(f"{where} is {list(image.shape)}; expected [height, width, 3]")
        pixels = image[..., :3].float()
        if not torch.isfinite(pixels).all():
            raise TrainingError(f"{where} has NaN or infinite pixels")
        mask = None
        if masks is not None:
            mask = masks[i].float()
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if tuple(mask.shape) != tuple(image.shape[:2]):
                raise TrainingError(f"the mask of {where} is {mask.shape[-1]}x{mask.shape[-2]}; the image is "
                                    f"{image.shape[1]}x{image.shape[0]} (width x height): masks must have their "
                                    f"image's size")
            if not torch.isfinite(mask).all():
                raise TrainingError(f"the mask of {where} has NaN or infinite values")
            mask = mask.clamp(0, 1)
            if not bool((mask > 0).any()):
                raise TrainingError(f"the mask of {where} is empty (all zero): it must cover the subject")
        caption = " ".join((captions[i] if captions is not None else "").split()) or TOKEN_PLACEHOLDER
        if TOKEN_PLACEHOLDER not in caption:
            raise TrainingError(f"the caption of {where} ({caption[:80]!r}) has no {TOKEN_PLACEHOLDER}: write "
                                f"{TOKEN_PLACEHOLDER} where the concept's tokens go (e.g. 'a {TOKEN_PLACEHOLDER} "
                                f"in a red coat')")
        examples.append(TrainingExample(pixels.permute(2, 0, 1).contiguous(), mask, caption))
    return TrainingSet(tuple(examples), templates, keep_first, crop_p)


@dataclass(frozen=True)
class Augmented:
    """One example as a training step sees it."""
    pixels: Tensor              # [3, S, S] in [0, 1], black outside the pasted image (the VAE maps it to [-1, 1])
    image_mask: Tensor          # [S/f, S/f]: where the pasted image is, at the latent's size
    subject_mask: Tensor | None  # [S/f, S/f]: the subject, at the latent's size


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """[C, H, W] -> [C, height, width], bilinear with antialiasing when shrinking."""
    if tuple(x.shape[1:]) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def augment(example: TrainingExample, size: int, crop_p: float, latent_scale: int, rng: random.Random) -> Augmented:
    """The reference's resize / crop / paste rule on a ``size`` x ``size`` canvas (docs/design.md §14.2):

    1. scale so the short edge is ``size``;
    2. with probability ``crop_p`` a portrait image keeps its top part, of a random height between its width and
       its height; otherwise a random ``size`` x ``size`` crop;
    3. scale so the long edge is at most ``size``;
    4. paste at a random offset on a black canvas; the image mask is 1 on the pasted rectangle.

    The subject mask goes through the same steps. Both masks are then resized to the latent's size
    (``size / latent_scale``) bilinearly, so their edges are soft (as in the reference). Random draws, in order:
    ``rng.random()`` (the crop kind), the crop (``randint`` of the kept height, or of top then left), the paste
    offset (top, then left)."""
    image, mask = example.image, example.mask
    layers = image if mask is None else torch.cat([image, mask[None]])
    h, w = layers.shape[1:]
    scale = size / min(h, w)
    h, w = max(size, round(h * scale)), max(size, round(w * scale))
    layers = _resize(layers, h, w)
    if rng.random() < crop_p and h > w:
        layers = layers[:, :rng.randint(w, h)]
    else:
        top = rng.randint(0, h - size)
        left = rng.randint(0, w - size)
        layers = layers[:, top:top + size, left:left + size]
    h, w = layers.shape[1:]
    if max(h, w) > size:
        scale = size / max(h, w)
        h, w = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        layers = _resize(layers, h, w)
    top, left = rng.randint(0, size - h), rng.randint(0, size - w)
    canvas = torch.zeros((layers.shape[0] + 1, size, size))
    canvas[:-1, top:top + h, left:left + w] = layers
    canvas[-1, top:top + h, left:left + w] = 1.0
    latent = size // latent_scale
    masks = F.interpolate(canvas[None, 3:], size=(latent, latent), mode="bilinear", align_corners=False)[0]
    return Augmented(pixels=canvas[:3].clamp(0, 1), image_mask=masks[-1],
                     subject_mask=masks[0] if mask is not None else None)


def build_caption(caption: str, concept_words: str, keep_first: int, templates: str, rng: random.Random) -> str:
    """``<TOK>`` -> the concept's tokens (``"<c1> <c2>"``), runs of spaces collapsed; the comma-separated
    pieces after the first ``keep_first`` shuffled (``rng.shuffle``) and joined with ``", "``; then wrapped
    in a template drawn with ``rng.choice``."""
    text = " ".join(caption.replace(TOKEN_PLACEHOLDER, concept_words).split())
    pieces = [p.strip() for p in text.split(",")]
    rest = pieces[keep_first:]
    rng.shuffle(rest)
    text = ", ".join(p for p in pieces[:keep_first] + rest if p)
    return rng.choice(TEMPLATES[templates]).format(text)


class ExampleOrder:
    """The order in which examples are drawn: epochs of ``count * repeats`` draws (each example ``repeats``
    times) in a random order, cut into batches; a batch never spans two epochs (the remainder of an epoch is
    dropped, like a data loader with ``drop_last``)."""

    def __init__(self, count: int, repeats: int, rng: random.Random) -> None:
        if count < 1 or repeats < 1:
            raise TrainingError(f"an epoch needs at least one example and one repeat (got {count}, {repeats})")
        self.count, self.repeats, self.rng = count, repeats, rng
        self._epoch: list[int] = []

    def batch(self, size: int) -> list[int]:
        if size > self.count * self.repeats:
            raise TrainingError(f"a batch of {size} is larger than an epoch ({self.count} images x {self.repeats} "
                                f"repeats)")
        if len(self._epoch) < size:
            self._epoch = [i % self.count for i in range(self.count * self.repeats)]
            self.rng.shuffle(self._epoch)
        taken, self._epoch = self._epoch[:size], self._epoch[size:]
        return taken


def steps_for(count: int, repeats: int, batch: int, accumulation: int) -> int:
    """Optimiser steps of one pass over ``count * repeats`` draws (the reference's schedule length)."""
    return max(1, math.ceil(count * repeats / (batch * accumulation)))
