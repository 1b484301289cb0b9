"""Region boxes for the tests and tools/make_example_workflows.py (moved out of the pack, which never used them):
the reference's box files (``assets/poses/*.txt``) and the masks of several boxes at once."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion.regions.masks import box_to_mask

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


def boxes_to_masks(height: int, width: int, boxes: Sequence[Sequence[int]]) -> Tensor:
    """Stack :func:`fusion.regions.masks.box_to_mask` for several ``[top, left, bottom, right]`` boxes ->
    ``[R, H, W]``."""
    if len(boxes) == 0:
        return torch.zeros(0, int(height), int(width), dtype=torch.float32)
    return torch.stack([box_to_mask(height, width, *[int(v) for v in b]) for b in boxes])
