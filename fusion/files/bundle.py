"""Fused ED-LoRA bundles: the result of gradient fusion as one ``.safetensors`` that is also a standard LoRA.

Format version 2 (metadata ``format=mixofshow-fused-bundle``, ``version=2``), SD1.x::

    lora_unet_<diffusers module with _>.lora_up.weight    [out, R]      ([out, R, 1, 1] for 1×1 convs)
    lora_unet_<…>.lora_down.weight                         [R, in]       ([R, in, 1, 1])
    lora_unet_<…>.alpha                                    R  (scale alpha/rank = 1)
    lora_te_text_model_encoder_layers_<i>_<proj>.lora_up.weight / .lora_down.weight / .alpha
    new_concept_embedding.<token>                          [16, 768] or [16, n, 768]

SDXL (metadata ``family=sdxl``): kohya's SDXL names -- ``lora_unet_<ldm module with _>`` (``input_blocks_4_1_…``),
``lora_te1_…`` (CLIP-L) and ``lora_te2_…`` (bigG) -- and one table per token and text encoder:
``new_concept_embedding.<token>`` ``[70, (n,) 768]`` and ``new_concept_embedding_2.<token>`` ``[70, (n,) 1280]``
(the ED-LoRA file parts, :attr:`fusion.families.TextEncoder.table_part`). A file without ``family`` is SD1.x (every
0.2.0 bundle): SDXL is still version 2, as the layout only gains parts that the family names, and a 0.2.0 reader
refuses an SDXL bundle at its 70-row tables anyway.

The LoRA part is kohya's key layout, float32, so the stock Load LoRA node (strength 1.0) applies the
fused weights ``W0 + up @ down`` exactly; Load ED-LoRA also restores the concepts. Metadata: ``base``
(digest of the original weights the deltas were solved against), ``concepts`` (JSON list, in set
order: ``name``, ``digest``, ``tokens``, ``trigger_words``, ``text_encoder_strength``, ``unet_strength``),
``settings`` (JSON of the fusion settings), ``family`` (absent for SD1.x). The same files are the fusion cache's
entries.

Format version 1 (0.1.0, read only): full fused weights under ``model.<MODEL key>`` and
``clip.<CLIP key>``, same tables and metadata.

Every file is validated like an ED-LoRA file before anything is applied (metadata JSON, concepts with
their tokens, table shapes, factor shapes, finite float tensors within the bound on values and weight
changes of ``filecheck.MAX_ABS_VALUE``); errors name the file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BundleError, EDLoRAError
from ..families import FAMILIES, SD15, ModelFamily, family_named
from ..versions import BUNDLE_FORMAT, BUNDLE_VERSION, READABLE_BUNDLE_VERSIONS
from .edlora import EDLoRA, _check_table, _Reader
from .filecheck import check_file_tensor, check_lora_change

_T = TypeVar("_T")
_LORA_KEY = re.compile(r"^(lora_(?:unet|te\d?)_[A-Za-z0-9_]+|text_encoders\.[A-Za-z0-9_.]+"
                       r"|diffusion_model\.[A-Za-z0-9_.]+)"
                       r"\.(lora_up\.weight|lora_down\.weight|alpha)$")



@dataclass
class FusedBundle:
    """A fused result: LoRA factors by LoRA module name (``lora_unet_…`` / ``lora_te_…``, scale 1),
    every concept's tables per text encoder of ``family`` and the metadata. Version-1 files carry full weights in
    ``weights``."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    concepts: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # encoder -> token -> [L, n, width]
    base: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = BUNDLE_VERSION
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # v1: "model.<key>" / "clip.<key>"
    family: ModelFamily = SD15

    def edloras(self) -> list[tuple[EDLoRA, str]]:
        """One embeddings-only :class:`EDLoRA` per fused concept with its trigger words (its LoRA is in the
        fused weights already)."""
        return [(EDLoRA(name=c["name"], tables={e.name: {t: self.tables[e.name][t] for t in c["tokens"]}
                                                for e in self.family.text_encoders},
                        digest=c.get("digest", ""), family=self.family), c.get("trigger_words", ""))
                for c in self.concepts]


def save_bundle(bundle: FusedBundle, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Write a version-2 bundle (atomically: a temporary file, then renamed; a failed write leaves no
    temporary file)."""
    tensors = {}
    for name, (up, down) in bundle.lora.items():
        tensors[f"{name}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        tensors[f"{name}.lora_down.weight"] = down.detach().float().contiguous().cpu()
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    for encoder in bundle.family.text_encoders:
        for tok, t in bundle.tables.get(encoder.name, {}).items():
            table = t.detach().float().cpu()
            single = table.ndim == 3 and table.shape[1] == 1
            tensors[f"{encoder.table_part}.{tok}"] = (table[:, 0] if single else table).contiguous()
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "base": bundle.base,
            "concepts": json.dumps(bundle.concepts), "settings": json.dumps(bundle.settings, sort_keys=True),
            **({} if bundle.family is SD15 else {"family": bundle.family.name}),  # SD1.x bytes as 0.2.0 wrote them
            **(extra_metadata or {})}
    tmp = path + ".part"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_bundle(path: str) -> bool:
    """True for a ``.safetensors`` file (the extension in any case) tagged as a fused bundle (any version)."""
    if not path.lower().endswith(".safetensors"):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == BUNDLE_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a bundle
        return False


def _check_tensor(name: str, key: str, t: object, float32: bool = True) -> torch.Tensor:
    """A dense float tensor with only finite values (the ED-LoRA rules), as a bundle error; float32
    unless ``float32=False`` (0.1.0's full weights keep the base's dtype)."""
    try:
        return check_file_tensor(name, key, t, float32=float32)
    except EDLoRAError as e:
        raise BundleError(str(e)) from None


def _check_bundle_table(name: str, key: str, t: object, family: ModelFamily, encoder: Any) -> torch.Tensor:
    """A token table by the ED-LoRA table rules of the family and text encoder (float, finite, ``[L, width]`` or
    ``[L, n, width]``), as a bundle error."""
    try:
        return _check_table(_Reader(name), t, key, family, encoder)
    except EDLoRAError as e:
        raise BundleError(str(e)) from None


def _json(name: str, meta: dict[str, str], field_name: str, kind: type[_T]) -> _T:
    try:
        value = json.loads(meta.get(field_name, "[]" if kind is list else "{}"))
    except (json.JSONDecodeError, TypeError) as e:
        raise BundleError(f"{name}: metadata '{field_name}' is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise BundleError(f"{name}: metadata '{field_name}' must be a JSON {kind.__name__}")
    return value


def _check_concepts(name: str, concepts: list[Any]) -> list[dict[str, Any]]:
    if not concepts:
        raise BundleError(f"{name}: the bundle lists no concepts")
    out: list[dict[str, Any]] = []
    for c in concepts:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise BundleError(f"{name}: every concept needs a 'name' (found {str(c)[:80]})")
        tokens, words = c.get("tokens"), c.get("trigger_words", "")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise BundleError(f"{name}: concept '{c['name']}' has no 'tokens' list")
        if not isinstance(words, str) or (not tokens and not words.strip()):
            raise BundleError(f"{name}: concept '{c['name']}' has neither tokens nor trigger words")
        for s in ("text_encoder_strength", "unet_strength"):
            if c.get(s) is not None and not isinstance(c[s], (int, float)):
                raise BundleError(f"{name}: concept '{c['name']}': '{s}' must be a number")
        out.append(c)
    return out


def load_bundle(path: str) -> FusedBundle:
    """Read and validate a bundle (version 1 or 2); raises :class:`BundleError` naming the file."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != BUNDLE_FORMAT:
                raise BundleError(f"{name}: not a fused ED-LoRA bundle (format={meta.get('format')!r}); "
                                  f"single ED-LoRAs load with Load ED-LoRA")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, unreadable
        raise BundleError(f"{name}: not a readable safetensors file ({str(e)[:200]})") from e
    version = meta.get("version", "")
    if version not in READABLE_BUNDLE_VERSIONS:
        raise BundleError(f"{name}: fused bundle format version {version!r}; this release reads versions "
                          f"{', '.join(READABLE_BUNDLE_VERSIONS)} (was it written by a newer release?)")
    try:
        family = family_named(meta.get("family", SD15.name))
    except KeyError:
        raise BundleError(f"{name}: fused for the model family {meta['family']!r}; this release knows "
                          f"{', '.join(f.name for f in FAMILIES)}") from None
    b = FusedBundle(base=meta.get("base", ""), concepts=_check_concepts(name, _json(name, meta, "concepts", list)),
                    settings=_json(name, meta, "settings", dict), version=version, family=family)
    table_parts = {e.table_part: e for e in family.text_encoders}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        part, _, token = key.partition(".")
        if part in table_parts:
            encoder = table_parts[part]
            b.tables.setdefault(encoder.name, {})[token] = _check_bundle_table(name, key, t, family, encoder)
        elif version == "1" and key.partition(".")[0] in ("model", "clip"):
            b.weights[key] = _check_tensor(name, key, t, float32=False)
        elif version == "2" and (m := _LORA_KEY.match(key)):
            parts.setdefault(m[1], {})[m[2]] = _check_tensor(name, key, t)
        else:
            raise BundleError(f"{name}: unexpected tensor '{key}' in a version-{version} fused bundle")
    for module, p in parts.items():
        if set(p) != {"lora_up.weight", "lora_down.weight", "alpha"}:
            raise BundleError(f"{name}: LoRA module '{module}' has only {', '.join(sorted(p))}")
        up, down, alpha = p["lora_up.weight"], p["lora_down.weight"], p["alpha"]
        if up.ndim not in (2, 4) or down.ndim != up.ndim or up.shape[1] != down.shape[0] or alpha.numel() != 1:
            raise BundleError(f"{name}: LoRA module '{module}' has factors {tuple(up.shape)} @ {tuple(down.shape)} "
                              f"(alpha {tuple(alpha.shape)}); expected [out, r] @ [r, in] and a scalar alpha")
        try:
            check_lora_change(name, module, up, down, float(alpha) / down.shape[0])
        except EDLoRAError as e:
            raise BundleError(str(e)) from None
        b.lora[module] = (up * (float(alpha) / down.shape[0]), down)
    listed = [t for c in b.concepts for t in c["tokens"]]
    for encoder in family.text_encoders:
        have = b.tables.get(encoder.name, {})
        missing = [t for t in listed if t not in have]
        if missing:
            raise BundleError(f"{name}: concepts list tokens {missing} that have no table in the file "
                              f"({encoder.table_part})")
        if set(have) - set(listed):
            raise BundleError(f"{name}: tables {sorted(set(have) - set(listed))} belong to no listed concept")
    if not b.lora and not b.weights:
        raise BundleError(f"{name}: the bundle holds no fused weights")
    return b
