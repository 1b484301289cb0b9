"""fusion/ is plain torch: no module in it imports ComfyUI (checked on the source, not by importing)."""
import ast
from pathlib import Path

import pytest

FUSION = Path(__file__).resolve().parents[2] / "fusion"
HOST_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes", "node_helpers",
                "server", "execution", "latent_preview"}


@pytest.mark.parametrize("path", sorted(FUSION.glob("*.py")), ids=lambda p: p.name)
def test_no_comfyui_import(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in HOST_MODULES, f"{path.name} imports {name}"
