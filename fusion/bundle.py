"""Fused ED-LoRA bundles: the result of gradient fusion as one ``.safetensors`` file.

Layout (metadata ``format=mixofshow-fused-bundle``)::

    model.<MODEL state-dict key>          fused weight, e.g. model.diffusion_model.input_blocks.1.1.proj_in.weight
    clip.<CLIP state-dict key>            fused weight, key relative to clip.cond_stage_model,
                                          e.g. clip.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight
    new_concept_embedding.<token>         [16, n, 768] table of every concept

Only weights that fusion changed are stored (the modules some concept has a LoRA on), as full
fused weights (not differences), in the base model's dtype. Metadata: ``base`` (identity string of
the base MODEL/CLIP the bundle was fused on), ``concepts`` (JSON list: name, tokens, sha256 digest of
the ED-LoRA file, strengths), ``settings`` (JSON of the fusion settings), ``version``.

The same file format is used for the on-disk fusion cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .edlora import EDLoRA, EDLoRAError, TOKEN_PATTERN

BUNDLE_FORMAT = "mixofshow-fused-bundle"
BUNDLE_VERSION = "1"


@dataclass
class FusedBundle:
    model: dict[str, torch.Tensor] = field(default_factory=dict)   # MODEL state-dict key -> fused weight
    clip: dict[str, torch.Tensor] = field(default_factory=dict)    # key relative to cond_stage_model
    concepts: list[dict] = field(default_factory=list)             # name, tokens, digest, strengths
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> [16, n, 768]
    base: str = ""
    settings: dict = field(default_factory=dict)

    def edloras(self) -> list[EDLoRA]:
        """One embeddings-only :class:`EDLoRA` per fused concept (its LoRA is already in the weights)."""
        out = []
        for c in self.concepts:
            missing = [t for t in c["tokens"] if t not in self.embeddings]
            if missing:
                raise EDLoRAError(f"fused bundle: concept {c['name']} lists tokens {missing} without tables")
            out.append(EDLoRA(name=c["name"], embeddings={t: self.embeddings[t] for t in c["tokens"]},
                              digest=c.get("digest", "")))
        return out


def save_bundle(bundle: FusedBundle, path: str) -> None:
    tensors = {}
    for k, v in bundle.model.items():
        tensors["model." + k] = v.detach().contiguous().cpu()
    for k, v in bundle.clip.items():
        tensors["clip." + k] = v.detach().contiguous().cpu()
    for tok, t in bundle.embeddings.items():
        tensors["new_concept_embedding." + tok] = t.detach().float().contiguous().cpu()
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "base": bundle.base,
            "concepts": json.dumps(bundle.concepts), "settings": json.dumps(bundle.settings, sort_keys=True)}
    tmp = path + ".part"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written bundle/cache entry behind


def is_bundle(path: str) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == BUNDLE_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a bundle
        return False


def load_bundle(path: str) -> FusedBundle:
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != BUNDLE_FORMAT:
                raise EDLoRAError(f"{name}: not a fused ED-LoRA bundle (format={meta.get('format')!r}); "
                                  f"single ED-LoRAs load with Load ED-LoRA")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except EDLoRAError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EDLoRAError(f"{name}: not a readable safetensors file ({e})") from e
    b = FusedBundle(base=meta.get("base", ""), concepts=json.loads(meta.get("concepts", "[]")),
                    settings=json.loads(meta.get("settings", "{}")))
    for k, v in tensors.items():
        part, _, rest = k.partition(".")
        if part == "model":
            b.model[rest] = v
        elif part == "clip":
            b.clip[rest] = v
        elif part == "new_concept_embedding" and TOKEN_PATTERN.fullmatch(rest):
            b.embeddings[rest] = v if v.ndim == 3 else v.unsqueeze(1)
        else:
            raise EDLoRAError(f"{name}: unexpected tensor '{k}' in a fused bundle")
    return b
