"""ED-LoRA files: reading (.pth and .safetensors), validation, and the flat safetensors layout.

An ED-LoRA (design §1) holds per-layer token tables (``new_concept_embedding``) and LoRA factors
for the SD1.x text encoder and UNet, in diffusers module naming, in one of two key spellings:
``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` (Mix-of-Show ``main``) or
``<module>_lora.down.weight`` / ``<module>_lora.up.weight`` (``research_branch``).

Flat safetensors layout written by :func:`save_edlora` (metadata ``format=mixofshow-edlora``)::

    new_concept_embedding.<token>          [16, 768]  (or [16, n, 768] for n-vector tokens)
    text_encoder.<module>.lora_down.weight [r, in]
    text_encoder.<module>.lora_up.weight   [out, r]
    unet.<module>.lora_down.weight         [r, in] or [r, in, 1, 1]
    unet.<module>.lora_up.weight           [out, r] or [out, r, 1, 1]

A ``.pth`` is a pickle: it is only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .layers import CONTEXT_DIM, NUM_LAYERS, XTI_LAYER_KEYS, diffusers_unet_to_ldm, is_text_encoder_module

FORMAT_TAG = "mixofshow-edlora"
TOKEN_PATTERN = re.compile(r"<[^<>\s()\[\]{}:,]+>")
_PARTS = ("new_concept_embedding", "text_encoder", "unet")
_KEY_SPELLINGS = (  # main branch, research_branch
    re.compile(r"^(.+)\.lora_(down|up)\.weight$"),
    re.compile(r"^(.+)_lora\.(down|up)\.weight$"),
)


class EDLoRAError(ValueError):
    """A file is not a usable ED-LoRA; the message names the file and what was expected."""


@dataclass
class EDLoRA:
    """One ED-LoRA in memory. LoRA factors are ``(up, down)`` pairs keyed by diffusers module name."""

    name: str
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    unet: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    digest: str = ""

    @property
    def tokens(self) -> list[str]:
        return list(self.embeddings)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (cache keys and provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


def read_state_dict(path: str) -> tuple[dict, dict[str, str]]:
    """Read a ``.safetensors`` or (safely) a pickled ``.pth``/``.pt`` file; returns (state, metadata)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise EDLoRAError(f"{name}: file not found ({path})")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path, device="cpu"), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise EDLoRAError(f"{name}: not a readable safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not re.search(r"Unsupported global|GLOBAL|REDUCE|BUILD|not an allowed", str(e)):
            raise EDLoRAError(f"{name}: truncated or corrupt .pth file ({_first_line(e)})") from e
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it asks for {found[1]})" if found else ""
        raise EDLoRAError(
            f"{name}: refused — this pickle needs more than plain tensors to load{what}, and .pth files are only "
            f"read with torch.load(weights_only=True); nothing in it was run") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise EDLoRAError(f"{name}: truncated or corrupt .pth file ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise EDLoRAError(f"{name}: expected a dict of tensors, found {type(state).__name__}")
    return state, {}


def _unflatten(state: dict) -> dict:
    """Flat ``part.rest`` keys -> ``{part: {rest: tensor}}``; nested dicts pass through."""
    if "params" in state and isinstance(state["params"], dict):
        state = state["params"]
    if any(isinstance(state.get(p), dict) for p in _PARTS):
        return state
    nested: dict[str, dict] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in _PARTS and rest:
            nested.setdefault(part, {})[rest] = value
    return nested


def _split_lora_factors(name: str, part: str, flat: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        for pattern in _KEY_SPELLINGS:
            m = pattern.match(key)
            if m:
                factors.setdefault(m[1], {})[m[2]] = value
                break
        else:
            raise EDLoRAError(f"{name}: unexpected key '{part}.{key}' (expected <module>.lora_up/lora_down.weight "
                              f"or <module>_lora.up/down.weight)")
    out = {}
    for module, pair in factors.items():
        if set(pair) != {"up", "down"}:
            raise EDLoRAError(f"{name}: '{part}.{module}' has only a lora {'/'.join(pair)} factor")
        up, down = pair["up"], pair["down"]
        if not (torch.is_tensor(up) and torch.is_tensor(down)) or up.ndim not in (2, 4) or down.ndim != up.ndim \
                or up.shape[1] != down.shape[0]:
            raise EDLoRAError(f"{name}: '{part}.{module}' factors have incompatible shapes "
                              f"{tuple(getattr(up, 'shape', ()))} @ {tuple(getattr(down, 'shape', ()))}")
        if part == "text_encoder":
            if not is_text_encoder_module(module):
                raise EDLoRAError(f"{name}: '{module}' is not a CLIP text-encoder linear of SD1.x")
            if not module.endswith("fc2") and down.shape[1] != CONTEXT_DIM:
                raise EDLoRAError(f"{name}: text-encoder LoRA '{module}' takes {down.shape[1]} inputs; an SD1.x "
                                  f"ED-LoRA has a {CONTEXT_DIM}-wide CLIP text encoder (is it for SD2/SDXL?)")
        else:
            try:
                diffusers_unet_to_ldm(module)
            except KeyError:
                raise EDLoRAError(f"{name}: '{module}' is not a transformer-block module of the SD1.x UNet") from None
        out[module] = (up.float(), down.float())
    return out


def _check_table(name: str, token: str, table) -> torch.Tensor:
    if not TOKEN_PATTERN.fullmatch(token):
        raise EDLoRAError(f"{name}: concept token '{token}' must look like <name> (angle brackets, no spaces)")
    if not torch.is_tensor(table) or table.ndim not in (2, 3) or table.shape[0] != NUM_LAYERS:
        raise EDLoRAError(f"{name}: token {token} has a table of shape {tuple(getattr(table, 'shape', ()))}; "
                          f"expected [{NUM_LAYERS}, {CONTEXT_DIM}] (one row per cross-attention layer)")
    if table.shape[-1] != CONTEXT_DIM:
        raise EDLoRAError(f"{name}: token {token} is {table.shape[-1]} wide; an SD1.x ED-LoRA is {CONTEXT_DIM} wide "
                          f"(is it for SD2/SDXL?)")
    return table.float() if table.ndim == 3 else table.float().unsqueeze(1)


def parse_edlora(state: dict, name: str) -> EDLoRA:
    """Validate a loaded state dict (nested, ``params``-wrapped or flat) and return an :class:`EDLoRA`.

    Token tables are normalised to ``[16, n, 768]`` (n vectors per token; ED-LoRA has n = 1).
    """
    nested = _unflatten(state)
    if not any(p in nested for p in _PARTS):
        raise EDLoRAError(f"{name}: not an ED-LoRA — no 'new_concept_embedding', 'text_encoder' or 'unet' part "
                          f"(top-level keys: {sorted(map(str, state))[:6]})")
    embeddings = nested.get("new_concept_embedding", {}) or {}
    if not isinstance(embeddings, dict):
        raise EDLoRAError(f"{name}: 'new_concept_embedding' must map tokens to tensors")
    tables = {tok: _check_table(name, tok, t) for tok, t in embeddings.items()}
    if not tables:
        raise EDLoRAError(f"{name}: defines no concept token (empty 'new_concept_embedding')")
    return EDLoRA(name=name, embeddings=tables,
                  text_encoder=_split_lora_factors(name, "text_encoder", nested.get("text_encoder", {}) or {}),
                  unet=_split_lora_factors(name, "unet", nested.get("unet", {}) or {}))


def parse_xti(state: dict, name: str, token: str) -> EDLoRA:
    """A kohya XTI (P+) embedding: 16 keys IN01..OUT11, each ``[n, 768]``, becomes one token table."""
    if set(state) != set(XTI_LAYER_KEYS):
        raise EDLoRAError(f"{name}: not an XTI embedding (expected exactly the keys {', '.join(XTI_LAYER_KEYS)})")
    rows = [state[k] for k in XTI_LAYER_KEYS]
    if any(not torch.is_tensor(r) or r.ndim != 2 or r.shape != rows[0].shape for r in rows):
        raise EDLoRAError(f"{name}: XTI layers must all be [n, {CONTEXT_DIM}] tensors of one shape")
    return EDLoRA(name=name, embeddings={token: _check_table(name, token, torch.stack(rows))})


def load_edlora(path: str) -> EDLoRA:
    """Load an ED-LoRA, a pack bundle or an XTI embedding file from disk (never running pickled code)."""
    name = os.path.basename(path)
    state, _meta = read_state_dict(path)
    if set(state) == set(XTI_LAYER_KEYS):
        stem = re.sub(r"[^A-Za-z0-9_\-.]", "_", os.path.splitext(name)[0])
        edlora = parse_xti(state, name, f"<{stem}>")
    else:
        edlora = parse_edlora(state, name)
    edlora.digest = file_digest(path)
    return edlora


def to_flat_state_dict(edlora: EDLoRA) -> dict[str, torch.Tensor]:
    """The flat safetensors layout (module docstring); single-vector tables are stored as [16, 768]."""
    flat = {}
    for tok, table in edlora.embeddings.items():
        flat[f"new_concept_embedding.{tok}"] = (table[:, 0] if table.shape[1] == 1 else table).contiguous()
    for part, factors in (("text_encoder", edlora.text_encoder), ("unet", edlora.unet)):
        for module, (up, down) in factors.items():
            flat[f"{part}.{module}.lora_up.weight"] = up.contiguous()
            flat[f"{part}.{module}.lora_down.weight"] = down.contiguous()
    return flat


def save_edlora(edlora: EDLoRA, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the flat safetensors layout."""
    meta = {"format": FORMAT_TAG, "version": "1", "tokens": " ".join(edlora.tokens)}
    meta.update(extra_metadata or {})
    save_file(to_flat_state_dict(edlora), path, metadata=meta)


def convert_to_safetensors(src: str, dst: str) -> EDLoRA:
    """Convert any readable ED-LoRA (.pth in either key spelling, or .safetensors) to the flat layout."""
    edlora = load_edlora(src)
    save_edlora(edlora, dst, {"converted_from": os.path.basename(src)})
    return edlora
