"""Write example_workflows/api/<name>.json, the API-format twin of each example workflow: the
example converted by the runner's own converter (mixofshow_run.ui_to_api) through the /object_info
of a real ComfyUI server started here with the pack. Re-run after changing an example or a node
definition; tests/api/test_runner.py checks that the twins are current.

usage: .host/venv/bin/python tools/make_api_twins.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import dev_paths  # isort: split

from comfy_server import ComfyServer

import mixofshow_run

REPO = dev_paths.REPO

EXAMPLES = REPO / "example_workflows"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mixofshow-twins-") as base, \
            ComfyServer(Path(base), {"mixofshow": REPO}) as server:
        object_info = server.get("/object_info")
    twins = EXAMPLES / "api"
    twins.mkdir(exist_ok=True)
    examples = sorted(EXAMPLES.glob("*.json"))
    for path in examples:
        prompt = mixofshow_run.ui_to_api(json.loads(path.read_text()), object_info)
        (twins / path.name).write_text(json.dumps(prompt, indent=1) + "\n")
        print("wrote", twins / path.name, len(prompt), "nodes")
    for stale in sorted(set(twins.glob("*.json")) - {twins / p.name for p in examples}):
        stale.unlink()
        print("removed", stale, "(no such example)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
