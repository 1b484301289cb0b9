"""Region masks and their size at each layer: boxes, the reference's per-layer box rule, exact area
resizing, and the feature-map size of a layer. Pure torch.

Boxes follow the reference convention ``[top, left, bottom, right]`` in pixels of the output image,
``bottom`` / ``right`` exclusive (a box ``[0, 0, 512, 400]`` covers rows ``0..511``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def box_to_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> Tensor:
    """A ``[height, width]`` float32 mask, 1 inside ``[top:bottom, left:right]``, 0 elsewhere.

    The box is clamped to the image first; a box that is empty after clamping
    raises :class:`ValueError` naming the box.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    box = [int(top), int(left), int(bottom), int(right)]
    t = min(max(box[0], 0), height)
    b = min(max(box[2], 0), height)
    l_ = min(max(box[1], 0), width)
    r = min(max(box[3], 0), width)
    if b <= t or r <= l_:
        raise ValueError(
            f"box [top, left, bottom, right] = {box} is empty inside a {height}x{width} image "
            f"(clamped to [{t}, {l_}, {b}, {r}])"
        )
    mask = torch.zeros(height, width, dtype=torch.float32)
    mask[t:b, l_:r] = 1.0
    return mask


def box_layer_mask(box: Sequence[int], height: int, width: int, feature_h: int, feature_w: int) -> Tensor:
    """The reference's per-layer mask of a box: hard 0/1 on a ``feature_h x feature_w`` map.

    A box ``[top, left, bottom, right]`` in pixels of a ``height x width`` image covers rows
    ``ceil(top*fh/H) : floor(bottom*fh/H)`` and columns ``ceil(left*fw/W) : floor(right*fw/W)``
    (Mix-of-Show rasterises every box this way at every feature size; a thin box can vanish at the
    coarse layers). Computed from integers, so it is exact.
    """
    top, left, bottom, right = (int(v) for v in box)
    height, width, fh, fw = int(height), int(width), int(feature_h), int(feature_w)
    if min(height, width, fh, fw) <= 0:
        raise ValueError(f"sizes must be positive, got image {height}x{width}, feature map {fh}x{fw}")
    r0, r1 = -(-top * fh // height), bottom * fh // height
    c0, c1 = -(-left * fw // width), right * fw // width
    mask = torch.zeros(fh, fw, dtype=torch.float32)
    mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = 1.0
    return mask


def _resample_matrix(in_size: int, out_size: int) -> Tensor:
    """1-D resampling operator ``[out_size, in_size]`` (float64).

    * ``out_size <= in_size``: exact area averaging. Output cell ``i`` covers the
      input interval ``[i*in/out, (i+1)*in/out)``; input pixel ``j`` (interval
      ``[j, j+1)``) contributes its overlap length divided by the cell length.
      Rows sum to 1 and columns sum to ``out/in``, so the total mass scales by
      exactly ``out/in`` (area preservation), and a box aligned to the output
      grid stays exactly binary. Cell boundaries are computed as ``(i*in)/out``
      from integers, so they are exact whenever they fall on a pixel border.
    * ``out_size > in_size``: linear interpolation with half-pixel centres
      (``align_corners=False``), the same operator as ``F.interpolate(...,
      mode="bilinear")`` along one axis.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    if out_size <= in_size:
        i = torch.arange(out_size, dtype=torch.float64)[:, None]
        j = torch.arange(in_size, dtype=torch.float64)[None, :]
        start = (i * in_size) / out_size
        end = ((i + 1) * in_size) / out_size
        overlap = (torch.minimum(end, j + 1) - torch.maximum(start, j)).clamp_min(0.0)
        return overlap * (out_size / in_size)
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    j0 = src.floor().long().clamp_max(in_size - 1)
    j1 = (j0 + 1).clamp_max(in_size - 1)
    lam = src - j0.to(torch.float64)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, j0), 1.0 - lam, accumulate=True)
    mat.index_put_((rows, j1), lam, accumulate=True)
    return mat


def resize_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """Resize masks ``[R, H, W]`` (or ``[H, W]``) to ``[R, height, width]`` float32 in [0, 1].

    Each axis is resampled separately: by exact area averaging where it shrinks
    (so grid-aligned boxes stay binary, partly covered cells get their covered
    fraction, and the mask sum scales by ``height*width / (H*W)``), by linear
    interpolation (half-pixel centres, as bilinear ``F.interpolate``) where it
    grows. The result is clamped to [0, 1] and lives on the input's device.
    """
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3:
        raise ValueError(f"masks must be [R, H, W] or [H, W], got shape {tuple(masks.shape)}")
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    r, in_h, in_w = masks.shape
    device = masks.device
    m = masks.to(dtype=torch.float64)
    if r == 0:
        return torch.zeros(0, height, width, dtype=torch.float32, device=device)
    if (in_h, in_w) != (height, width):
        mh = _resample_matrix(in_h, height).to(device)
        mw = _resample_matrix(in_w, width).to(device)
        m = torch.einsum("oh,rhw,pw->rop", mh, m, mw)
    return m.clamp(0.0, 1.0).to(torch.float32)


def layer_masks(masks: Tensor, feature_h: int, feature_w: int) -> Tensor:
    """Masks resized to a ``feature_h x feature_w`` feature map, flattened to ``[R, feature_h*feature_w]``.

    Flattening is row-major, i.e. the token order of ``b c h w -> b (h w) c``.
    """
    resized = resize_masks(masks, feature_h, feature_w)
    return resized.reshape(resized.shape[0], int(feature_h) * int(feature_w))


def region_layer_masks(masks: Sequence[Tensor] | Tensor, boxes: Sequence[Sequence[int] | None], feature_h: int,
                       feature_w: int) -> Tensor:
    """Every region's mask on a ``feature_h x feature_w`` layer, flattened to ``[R, fh*fw]``.

    ``masks``: one ``[H_r, W_r]`` mask per region (or a stacked ``[R, H, W]``), each covering the whole
    output image at its own size (a 512 x 512 and a 1024 x 1024 mask may sample together: each is resized
    as it would be alone); ``boxes[r]`` is region r's box, in pixels of its mask, when the mask is exactly
    that box: it then follows the reference rule (:func:`box_layer_mask`, hard 0/1), other masks are
    area-averaged (:func:`layer_masks`)."""
    if len(boxes) != len(masks) or any(m.dim() != 2 for m in masks):
        raise ValueError(f"expected one [H, W] mask and one box per region, got {[tuple(m.shape) for m in masks]} "
                         f"and {len(boxes)} boxes")
    rows = [box_layer_mask(box, int(mask.shape[0]), int(mask.shape[1]), feature_h, feature_w).reshape(-1)
            .to(mask.device) if box is not None else layer_masks(mask, feature_h, feature_w)[0]
            for mask, box in zip(masks, boxes, strict=True)]
    if not rows:
        return torch.zeros(0, int(feature_h) * int(feature_w), dtype=torch.float32)
    return torch.stack(rows)


def feature_hw_for_tokens(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` of a feature map with ``n_tokens`` tokens for an image/mask of ``height x width``.

    Tries the UNet chain first: repeated halving with ceiling (stride-2 convs with
    padding 1), starting from the given size (pixel or latent size both work).
    Failing that, the factorisation ``h * w == n_tokens`` whose aspect ratio is
    closest to ``height / width``.
    """
    n_tokens, height, width = int(n_tokens), int(height), int(width)
    if n_tokens <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"sizes must be positive, got n_tokens={n_tokens}, {height}x{width}")
    h, w = height, width
    for _ in range(32):
        if h * w == n_tokens:
            return h, w
        if h * w < n_tokens or (h == 1 and w == 1):
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    target = math.log(height / width)
    best: tuple[int, int] | None = None
    best_err = float("inf")
    for fh in range(1, n_tokens + 1):
        if n_tokens % fh:
            continue
        fw = n_tokens // fh
        err = abs(math.log(fh / fw) - target)
        if err < best_err:
            best, best_err = (fh, fw), err
    assert best is not None
    return best
