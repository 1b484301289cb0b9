"""The archive the Comfy Registry builds from the repository (git-tracked files minus .comfyignore),
zipped and unzipped: no development files, nothing the Registry's scanner flags, and the pack loads
from it alone in a real ComfyUI server with every node and its web extension."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from comfy_server import ComfyServer
from registry_archive import build_archive, is_git_checkout

REPO = Path(__file__).resolve().parents[2]
DEVELOPMENT_ONLY = ("tests/", "benchmarks/", "tools/", ".ci/", "requirements-dev.txt")
pytestmark = pytest.mark.skipif(not is_git_checkout(REPO), reason="not a git checkout: the archive is built from git")


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("registry-archive")
    files = build_archive(REPO, root / "node.zip")
    folder = root / "mixofshow"  # the folder a Registry install unpacks into (custom_nodes/<node id>)
    with zipfile.ZipFile(root / "node.zip") as archive:
        archive.extractall(folder)
    return folder, files


def test_archive_holds_the_pack_and_no_development_files(unzipped):
    folder, files = unzipped
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == files
    assert not [n for n in names if n.startswith(DEVELOPMENT_ONLY)]
    assert {"README.md", "__init__.py", "pyproject.toml", "requirements.txt", "mixofshow_run.py",
            "js/mixofshow.js", "assets/icon.png", "assets/poses/NOTICE.md"} <= set(names)


def test_nothing_in_it_starts_processes_or_installs_packages(unzipped):
    folder, _ = unzipped
    flagged = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
               and (b"subprocess" in p.read_bytes() or b"pip install" in p.read_bytes())]
    assert not flagged, "the Registry's scanner flags these"


def test_pack_loads_from_the_archive_alone(server, unzipped, tmp_path):
    folder, _ = unzipped
    in_repo = {name for name in server.get("/object_info") if name.startswith("MixOfShow")}
    with ComfyServer(tmp_path / "base", {"mixofshow": folder}) as archived:
        nodes = {name for name in archived.get("/object_info") if name.startswith("MixOfShow")}
        extensions = archived.get("/extensions")
    assert in_repo and nodes == in_repo
    assert "/extensions/mixofshow/mixofshow.js" in extensions
