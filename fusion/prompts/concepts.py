"""Concept sets and concept-token prompts (docs/design.md §3.2, §4.2), independent of ComfyUI.

A :class:`ConceptSet` is what the pack's nodes pass around as ``EDLORA_CONCEPTS``: the loaded
ED-LoRAs with the strengths they were applied at. It is immutable: adding returns a new set.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ConceptError
from ..files.edlora import TOKEN_PATTERN, EDLoRA

# A LoRA module's factors, keyed by the weight it patches (ComfyUI state-dict keys: the MODEL's, e.g.
# "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", or the CLIP's relative to
# cond_stage_model, e.g. "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"):
# (up, down) with the file's alpha/rank scale folded into up and no strength; [out, r] @ [r, in], or
# 4-D conv factors [out, r, 1, 1] @ [r, in, kh, kw].
Factors = Mapping[str, "tuple[torch.Tensor, torch.Tensor]"]



@dataclass(frozen=True)
class Concept:
    """One character: an ED-LoRA (concept tokens with layer-wise tables), or a plain LoRA named in
    prompts by its ``trigger_words`` (``edlora`` then holds the file's name and digest, and textual
    inversion tables if any). ``unet_factors`` / ``text_factors`` are its LoRA as ComfyUI patches it
    (see :data:`Factors`), filled by the loader nodes; the strengths scale them."""
    edlora: EDLoRA
    text_encoder_strength: float
    unet_strength: float
    trigger_words: str = ""
    unet_factors: Factors = field(default_factory=dict)
    text_factors: Factors = field(default_factory=dict)

    @property
    def prompt_words(self) -> str:
        """What names the concept in a prompt: its trigger words, else its tokens in file order."""
        return self.trigger_words or " ".join(self.edlora.tokens)


def concept_label(concept: Concept) -> str:
    return f"{concept.edlora.name} ({concept.edlora.digest[:8] or 'in memory'})"


def normalise_trigger_words(text: str) -> str:
    """Trigger words as compared and used in recording prompts: single spaces, no commas at the ends."""
    return re.sub(r"\s+", " ", text).strip().strip(",").strip()


def _words_collide(a: str, b: str) -> bool:
    """One trigger phrase equals the other or contains it as whole words (case-insensitive)."""
    wa, wb = a.lower().split(), b.lower().split()
    short, long_ = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
    return bool(short) and any(long_[i:i + len(short)] == short for i in range(len(long_) - len(short) + 1))


@dataclass(frozen=True)
class ConceptSet:
    concepts: tuple[Concept, ...] = ()

    def add(self, concept: Concept) -> ConceptSet:
        family = concept.edlora.family
        other = next((c for c in self.concepts if c.edlora.family.name != family.name), None)
        if other is not None:
            raise ConceptError(f"'{concept.edlora.name}' is an {family.label} concept but the concept set holds "
                               f"'{other.edlora.name}', an {other.edlora.family.label} one; one set is for one model "
                               f"family")
        owners = self.token_owners()
        for tok in concept.edlora.tokens:
            if tok in owners:
                raise ConceptError(f"concept token {tok} is defined by both '{owners[tok]}' and "
                                   f"'{concept.edlora.name}'; rename one of them (tokens must be unique)")
        if concept.trigger_words:
            for other in self.concepts:
                if other.trigger_words and _words_collide(other.trigger_words, concept.trigger_words):
                    raise ConceptError(f"trigger words '{concept.trigger_words}' of '{concept.edlora.name}' collide "
                                       f"with '{other.trigger_words}' of '{other.edlora.name}'; each concept needs "
                                       f"its own trigger words (they are plain text in the prompts)")
        return ConceptSet(self.concepts + (concept,))

    def token_owners(self) -> dict[str, str]:
        return {tok: c.edlora.name for c in self.concepts for tok in c.edlora.tokens}

    def labels_for(self, tokens: Iterable[str]) -> tuple[str, ...]:
        """Which loaded files (``name (digest)``) define these tokens — provenance for conditionings."""
        wanted = set(tokens)
        return tuple(sorted({concept_label(c) for c in self.concepts if wanted & set(c.edlora.tokens)}))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(concept_label(c) for c in self.concepts)

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """token -> ``[L, n, C]`` table of its family's first text encoder (SD1.x: its only one)."""
        return {tok: t for c in self.concepts for tok, t in c.edlora.embeddings.items()}

    def tables_of(self, encoder: str) -> dict[str, torch.Tensor]:
        """token -> ``[L, n, C]`` table of the text encoder named ``encoder`` (``clip_l``, ``clip_g``)."""
        return {tok: t for c in self.concepts for tok, t in c.edlora.tables.get(encoder, {}).items()}

    def describe(self) -> str:
        return "; ".join(f"{c.edlora.name}: {c.prompt_words}" for c in self.concepts) or "(empty)"


def find_concept_tokens(text: str) -> list[str]:
    """Angle-bracket tokens in prompt order (``<potter1>``)."""
    return TOKEN_PATTERN.findall(text)


@dataclass(frozen=True)
class Substitution:
    """A prompt with every concept token replaced by ``n`` copies of one placeholder word.

    ``vectors[k]`` is ``(token, j)``: the k-th placeholder occurrence takes vector j of that token.
    """
    text: str
    vectors: tuple[tuple[str, int], ...]


def substitute_concepts(text: str, tables: dict[str, torch.Tensor], placeholder: str) -> Substitution:
    """Replace concept tokens by placeholder words so the host tokenizer can parse weights etc.

    Raises :class:`ConceptError` for an angle-bracket token that no loaded ED-LoRA defines.
    """
    vectors: list[tuple[str, int]] = []

    def repl(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok not in tables:
            known = " ".join(sorted(tables)) or "none — load an ED-LoRA first"
            raise ConceptError(f"prompt uses {tok}, which no loaded ED-LoRA defines (loaded tokens: {known})")
        n = tables[tok].shape[1]
        vectors.extend((tok, j) for j in range(n))
        return " " + " ".join([placeholder] * n) + " "

    return Substitution(TOKEN_PATTERN.sub(repl, text), tuple(vectors))
