"""Release 0.1.0's files still work with today's pack (tests/fixtures/v0_1_0/, saved verbatim from the
release): its two example workflows (web UI format) and the two API prompts written against it.

On a server whose base directory ``tools/demo.py``'s ``prepare`` filled with the demo's models (the
full-size random SD1.5, three full-size synthetic ED-LoRAs, the random OpenPose T2I-Adapter, the pose
image):

* each UI workflow, converted through today's ``/object_info`` by the headless runner's converter
  (tests/api/test_runner.py checks that converter against the frontend's own graphToPrompt), is
  exactly the 0.1.0 API prompt of the same graph (the converter adds node titles in ``_meta``, which the
  server ignores and the 0.1.0 prompts do not carry);
* both 0.1.0 API prompts are accepted unchanged (``POST /prompt`` → 200, no node errors), then
  cancelled: at 1024×512 and 20 steps on the full-size model they take far too long on a CPU;
* so both also run to completion through ``python -m mixofshow_run``, unchanged except for the step
  counts and image sizes lowered with ``--set``: sampling 1 step at 256×128, and in the fusion graph
  Gradient Fusion 1 step at 64×64.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import demo
import pytest
from comfy_server import ComfyServer
from PIL import Image
from server_events import interrupt

import mixofshow_run

REPO = Path(__file__).resolve().parents[2]

V010 = REPO / "tests" / "fixtures" / "v0_1_0"
GRAPHS = ("multi_concept", "fusion_regional")
SMALLER = {"multi_concept": ("23.steps=1", "22.width=256", "22.height=128"),
           "fusion_regional": ("23.steps=1", "22.width=256", "22.height=128", "40.steps=1", "40.width=64",
                               "40.height=64")}
DEMO_MODELS = [REPO / ".host" / "models" / name for name in (demo.CKPT, demo.ADAPTER)]


def released(name: str) -> tuple[dict, dict]:
    """(UI workflow, API prompt) of 0.1.0 for one graph."""
    return (json.loads((V010 / f"mixofshow_{name}.json").read_text()),
            json.loads((V010 / f"api_{name}.json").read_text()))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    missing = [str(p) for p in DEMO_MODELS if not p.is_file()]
    if missing:
        pytest.skip(f"the demo models are not built ({', '.join(missing)}): run tools/host/make_models.sh")
    base = tmp_path_factory.mktemp("compat-010-base")
    demo.prepare(base)
    with ComfyServer(base, {"mixofshow": REPO}) as server:
        yield server


@pytest.mark.parametrize("name", GRAPHS)
def test_010_ui_workflow_converts_to_the_010_api_prompt(demo_server, name):
    workflow, prompt = released(name)
    object_info = demo_server.get("/object_info")
    converted = mixofshow_run.ui_to_api(workflow, object_info)
    assert {k: v["class_type"] for k, v in converted.items()} == {k: v["class_type"] for k, v in prompt.items()}
    for node_id, node in converted.items():
        released_inputs = prompt[node_id]["inputs"]
        assert {k: v for k, v in node["inputs"].items() if k in released_inputs} == released_inputs, node_id
        # inputs added after 0.1.0 are optional and take their defaults, as the frontend gives them
        optional = object_info[node["class_type"]]["input"].get("optional", {})
        added = {k: v for k, v in node["inputs"].items() if k not in released_inputs}
        assert all(k in optional and optional[k][1].get("default") == v for k, v in added.items()), (node_id, added)


def cancel(server: ComfyServer, prompt_ids: list[str], timeout: float = 180) -> None:
    """Take the prompts off the queue: pending ones deleted, the running one interrupted (again each
    second: an interrupt that comes just before the prompt starts is cleared by its start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get("/queue")
        running = [item[1] for item in queue["queue_running"] if item[1] in prompt_ids]
        pending = [item[1] for item in queue["queue_pending"] if item[1] in prompt_ids]
        if not running and not pending:
            return
        if pending:
            server.post_json("/queue", {"delete": pending})
        for prompt_id in running:
            interrupt(server, prompt_id)
        time.sleep(1)
    raise TimeoutError(f"the 0.1.0 prompts were still queued {timeout} s after cancelling them")


def test_010_api_prompts_are_accepted_unchanged(demo_server):
    queued = []
    for name in GRAPHS:
        status, body = demo_server.post_json("/prompt", {"prompt": released(name)[1]})
        assert status == 200 and not body.get("node_errors"), (name, body)
        queued.append(body["prompt_id"])
    cancel(demo_server, queued)
    history = demo_server.get("/history")
    for prompt_id in queued:  # a prompt deleted before it started has no history
        if prompt_id in history:
            assert "execution_interrupted" in [event for event, _ in history[prompt_id]["status"]["messages"]]


@pytest.mark.parametrize("name", GRAPHS)
def test_010_api_prompt_runs_with_fewer_steps_and_smaller_images(demo_server, name, tmp_path):
    args = [arg for setting in SMALLER[name] for arg in ("--set", setting)]
    done = subprocess.run([sys.executable, "-m", "mixofshow_run", str(V010 / f"api_{name}.json"), "--server",
                           demo_server.url, "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (saved,) = tmp_path.glob("mixofshow_demo_*.png")
    with Image.open(saved) as image:
        assert image.size == (256, 128)
