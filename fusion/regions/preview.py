"""Region previews: each region's mask in its colour, outlined and labelled, over the pose image or a
grey canvas (the picture the Regions Editor, Regions from Pose and the Regional KSampler/Guider show).

Pure numpy + OpenCV (imported when a preview is drawn); no ComfyUI import. Images are RGB ``uint8`` ``[H, W, 3]``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .opencv import opencv

# The editor (js/lib/regions.js) gives new boxes the same colours, in the same order.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990")
CANVAS_GREY = (64, 64, 64)
_FILL_ALPHA = 0.35
_HEX = re.compile(r"#[0-9a-fA-F]{6}")
_MAX_LABEL = 40

Color = tuple[int, int, int]


def parse_color(text: str) -> Color:
    """``"#rrggbb"`` -> ``(r, g, b)``; raises :class:`ValueError` for anything else."""
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise ValueError(f"a colour must be written #rrggbb, got {text!r}")
    r, g, b = bytes.fromhex(text[1:])
    return r, g, b


def region_color(index: int) -> Color:
    """The default colour of region ``index`` (0-based)."""
    return parse_color(PALETTE[index % len(PALETTE)])


def grey_canvas(height: int, width: int) -> np.ndarray:
    """The background used when there is no pose image."""
    if height <= 0 or width <= 0:
        raise ValueError(f"canvas size must be positive, got {height}x{width}")
    return np.full((int(height), int(width), 3), CANVAS_GREY, dtype=np.uint8)


def _background(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"the background must be an [H, W, 3] image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.rint(arr * 255.0), 0, 255)
    return np.ascontiguousarray(arr, dtype=np.uint8)  # a copy: the caller's image is never drawn on


def _fit(mask: np.ndarray, height: int, width: int) -> npt.NDArray[np.float32]:
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"each mask must be [H, W], got shape {m.shape}")
    if m.shape != (height, width):
        cv2 = opencv("drawing a region preview")
        m = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(m), 0.0, 1.0)


def _printable(label: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in label)
    return text if len(text) <= _MAX_LABEL else text[:_MAX_LABEL - 1] + "~"


def _text_color(color: Color) -> Color:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_regions(masks: Sequence[np.ndarray], labels: Sequence[str], background: np.ndarray | None = None,
                 colors: Sequence[Color | None] | None = None) -> np.ndarray:
    """The preview picture.

    Args:
        masks: one ``[h, w]`` float mask in [0, 1] per region (resized to the background if needed).
        labels: one label per region, drawn as ``"<n>: <label>"`` (n from 1) at the region's top left.
        background: ``[H, W, 3]`` uint8 (or float in [0, 1]) image; default a grey canvas the size of
            the first mask.
        colors: per region an ``(r, g, b)`` or None for the default :data:`PALETTE` colour.

    Returns:
        A new ``[H, W, 3]`` uint8 image: each mask filled at 35 % in its colour, outlined, labelled.
    """
    if len(labels) != len(masks):
        raise ValueError(f"{len(masks)} mask(s) but {len(labels)} label(s)")
    if colors is not None and len(colors) != len(masks):
        raise ValueError(f"{len(masks)} mask(s) but {len(colors)} colour(s)")
    if background is None:
        if not len(masks):
            raise ValueError("nothing to draw: no regions and no background image")
        background = grey_canvas(*np.asarray(masks[0]).shape[:2])
    out = _background(background)
    height, width = out.shape[:2]
    fitted = [_fit(m, height, width) for m in masks]
    given: Sequence[Color | None] = colors if colors is not None else [None] * len(masks)
    palette = [c if c is not None else region_color(i) for i, c in enumerate(given)]
    canvas = out.astype(np.float32)
    for m, color in zip(fitted, palette, strict=True):
        weight = (_FILL_ALPHA * m)[:, :, None]
        canvas = canvas * (1.0 - weight) + np.asarray(color, np.float32) * weight
    out = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    thickness = max(2, round(min(height, width) / 200))
    font_scale = max(0.45, min(height, width) / 560)
    cv2 = opencv("drawing a region preview")
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, (m, color, label) in enumerate(zip(fitted, palette, labels, strict=True)):
        inside = (m >= 0.5).astype(np.uint8)
        if not inside.any():
            continue
        contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, color, thickness)
        ys, xs = np.nonzero(inside)
        text = _printable(f"{i + 1}: {label}")
        (tw, th), base = cv2.getTextSize(text, font, font_scale, 1 + thickness // 2)
        pad = max(2, thickness)
        x0 = int(min(xs.min() + thickness, max(0, width - tw - 2 * pad)))
        y0 = int(min(ys.min() + thickness, max(0, height - th - base - 2 * pad)))
        cv2.rectangle(out, (x0, y0), (x0 + tw + 2 * pad, y0 + th + base + 2 * pad), color, cv2.FILLED)
        cv2.putText(out, text, (x0 + pad, y0 + pad + th), font, font_scale, _text_color(color), 1 + thickness // 2,
                    cv2.LINE_AA)
    return out
