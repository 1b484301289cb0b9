"""What ED-LoRA training minimises (docs/design.md §14.3): the masked denoising loss and the attention
regulariser on the cross-attention maps of the concept's tokens, plus the attention that captures those maps."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_denoising_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``mean_b [ Σ_{c,h,w} (prediction − target)² · m / Σ_{h,w} m ]`` in float32.

    ``prediction``/``target`` ``[B, C, h, w]``; ``mask`` ``[B, h, w]`` (one channel): the squared error of every
    latent channel is averaged over the mask and the channels are summed, as the reference does (so the loss is
    ``C`` times the masked mean)."""
    m = mask.float()[:, None]
    error = (prediction.float() - target.float()).square() * m
    return (error.sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))).mean()


def attention_with_maps(q: Tensor, k: Tensor, v: Tensor, heads: int, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-attention computed explicitly, with the attention probabilities of some key positions kept.

    ``q`` ``[B, N, H·D]``, ``k``/``v`` ``[B, T, H·D]`` (projected, heads side by side as ComfyUI passes them);
    ``columns`` ``[B, P]`` key positions per batch row. Returns the attention output ``[B, N, H·D]`` (the
    dtype of ``v``) and ``Σ_heads softmax(q kᵀ / √D)[..., columns]`` ``[B, N, P]`` in float32."""
    b, n, width = q.shape
    d = width // heads
    qh, kh, vh = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).float().softmax(dim=-1)   # [B, H, N, T]
    out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, n, width)
    index = columns[:, None, None, :].expand(b, heads, n, columns.shape[1])
    return out, probs.gather(-1, index).sum(dim=1)


@dataclass(frozen=True)
class LayerMaps:
    """One cross-attention layer's captured maps: ``maps`` ``[B, h·w, P]`` summed over its ``heads``."""
    maps: Tensor
    heads: int
    height: int
    width: int


def attention_regulariser(layers: Sequence[LayerMaps], mask: Tensor, full_identity: bool,
                          weight: float) -> Tensor | None:
    """The reference's attention regulariser, or None where it is undefined (a mask with no zero pixel).

    Layers are grouped by feature size; per size, every (layer, head) weighs the same: the maps are averaged
    over all heads of all its layers, ``[B, h, w, P]``, and each position's map is divided by its maximum over
    the batch and the pixels. ``g`` is ``mask`` (``[B, H, W]``) resized to ``h × w`` by nearest neighbour. With
    two positions, the first (the concept's first token, its "adjective") adds ``mean(A₀[g = 0])``; the last (the
    "subject") adds ``mean(A[g = 0])``, or ``mean((A − g)²)`` over all pixels with ``full_identity``. The result is
    ``weight · Σ_sizes (L_subject + L_adjective)``."""
    by_size: dict[tuple[int, int], list[LayerMaps]] = defaultdict(list)
    for layer in layers:
        by_size[(layer.height, layer.width)].append(layer)
    total = torch.zeros((), device=mask.device)
    for (h, w), group in by_size.items():
        mean = torch.stack([layer.maps.float() for layer in group]).sum(dim=0) / sum(layer.heads for layer in group)
        maps = mean.reshape(mean.shape[0], h, w, -1)
        maps = maps / maps.amax(dim=(0, 1, 2))
        g = F.interpolate(mask.float()[:, None], size=(h, w), mode="nearest")[:, 0].to(maps.device)
        outside = g == 0
        subject = maps[..., -1]
        total = total + (((subject - g).square().mean()) if full_identity else subject[outside].mean())
        if maps.shape[-1] > 1:
            total = total + maps[..., 0][outside].mean()
    if not bool(torch.isfinite(total)):
        return None
    return weight * total
