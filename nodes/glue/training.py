"""ED-LoRA training inside ComfyUI (docs/design.md §14): one concept trained on a MODEL + CLIP + VAE.

What is trained are separate tensors, never the model: the concept's rows (one table per text encoder,
``[tokens, layers, width]``, injected into the token sequences as embeddings, so the CLIP's token table is never
written) and LoRA factors on the text encoders' and the UNet's linears, added to those modules' outputs by
forward hooks that live for the training only. Each step:

1. draws a batch (``fusion.train.dataset``), encodes the augmented images with the VAE's encoder and scales them
   as the model does (``process_latent_in``);
2. draws ``t`` and the noise, noises through the model's own schedule (``x = x0 + σ_t ε``; the UNet's input
   ``x / √(σ²+1)`` is DDPM's ``x_t``);
3. encodes every caption once per cross-attention layer (copy ``l`` holds row ``l`` of each concept token),
   through every text encoder of the family, and hands the ``[B, L, T, C]`` stack to the UNet through the pack's
   layer-wise attn2 patch; the UNet is called directly (its raw output is the ε or v prediction);
4. the loss is the masked denoising loss plus the attention regulariser on the maps an attn2 replace captures;
   AdamW steps the three kinds of parameters with their own learning rates, decayed linearly; the norm rule
   freezes an encoder's rows once their mean norm reaches its threshold.

The result goes through the same path as a loaded file (``loading.apply_concept``): clones of the inputs with
ordinary LoRA patches, and a concept set holding the trained concept.

Models a prompt loaded hold *inference tensors* (ComfyUI runs nodes under ``torch.inference_mode``), which
autograd may not save; while training, the modules' parameters are swapped for ordinary tensors that share their
memory (:func:`_autograd_weights`) and swapped back after — no weight is copied or written.
"""
from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management as mm
import comfy.model_sampling
import folder_paths
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from comfy.ldm.modules.attention import optimized_attention

from ...fusion.errors import ModelFamilyError, TrainingError
from ...fusion.families import ModelFamily, TextEncoder
from ...fusion.files.edlora import EDLoRA
from ...fusion.log import log
from ...fusion.prompts.concepts import Concept, ConceptSet
from ...fusion.train import dataset as ds
from ...fusion.train.objectives import LayerMaps, attention_regulariser, attention_with_maps, masked_denoising_loss
from ...fusion.train.schedule import EmbeddingStop, linear_lr, mean_row_norm
from ...fusion.train.settings import (
    Initialiser,
    TrainSettings,
    initial_rows,
    lora_factors,
    parse_concept_tokens,
    parse_initialisers,
    quirk_rows,
    resolve_settings,
    size_conditioning,
    text_lora_modules,
    unet_lora_modules,
)
from ...fusion.versions import TRAINING_VERSION
from ..names import LAYERWISE_KEY
from .family import clip_family, describe_clip, model_family
from .images import read_grey, read_rgb, to_image
from .layerwise import install_layerwise, tokenize_with_concepts
from .loading import apply_concept
from .lora_patch import clip_key_map, model_key_map, unet_lora_name

Progress = Callable[[int, int, str], None]


# ---- the training set from node inputs

NO_FOLDER = "(none)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def training_folders() -> list[str]:
    """The training-set node's folder choices: none, or a folder of ComfyUI's input directory."""
    return [NO_FOLDER, *sorted(folder_paths.get_input_subfolders())]


def read_training_folder(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[str]]:
    """A training set in a folder of ComfyUI's input directory, laid out as Mix-of-Show's datasets are::

        <name>/image/<stem>.png|jpg|jpeg|webp   (or the images right in <name>/)
        <name>/mask/<stem>.png ...               optional: one per image, white = the subject
        <name>/caption/<stem>.txt                optional: the first line is the image's caption (or <stem>.txt
                                                 beside the image)

    Images in name order. Returns (IMAGE rows ``[H, W, 3]``, masks ``[H, W]`` or None, captions; "" = none)."""
    root = os.path.abspath(folder_paths.get_input_directory())
    folder = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([folder, root]) != root or not os.path.isdir(folder):
        raise TrainingError(f"training folder {name!r} is not a folder of ComfyUI's input directory")
    image_dir = os.path.join(folder, "image") if os.path.isdir(os.path.join(folder, "image")) else folder
    stems = sorted((os.path.splitext(f)[0], f) for f in os.listdir(image_dir)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_dir, f)))
    if not stems:
        raise TrainingError(f"training folder {name!r} has no images (.png, .jpg, .jpeg, .webp) in "
                            f"{os.path.relpath(image_dir, root)}")
    mask_dir = os.path.join(folder, "mask")
    images, masks, captions = [], [], []
    for stem, file in stems:
        images.append(to_image(read_rgb(os.path.join(image_dir, file)))[0])
        if os.path.isdir(mask_dir):
            found = [f for f in sorted(os.listdir(mask_dir))
                     if os.path.splitext(f)[0] == stem and f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise TrainingError(f"training folder {name!r}: image {file} has no mask in mask/ (expected "
                                    f"mask/{stem}.png): give every image a mask, or none")
            masks.append(torch.from_numpy(read_grey(os.path.join(mask_dir, found[0]))))
        caption = ""
        for path in (os.path.join(folder, "caption", stem + ".txt"), os.path.join(image_dir, stem + ".txt")):
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    caption = (f.read(4096).strip().splitlines() or [""])[0]
                break
        captions.append(caption)
    return images, masks if os.path.isdir(mask_dir) else None, captions

def training_set_from_inputs(images: Sequence[Any] | None, masks: Sequence[Any] | None,
                             captions: Sequence[str] | None, folder: str, templates: str, keep_first: int,
                             crop_p: float) -> ds.TrainingSet:
    """The training-set node's inputs (lists, as ComfyUI passes list inputs) -> a checked training set.

    Images and masks are batches (``[b, H, W, 3]`` / ``[b, H, W]``) or lists of them; a ``folder`` of the input
    directory (:func:`read_training_folder`) adds its images, masks and captions after them. Typed captions: one
    line for every image, or one line per image (or one text per connected image); none = the folder's own
    captions, else ``<TOK>``."""
    pictures = [img for batch in images or () if batch is not None for img in batch]
    mask_rows = [m for batch in masks or () if batch is not None for m in (batch if batch.ndim == 3 else [batch])]
    texts = [t for t in captions or () if t is not None]
    if len(texts) > 1 and len(texts) == len(pictures):
        typed = [(t.strip().splitlines() or [""])[0] for t in texts]
    else:
        typed = [line for t in texts for line in t.strip().splitlines() if line.strip()]
    own = [""] * len(pictures)
    if folder and folder != NO_FOLDER:
        more_images, more_masks, more_captions = read_training_folder(folder)
        if pictures and bool(mask_rows) != (more_masks is not None):
            raise TrainingError(f"the connected images {'have' if mask_rows else 'have no'} masks but training "
                                f"folder {folder!r} {'has' if more_masks is not None else 'has no'} mask/ folder: "
                                f"give masks to all images, or to none")
        pictures += more_images
        mask_rows += more_masks or []
        own += more_captions
    lines = typed * len(pictures) if len(typed) == 1 else (typed or own)
    return ds.make_training_set(pictures, mask_rows or None, lines, templates, keep_first, crop_p)


# ---- what is trained

@dataclass
class _LoRA:
    """One LoRA being trained: its factors and the forward hook that adds ``up(down(x))`` to the module's output."""
    part: str                   # the ED-LoRA part ("unet", or the encoder's LoRA part)
    name: str                   # the module's diffusers / transformers name (as files store it)
    module: torch.nn.Module
    up: torch.nn.Parameter
    down: torch.nn.Parameter
    handle: Any = None

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if down.ndim == 4:
            return output + F.conv2d(F.conv2d(x, down), up)
        return output + F.linear(F.linear(x, down), up)


@dataclass
class _Encoder:
    """One text encoder being trained on: its concept rows ``[tokens, layers, width]``, its LoRA and settings."""
    spec: TextEncoder
    key: str                    # its key in ComfyUI's token dicts ("l")
    module: torch.nn.Module     # cond_stage_model.<name>
    rows: torch.nn.Parameter
    initial: torch.Tensor
    loras: list[_LoRA] = field(default_factory=list)


def _tokenizer_key(encoder: TextEncoder) -> str:
    return encoder.name.removeprefix("clip_")


def _content_ids(clip: Any, text: str) -> dict[str, list[int]]:
    """The token ids ComfyUI's tokenizer makes of ``text`` per tokenizer key, without the start, end and padding
    tokens (those of an empty prompt)."""
    special = {key: {int(p[0]) for p in sections[0]} for key, sections in clip.tokenize("").items()}
    return {key: [int(p[0]) for p in sections[0] if isinstance(p[0], numbers.Integral)
                  and int(p[0]) not in special[key]] for key, sections in clip.tokenize(text).items()}


class _AttentionCapture:
    """attn2 replace: the attention computed explicitly, the maps of the concept's token columns kept for the
    regulariser while ``recording`` (off during a checkpoint's recompute, so nothing is kept twice)."""

    def __init__(self) -> None:
        self.columns: torch.Tensor | None = None
        self.recording = False
        self.maps: list[LayerMaps] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        if self.columns is None or self.columns.shape[0] != q.shape[0]:
            return optimized_attention(q, k, v, heads)
        out, maps = attention_with_maps(q, k, v, heads, self.columns.to(q.device))
        if self.recording:
            height, width = extra_options["activations_shape"][-2:]
            self.maps.append(LayerMaps(maps, heads, int(height), int(width)))
        return out

    def to(self, *_args: Any, **_kwargs: Any) -> _AttentionCapture:  # ModelPatcher moves patch objects
        return self


# ---- temporary changes to the shared torch modules, always undone

@contextmanager
def _autograd_weights(*roots: torch.nn.Module) -> Iterator[None]:
    """Swap every inference-mode parameter and buffer under ``roots`` for an ordinary tensor on the same memory
    (autograd refuses to save inference tensors), and put the originals back afterwards."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for root in roots:
            for module in root.modules():
                stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
                for store in stores:
                    for name, tensor in list(store.items()):
                        if tensor is None or not tensor.is_inference():
                            continue
                        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                        alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
                        swapped.append((store, name, tensor))
                        store[name] = torch.nn.Parameter(alias, requires_grad=False) \
                            if isinstance(tensor, torch.nn.Parameter) else alias
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


@contextmanager
def _out_of_place_residuals(*roots: torch.nn.Module) -> Iterator[None]:
    """ComfyUI's CLIP layers add their residuals in place (``x += attention(norm(x))``), which autograd refuses
    once the layer norm has saved ``x``: each layer norm under ``roots`` gets a copy of its input instead."""
    handles = []
    try:
        for root in roots:
            for module in root.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    handles.append(module.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _checkpointed(forward: Callable[..., Any], copy_input: bool) -> Callable[..., Any]:
    """``forward`` under non-reentrant checkpointing. The UNet keeps editing its transformer_options while it runs,
    so the recompute gets a copy of this call's; ``copy_input``: the module adds into its input in place (ComfyUI's
    CLIP layers), so every run gets a copy of it and the saved input stays as it was."""
    def body(x: Any, *args: Any, **kwargs: Any) -> Any:
        return forward(x.clone() if copy_input else x, *args, **kwargs)

    def run(*args: Any, **kwargs: Any) -> Any:
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False, **kwargs)
    return run


@contextmanager
def _gradient_checkpointing(modules: Sequence[tuple[torch.nn.Module, bool]]) -> Iterator[None]:
    """Recompute each module's activations in the backward pass instead of keeping them (each ``(module,
    copy_input)``, see :func:`_checkpointed`)."""
    saved = []
    try:
        for module, copy_input in modules:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _checkpointed(module.forward, copy_input)
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                del module.forward
            else:
                module.forward = own


@contextmanager
def _hooks(loras: Sequence[_LoRA]) -> Iterator[None]:
    try:
        for lora in loras:
            lora.handle = lora.module.register_forward_hook(lora.hook)
        yield
    finally:
        for lora in loras:
            if lora.handle is not None:
                lora.handle.remove()
                lora.handle = None


# ---- checks before the first step

def _prediction(model: Any) -> str:
    """``"eps"`` or ``"v"``; TrainingError for a model the trainer cannot noise as DDPM does."""
    sampling = model.get_model_object("model_sampling")
    ms = comfy.model_sampling
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete)
    if discrete and isinstance(sampling, ms.V_PREDICTION) and not isinstance(sampling, ms.EDM):
        return "v"
    if discrete and isinstance(sampling, ms.EPS) and not isinstance(sampling, (ms.V_PREDICTION, ms.X0)):
        return "eps"
    kinds = "/".join(type(b).__name__ for b in type(sampling).__bases__) or type(sampling).__name__
    raise TrainingError(f"Train ED-LoRA: the MODEL's sampling is {kinds}; the trainer trains ε- or v-prediction "
                        f"models with a discrete noise schedule (SD1.x, SDXL and their fine-tunes), not EDM, "
                        f"flow-matching or x0 models")


@dataclass(frozen=True)
class Plan:
    """Everything checked before the first step."""
    family: ModelFamily
    settings: TrainSettings
    tokens: tuple[str, ...]
    initialisers: tuple[Initialiser, ...]
    word_ids: dict[str, dict[str, int]]   # class word -> tokenizer key -> its one id
    steps: int
    prediction: str


def plan_training(model: Any, clip: Any, vae: Any, trainset: Any, concept_tokens: str, init_tokens: str,
                  preset: str, overrides: dict[str, Any], concepts: ConceptSet | None) -> Plan:
    """Check everything a run needs before anything is loaded or trained; raises with a message naming what is
    wrong (the model, the preset field, the token, the image)."""
    if not isinstance(trainset, ds.TrainingSet):
        raise TrainingError("Train ED-LoRA: training_set must come from the ED-LoRA Training Set node")
    family = model_family(model, "Train ED-LoRA")
    clip_of = clip_family(clip, "Train ED-LoRA")
    if clip_of is not family:
        raise ModelFamilyError(f"Train ED-LoRA: the MODEL is {family.label} but the CLIP is {describe_clip(clip)}: "
                               f"connect the CLIP of the same checkpoint")
    prediction = _prediction(model)
    unet = model.model.diffusion_model
    if vae is None or getattr(vae, "latent_channels", None) != getattr(unet, "in_channels", None) \
            or not isinstance(getattr(vae, "downscale_ratio", None), int):
        raise TrainingError(f"Train ED-LoRA: the VAE makes {getattr(vae, 'latent_channels', '?')}-channel latents; "
                            f"the MODEL takes {getattr(unet, 'in_channels', '?')}: connect the checkpoint's VAE")
    settings = resolve_settings(preset, family, overrides)
    tokens = parse_concept_tokens(concept_tokens)
    owners = concepts.token_owners() if concepts is not None else {}
    for token in tokens:
        if token in owners:
            raise TrainingError(f"concept token {token} is already defined by '{owners[token]}' in the connected "
                                f"concept set; name the new concept's tokens differently")
    initialisers = parse_initialisers(init_tokens, tokens)
    word_ids: dict[str, dict[str, int]] = {}
    for init in initialisers:
        if init.word and init.word not in word_ids:
            ids = _content_ids(clip, init.word)
            for key, found in ids.items():
                if len(found) != 1:
                    raise TrainingError(f"init token {init.word!r} is {len(found)} tokens for the CLIP's "
                                        f"'{key}' tokenizer; a class word must be exactly one token (e.g. man, "
                                        f"woman, girl, dog)")
            word_ids[init.word] = {key: found[0] for key, found in ids.items()}
    if settings.use_mask_loss and not trainset.has_masks:
        raise TrainingError(f"preset {settings.preset!r} trains with the subject-masked loss (use_mask_loss) but the "
                            f"training set has no masks: connect one mask per image, or set use_mask_loss to off")
    if settings.resolution < 8 * vae.downscale_ratio:
        raise TrainingError(f"resolution {settings.resolution} is too small (at least {8 * vae.downscale_ratio})")
    count = len(trainset.examples)
    if settings.batch_size > count * settings.repeats:
        raise TrainingError(f"batch_size {settings.batch_size} is larger than an epoch ({count} images x "
                            f"{settings.repeats} repeats)")
    longest = max(ds.TEMPLATES[trainset.templates], key=len)
    words = " ".join(tokens)
    for i, example in enumerate(trainset.examples):
        text = longest.format(example.caption.replace(ds.TOKEN_PLACEHOLDER, words))
        sections = max(len(s) for s in clip.tokenize(_escaped(text)).values())
        if sections > 1:
            raise TrainingError(f"the caption of image {i + 1} is longer than one 77-token section once a template "
                                f"wraps it ({example.caption[:60]!r}...); shorten it")
    steps = settings.steps or ds.steps_for(count, settings.repeats, settings.batch_size, settings.grad_accum)
    return Plan(family, settings, tokens, initialisers, word_ids, steps, prediction)


def _escaped(text: str) -> str:
    """A caption for ComfyUI's tokenizer: parentheses are literal (no prompt weights in training captions)."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


# ---- the run

@dataclass
class TrainResult:
    model: Any
    clip: Any
    concepts: ConceptSet
    edlora: EDLoRA
    loss_map: dict[str, list[float]]
    steps: int


class _Run:
    """One training run: the prepared clones, parameters and patches (see the module text)."""

    def __init__(self, plan: Plan, model: Any, clip: Any, vae: Any, trainset: ds.TrainingSet) -> None:
        self.plan, self.settings, self.family = plan, plan.settings, plan.family
        self.vae, self.trainset = vae, trainset
        self.model = model.clone()
        self.clip = clip.clone()
        self.device = self.model.load_device
        self.text_device = self.clip.patcher.load_device
        self.compute_dtype = self._compute_dtype()
        if self.model.model.get_dtype() != self.compute_dtype:
            self.model.set_model_compute_dtype(self.compute_dtype)
        install_layerwise(self.model)
        self.capture = _AttentionCapture() if self.settings.attn_reg_weight > 0 else None
        if self.capture is not None:
            replaced = self.model.model_options.get("transformer_options", {}).get("patches_replace", {})
            if replaced.get("attn2"):
                log.warning("Mix-of-Show training: the MODEL has attn2 replace patches of another node; they do not "
                            "run while the trainer captures the attention maps")
            for name, number, index in self.family.layers:
                self.model.set_model_attn2_replace(self.capture, name, number, index)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.rng = random.Random(self.settings.seed)
        self.sampling = self.model.get_model_object("model_sampling")
        self.timesteps = len(self.sampling.sigmas)

    def _compute_dtype(self) -> torch.dtype:
        choice = self.settings.training_dtype
        if choice == "auto":
            cuda = torch.device(self.device).type == "cuda"
            choice = "bf16" if cuda and mm.should_use_bf16(self.device) else "fp32"
        return torch.bfloat16 if choice == "bf16" else torch.float32

    # -- parameters
    def make_parameters(self) -> None:
        s, g = self.settings, self.generator
        layers = self.family.layer_count
        text_keys = clip_key_map(self.clip)
        self.encoders: list[_Encoder] = []
        for index, spec in enumerate(self.family.text_encoders):
            module = getattr(self.clip.cond_stage_model, spec.name)
            table = module.transformer.get_input_embeddings().weight
            key = _tokenizer_key(spec)
            rows = []
            for init in self.plan.initialisers:
                if index > 0 and s.reference_quirks:
                    rows.append(quirk_rows(layers, spec.width, g))
                else:
                    word_row = table[self.plan.word_ids[init.word][key]] if init.word else None
                    rows.append(initial_rows(init, layers, spec.width, word_row, g))
            start = torch.stack(rows)[:, :, 0]
            encoder = _Encoder(spec, key, module, torch.nn.Parameter(start.to(self.text_device)), start.clone())
            for name in text_lora_modules(module.num_layers, s.te_scope):
                weight_key = text_keys.get(spec.comfy_lora_prefix + name)
                if weight_key is None:
                    raise TrainingError(f"the CLIP has no text-encoder module {name} for {spec.name}")
                target = self.clip.cond_stage_model.get_submodule(weight_key.removesuffix(".weight"))
                up, down = lora_factors(tuple(target.weight.shape), s.encoders[index].rank_te, g)
                encoder.loras.append(_LoRA(spec.lora_part, name, target,
                                           torch.nn.Parameter(up.to(self.text_device)),
                                           torch.nn.Parameter(down.to(self.text_device))))
            self.encoders.append(encoder)
        unet_keys = model_key_map(self.model)
        self.unet_loras: list[_LoRA] = []
        for name in unet_lora_modules(self.family, s.unet_scope):
            weight_key = unet_keys.get(unet_lora_name(name))
            if weight_key is None:
                raise TrainingError(f"the MODEL has no UNet module {name}")
            target = self.model.model.get_submodule(weight_key.removesuffix(".weight"))
            up, down = lora_factors(tuple(target.weight.shape), s.rank_unet, g)
            self.unet_loras.append(_LoRA("unet", name, target, torch.nn.Parameter(up.to(self.device)),
                                         torch.nn.Parameter(down.to(self.device))))
        groups = []
        for encoder, es in zip(self.encoders, s.encoders, strict=True):
            groups.append({"params": [encoder.rows], "lr": es.lr_emb, "base_lr": es.lr_emb})
            groups.append({"params": [p for lora in encoder.loras for p in (lora.up, lora.down)], "lr": es.lr_te,
                           "base_lr": es.lr_te})
        groups.append({"params": [p for lora in self.unet_loras for p in (lora.up, lora.down)], "lr": s.lr_unet,
                       "base_lr": s.lr_unet})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.weight_decay)
        self.stop = EmbeddingStop([e.emb_norm_threshold for e in s.encoders], shared=s.reference_quirks)
        words = " ".join(self.plan.tokens)
        placeholders = EDLoRA(name="training", family=self.family, tables={
            e.name: {t: torch.zeros(layers, 1, e.width) for t in self.plan.tokens} for e in self.family.text_encoders})
        self.tokenizing_set = ConceptSet((Concept(placeholders, 1.0, 1.0),))
        self.words = words

    # -- one forward pass
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The ``[B, L, 77, C]`` context stack of the captions, the pooled output of the last encoder's copy 0
        (``[B, width]``, or None) and the concept token columns ``[B, P]`` (the first two placeholder positions:
        "adjective", "subject"; one for a one-token concept)."""
        layers = self.family.layer_count
        tokenized = [tokenize_with_concepts(self.clip, _escaped(c), self.tokenizing_set) for c in captions]
        index = {tok: i for i, tok in enumerate(self.plan.tokens)}
        contexts, pooled = [], None
        for encoder in self.encoders:
            sequences = []
            for tokens, positions, vectors in tokenized:
                ids = [p[0] for p in tokens[encoder.key][0]]
                places = [(j, index[tok]) for (s, j), (tok, _) in zip(positions[encoder.key], vectors, strict=True)
                          if s == 0]
                for layer in range(layers):
                    copy = list(ids)
                    for j, t in places:
                        copy[j] = encoder.rows[t, layer]
                    sequences.append(copy)
            out = encoder.module(sequences)
            z = out[0].reshape(len(captions), layers, -1, out[0].shape[-1])
            contexts.append(z)
            if out[1] is not None:
                pooled = out[1].reshape(len(captions), layers, -1)[:, 0]
        first = self.encoders[0].key
        columns = []
        for _tokens, positions, _vectors in tokenized:
            js = [j for s, j in positions[first] if s == 0][:2]
            columns.append(js if len(self.plan.tokens) > 1 else js[:1])
        width = min(len(c) for c in columns)
        return torch.cat(contexts, dim=-1), pooled, torch.tensor([c[:width] for c in columns], dtype=torch.long)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's posterior mean of ``[B, 3, S, S]`` pixels in [0, 1], scaled as the model takes it.
        (The VAE's own module is called: the models stay loaded between steps.)"""
        vae = self.vae
        with torch.no_grad():
            x = vae.process_input(pixels.to(vae.device, vae.vae_dtype))
            z = vae.first_stage_model.encode(x).float()
        return self.model.model.process_latent_in(z.to(self.device))

    def micro_step(self, batch: list[int]) -> tuple[torch.Tensor, float]:
        s = self.settings
        examples = [self.trainset.examples[i] for i in batch]
        augmented = [ds.augment(e, s.resolution, self.trainset.crop_p, self.vae.downscale_ratio, self.rng)
                     for e in examples]
        captions = [ds.build_caption(e.caption, self.words, self.trainset.keep_first, self.trainset.templates,
                                     self.rng) for e in examples]
        x0 = self.latents(torch.stack([a.pixels for a in augmented]))
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        if s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((b, x0.shape[1], 1, 1), generator=self.generator)
        noise = noise.to(self.device)
        sigma = self.sampling.sigma(t.float()).to(self.device).float()
        x = self.sampling.calculate_input(sigma, x0 + sigma.view(-1, 1, 1, 1) * noise)
        if self.plan.prediction == "v":
            target = (noise - sigma.view(-1, 1, 1, 1) * x0) / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        else:
            target = noise
        image_masks = torch.stack([a.image_mask for a in augmented]).to(self.device)
        subject = torch.stack([a.subject_mask for a in augmented if a.subject_mask is not None]).to(self.device) \
            if self.trainset.has_masks else None
        loss_mask = subject if (s.use_mask_loss and subject is not None) else image_masks
        autocast = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=self.compute_dtype == torch.bfloat16)
        with autocast:
            context, pooled, columns = self.encode(captions)
            context = context.to(self.device)
            y = self.model.model.encode_adm(pooled_output=pooled, device=self.device,
                                            **size_conditioning(s.resolution, s.reference_quirks))
            options = dict(self.model.model_options.get("transformer_options", {}))
            options[LAYERWISE_KEY] = context.to(self.compute_dtype)
            if self.capture is not None:
                self.capture.columns, self.capture.maps, self.capture.recording = columns, [], True
            try:
                prediction = self.model.model.diffusion_model(
                    x.to(self.compute_dtype), t.float().to(self.device), context=context[:, 0].to(self.compute_dtype),
                    y=None if y is None else y.to(self.device, self.compute_dtype), transformer_options=options)
            finally:
                if self.capture is not None:
                    self.capture.recording = False
        loss = masked_denoising_loss(prediction, target, loss_mask)
        regulariser = 0.0
        if self.capture is not None:
            reg = attention_regulariser(self.capture.maps, subject if subject is not None else image_masks,
                                        s.reg_full_identity, s.attn_reg_weight)
            self.capture.maps = []
            if reg is not None:
                loss = loss + reg
                regulariser = float(reg.detach())
        return loss, regulariser

    def optimiser_step(self, step: int, total: int) -> list[float]:
        for group in self.optimizer.param_groups:
            group["lr"] = linear_lr(group["base_lr"], step, total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        norms = [mean_row_norm(e.rows) for e in self.encoders]
        stopped, reverted = self.stop.update(norms)
        for i in stopped + reverted:
            self.encoders[i].rows.requires_grad_(False)
            self.encoders[i].rows.grad = None
        with torch.no_grad():
            for i in reverted:
                self.encoders[i].rows.copy_(self.encoders[i].initial.to(self.encoders[i].rows.device))
        if stopped or reverted:
            log.info("Mix-of-Show training: step %d: embedding rows frozen (%s)", step + 1,
                     ", ".join(self.encoders[i].spec.name for i in stopped + reverted))
        return [mean_row_norm(e.rows) for e in self.encoders]

    def checkpointed_modules(self) -> list[tuple[torch.nn.Module, bool]]:
        """What gradient checkpointing recomputes: each part of the UNet's blocks, each text-encoder layer (those
        add into their input in place)."""
        unet: Any = self.model.model.diffusion_model
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        out = [(child, False) for block in blocks if block is not None for child in block.children()]
        for encoder in self.encoders:
            text: Any = encoder.module
            out.extend((layer, True) for layer in text.transformer.text_model.encoder.layers)
        return out

    def edlora(self, name: str) -> EDLoRA:
        def factors(loras: Sequence[_LoRA]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {lora.name: (lora.up.detach().float().cpu().clone(), lora.down.detach().float().cpu().clone())
                    for lora in loras}
        tables, text = {}, {}
        for encoder in self.encoders:
            rows = encoder.rows.detach().float().cpu()
            tables[encoder.spec.name] = {tok: rows[i][:, None].clone() for i, tok in enumerate(self.plan.tokens)}
            text[encoder.spec.name] = factors(encoder.loras)
        return EDLoRA(name=name, family=self.family, tables=tables, text=text, unet=factors(self.unet_loras))


def train_edlora(model: Any, clip: Any, vae: Any, trainset: Any, concept_tokens: str, init_tokens: str,
                 preset: str, overrides: dict[str, Any], concepts: ConceptSet | None = None,
                 progress: Progress | None = None) -> TrainResult:
    """Train one concept (see the module text). ``overrides``: setting fields whose value is not None replace the
    preset's. Returns clones of MODEL and CLIP with the trained LoRA, the concept set with the concept added, the
    loss curves (``loss``, ``attn_reg``, ``norm_<encoder key>``) and the number of optimiser steps."""
    plan = plan_training(model, clip, vae, trainset, concept_tokens, init_tokens, preset, overrides, concepts)
    s, total = plan.settings, plan.steps
    run = _Run(plan, model, clip, vae, trainset)
    order = ds.ExampleOrder(len(trainset.examples), s.repeats, run.rng)
    curves: dict[str, list[float]] = {"loss": [], "attn_reg": []}
    for encoder in plan.family.text_encoders:
        curves[f"norm_{_tokenizer_key(encoder)}"] = []
    log.info("Mix-of-Show training: %s for %d steps on %s (%s)", "+".join(plan.tokens), total,
             trainset.describe(), s.preset)
    with torch.inference_mode(False), torch.enable_grad(), ExitStack() as stack:
        mm.load_models_gpu([run.model, run.clip.patcher, vae.patcher], force_full_load=True)
        run.make_parameters()
        roots = [run.model.model.diffusion_model, run.clip.cond_stage_model]
        stack.enter_context(_autograd_weights(*roots))
        stack.enter_context(_hooks([lora for e in run.encoders for lora in e.loras] + run.unet_loras))
        stack.enter_context(_out_of_place_residuals(*(e.module for e in run.encoders)))
        if s.gradient_checkpointing:
            stack.enter_context(_gradient_checkpointing(run.checkpointed_modules()))
        run.clip.cond_stage_model.reset_clip_options()
        if run.clip.layer_idx is not None:
            run.clip.cond_stage_model.set_clip_options({"layer": run.clip.layer_idx})
        for step in range(total):
            losses, regs = [], []
            for _ in range(s.grad_accum):
                mm.throw_exception_if_processing_interrupted()
                loss, reg = run.micro_step(order.batch(s.batch_size))
                (loss / s.grad_accum).backward()
                losses.append(float(loss.detach()))
                regs.append(reg)
            norms = run.optimiser_step(step, total)
            curves["loss"].append(sum(losses) / len(losses))
            curves["attn_reg"].append(sum(regs) / len(regs))
            for trained, norm in zip(run.encoders, norms, strict=True):
                curves[f"norm_{trained.key}"].append(norm)
            if progress is not None:
                shown = " ".join(f"{e.key} {n:.3f}" for e, n in zip(run.encoders, norms, strict=True))
                progress(step + 1, total, f"step {step + 1}/{total} · loss {curves['loss'][-1]:.4f} · norm {shown}")
        run.clip.cond_stage_model.reset_clip_options()
        edlora = run.edlora("trained " + "+".join(plan.tokens))
    edlora.metadata = {"trained": TRAINING_VERSION, "steps": str(total), "tokens_init":
                       "+".join(i.describe() for i in plan.initialisers), **_settings_metadata(s, trainset)}
    model_out, clip_out, concepts_out = apply_concept(model, clip, concepts, edlora, 1.0, 1.0)
    if not all(math.isfinite(v) for v in curves["loss"]):
        log.warning("Mix-of-Show training: the loss was not finite at some steps (learning rates too high?)")
    return TrainResult(model_out, clip_out, concepts_out, edlora, curves, total)


def _settings_metadata(settings: TrainSettings, trainset: ds.TrainingSet) -> dict[str, str]:
    import json

    return {"settings": json.dumps({**settings.metadata(), "templates": trainset.templates,
                                    "keep_first": trainset.keep_first, "crop_p": trainset.crop_p,
                                    "images": len(trainset.examples)}, sort_keys=True),
            "family": settings.family}
