"""Issue 23: outside validators keep passing on the example workflows, with the models they name present
(the demo's, as tools/demo.py lays them out): comfy-cli's ``comfy workflow validate`` and comfy-lint, both
reading a real server's /object_info, on the API-format twins (example_workflows/api/); ``comfy workflow
notes`` finds each UI workflow's note. tools/test.sh installs both tools; without them this module skips."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_server import ComfyServer
from server_setup import PACKS

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
TWINS = sorted((EXAMPLES / "api").glob("*.json"))
BIN = Path(sys.executable).parent
TOOLS = {"comfy": BIN / "comfy", "comfy-lint": BIN / "comfy-lint"}
MISSING = [name for name, path in TOOLS.items() if not path.is_file()]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed in this venv (tools/test.sh "
                                                      f"installs comfy-cli 1.23.0 and comfy-lint 0.1.0; it could not)")


@pytest.fixture(scope="module")
def object_info(tmp_path_factory) -> Path:
    """/object_info of a server that has the examples' models, saved for the tools' offline modes."""
    import demo

    root = tmp_path_factory.mktemp("validators")
    demo.prepare(root / "base")
    with ComfyServer(root / "base", PACKS) as server:
        info = server.get("/object_info")
    assert demo.CKPT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    path = root / "object_info.json"
    path.write_text(json.dumps(info))
    return path


def run(tool: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    # a HOME of its own: comfy-cli keeps its config (and would ask about tracking) there
    env = dict(os.environ, HOME=str(home), COMFY_CLI_DISABLE_TRACKING="1", NO_COLOR="1")
    return subprocess.run([str(TOOLS[tool]), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("twin", TWINS, ids=[t.stem for t in TWINS])
def test_comfy_cli_validates_each_example(object_info, twin, tmp_path):
    done = run("comfy", "--skip-prompt", "--json", "workflow", "validate", "--workflow", str(twin),
               "--input", str(object_info), home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True, done.stdout


def test_comfy_lint_passes_every_example(object_info, tmp_path):
    done = run("comfy-lint", "--schema-cache", str(object_info), "--strict", "--color", "never",
               *map(str, TWINS), home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_comfy_cli_finds_each_examples_note(tmp_path):
    for workflow in sorted(EXAMPLES.glob("*.json")):
        done = run("comfy", "--skip-prompt", "--json", "workflow", "notes", str(workflow), home=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Pick your own models" in done.stdout, (workflow.name, done.stdout[:500])
