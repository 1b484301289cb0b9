"""The web part in real headless Chromium: the pack's nodes and extension in the ComfyUI frontend, a
graph built and queued from the UI, and the example workflow loading without missing nodes."""
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "host"))
sys.path.insert(0, str(REPO / "tools"))
from browser import CHROMIUM  # noqa: E402
from comfy_server import ComfyServer, comfy_root  # noqa: E402

from fusion.synthetic import make_edlora_state  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (tools/test.sh installs it)"),
    pytest.mark.skipif(not (comfy_root() / "main.py").is_file(), reason=f"no ComfyUI at {comfy_root()}"),
]
pytest.importorskip("playwright")
FIXTURES = REPO / "tests" / "support" / "mixofshow_test_fixtures"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from browser import comfy_page
    import demo

    base = tmp_path_factory.mktemp("ui-base")
    demo.prepare(base)  # the example workflow's models (full-size random SD1.5 + 3 ED-LoRAs)
    torch.save(make_edlora_state(("<u1>", "<u2>"), seed=50, model_channels=32, text_layers=2, text_intermediate=512),
               base / "models" / "edloras" / "ui_tiny.pth")
    with ComfyServer(base, {"mixofshow": REPO, "mixofshow_test_fixtures": FIXTURES}) as server, \
            comfy_page(server.url) as (page, errors):
        page.wait_for_function("() => window.__mixofshowExtension === true", timeout=30000)
        yield server, page, errors


def wait_history(server, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [v for v in server.get("/history").values() if v.get("status", {}).get("completed") is not None]
        if done:
            return done[-1]
        time.sleep(0.5)
    raise TimeoutError("the UI-queued prompt did not finish")


def test_nodes_and_extension_are_in_the_frontend(ui):
    _, page, errors = ui
    info = page.evaluate("""() => {
        const node = LiteGraph.createNode('MixOfShowLoadEDLoRA');
        app.graph.add(node);
        return {
          ext: app.extensions.map(e => e.name).includes('mixofshow.concepts'),
          types: ['MixOfShowLoadEDLoRA', 'MixOfShowTextEncode', 'MixOfShowConvertEDLoRA']
                 .map(t => !!LiteGraph.registered_node_types[t]),
          title: node.title,
          widgets: node.widgets.map(w => [w.name, w.value]),
          inputs: node.inputs.map(i => [i.name, i.type]),
          outputs: node.outputs.map(o => [o.name, o.type]),
        };
    }""")
    assert info["ext"] and all(info["types"])
    assert info["title"] == "Load ED-LoRA (Mix-of-Show)"
    widgets = dict(info["widgets"])
    assert widgets["text_encoder_strength"] == 0.7 and widgets["unet_strength"] == 0.7
    assert ["concepts", "EDLORA_CONCEPTS"] in info["inputs"]
    assert ["concepts", "EDLORA_CONCEPTS"] in info["outputs"]
    assert not errors


def test_graph_queued_from_the_ui_runs_and_shows_tokens(ui):
    server, page, errors = ui
    graph = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "edlora_name": "ui_tiny.pth", "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "3": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["2", 1], "concepts": ["2", 2],
                                                              "text": "a <u1> <u2> reading"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
              "latent_image": ["5", 0], "seed": 1, "steps": 1, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ui_mos"}},
    }
    page.evaluate("async (g) => { await app.loadApiJson(g, 'ui-test'); await app.queuePrompt(0, 1); }", graph)
    entry = wait_history(server)
    assert entry["status"]["status_str"] == "success"
    page.wait_for_function("""() => {
        const n = app.graph.getNodeById(2);
        const w = n && (n.widgets || []).find(w => w.name === 'concept_tokens');
        return w && w.value.includes('<u1> <u2>');
    }""", timeout=30000)
    shot = server.base / "output" / "ui_test.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10000 and not errors


@pytest.mark.parametrize("name", ["mixofshow_multi_concept", "mixofshow_fusion_regional"])
def test_example_workflow_loads_and_matches_the_demo_graph(ui, name):
    from make_example_workflows import EXAMPLES

    server, page, errors = ui
    listed = server.get("/workflow_templates")
    assert name in json.dumps(listed)
    example = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    prompt = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        return (await app.graphToPrompt()).output;
    }""", example)
    page.wait_for_timeout(500)
    assert "Invalid workflow" not in page.inner_text("body"), "the frontend's schema check refused the example"
    expected = EXAMPLES[name]()
    assert {k: v["class_type"] for k, v in prompt.items()} == {k: v["class_type"] for k, v in expected.items()}
    for node_id, node in expected.items():
        for name, value in node["inputs"].items():
            assert prompt[node_id]["inputs"][name] == value, (node_id, name)
    assert not errors
