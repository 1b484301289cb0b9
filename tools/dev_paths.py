"""``import dev_paths`` first in a script of tools/ or benchmarks/ run as a file (``python tools/demo.py``):
it makes importable what pyproject.toml's ``pythonpath`` gives the tests: the repo root (``fusion``,
``mixofshow_run``), tests/support (``comfy_env``, ``synthetic``), tools/host (``comfy_server``) and tools
(``demo``). The repo root goes last: ComfyUI's own root, put in front by comfy_env.env(), must win for
its top-level ``nodes`` module over the pack's ``nodes`` package."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO / "tools", REPO / "tools" / "host", REPO / "tests" / "support"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
