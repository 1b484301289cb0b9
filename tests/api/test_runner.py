"""The headless runner (``python -m mixofshow_run``) against the test server: images saved, progress,
``--set``, the server's refusals and execution errors as exit codes, UI-format conversion (checked
against the real frontend's graphToPrompt where Chromium is installed) and the API-format twins."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from comfy_server import free_port
from PIL import Image

import mixofshow_run

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
BLOCK_AIOHTTP = ("import runpy, sys; sys.modules['aiohttp'] = None; sys.argv[0] = 'mixofshow_run'; "
                 "runpy.run_module('mixofshow_run', run_name='__main__', alter_sys=True)")


# The tiny model's weights seed: one no other test of the session loads, so that no node of these
# graphs is a cached result of another test's prompt (and theirs none of ours).
TINY_SEED = 5


def regional_graph() -> dict:
    """Tiny model, one ED-LoRA, one box region, the Regional KSampler: 64×64, 2 steps."""
    return {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": TINY_SEED}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "edlora_name": "srv_0.pth", "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "3": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["2", 1], "concepts": ["2", 2],
                                                              "text": "a <s1> <s2> on a beach"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "MixOfShowBoxMask", "inputs": {"width": 64, "height": 64, "top": 0, "left": 0,
                                                           "bottom": 64, "right": 32}},
        "7": {"class_type": "MixOfShowRegion",
              "inputs": {"positive": ["3", 0], "negative": ["4", 0], "mask": ["6", 0]}},
        "8": {"class_type": "MixOfShowRegionalSampler", "_meta": {"title": "Regional sampler"}, "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "regions": ["7", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "runner"}},
    }


def run_cli(server, workflow: dict, tmp_path: Path, *args: str, server_url: str | None = None,
            without_aiohttp: bool = False):
    """``python -m mixofshow_run`` in a child process; returns (completed process, out dir)."""
    path, out = tmp_path / "workflow.json", tmp_path / "out"
    path.write_text(json.dumps(workflow))
    cli = [str(path), "--server", server_url or server.url, "--out", str(out), *args]
    python = [sys.executable, "-c", BLOCK_AIOHTTP] if without_aiohttp else [sys.executable, "-m", "mixofshow_run"]
    return subprocess.run(python + cli, cwd=REPO, capture_output=True, text=True, timeout=600), out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def baseline(server, tmp_path_factory):
    return run_cli(server, regional_graph(), tmp_path_factory.mktemp("baseline"))


def test_saves_the_image_and_shows_progress(baseline):
    done, out = baseline
    assert done.returncode == 0, done.stderr
    saved = sorted(out.glob("runner_*.png"))
    assert len(saved) == 1 and f"saved {saved[0]}" in done.stdout
    assert pixels(saved[0]).shape == (64, 64, 3)
    assert "queued prompt" in done.stdout and "[100%] finished" in done.stdout
    assert "node 8 MixOfShowRegionalSampler (Regional sampler)" in done.stdout
    assert "2/2 (100%)" in done.stdout  # the sampler's step progress


def test_set_by_title_changes_the_output(server, baseline, tmp_path):
    done, out = run_cli(server, regional_graph(), tmp_path, "--set", "regional SAMPLER.seed=2")
    assert done.returncode == 0, done.stderr
    (changed,) = out.glob("runner_*.png")
    (original,) = baseline[1].glob("runner_*.png")
    assert np.abs(pixels(changed) - pixels(original)).max() > 0, "another seed must give another image"


def test_invalid_value_is_refused_naming_node_and_input(server, tmp_path):
    done, _ = run_cli(server, regional_graph(), tmp_path, "--set", "8.steps=-5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "node 8 (MixOfShowRegionalSampler) input 'steps': Value -5 smaller than min of 1" in done.stderr


def test_missing_model_is_refused_clearly(server, tmp_path):
    done, _ = run_cli(server, regional_graph(), tmp_path, "--set", "2.edlora_name=missing.pth")
    assert done.returncode == 2
    assert "node 2 (MixOfShowLoadEDLoRA) input 'edlora_name': 'missing.pth' is not one of the" in done.stderr
    assert "'srv_0.pth'" in done.stderr and len(done.stderr) < 1500  # the server's list, bounded


@pytest.mark.parametrize("override, message", [
    ("nosuchnode.seed=1", "no node has the id or title 'nosuchnode'"),
    ("8.stepz=3", "node 8 (MixOfShowRegionalSampler) has no input 'stepz'"),
    ("8steps", "expected NODE.input=value"),
])
def test_bad_set_arguments_exit_2_before_queuing(server, tmp_path, override, message):
    done, _ = run_cli(server, regional_graph(), tmp_path, "--set", override)
    assert done.returncode == 2 and message in done.stderr and "queued" not in done.stdout


def test_execution_error_exits_1_with_the_servers_message(server, tmp_path):
    done, out = run_cli(server, regional_graph(), tmp_path, "--set", "2.edlora_name=broken.pth")
    assert done.returncode == 1
    assert "node 2 (MixOfShowLoadEDLoRA) failed:" in done.stderr and "broken.pth" in done.stderr
    assert not list(out.glob("*.png"))


def test_unreachable_server_exits_3(server, tmp_path):
    done, _ = run_cli(server, regional_graph(), tmp_path, server_url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3 and "cannot reach ComfyUI" in done.stderr


def test_a_prompt_that_leaves_the_queue_without_a_result_is_an_error(server):
    """A prompt deleted from the queue (or never queued) never gets a /history entry: no endless wait."""
    with pytest.raises(mixofshow_run.ExecutionFailed, match="left the queue without a result"):
        mixofshow_run._wait_for_history(mixofshow_run.Server(server.url), "no-such-prompt")


# --------------------------------------------------------------------------- UI format


class UiWorkflow:
    """Builds a workflow in the frontend's saved format (nodes with sockets, links, widgets_values)."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, node_id: int, kind: str, widgets=(), inputs=(), outputs=(), mode: int = 0, title=None) -> dict:
        node = {"id": node_id, "type": kind, "pos": [200 * len(self.nodes), 100], "size": [240, 120], "flags": {},
                "order": len(self.nodes), "mode": mode, "properties": {"Node name for S&R": kind},
                "inputs": [{"name": n, "type": t, "link": None, **({"widget": {"name": n}} if widget else {})}
                           for n, t, widget in inputs],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
                "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, source: dict, slot: int, target: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        index = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        kind = source["outputs"][slot]["type"]
        self.links.append([link_id, source["id"], slot, target["id"], index, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][index]["link"] = link_id

    def workflow(self) -> dict:
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def small_ui_workflow() -> tuple[dict, dict]:
    """A UI workflow with what the frontend treats specially (a seed's control value, a note, a
    reroute, a primitive feeding a converted widget, a bypassed and a muted node), and the API
    prompt graphToPrompt makes of it."""
    ui = UiWorkflow()
    loader = ui.node(1, "TinySD15Loader", ["narrow", TINY_SEED, "fixed"], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"),
                                                                          ("VAE", "VAE")])
    edlora = ui.node(2, "MixOfShowLoadEDLoRA", ["srv_0.pth", 0.7, 0.7],
                     inputs=[("model", "MODEL", False), ("clip", "CLIP", False),
                             ("concepts", "EDLORA_CONCEPTS", False)],
                     outputs=[("model", "MODEL"), ("clip", "CLIP"), ("concepts", "EDLORA_CONCEPTS")],
                     title="Load the beach concept")
    positive = ui.node(3, "MixOfShowTextEncode", ["a <s1> <s2> on a beach"],
                       inputs=[("clip", "CLIP", False), ("concepts", "EDLORA_CONCEPTS", False)],
                       outputs=[("CONDITIONING", "CONDITIONING")])
    reroute = ui.node(11, "Reroute", inputs=[("", "*", False)], outputs=[("", "CLIP")])
    negative = ui.node(4, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP", False)],
                       outputs=[("CONDITIONING", "CONDITIONING")])
    latent = ui.node(5, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT")])
    upscale = ui.node(12, "LatentUpscaleBy", ["nearest-exact", 1.5], inputs=[("samples", "LATENT", False)],
                      outputs=[("LATENT", "LATENT")], mode=mixofshow_run.MODE_BYPASSED)
    steps = ui.node(13, "PrimitiveNode", [2, "fixed"], outputs=[("INT", "INT")], title="steps")
    sampler = ui.node(6, "KSampler", [3, "fixed", 20, 7.0, "euler", "normal", 1.0],
                      inputs=[("model", "MODEL", False), ("positive", "CONDITIONING", False),
                              ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False),
                              ("steps", "INT", True)],
                      outputs=[("LATENT", "LATENT")])
    decode = ui.node(7, "VAEDecode", inputs=[("samples", "LATENT", False), ("vae", "VAE", False)],
                     outputs=[("IMAGE", "IMAGE")])
    save = ui.node(8, "SaveImage", ["runner_ui"], inputs=[("images", "IMAGE", False)])
    preview = ui.node(9, "PreviewImage", inputs=[("images", "IMAGE", False)], mode=2)
    ui.node(10, "Note", ["the seed is fixed so the example reproduces"])
    ui.link(loader, 0, edlora, "model")
    ui.link(loader, 1, edlora, "clip")
    ui.link(edlora, 1, positive, "clip")
    ui.link(edlora, 2, positive, "concepts")
    ui.link(edlora, 1, reroute, "")
    ui.link(reroute, 0, negative, "clip")
    ui.link(latent, 0, upscale, "samples")
    ui.link(edlora, 0, sampler, "model")
    ui.link(positive, 0, sampler, "positive")
    ui.link(negative, 0, sampler, "negative")
    ui.link(upscale, 0, sampler, "latent_image")
    ui.link(steps, 0, sampler, "steps")
    ui.link(sampler, 0, decode, "samples")
    ui.link(loader, 2, decode, "vae")
    ui.link(decode, 0, save, "images")
    ui.link(decode, 0, preview, "images")
    expected = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": TINY_SEED}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"edlora_name": "srv_0.pth",
                                                              "text_encoder_strength": 0.7, "unet_strength": 0.7,
                                                              "model": ["1", 0], "clip": ["1", 1]}},
        # the SDXL size inputs the workflow predates get their defaults, as the frontend gives them
        "3": {"class_type": "MixOfShowTextEncode", "inputs": {"text": "a <s1> <s2> on a beach", "clip": ["2", 1],
                                                              "concepts": ["2", 2], **dict.fromkeys(SDXL_SIZES, 0)}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["2", 0],
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "runner_ui", "images": ["7", 0]}},
    }
    return ui.workflow(), expected


SDXL_SIZES = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def without_titles(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def test_ui_workflow_converts_as_the_frontend_does(server):
    workflow, expected = small_ui_workflow()
    prompt = mixofshow_run.ui_to_api(workflow, server.get("/object_info"))
    assert without_titles(prompt) == expected
    assert prompt["2"]["_meta"]["title"] == "Load the beach concept"
    assert prompt["6"]["_meta"]["title"] == "KSampler"  # the display name when the node has no title


def test_ui_workflow_runs_without_aiohttp(server, tmp_path):
    """The UI format end to end, through the stdlib-only path (polling /history)."""
    workflow, _ = small_ui_workflow()
    done, out = run_cli(server, workflow, tmp_path, without_aiohttp=True)
    assert done.returncode == 0, done.stderr
    assert "no aiohttp here" in done.stdout and "[100%]" not in done.stdout
    (saved,) = out.glob("runner_ui_*.png")
    assert pixels(saved).shape == (64, 64, 3)


def test_subgraphs_are_refused(server):
    workflow, _ = small_ui_workflow()
    workflow["definitions"] = {"subgraphs": [{"id": "0b1e2c3d-0000-4000-8000-000000000000", "nodes": []}]}
    workflow["nodes"][0]["type"] = "0b1e2c3d-0000-4000-8000-000000000000"
    with pytest.raises(mixofshow_run.Refused, match="node 1 is a subgraph or group node"):
        mixofshow_run.ui_to_api(workflow, server.get("/object_info"))


def test_api_twins_are_the_examples_converted(server):
    """example_workflows/api/<name>.json is what the runner makes of example_workflows/<name>.json
    (tools/make_api_twins.py writes them)."""
    examples = sorted(EXAMPLES.glob("*.json"))
    assert examples and sorted(p.name for p in (EXAMPLES / "api").glob("*.json")) == [p.name for p in examples]
    object_info = server.get("/object_info")
    for path in examples:
        twin = json.loads((EXAMPLES / "api" / path.name).read_text())
        assert mixofshow_run.ui_to_api(json.loads(path.read_text()), object_info) == twin, path.name


def test_runner_needs_only_the_standard_library():
    tree = ast.parse((REPO / "mixofshow_run.py").read_text())
    imported = {alias.name.split(".")[0]
                for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"aiohttp"}  # optional: guarded by ImportError
    probe = "import sys, mixofshow_run; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
            "{'torch', 'comfy', 'nodes', 'folder_paths', 'numpy'}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.browser
def test_conversion_equals_the_frontends_graph_to_prompt(server):
    """The real web UI loads each workflow and serialises it with graphToPrompt; the runner's
    conversion through /object_info must give the same prompt."""
    from browser import CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (tools/test.sh installs it)")
    pytest.importorskip("playwright")
    from browser import comfy_page, load_workflow

    object_info = server.get("/object_info")
    workflows = {"small": small_ui_workflow()[0]}
    workflows.update({p.stem: json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))})
    with comfy_page(server.url) as (page, errors):  # once the app's own start-up graph is in
        for name, workflow in workflows.items():
            load_workflow(page, workflow)  # the test's own graph, not one the frontend loaded meanwhile
            frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
            assert mixofshow_run.ui_to_api(workflow, object_info) == frontend, name
        assert not errors
