"""pyproject.toml against the Comfy Registry's published rules (docs.comfy.org/registry/specifications),
requirements.txt against what the shipped code imports, and the icon file (what ComfyUI's own parser reads of
pyproject.toml: tests/inprocess/test_comfyui_metadata.py)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import cv2
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from registry_archive import archive_files, is_git_checkout

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# Top-level modules the pack may import without listing them: ComfyUI itself and what it installs.
PROVIDED_BY_COMFYUI = {"torch", "comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes",
                       "node_helpers", "server", "execution", "latent_preview", "aiohttp",
                       "comfyui_version"}
IMPORT_NAME = {"opencv-python-headless": "cv2", "Pillow": "PIL"}  # distribution -> module, where they differ


def requirements_txt() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in (raw.split("#")[0].strip() for raw in lines) if line]


def test_name_follows_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name), "only letters, digits, '-', '_' and '.'"
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert name[0].isalpha(), "must not start with a digit or a special character"
    assert "comfyui" not in name.lower() and name == name.lower()


def test_version_is_three_part_semver():
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)", PROJECT["version"])


def test_license_description_and_python():
    license_ = PROJECT["license"]
    assert isinstance(license_, dict) and set(license_) in ({"text"}, {"file"}), \
        "license = { text = ... } or { file = ... }"
    if "file" in license_:
        assert (REPO / license_["file"]).is_file()
    assert PROJECT["description"].strip()
    assert Version("3.10") in SpecifierSet(PROJECT["requires-python"])


def test_urls_have_the_repository():
    urls = PROJECT["urls"]
    for key in ("Repository", "Documentation", "Bug Tracker"):
        assert urlparse(urls[key]).scheme == "https", key


def test_classifiers_pass_the_registry_filters():
    """The Registry keeps OS / accelerator classifiers only if every one of them is of its known kinds."""
    classifiers = PROJECT["classifiers"]
    os_values = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    assert os_values and all(v.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for v in os_values)
    accelerators = {c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")}
    assert accelerators <= {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                            "GPU :: Apple Metal"}


def test_tool_comfy_section():
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"])
    assert COMFY["DisplayName"].strip()
    spec = SpecifierSet(COMFY["requires-comfyui"])
    assert Version("0.3.75") in spec, "the version the tests run on"
    # The pack's web folder is WEB_DIRECTORY in __init__.py; a [tool.comfy] web entry would register
    # it a second time under the project name, and the frontend would load the extension twice.
    assert "web" not in COMFY


def test_icon_is_a_square_image_in_this_repository_of_at_most_400px():
    icon = urlparse(COMFY["Icon"])
    repository = urlparse(PROJECT["urls"]["Repository"]).path.strip("/")
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com"
    assert icon.path.startswith(f"/{repository}/"), "the icon is served from the project's own repository"
    path = REPO / icon.path.split("/", 4)[4]  # /owner/repo/branch/<path>
    assert path.suffix.lower() in {".svg", ".png", ".jpg", ".jpeg", ".gif"}
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not a readable image"
    height, width = image.shape[:2]
    assert height == width <= 400


def test_dependencies_equal_requirements_txt():
    declared = sorted(str(Requirement(d)) for d in PROJECT["dependencies"])
    assert declared == sorted(str(r) for r in requirements_txt())


@pytest.mark.skipif(not is_git_checkout(REPO), reason="not a git checkout: the archive's file list needs git")
def test_requirements_are_what_the_shipped_code_imports():
    imported: dict[str, str] = {}
    for name in archive_files(REPO):
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse((REPO / name).read_text(), name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                imported.setdefault(module.split(".")[0], name)
    third_party = {m: f for m, f in imported.items()
                   if m not in sys.stdlib_module_names and m not in PROVIDED_BY_COMFYUI and m != "__future__"}
    listed = {IMPORT_NAME.get(r.name, r.name) for r in requirements_txt()}
    assert set(third_party) == listed, f"imported by the shipped code: {third_party}"

