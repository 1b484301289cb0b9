"""The regional blend (docs/design.md §9.1), pure torch.

The rule, applied in every cross-attention layer to the
rows of one prompt (positive rows with the regions' prompts, unconditional rows
with the regions' negative prompts):

* ``h``   -- the ordinary cross-attention output against the global context;
* ``h_r`` -- the output of the *same queries* against region ``r``'s context;
* per token (pixel of the layer's feature map), with mask values
  ``m_r in [0, 1]``, ``S = sum_r m_r`` and coverage ``c = min(S, 1)``::

      out = (1 - c) * h + c * (sum_r m_r * h_r) / S        (out = h where S == 0)

  For binary masks this is the reference rule: ``h`` outside every region, the
  plain average of the covering regions' ``h_r`` inside (overlaps averaged by
  count).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _region_weights(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Masks ``[R, ...]`` -> (weights ``c * m_r / S`` ``[R, ...]``, coverage ``c = min(S, 1)`` ``[...]``),
    ``S = sum_r m_r``; the weights are 0 where ``S == 0`` (no 0/0). float32."""
    m = masks.to(torch.float32).clamp(0.0, 1.0)
    s = m.sum(dim=0)
    c = s.clamp(max=1.0)
    scale = torch.where(s > 0, c / s.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(s))
    return m * scale[None], c


def blend_weights(masks_flat: Tensor) -> Tensor:
    """Each region's weight in the blend of :func:`blend_regions`, per token: ``[R, N]`` masks ->
    ``[R, N]`` weights ``c * m_r / S`` (the global output gets ``1 - c``). Region LoRAs use the same
    weights (fusion/regions/lowrank.py, docs/design.md §10)."""
    return _region_weights(masks_flat)[0]


def blend_regions(h: Tensor, h_regions: Tensor, masks_flat: Tensor) -> Tensor:
    """Blend the global attention output with the regions' outputs.

    Args:
        h: ``[B, N, C]`` cross-attention output against the global context.
        h_regions: ``[R, B, N, C]`` outputs of the same queries against each region's context.
        masks_flat: ``[R, N]`` per-token mask values in [0, 1] (see :func:`layer_masks`);
            ``[R, B, N]`` gives each batch row its own masks.

    Returns:
        ``[B, N, C]`` in ``h``'s dtype: ``(1 - c) * h + c * sum_r(m_r h_r) / S`` with
        ``S = sum_r m_r`` and ``c = min(S, 1)``; exactly ``h`` where ``S == 0``.
        The per-token weights are computed in float32 and cast once to ``h``'s dtype.
    """
    if h.dim() != 3:
        raise ValueError(f"h must be [B, N, C], got shape {tuple(h.shape)}")
    if h_regions.dim() != 4 or tuple(h_regions.shape[1:]) != tuple(h.shape):
        raise ValueError(
            f"h_regions must be [R, B, N, C] with [B, N, C] = {tuple(h.shape)}, "
            f"got shape {tuple(h_regions.shape)}"
        )
    n_regions, batch, n_tokens, _ = h_regions.shape
    if masks_flat.dim() == 2:
        if tuple(masks_flat.shape) != (n_regions, n_tokens):
            raise ValueError(
                f"masks_flat must be [R, N] = {(n_regions, n_tokens)}, got {tuple(masks_flat.shape)}"
            )
        m = masks_flat[:, None, :]  # [R, 1, N]
    elif masks_flat.dim() == 3:
        if tuple(masks_flat.shape) != (n_regions, batch, n_tokens):
            raise ValueError(
                f"masks_flat must be [R, B, N] = {(n_regions, batch, n_tokens)}, "
                f"got {tuple(masks_flat.shape)}"
            )
        m = masks_flat
    else:
        raise ValueError(f"masks_flat must be [R, N] or [R, B, N], got {tuple(masks_flat.shape)}")

    w_regions, c = _region_weights(m.to(device=h.device))
    w_regions = w_regions.to(h.dtype)  # [R, 1|B, N]
    w_global = (1.0 - c).to(h.dtype)  # [1|B, N]

    out = h * w_global[..., None]
    if n_regions:
        w_regions = w_regions.expand(n_regions, batch, n_tokens)
        out = out + torch.einsum("rbn,rbnc->bnc", w_regions, h_regions.to(h.dtype))
    return out
