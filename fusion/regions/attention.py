"""The regional attention of one cross-attention layer (docs/design.md §4), pure torch: how the global and
the regions' contexts are laid out in one key/value sequence, how the projected keys/values are split again,
and the attention that blends them. ComfyUI's attention function is passed in.

Layout of a layer's context (``[B, T_global + R * T, C]``): the global context's own tokens, then each
region's context padded with zeros to the longest region context ``T``; an additive mask hides the padding.
(Padding to the longest with a mask keeps the cost bounded: repeating every context to the least common
multiple of the lengths grows without bound, e.g. 210 chunks for 2/3/5/7.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .blend import blend_regions

Attention = Callable[..., Tensor]  # (q, k, v, heads, mask=None) -> [B, N, heads * dim_head]


@dataclass(frozen=True)
class ContextLayout:
    """Where the parts of one layer's concatenated context are: ``global_tokens``, then each region's
    ``region_tokens``; ``mask`` (``[R*B, 1, region_tokens]``, additive, region-major) hides the padding, or is
    None when nothing was padded."""
    global_tokens: int
    region_tokens: int
    mask: Tensor | None

    def region_slice(self, region: int) -> slice:
        start = self.global_tokens + region * self.region_tokens
        return slice(start, start + self.region_tokens)

    def total_tokens(self, regions: int) -> int:
        return self.global_tokens + regions * self.region_tokens


def pack_region_contexts(contexts: Sequence[Sequence[Tensor]], rows_per_chunk: int, device: torch.device | str,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor | None, int]:
    """The regions' part of a layer's context.

    Args:
        contexts: per region, per batch chunk (positive or negative rows), that region's ``[1, T_rc, C]`` context.
        rows_per_chunk: batch rows of each chunk.
    Returns:
        ``([B, R * T, C]`` region contexts padded with zeros to ``T`` = the longest, the additive mask
        ``[R * B, 1, T]`` (region-major) or None when nothing is padded, ``T``).
    """
    tokens = max(c.shape[1] for region in contexts for c in region)
    parts, valid = [], []
    for region in contexts:
        region = [c.to(device=device, dtype=dtype) for c in region]
        parts.append(torch.cat([F.pad(c, (0, 0, 0, tokens - c.shape[1])).expand(rows_per_chunk, -1, -1)
                                for c in region]))
        valid.append(torch.cat([torch.arange(tokens, device=device).expand(rows_per_chunk, -1) < c.shape[1]
                                for c in region]))
    mask = None
    if not all(bool(v.all()) for v in valid):
        hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask = torch.where(torch.cat(valid), torch.zeros((), dtype=dtype, device=device), hidden)[:, None]
    return torch.cat(parts, dim=1), mask, tokens


def split_regions(x: Tensor, layout: ContextLayout, regions: int) -> tuple[Tensor, Tensor]:
    """Projected keys or values ``[B, T_global + R * T, D]`` -> (global ``[B, T_global, D]``, regions
    ``[R * B, T, D]`` region-major)."""
    b, g, t = x.shape[0], layout.global_tokens, layout.region_tokens
    return x[:, :g], x[:, g:].reshape(b, regions, t, -1).transpose(0, 1).reshape(regions * b, t, -1)


def regional_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, layout: ContextLayout, regions: int,
                       masks_flat: Tensor, attention: Attention, global_attention: Attention | None = None) -> Tensor:
    """One layer's regional cross-attention: the global attention ``h`` (``global_attention``, default
    ``attention``) on the global keys, each region's ``h_r`` of the same queries on its own keys (one batched
    call), blended with the layer's masks ``[R, N]`` (:func:`fusion.regions.blend.blend_regions`).

    ``q`` ``[B, N, D]``; ``k``/``v`` laid out as ``layout`` says. Returns ``[B, N, D]``."""
    b, n_tok, _ = q.shape
    kg, kr = split_regions(k, layout, regions)
    vg, vr = split_regions(v, layout, regions)
    h = (global_attention or attention)(q, kg, vg, heads)
    h_regions = attention(q.repeat(regions, 1, 1), kr, vr, heads, mask=layout.mask).reshape(regions, b, n_tok, -1)
    return blend_regions(h, h_regions, masks_flat)
