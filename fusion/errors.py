"""The pack's error classes, in one place. All are ``ValueError`` subclasses (bad input, not a bug):
ComfyUI shows their message on the node that raised it.

Messages name what is wrong and where (the file, key, token, region or concept) and, where one exists,
the fix."""
from __future__ import annotations

MAX_MESSAGE_CHARS = 600  # a whole file error message: a hostile file cannot flood the UI


class EDLoRAError(ValueError):
    """A file is not a usable ED-LoRA (or bundle); the message names the file and what was expected.

    The message is cut to :data:`MAX_MESSAGE_CHARS`, whatever the caller built.
    """

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)


class BundleError(EDLoRAError):
    """A file is not a usable fused bundle (the message names the file)."""


class LoRAFormatError(EDLoRAError):
    """A patch that is not a plain low-rank LoRA where one is needed (regions, fusion)."""


class ModelFamilyError(EDLoRAError):
    """A file, MODEL or CLIP of another model family than the rest (the message names both families)."""


class ConceptError(ValueError):
    """Token collisions and unknown concept tokens."""


class FusionError(ValueError):
    """Concepts that cannot be fused (the message names the concept and the module)."""


class RegionError(ValueError):
    """A region that cannot be sampled (the message names the region, counted from 1 as the editor does)."""


class TrainingError(ValueError):
    """A training set, a setting or a model the ED-LoRA trainer cannot train with; refused before the first step
    (the message names the image counted from 1, the input or the token)."""
