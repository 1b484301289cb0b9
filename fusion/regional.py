"""Regionally controllable sampling: masks, their per-layer resizing and the blend.

Pure torch (numpy / OpenCV are imported lazily, only by :func:`find_pose_boxes`);
no ComfyUI import here.

The rule (design doc section 4), applied in every cross-attention layer to the
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

Boxes follow the reference convention ``[top, left, bottom, right]`` in pixels of
the output image, ``bottom`` / ``right`` exclusive (a box ``[0, 0, 512, 400]``
covers rows ``0..511``).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "box_to_mask",
    "box_layer_mask",
    "boxes_to_masks",
    "resize_masks",
    "layer_masks",
    "region_layer_masks",
    "feature_hw_for_tokens",
    "blend_regions",
    "blend_weights",
    "parse_box_file",
    "find_pose_boxes",
]


# --------------------------------------------------------------------------- masks


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


def boxes_to_masks(height: int, width: int, boxes: Sequence[Sequence[int]]) -> Tensor:
    """Stack :func:`box_to_mask` for several ``[top, left, bottom, right]`` boxes -> ``[R, H, W]``."""
    if len(boxes) == 0:
        return torch.zeros(0, int(height), int(width), dtype=torch.float32)
    return torch.stack([box_to_mask(height, width, *[int(v) for v in b]) for b in boxes])


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


def region_layer_masks(masks: Tensor, boxes: Sequence[Sequence[int] | None], feature_h: int,
                       feature_w: int) -> Tensor:
    """Every region's mask on a ``feature_h x feature_w`` layer, flattened to ``[R, fh*fw]``.

    ``masks`` ``[R, H, W]`` in pixels of the output image; ``boxes[r]`` is region r's box when its mask
    is exactly that box: it then follows the reference rule (:func:`box_layer_mask`, hard 0/1), other
    masks are area-averaged (:func:`layer_masks`)."""
    if masks.dim() != 3 or len(boxes) != masks.shape[0]:
        raise ValueError(f"expected masks [R, H, W] and R boxes, got {tuple(masks.shape)} and {len(boxes)} boxes")
    height, width = int(masks.shape[1]), int(masks.shape[2])
    rows = [box_layer_mask(box, height, width, feature_h, feature_w).reshape(-1).to(masks.device)
            if box is not None else layer_masks(mask, feature_h, feature_w)[0] for mask, box in zip(masks, boxes)]
    if not rows:
        return torch.zeros(0, int(feature_h) * int(feature_w), dtype=torch.float32, device=masks.device)
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


# --------------------------------------------------------------------------- blend


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
    weights (fusion/regional_lora.py)."""
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


# --------------------------------------------------------------------------- box files

_BOX_LINE = re.compile(
    r"""^\s*([A-Za-z_]\w*)\s*=\s*(['"])\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]\s*\2\s*$"""
)


def parse_box_file(path: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """Boxes from a reference ``.txt`` file, in file order.

    Every line of the form ``name='[a, b, c, d]'`` (four integers, single or
    double quotes) yields ``(name, [a, b, c, d])`` -- ``[top, left, bottom,
    right]``. Prompt lines (``char1='<x> <y>'``, ``region3='a <dogA1>'``) and
    anything else are ignored; names may repeat (``region3`` is used for both
    the prompt and the box in one reference file).
    """
    boxes: list[tuple[str, list[int]]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            match = _BOX_LINE.match(line)
            if match:
                boxes.append((match.group(1), [int(match.group(k)) for k in range(3, 7)]))
    return boxes


# --------------------------------------------------------------------------- pose boxes


def _to_uint8_image(image: Any) -> Any:
    """``[H, W, 3]`` (also ``[1, H, W, C]``, ``[H, W]``, ``[H, W, 4]``) numpy/torch -> uint8 numpy ``[H, W, 3]``."""
    import numpy as np

    if isinstance(image, Tensor):
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"expected a single image, got a batch of shape {arr.shape}")
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W, 3], got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = np.iinfo(arr.dtype).max if arr.max() > 255 else 255
        return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


# An OpenPose rendering of a few people has a handful of separate shapes (the reference images: 1-4);
# thousands mean a photo, noise or a dot pattern, whose box search would only burn time.
MAX_POSE_SHAPES = 2000


def _component_boxes(fg: Any, labels: Any, noise_pixels: float) -> tuple[Any, Any]:
    """Foreground pixel count and box ``[x0, y0, x1, y1)`` of each component, in one pass.

    Counts and boxes are over the original (undilated) foreground; components with fewer than
    ``noise_pixels`` such pixels are left out. Returns int64 ``[k]`` and ``[k, 4]`` in label order.
    Sorting the foreground pixels by label replaces one full-image scan per component (which made
    an image of thousands of dots cost a minute).
    """
    import numpy as np

    ys, xs = np.nonzero(fg)
    labs = labels[ys, xs]
    order = np.argsort(labs, kind="stable")
    labs, xs, ys = labs[order], xs[order].astype(np.int64), ys[order].astype(np.int64)
    ids, starts, counts = np.unique(labs, return_index=True, return_counts=True)
    keep = (ids > 0) & (counts >= noise_pixels)
    boxes = np.stack([np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts),
                      np.maximum.reduceat(xs, starts) + 1, np.maximum.reduceat(ys, starts) + 1], axis=1)
    return counts[keep], boxes[keep]


def _merge_matrix(b: Any, height: int, overlap_frac: float, nest_frac: float, gap_frac: float) -> Any:
    """``[n, n]`` bool: which pairs of large boxes belong to one person (see :func:`find_pose_boxes` step 5)."""
    import numpy as np

    x0, y0, x1, y1 = (b[:, k] for k in range(4))
    ix = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
    iy = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
    area = (x1 - x0) * (y1 - y0)
    overlap = (ix > 0) & (iy > 0) & (ix * iy >= overlap_frac * np.minimum(area[:, None], area[None]))
    narrow = np.minimum((x1 - x0)[:, None], (x1 - x0)[None])
    v_gap = np.maximum(y0[:, None], y0[None]) - np.minimum(y1[:, None], y1[None])  # <= 0 when they overlap
    nested = (ix >= nest_frac * narrow) & (v_gap <= gap_frac * height)
    merge = overlap | nested
    np.fill_diagonal(merge, False)
    return merge


def _groups(n: int, pairs: list[list[int]]) -> Any:
    """Union-find over ``n`` items: each item's group, named by its smallest member (int64 ``[n]``)."""
    import numpy as np

    root = list(range(n))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]  # path halving
            i = root[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            root[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _merge_large(boxes: Any, height: int, overlap_frac: float, nest_frac: float, gap_frac: float,
                 check_interrupt: Callable[[], None] | None = None) -> tuple[Any, int]:
    """Merge large boxes ``[n, 4]`` until no pair should merge; returns ``(boxes [m, 4], rounds)``.

    Each round tests every pair at once (numpy) and unites each connected group of mergeable boxes
    into the place of its first member, so a chain of n pieces takes one round, not n restarts of
    an O(n^2) scan. Rounds repeat because a grown box can reach new neighbours; every round but the
    last removes a box, so there are at most n.
    """
    import numpy as np

    rounds = 0
    while len(boxes) > 1:
        if check_interrupt is not None:
            check_interrupt()
        rounds += 1
        pairs = np.argwhere(np.triu(_merge_matrix(boxes, height, overlap_frac, nest_frac, gap_frac)))
        if not len(pairs):
            break
        group = _groups(len(boxes), pairs.tolist())
        reps = np.unique(group)  # sorted, so the merged boxes keep the order of their first members
        slot = np.searchsorted(reps, group)
        merged = boxes[reps].copy()
        for k, op in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
            op.at(merged[:, k], slot, boxes[:, k])
        boxes = merged
    return boxes, rounds


def find_pose_boxes(
    image: Any,
    margin: float = 0.05,
    min_area_frac: float = 0.002,
    *,
    threshold: int = 40,
    dilate_frac: float = 0.002,
    overlap_frac: float = 0.5,
    nest_frac: float = 0.8,
    gap_frac: float = 0.1,
    check_interrupt: Callable[[], None] | None = None,
) -> list[tuple[int, int, int, int]]:
    """One ``(top, left, bottom, right)`` box per skeleton / outline in a condition image.

    ``image`` is ``[H, W, 3]`` (numpy or torch; uint8, or float in [0, 1]; a
    ComfyUI ``[1, H, W, 3]`` IMAGE also works). Meant for OpenPose renderings
    (coloured limbs on black) and line-art outlines on black.

    Heuristics, in order:

    1. *Foreground*: pixels whose brightest channel exceeds ``threshold`` (of
       255) -- OpenPose limbs are saturated colours, JPEG noise stays far below.
    2. *Frame removal*: any of the outermost ``max(2, 1%)`` rows / columns on each
       side that is more than half foreground is cleared -- it is a border line
       drawn around the picture (one reference image has one), which would
       otherwise join everything into one component.
    3. *Dilation* by ``max(1, dilate_frac * max(H, W))`` pixels (2 px at 1024)
       to heal JPEG-broken or anti-aliased strokes; kept small because
       neighbouring people can come within a few pixels (6 px in a reference).
    4. *Connected components* (8-connectivity, OpenCV). Components with at
       least ``min_area_frac * H * W`` foreground pixels are *large* (person
       candidates); smaller ones are *pieces* (a detached keypoint dot or limb,
       or a speck); fewer than ``max(4, 1e-5 * H * W)`` pixels is noise, ignored.
       More than :data:`MAX_POSE_SHAPES` large components and pieces raise
       :class:`ValueError`: the image is not an OpenPose rendering.
    5. *Merging* (repeated until stable) of two large components when their
       boxes overlap strongly (intersection >= ``overlap_frac`` of the smaller
       box) or when one is horizontally nested in the other (horizontal overlap
       >= ``nest_frac`` of the narrower width) with a vertical gap of at most
       ``gap_frac * H`` -- a head or body part detached from its own body.
       Each round unites every connected group of such pairs (see :func:`_merge_large`).
       Then each piece joins the box of the nearest large component when the
       gap between their boxes is at most ``gap_frac * H``; farther pieces are
       dropped (specks). Pieces never create a box of their own.
    6. Each box is grown by ``margin * W`` left/right and ``margin * H``
       top/bottom, clamped to the image, and the boxes are sorted left to right.

    ``check_interrupt`` (e.g. ComfyUI's ``throw_exception_if_processing_interrupted``)
    is called between the stages and in every merging round; whatever it raises propagates.

    Boxes are in pixels, ``bottom`` / ``right`` exclusive. An image with no
    foreground gives ``[]``.
    """
    import cv2
    import numpy as np

    def interrupt() -> None:
        if check_interrupt is not None:
            check_interrupt()

    img = _to_uint8_image(image)
    height, width = img.shape[:2]
    fg = (img.max(axis=2) > int(threshold)).astype(np.uint8)

    # 2. frame removal
    for axis_len, along_len, is_row in ((height, width, True), (width, height, False)):
        k = min(axis_len, max(2, int(math.ceil(0.01 * axis_len))))
        for idx in list(range(k)) + list(range(axis_len - k, axis_len)):
            line = fg[idx, :] if is_row else fg[:, idx]
            if line.sum() > 0.5 * along_len:
                if is_row:
                    fg[idx, :] = 0
                else:
                    fg[:, idx] = 0

    # 3. dilation
    interrupt()
    radius = max(1, int(round(dilate_frac * max(height, width))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate(fg, kernel)

    # 4. components; boxes and counts over the original (undilated) foreground pixels
    interrupt()
    n_labels, labels = cv2.connectedComponents(grown, connectivity=8)
    if n_labels <= 1:
        return []
    interrupt()
    counts, boxes = _component_boxes(fg, labels, max(4.0, 1e-5 * height * width))
    if len(boxes) > MAX_POSE_SHAPES:
        raise ValueError(f"pose image has {len(boxes)} separate shapes (at most {MAX_POSE_SHAPES} are searched): "
                         f"this does not look like an OpenPose image (coloured skeletons on black); use a pose "
                         f"rendering, or draw the boxes with a box node instead")
    large = counts >= float(min_area_frac) * height * width
    majors, minors = boxes[large], boxes[~large]

    # 5. merging of the large components
    majors, _ = _merge_large(majors, height, overlap_frac, nest_frac, gap_frac, check_interrupt)

    # 5b. small pieces join the nearest large component if close enough, else are dropped
    interrupt()
    grown_boxes = majors.copy()
    if len(majors) and len(minors):
        # gap between boxes, squared (exact integers); argmin keeps the first of equally near ones
        dx = np.maximum(0, np.maximum(minors[:, None, 0], majors[None, :, 0])
                        - np.minimum(minors[:, None, 2], majors[None, :, 2]))
        dy = np.maximum(0, np.maximum(minors[:, None, 1], majors[None, :, 1])
                        - np.minimum(minors[:, None, 3], majors[None, :, 3]))
        dist2 = dx * dx + dy * dy
        nearest = dist2.argmin(axis=1)
        close = dist2[np.arange(len(minors)), nearest] <= (gap_frac * height) ** 2
        for k, col in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
            col.at(grown_boxes[:, k], nearest[close], minors[close, k])
    comps = [[int(v) for v in b] for b in grown_boxes]

    # 6. margin, clamp, order
    mx = float(margin) * width
    my = float(margin) * height
    boxes = []
    for x0, y0, x1, y1 in sorted(comps, key=lambda c: (c[0], c[1])):
        top = max(0, int(math.floor(y0 - my)))
        left = max(0, int(math.floor(x0 - mx)))
        bottom = min(height, int(math.ceil(y1 + my)))
        right = min(width, int(math.ceil(x1 + mx)))
        boxes.append((top, left, bottom, right))
    return boxes

