"""Region boxes from pictures: one box per OpenPose skeleton.

OpenCV is imported inside :func:`find_pose_boxes` only (the pack loads without it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .opencv import opencv


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
    cv2 = opencv("finding people in a pose image")
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
