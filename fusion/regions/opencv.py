"""OpenCV, imported when a region preview is drawn or a pose image searched (never when the pack loads), with
an error that says which package to install."""
from __future__ import annotations

from types import ModuleType


def opencv(purpose: str) -> ModuleType:
    """The ``cv2`` module; ImportError naming ``purpose`` and the package when it is not installed."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"Mix-of-Show: {purpose} needs OpenCV; install the pack's requirements.txt "
                          f"(the package opencv-python-headless) into ComfyUI's Python") from e
    return cv2
