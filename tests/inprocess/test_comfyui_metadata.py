"""pyproject.toml as ComfyUI itself reads it (moved from tests/unit/test_packaging.py: it imports ComfyUI)."""
from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]


def test_comfyui_reads_the_same_metadata(env):
    """ComfyUI's own pyproject parser (comfy_config, kept in sync with comfy-cli's) sees every field."""
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(REPO))
    assert config.project.name == PROJECT["name"] and config.project.version == PROJECT["version"]
    assert config.project.urls.repository == PROJECT["urls"]["Repository"]
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_comfyui_version == COMFY["requires-comfyui"]
    assert config.tool_comfy.publisher_id == COMFY["PublisherId"] and config.tool_comfy.icon == COMFY["Icon"]
