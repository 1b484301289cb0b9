"""Test tiers: tests/unit (pure torch), tests/inprocess (in-process ComfyUI), tests/api (real server),
tests/browser (headless Chromium). The repo root is appended to sys.path so the pure core imports
as ``fusion``; ComfyUI's own root goes in front (it has a top-level ``nodes`` module too)."""
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
