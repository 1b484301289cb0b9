"""Every setting of ED-LoRA training, the presets that reproduce the reference configurations, and the pure parts
of setting a concept up: its tokens and their initialisers, the modules that get a LoRA, the LoRA factors' and the
token rows' first values (docs/design.md §14.1, §14.5)."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import TrainingError
from ..families import ModelFamily
from ..files.edlora import MAX_TOKEN_CHARS, TOKEN_PATTERN

TEXT_SCOPES = ("attention", "attention+mlp")
UNET_SCOPES = ("attention", "transformer")
TRAINING_DTYPES = ("auto", "bf16", "fp32")
AUTO_PRESET = "auto"
DEFAULT_RANDOM_SIGMA = 0.017   # the reference's initialiser when none is given
QUIRK_ROW_SIGMA = 0.02          # a grown token table's random rows (the reference's untrained second-encoder rows)
_RANDOM_INIT = re.compile(r"^<rand(?:-([0-9.eE+-]+))?>$")


@dataclass(frozen=True)
class Preset:
    family: str                 # the model family it is for (fusion.families names)
    description: str
    values: Mapping[str, Any]   # node field -> value


# Per text encoder, the fields of the first encoder have no suffix; a later encoder's carry "_<key>" (lr_emb_g for
# the second SDXL encoder, clip_g): see encoder_field.
_COMMON = {"weight_decay": 0.01, "noise_offset": 0.01, "attn_reg_weight": 0.01, "reg_full_identity": False,
           "te_scope": "attention", "unet_scope": "attention", "reference_quirks": False}
PRESETS: dict[str, Preset] = {
    "MoS SD1.5 real": Preset("sd15", "Mix-of-Show's real-person configuration: subject-masked loss", {
        **_COMMON, "resolution": 512, "batch_size": 2, "grad_accum": 2, "repeats": 500,
        "lr_emb": 1e-3, "lr_te": 1e-5, "lr_unet": 1e-4, "rank_te": 4, "rank_unet": 4,
        "emb_norm_threshold": 0.55, "use_mask_loss": True}),
    "MoS SD1.5 anime": Preset("sd15", "Mix-of-Show's anime configuration: the loss covers the whole pasted image", {
        **_COMMON, "resolution": 512, "batch_size": 2, "grad_accum": 2, "repeats": 500,
        "lr_emb": 1e-3, "lr_te": 1e-5, "lr_unet": 1e-4, "rank_te": 4, "rank_unet": 4,
        "emb_norm_threshold": 0.55, "use_mask_loss": False}),
    "CC SDXL": Preset("sdxl", "Concept Conductor's SDXL configuration", {
        **_COMMON, "resolution": 1024, "batch_size": 1, "grad_accum": 1, "repeats": 2000,
        "lr_emb": 1e-3, "lr_emb_g": 5e-4, "lr_te": 1e-5, "lr_te_g": 2e-6, "lr_unet": 5e-5,
        "rank_te": 4, "rank_te_g": 32, "rank_unet": 32,
        "emb_norm_threshold": 0.55, "emb_norm_threshold_g": 1.5, "use_mask_loss": True}),
}
REFERENCE_PRESET = {"sd15": "MoS SD1.5 real", "sdxl": "CC SDXL"}   # what "auto" means per family
PRESET_CHOICES = (AUTO_PRESET, *PRESETS)


@dataclass(frozen=True)
class EncoderSettings:
    """The settings of one text encoder: its concept rows' and its LoRA's learning rates, the LoRA's rank and the
    rows' norm threshold."""
    lr_emb: float
    lr_te: float
    rank_te: int
    emb_norm_threshold: float


@dataclass(frozen=True)
class TrainSettings:
    preset: str
    family: str
    resolution: int              # the square canvas, in pixels
    batch_size: int              # examples per forward pass
    grad_accum: int              # forward passes per optimiser step
    repeats: int                 # draws of each image per epoch (sets the number of steps when steps is 0)
    steps: int                   # optimiser steps; 0 = one epoch
    encoders: tuple[EncoderSettings, ...]   # one per text encoder of the family, in its order
    lr_unet: float
    rank_unet: int
    te_scope: str
    unet_scope: str
    noise_offset: float
    attn_reg_weight: float
    reg_full_identity: bool
    use_mask_loss: bool
    weight_decay: float
    seed: int
    training_dtype: str
    gradient_checkpointing: bool
    reference_quirks: bool

    def metadata(self) -> dict[str, Any]:
        """The settings as plain JSON values (what a saved file records)."""
        return dataclasses.asdict(self)


def encoder_field(name: str, family: ModelFamily, index: int) -> str:
    """The node field of a per-encoder setting: ``lr_emb`` for the first encoder, ``lr_emb_g`` for clip_g."""
    return name if index == 0 else f"{name}_{family.text_encoders[index].name.removeprefix('clip_')}"


def per_encoder_fields(family: ModelFamily) -> list[str]:
    return [encoder_field(f, family, i) for i in range(len(family.text_encoders))
            for f in ("lr_emb", "lr_te", "rank_te", "emb_norm_threshold")]


def resolve_settings(preset: str, family: ModelFamily, overrides: Mapping[str, Any]) -> TrainSettings:
    """The settings of a run: the preset's values (``auto``: the family's reference preset), each replaced by the
    override of the same field that is not None. Raises :class:`TrainingError` for a preset of another family and
    for values out of range, naming the field."""
    name = REFERENCE_PRESET.get(family.name) if preset == AUTO_PRESET else preset
    if name is None:
        raise TrainingError(f"no training preset for {family.label} models yet; choose one of "
                            f"{', '.join(PRESETS)} on a model of its family")
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {preset!r} (choose {', '.join(PRESET_CHOICES)})")
    chosen = PRESETS[name]
    if chosen.family != family.name:
        raise TrainingError(f"preset {name!r} is for {chosen.family.upper()} models; the connected MODEL is "
                            f"{family.label}: choose 'auto' or a preset of its family")
    values = {**chosen.values, **{k: v for k, v in overrides.items() if v is not None}}
    for field in per_encoder_fields(family):
        if field not in values:
            raise TrainingError(f"preset {name!r} has no {field}; set it")
    positive = ("resolution", "batch_size", "grad_accum", "repeats", "rank_unet")
    for field in positive + tuple(f for f in per_encoder_fields(family) if f.startswith("rank_te")):
        if int(values[field]) < 1:
            raise TrainingError(f"{field} must be at least 1 (got {values[field]})")
    for field in ("lr_unet", "noise_offset", "attn_reg_weight", "weight_decay",
                  *(f for f in per_encoder_fields(family) if not f.startswith("rank_te"))):
        if not (math.isfinite(float(values[field])) and float(values[field]) >= 0):
            raise TrainingError(f"{field} must be a finite number >= 0 (got {values[field]})")
    for field, choices in (("te_scope", TEXT_SCOPES), ("unet_scope", UNET_SCOPES),
                           ("training_dtype", TRAINING_DTYPES)):
        if values.get(field, choices[0]) not in choices:
            raise TrainingError(f"{field} must be one of {', '.join(choices)} (got {values[field]!r})")
    if int(values["resolution"]) % 8:
        raise TrainingError(f"resolution must be a multiple of 8 pixels (got {values['resolution']})")
    encoders = tuple(EncoderSettings(float(values[encoder_field("lr_emb", family, i)]),
                                     float(values[encoder_field("lr_te", family, i)]),
                                     int(values[encoder_field("rank_te", family, i)]),
                                     float(values[encoder_field("emb_norm_threshold", family, i)]))
                     for i in range(len(family.text_encoders)))
    return TrainSettings(
        preset=name, family=family.name, resolution=int(values["resolution"]), batch_size=int(values["batch_size"]),
        grad_accum=int(values["grad_accum"]), repeats=int(values["repeats"]), steps=max(0, int(values.get("steps", 0))),
        encoders=encoders, lr_unet=float(values["lr_unet"]), rank_unet=int(values["rank_unet"]),
        te_scope=str(values["te_scope"]), unet_scope=str(values["unet_scope"]),
        noise_offset=float(values["noise_offset"]), attn_reg_weight=float(values["attn_reg_weight"]),
        reg_full_identity=bool(values["reg_full_identity"]), use_mask_loss=bool(values["use_mask_loss"]),
        weight_decay=float(values["weight_decay"]), seed=int(values.get("seed", 0)),
        training_dtype=str(values.get("training_dtype", "auto")),
        gradient_checkpointing=bool(values.get("gradient_checkpointing", False)),
        reference_quirks=bool(values["reference_quirks"]))


# ---- size conditioning (families whose UNet takes it, e.g. SDXL's time ids)

QUIRK_SIZE_HEIGHT = 32   # the reference SDXL trainer's "height", read from the wrong axis of the latent


def size_conditioning(resolution: int, reference_quirks: bool) -> dict[str, int]:
    """The size arguments of the model's ``encode_adm`` for a square training canvas: original and target size
    ``(resolution, resolution)``, no crop. With ``reference_quirks`` the reference's SDXL defect: the heights are
    32, i.e. the time ids ``(32, W, 0, 0, 32, W)``."""
    height = QUIRK_SIZE_HEIGHT if reference_quirks else resolution
    return {"width": resolution, "height": height, "crop_w": 0, "crop_h": 0, "target_width": resolution,
            "target_height": height}


# ---- the concept's tokens and their initialisers

def parse_concept_tokens(text: str) -> tuple[str, ...]:
    """``"<c1>+<c2>"`` or ``"<c1> <c2>"`` -> ``("<c1>", "<c2>")``; each token once, each like ``<name>``."""
    tokens = tuple(t for t in re.split(r"[+\s]+", text.strip()) if t)
    if not tokens:
        raise TrainingError("concept_tokens is empty: name the new tokens, e.g. <hina1>+<hina2>")
    for token in tokens:
        if len(token) > MAX_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
            raise TrainingError(f"concept token {token[:60]!r} must look like <name> (angle brackets, no spaces, at "
                                f"most {MAX_TOKEN_CHARS} characters)")
        if tokens.count(token) > 1:
            raise TrainingError(f"concept token {token} is given twice in concept_tokens")
    return tokens


@dataclass(frozen=True)
class Initialiser:
    """How a concept token's rows start: ``sigma`` > 0 draws one random vector N(0, σ²); else ``word``'s row in the
    token table (a class word such as ``man``, which must be one token)."""
    word: str = ""
    sigma: float = 0.0

    def describe(self) -> str:
        return f"<rand-{self.sigma:g}>" if self.sigma else self.word


def parse_initialisers(text: str, tokens: tuple[str, ...]) -> tuple[Initialiser, ...]:
    """``"<rand-0.013>+man"``: one initialiser per concept token (``<rand>`` = ``<rand-0.017>``); empty = random
    for every token."""
    parts = [p for p in re.split(r"\s*\+\s*", text.strip()) if p]
    if not parts:
        return tuple(Initialiser(sigma=DEFAULT_RANDOM_SIGMA) for _ in tokens)
    if len(parts) != len(tokens):
        raise TrainingError(f"init_tokens has {len(parts)} initialiser{'s' * (len(parts) != 1)} ({text.strip()!r}) "
                            f"for {len(tokens)} concept token{'s' * (len(tokens) != 1)} ({'+'.join(tokens)}): give "
                            f"one per token, joined with +, e.g. <rand-0.013>+man")
    out = []
    for part in parts:
        m = _RANDOM_INIT.match(part)
        if m:
            try:
                sigma = float(m[1]) if m[1] else DEFAULT_RANDOM_SIGMA
            except ValueError:
                sigma = -1.0
            if not (math.isfinite(sigma) and sigma > 0):
                raise TrainingError(f"init token {part!r}: the random initialiser is <rand-σ> with σ > 0, e.g. "
                                    f"<rand-0.013>")
            out.append(Initialiser(sigma=sigma))
        elif part.startswith("<") or " " in part:
            raise TrainingError(f"init token {part!r} is neither <rand-σ> nor one class word (e.g. man, girl, dog)")
        else:
            out.append(Initialiser(word=part))
    return tuple(out)


def initial_rows(init: Initialiser, layers: int, width: int, word_row: Tensor | None,
                 generator: torch.Generator) -> Tensor:
    """A token's first table ``[layers, 1, width]``: every layer the same vector — one random N(0, σ²) draw, or the
    class word's row ``word_row``."""
    if init.sigma:
        vector = torch.randn(width, generator=generator) * init.sigma
    else:
        if word_row is None:
            raise TrainingError(f"init token {init.word!r} needs its row in the token table")
        vector = word_row.detach().float().cpu()
    return vector.reshape(1, 1, width).repeat(layers, 1, 1)


def quirk_rows(layers: int, width: int, generator: torch.Generator) -> Tensor:
    """The reference's rows of its second SDXL encoder: never initialised, so each layer's row is a different
    random draw N(0, 0.02²), as a grown token table starts."""
    return torch.randn((layers, 1, width), generator=generator) * QUIRK_ROW_SIGMA


# ---- LoRA modules and factors

def unet_lora_modules(family: ModelFamily, scope: str) -> list[str]:
    """The UNet modules (diffusers names) that get a LoRA: every attention projection of every transformer block
    (``attention``); with ``transformer`` also the feed-forward and each SpatialTransformer's proj_in/proj_out."""
    names = []
    for t in family.transformers:
        for j in range(t.depth):
            block = f"{t.diffusers}.transformer_blocks.{j}"
            names += [f"{block}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
            if scope == "transformer":
                names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
        if scope == "transformer":
            names += [f"{t.diffusers}.proj_in", f"{t.diffusers}.proj_out"]
    return names


def text_lora_modules(layers: int, scope: str) -> list[str]:
    """The text-encoder modules (transformers names) that get a LoRA, for an encoder of ``layers`` layers: the
    attention projections (``attention``), with ``attention+mlp`` also fc1 and fc2."""
    names = []
    for i in range(layers):
        names += [f"text_model.encoder.layers.{i}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
        if scope == "attention+mlp":
            names += [f"text_model.encoder.layers.{i}.mlp.fc1", f"text_model.encoder.layers.{i}.mlp.fc2"]
    return names


def lora_factors(weight_shape: tuple[int, ...], rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A new LoRA on a weight ``[out, in]`` (or a 1×1 conv ``[out, in, 1, 1]``): ``(up, down)`` with ``up = 0``
    and ``down`` ~ U(±1/√in) (Kaiming-uniform with a = √5), float32; conv factors are 4-D."""
    out_features, in_features, *kernel = weight_shape
    if any(k != 1 for k in kernel):
        raise TrainingError(f"a LoRA is trained only on linear and 1x1-conv weights (got {list(weight_shape)})")
    bound = 1.0 / math.sqrt(in_features)
    down = (torch.rand((rank, in_features), generator=generator) * 2 - 1) * bound
    up = torch.zeros((out_features, rank))
    return up.reshape(out_features, rank, *kernel), down.reshape(rank, in_features, *kernel)
