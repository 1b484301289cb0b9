"""The Regions Editor's boxes: its JSON (a list of ``{top, left, bottom, right, prompt, negative,
control_strength, label, color}`` in pixels of the output image) parsed and checked; every error names the box,
counted from 1 as the editor shows it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .preview import Color, parse_color

MAX_CONTROL_STRENGTH = 10.0


@dataclass(frozen=True)
class EditorBox:
    """One box of the editor, in pixels of the output image (bottom/right exclusive)."""
    top: int
    left: int
    bottom: int
    right: int
    prompt: str
    negative: str = ""
    control_strength: float = 1.0
    label: str = ""
    color: Color | None = None


def _number(box: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = box.get(key, default)
    if value is None:
        raise ValueError(f"{where}: '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: '{key}' must be a finite number, got {json.dumps(value)}")
    return float(value)


def _text(box: dict[str, Any], key: str, where: str) -> str:
    value = box.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be text, got {json.dumps(value)}")
    return value


def parse_boxes(regions_json: str) -> list[EditorBox]:
    """The editor's JSON as boxes; every problem raises :class:`ValueError` naming the box (from 1)."""
    try:
        data = json.loads(regions_json)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"Regions Editor: regions_json is not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError("Regions Editor: regions_json must be a JSON list of boxes")
    if not data:
        raise ValueError("Regions Editor: no boxes; draw at least one box in the editor (or click 'from pose')")
    boxes = []
    for i, box in enumerate(data):
        where = f"Regions Editor box {i + 1}"
        if not isinstance(box, dict):
            raise ValueError(f"{where}: expected an object with top, left, bottom, right and prompt")
        top, left, bottom, right = (round(_number(box, k, where)) for k in ("top", "left", "bottom", "right"))
        prompt = _text(box, "prompt", where)
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty; write who or what is in this box")
        strength = _number(box, "control_strength", where, 1.0)
        if not 0.0 <= strength <= MAX_CONTROL_STRENGTH:
            raise ValueError(f"{where}: control_strength must be between 0 and {MAX_CONTROL_STRENGTH:g}, "
                             f"got {strength:g}")
        color = _text(box, "color", where)
        try:
            rgb = parse_color(color) if color else None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        boxes.append(EditorBox(top, left, bottom, right, prompt=prompt, negative=_text(box, "negative", where),
                               control_strength=strength, label=_text(box, "label", where).strip(), color=rgb))
    return boxes


def clamp_box(box: EditorBox, height: int, width: int, index: int) -> tuple[int, int, int, int]:
    """The box clamped to the image; an empty result raises :class:`ValueError` naming the box."""
    top, bottom = max(0, min(box.top, height)), max(0, min(box.bottom, height))
    left, right = max(0, min(box.left, width)), max(0, min(box.right, width))
    if bottom <= top or right <= left:
        raise ValueError(f"Regions Editor box {index + 1}: [top, left, bottom, right] = "
                         f"[{box.top}, {box.left}, {box.bottom}, {box.right}] is empty inside the {width}×{height} "
                         f"image (clamped to [{top}, {left}, {bottom}, {right}])")
    return top, left, bottom, right
