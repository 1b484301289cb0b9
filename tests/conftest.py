"""Test tiers: tests/unit (pure torch), tests/inprocess (in-process ComfyUI), tests/api (real server),
tests/reliability (one server, soak and interrupts), tests/browser (headless Chromium).

Imports: pyproject.toml's ``pythonpath`` (the repo root, tests/support, tools/host, tools); ComfyUI's root is
put in front at run time by tests/support/comfy_env.py. Markers: every test gets its tier's (``pytest -m
unit``); a test marked ``gpu`` is skipped without CUDA."""
import os
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "inprocess", "api", "browser", "reliability")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m selects by them
def pytest_collection_modifyitems(items):
    for item in items:
        path = Path(str(item.path)).resolve()
        tier = path.relative_to(TESTS).parts[0] if TESTS in path.parents else None
        if tier in TIERS:
            item.add_marker(tier)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
