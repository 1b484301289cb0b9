"""A LoRA per region in one UNet pass (docs/design.md §10): every patched layer computes

    y = W0 x + sum_r w_r(p) * delta_r(x),        delta_r(x) = up_r(down_r(x)),

where ``W0 x`` is the sampling model's own output of the layer, ``delta_r`` region r's low-rank LoRA
product (strength and alpha/rank folded into ``up_r``) and ``w_r(p)`` region r's weight at output
position ``p``: the same mask blend as the regional attention (``c * m_r / S``,
:func:`fusion.regions.blend.blend_weights`), so outside all regions the layer is the sampling model's and
binary overlaps are averaged. Because the weight is a scalar per position, it is applied between the
two factors, ``w_r * (x D_r^T) U_r^T``: two thin matrix products for all regions together
(:class:`LowRankBank`), the second one added into the layer's output in place (no temporary of the
output's size). Plain torch; no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LowRankBank"]


@dataclass
class _Factors:
    regions: list[int]   # region index of each factor pair, in order
    ranks: list[int]
    down: Tensor         # [sum r, in] or [sum r, in, kh, kw]
    up: Tensor           # [out, sum r]


class LowRankBank:
    """The LoRA factors of several regions on one layer, stacked: ``down`` rows and ``up`` columns of
    region ``regions[i]`` have rank ``ranks[i]``.

    Args:
        pairs: per region index, ``(up, down)`` with ``up`` ``[out, r]`` (or ``[out, r, 1, 1]``) and
            ``down`` ``[r, in]`` (linear / 1x1 conv) or ``[r, in, kh, kw]`` (conv).
    """

    def __init__(self, pairs: dict[int, tuple[Tensor, Tensor]]):
        if not pairs:
            raise ValueError("a LowRankBank needs at least one region's factors")
        regions = sorted(pairs)
        ups = [pairs[r][0].reshape(pairs[r][0].shape[0], pairs[r][0].shape[1]).float() for r in regions]
        downs = [pairs[r][1].float() for r in regions]
        if len({d.shape[1:] for d in downs}) != 1 or len({u.shape[0] for u in ups}) != 1:
            raise ValueError("regions' LoRA factors for one layer must have the same in/out shapes")
        self.is_conv = downs[0].dim() == 4
        self._base = _Factors(regions, [d.shape[0] for d in downs], torch.cat(downs), torch.cat(ups, dim=1))
        self._cast: dict[tuple[torch.device, torch.dtype], _Factors] = {}
        # id(weights) -> [N, sum r] column weights (weights are cached by the caller)
        self._columns: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}

    @property
    def regions(self) -> list[int]:
        return self._base.regions

    @property
    def rank(self) -> int:
        """Columns of :meth:`project`: the regions' ranks together."""
        return int(self._base.down.shape[0])

    def _factors(self, like: Tensor) -> _Factors:
        key = (like.device, like.dtype)
        if key not in self._cast:
            b = self._base
            self._cast[key] = _Factors(b.regions, b.ranks, b.down.to(like.device, like.dtype),
                                       b.up.to(like.device, like.dtype))
        return self._cast[key]

    def _column_weights(self, weights: Tensor, f: _Factors) -> Tensor:
        """``[R, N]`` blend weights -> ``[N, sum r]``: each factor column gets its region's weight."""
        key = (id(weights), f.down.dtype)
        if key not in self._columns:
            per_region = weights[f.regions]  # [regions here, N]
            ranks = torch.tensor(f.ranks, device=weights.device)
            self._columns[key] = (weights, torch.repeat_interleave(per_region, ranks, dim=0).mT.contiguous())
        return self._columns[key][1]

    def project(self, x: Tensor, weights: Tensor | None) -> Tensor:
        """The weighted down-projection ``w_r(p) * down_r(x_p)`` of token rows ``x`` ``[..., N, in]``:
        ``[..., N, sum r]``; ``weights`` ``[R, N]`` (``None``: weight 1 for every region, every row)."""
        f = self._factors(x)
        z = x @ f.down.mT
        if weights is not None:
            z = z * self._column_weights(weights, f).to(x.dtype)
        return z

    def add_up(self, z: Tensor, into: Tensor) -> Tensor:
        """``into + z up^T`` for a layer's output ``into`` ``[..., N, out]`` and ``z`` from :meth:`project`:
        added in place, one fused product without a temporary of the output's size, rounded as the sum
        is; a new tensor when ``into`` cannot take it in place (not contiguous, another dtype or device).
        (A down-projection stacked over layers that share an input, q/k/v, would not round the same: the
        BLAS picks other kernels for other widths.)"""
        f = self._factors(z)
        if into.is_contiguous() and into.dtype == z.dtype and into.device == z.device:
            return into.view(-1, into.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), f.up.mT).view(into.shape)
        return into + z @ f.up.mT

    def linear(self, x: Tensor, weights: Tensor | None) -> Tensor:
        """``sum_r w_r(p) up_r(down_r(x_p))`` for token rows ``x`` ``[..., N, in]``; ``weights`` ``[R, N]``
        (``None``: weight 1 for every region, every row)."""
        return self.project(x, weights) @ self._factors(x).up.mT

    def broadcast(self, x: Tensor, weights: Tensor) -> Tensor:
        """For a layer whose output is added to every pixel (a ResNet block's time embedding): rows ``x``
        ``[B, in]``, weights ``[R, N]`` -> ``[B, out, N]``, ``sum_r w_r(p) up_r(down_r(x_b))``."""
        f = self._factors(x)
        z = x @ f.down.mT  # [B, sum r]
        cw = self._column_weights(weights, f).to(x.dtype)  # [N, sum r]
        return torch.einsum("bk,nk,ok->bon", z, cw, f.up)

    def segments(self, x: Tensor, rows_of_region: dict[int, slice]) -> Tensor:
        """Context rows made of segments (the global prompt's, then one per region): region r's product
        applies to its own rows ``rows_of_region[r]`` only, with weight 1."""
        f = self._factors(x)
        out = torch.zeros(*x.shape[:-1], f.up.shape[0], device=x.device, dtype=x.dtype)
        start = 0
        for region, rank in zip(f.regions, f.ranks, strict=True):
            rows = rows_of_region.get(region)
            if rows is not None:
                out[..., rows, :] = (x[..., rows, :] @ f.down[start:start + rank].mT) @ f.up[:, start:start + rank].mT
            start += rank
        return out

    def conv(self, x: Tensor, weights: Tensor | None, stride: int | tuple[int, ...],
             padding: int | tuple[int, ...] | str, dilation: int | tuple[int, ...], out_hw: tuple[int, int]) -> Tensor:
        """The same for a conv layer: ``x`` ``[B, in, h, w]``, ``weights`` ``[R, h'*w']`` at the output size.
        (Both products stay convolutions: a matrix product would round differently.)"""
        f = self._factors(x)
        down = f.down if f.down.dim() == 4 else f.down[:, :, None, None]
        z = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)  # [B, sum r, h', w']
        if weights is not None:
            cw = self._column_weights(weights, f).to(x.dtype)  # [h'w', sum r]
            z = z * cw.mT.reshape(1, -1, out_hw[0], out_hw[1])
        return F.conv2d(z, f.up[:, :, None, None])
