"""Region previews as ComfyUI values: an IMAGE output and the node's own preview (saved to the temp
folder and listed under ``"images"`` in the UI message, as core's Preview Image does)."""
from __future__ import annotations

from typing import Any, overload

import numpy as np
import torch
from comfy_api.latest import io, ui

from ...fusion.regions.preview import Color, draw_regions, grey_canvas
from ..names import PREVIEW_PREFIX


def _first_image(image: torch.Tensor) -> np.ndarray:
    img = image[0] if image.dim() == 4 else image
    return img.detach().to("cpu", torch.float32).numpy()


def regions_preview(regions, background: torch.Tensor | None = None, colors: list[Color | None] | None = None,
                    size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """``[1, H, W, 3]`` IMAGE of ``regions`` over ``background`` (an IMAGE; its first picture), else over a
    grey canvas of ``size`` (height, width) or of the first mask's size; None when there is nothing to draw."""
    regions = tuple(regions or ())
    if background is not None:
        picture = _first_image(background)
    elif size is not None:
        picture = grey_canvas(*size)
    elif regions:
        picture = grey_canvas(*regions[0].mask.shape[-2:])
    else:
        return None
    picture = draw_regions([r.mask.numpy() for r in regions], [r.label for r in regions], picture, colors)
    return torch.from_numpy(picture).float().div_(255.0)[None]


@overload
def preview_ui(image: torch.Tensor) -> dict[str, Any]: ...


@overload
def preview_ui(image: None) -> None: ...


def preview_ui(image: torch.Tensor | None) -> dict[str, Any] | None:
    """The UI message that shows ``image`` in the node (None shows nothing)."""
    if image is None:
        return None
    saved = ui.ImageSaveHelper.save_images(image, filename_prefix=PREVIEW_PREFIX,
                                           folder_type=io.FolderType.temp, cls=None, compress_level=1)
    return {"images": saved}
