"""Concept sets and concept-token prompts (design §1-§2), independent of ComfyUI.

A :class:`ConceptSet` is what the pack's nodes pass around as ``EDLORA_CONCEPTS``: the loaded
ED-LoRAs with the strengths they were applied at. It is immutable: adding returns a new set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .edlora import TOKEN_PATTERN, EDLoRA


class ConceptError(ValueError):
    """Token collisions and unknown concept tokens."""


@dataclass(frozen=True)
class Concept:
    edlora: EDLoRA
    text_encoder_strength: float
    unet_strength: float


def concept_label(concept: Concept) -> str:
    return f"{concept.edlora.name} ({concept.edlora.digest[:8] or 'in memory'})"


@dataclass(frozen=True)
class ConceptSet:
    concepts: tuple[Concept, ...] = ()

    def add(self, concept: Concept) -> "ConceptSet":
        owners = self.token_owners()
        for tok in concept.edlora.tokens:
            if tok in owners:
                raise ConceptError(f"concept token {tok} is defined by both '{owners[tok]}' and "
                                   f"'{concept.edlora.name}'; rename one of them (tokens must be unique)")
        return ConceptSet(self.concepts + (concept,))

    def token_owners(self) -> dict[str, str]:
        return {tok: c.edlora.name for c in self.concepts for tok in c.edlora.tokens}

    def labels_for(self, tokens) -> tuple[str, ...]:
        """Which loaded files (``name (digest)``) define these tokens — provenance for conditionings."""
        wanted = set(tokens)
        return tuple(sorted({concept_label(c) for c in self.concepts if wanted & set(c.edlora.tokens)}))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(concept_label(c) for c in self.concepts)

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """token -> ``[16, n, 768]`` table."""
        return {tok: t for c in self.concepts for tok, t in c.edlora.embeddings.items()}

    def describe(self) -> str:
        return "; ".join(f"{c.edlora.name}: {' '.join(c.edlora.tokens)}" for c in self.concepts) or "(empty)"


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

    def repl(m) -> str:
        tok = m.group(0)
        if tok not in tables:
            known = " ".join(sorted(tables)) or "none — load an ED-LoRA first"
            raise ConceptError(f"prompt uses {tok}, which no loaded ED-LoRA defines (loaded tokens: {known})")
        n = tables[tok].shape[1]
        vectors.extend((tok, j) for j in range(n))
        return " " + " ".join([placeholder] * n) + " "

    return Substitution(TOKEN_PATTERN.sub(repl, text), tuple(vectors))
