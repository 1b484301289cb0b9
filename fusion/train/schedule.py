"""The learning-rate schedule and the embedding-norm stop rule of ED-LoRA training (docs/design.md §14.4)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def linear_lr(base: float, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: linear from ``base`` to 0, no warm-up
    (``base · (total − step) / total``)."""
    return base * (total - step) / total


def mean_row_norm(rows: Tensor) -> float:
    """The mean Euclidean norm of a concept's embedding rows (every token, layer and vector; the last axis is the
    embedding)."""
    return float(rows.detach().float().norm(dim=-1).mean())


class EmbeddingStop:
    """The embedding-norm stop rule, one flag per text encoder (docs/design.md §14.4).

    After each optimiser step the mean norm of an encoder's concept rows is compared with its threshold; from
    the step where it reaches it, those rows are frozen (they keep the values of that step). With ``shared``
    (the reference's SDXL behaviour) one flag serves every encoder: the first encoder to reach its threshold
    stops them all, and the others' rows go back to their values before training."""

    def __init__(self, thresholds: Sequence[float], shared: bool = False) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.shared = shared
        self.stopped = [False] * len(self.thresholds)

    def update(self, norms: Sequence[float]) -> tuple[list[int], list[int]]:
        """Record one step's norms; returns (encoders that stop now, keeping their rows; encoders whose rows go
        back to their values before training)."""
        reached = [i for i, (norm, threshold) in enumerate(zip(norms, self.thresholds, strict=True))
                   if not self.stopped[i] and norm >= threshold]
        if not reached:
            return [], []
        if self.shared:
            reverted = [i for i in range(len(self.stopped)) if not self.stopped[i] and i not in reached]
            self.stopped = [True] * len(self.stopped)
            return reached, reverted
        for i in reached:
            self.stopped[i] = True
        return reached, []
