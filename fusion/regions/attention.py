"""The regional attention of one cross-attention layer (docs/design.md §4), pure torch: how the global and
the regions' contexts are laid out in one key/value sequence, how the projected keys/values are split again,
and the attention that blends them. ComfyUI's attention function is passed in.

Layout of a layer's context (``[B, T_global + R * T, C]``): the global context's own tokens, then each
region's context padded with zeros to the longest region context ``T``; an additive mask hides the padding.
(Padding to the longest with a mask keeps the cost bounded: repeating every context to the least common
multiple of the lengths grows without bound, e.g. 210 chunks for 2/3/5/7.)

Each region's attention is computed only on the rows (pixels) where its blend weight is nonzero
(:class:`RegionRows`, once per feature size): elsewhere its output is weighted 0. An attention row does
not depend on the other rows, and the blend is rebuilt with the same operations as
:func:`fusion.regions.blend.blend_regions`, so the result is the same, bit for bit, as blending every
region's output on every row (tests/unit/test_regional_attention.py; the behaviour digests on the real
model), as long as the attention rounds each row alike however many rows it is given: true of ComfyUI's CPU
attention from 4 rows up (``_FEWEST_ROWS``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .blend import _region_weights, blend_regions

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


# Fewer query rows than this take another kernel of the CPU BLAS in the attention's products, which rounds
# differently (measured: 1-3 rows differ from the same rows computed among more, 4 and up agree); a region
# reaching fewer rows than this is computed on every row, as cheap at that size.
_FEWEST_ROWS = 4


@dataclass(frozen=True)
class RegionRows:
    """Where each region's attention is needed at one feature size (:func:`region_rows`), and how each row
    is blended. Rows are token indices of the layer's ``[N]`` flattened feature map; a region's output is
    addressed by ``(region, i)``, its ``i``-th row in ``gather``.

    ``gather`` ``[R, n]``: each region's rows, ``n`` the most any region has (a region with fewer repeats
    one, whose output is not used). Rows no region covers keep ``h``; rows one region covers with weight
    1 (``alone_rows``, from ``alone_region``/``alone_index``) take that region's output; rows one region
    covers with weight ``w`` < 1 (``single_rows``, ``single_region``/``single_index``) take
    ``(1 - c) h + w h_r`` (``single_global``, ``single_weight``); rows two or more cover (``shared_rows``)
    are blended from every region's output at ``shared_index`` ``[R, P]`` (a region not covering a row is
    weighted 0 there) with the masks ``shared_masks`` ``[R, P]``."""
    gather: Tensor
    alone_rows: Tensor
    alone_region: Tensor
    alone_index: Tensor
    single_rows: Tensor
    single_region: Tensor
    single_index: Tensor
    single_weight: Tensor
    single_global: Tensor
    shared_rows: Tensor
    shared_index: Tensor
    shared_masks: Tensor

    def to(self, device: torch.device | str) -> RegionRows:
        return RegionRows(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def region_rows(masks_flat: Tensor) -> RegionRows:
    """:class:`RegionRows` of a layer's masks ``[R, N]`` (on the CPU: once per feature size)."""
    weights, coverage = _region_weights(masks_flat)  # the blend's own weights, bit for bit
    covers = weights > 0
    count = covers.sum(dim=0)
    rows = [torch.nonzero(c).flatten() for c in covers]
    n = max(int(r.numel()) for r in rows) if rows else 0
    if 0 < n < _FEWEST_ROWS:  # too few to round like the whole map: every region on every row
        n = masks_flat.shape[1]
        rows = [torch.arange(n)] * len(rows)
    gather = torch.zeros(len(rows), n, dtype=torch.long)
    index = torch.zeros(len(rows), masks_flat.shape[1], dtype=torch.long)  # row -> its index in gather[r]
    for r, own in enumerate(rows):
        gather[r, :own.numel()] = own
        index[r, own] = torch.arange(own.numel())
    region = covers.to(torch.long).argmax(dim=0)  # the covering region of a row one region covers
    own_weight = weights.gather(0, region[None])[0]
    alone = torch.nonzero((count == 1) & (own_weight == 1)).flatten()
    single = torch.nonzero((count == 1) & (own_weight != 1)).flatten()
    shared = torch.nonzero(count > 1).flatten()
    return RegionRows(gather, alone, region[alone], index[region[alone], alone],
                      single, region[single], index[region[single], single], own_weight[single],
                      1.0 - coverage[single], shared, index[:, shared], masks_flat[:, shared].to(torch.float32))


def regional_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, layout: ContextLayout, regions: int,
                       rows: RegionRows, attention: Attention, global_attention: Attention | None = None) -> Tensor:
    """One layer's regional cross-attention: the global attention ``h`` (``global_attention``, default
    ``attention``) on the global keys, each region's ``h_r`` of the same queries on its own keys, on the
    region's rows only (one batched call), blended as :func:`fusion.regions.blend.blend_regions` blends
    them with the layer's masks (``rows``: :func:`region_rows` of the masks ``[R, N]``).

    ``q`` ``[B, N, D]``; ``k``/``v`` laid out as ``layout`` says. Returns ``[B, N, D]`` (``h``, blended in
    place)."""
    b, _, dim = q.shape
    kg, kr = split_regions(k, layout, regions)
    vg, vr = split_regions(v, layout, regions)
    h = (global_attention or attention)(q, kg, vg, heads)
    n = rows.gather.shape[1]
    if n == 0:
        return h  # no region at this size
    batch = torch.arange(b, device=q.device)
    q_regions = q[batch[None, :, None], rows.gather[:, None, :]].reshape(regions * b, n, dim)  # region-major
    h_regions = attention(q_regions, kr, vr, heads, mask=layout.mask).reshape(regions * b, n, -1)
    by_region = h_regions.reshape(regions, b, n, -1)
    if rows.alone_rows.numel():  # (1 - c) h + w h_r with c = w = 1
        h.index_copy_(1, rows.alone_rows, by_region[rows.alone_region, :, rows.alone_index].transpose(0, 1))
    if rows.single_rows.numel():
        single = (h[:, rows.single_rows] * rows.single_global.to(h.dtype)[:, None]
                  + rows.single_weight.to(h.dtype)[:, None]
                  * by_region[rows.single_region, :, rows.single_index].transpose(0, 1))
        h.index_copy_(1, rows.single_rows, single)
    if rows.shared_rows.numel():
        every = torch.arange(regions, device=q.device)[:, None]
        shared = by_region[every, :, rows.shared_index].transpose(1, 2)  # [R, B, P, D]
        h.index_copy_(1, rows.shared_rows, blend_regions(h[:, rows.shared_rows], shared, rows.shared_masks))
    return h
