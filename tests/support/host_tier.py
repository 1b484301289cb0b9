"""Collection for the test tiers that need a ComfyUI host (in-process and api): without one, every
test module of the tier is one skipped test that names the missing ComfyUI, and the module itself
(which imports ``comfy.*`` at the top) is never imported."""
from __future__ import annotations

from pathlib import Path

import pytest


class _HostMissing(pytest.Item):
    """Stands for the module's tests; skipped by its mark, so it never runs."""

    def runtest(self) -> None:
        raise AssertionError("a skipped placeholder ran")

    def reportinfo(self):
        return self.path, 0, self.name


class _ModuleWithoutHost(pytest.File):
    def collect(self):
        item = _HostMissing.from_parent(self, name="needs_comfyui")
        item.add_marker(pytest.mark.skip(reason=self.reason))
        yield item


def module_without_host(module_path: Path, parent, reason: str) -> pytest.File:
    """Return from a conftest's ``pytest_pycollect_makemodule`` when the host is missing."""
    module = _ModuleWithoutHost.from_parent(parent, path=module_path)
    module.reason = reason
    return module
