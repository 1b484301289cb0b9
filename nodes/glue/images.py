"""Pictures the editor and the pose nodes read: the pose images shipped in ``assets/poses``, images of
ComfyUI's input/output/temp folders (kept inside them), and pose boxes found in either. Pillow is imported
only when an image is read."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import numpy as np
import torch

from ...fusion.regions.pose import find_pose_boxes

POSES_DIR = Path(__file__).resolve().parents[2] / "assets" / "poses"  # the pack root's assets/poses


_POSE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}


DEFAULT_MARGIN = 0.05  # Regions from Pose's default


def reference_poses() -> list[str]:
    """The pose images shipped in assets/poses."""
    if not POSES_DIR.is_dir():
        return []
    return sorted(p.name for p in POSES_DIR.iterdir() if p.suffix.lower() in _POSE_EXTENSIONS and p.is_file())


def pose_path(name: str) -> Path:
    if name not in reference_poses():
        raise ValueError(f"'{name}' is not one of the shipped poses ({', '.join(reference_poses()) or 'none'})")
    return POSES_DIR / name


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file (EXIF rotation applied, as Load Image does)."""
    from PIL import Image, ImageOps  # only when an image is read

    with Image.open(path) as img:
        return np.array(ImageOps.exif_transpose(img).convert("RGB"))


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """``[H, W]`` float32 in [0, 1] of an image file read as grey levels (a mask: white = 1)."""
    from PIL import Image, ImageOps  # only when an image is read

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("L"), dtype=np.float32) / 255.0


def to_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> ComfyUI IMAGE ``[1, H, W, 3]`` float in [0, 1]."""
    return torch.from_numpy(rgb).float().div_(255.0)[None]


def user_image_path(ref: dict) -> str:
    """The file of a ``{filename, subfolder, type}`` reference (as /view takes), kept inside its folder."""
    kind = str(ref.get("type") or "input")
    folder = folder_paths.get_directory_by_type(kind)
    if folder is None:
        raise ValueError(f"unknown image folder type '{kind}' (input, output or temp)")
    filename = str(ref.get("filename") or "")
    if not filename:
        raise ValueError("no image file named")
    path = os.path.abspath(os.path.join(folder, str(ref.get("subfolder") or ""), filename))
    if os.path.commonpath([path, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise ValueError(f"'{filename}' is outside the {kind} folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image '{filename}' in the {kind} folder")
    return path


def pose_boxes_for(source: dict, margin: float = DEFAULT_MARGIN) -> dict:
    """What the editor's "from pose" button gets: the image size and one ``[top, left, bottom, right]``
    box per skeleton, left to right, from the detector Regions from Pose uses. ``source`` is
    ``{"pose": name}`` (a shipped pose) or an image reference ``{filename, subfolder, type}``."""
    margin = float(margin)
    if not 0.0 <= margin <= 0.5:
        raise ValueError(f"margin must be between 0 and 0.5, got {margin}")
    path = pose_path(str(source["pose"])) if source.get("pose") else user_image_path(source)
    rgb = read_rgb(path)
    boxes = find_pose_boxes(rgb, margin=margin)
    return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "boxes": [list(b) for b in boxes]}
