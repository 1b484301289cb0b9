"""Issue 23: the example workflows as a user who installed the pack from the Comfy Registry meets them.

The archive is built as the Registry builds it (git-tracked files minus .comfyignore: no tools/, so no demo
script and no demo models) and unpacked into the custom_nodes of a clean ComfyUI base folder whose models have
other names than the demo's. Each example, opened from the templates browser, shows its note; Run then reports
only the missing models, each on a loader the note tells what file to pick for; nothing else fails in the page."""
from __future__ import annotations

import json
import re
import zipfile

import pytest
from comfy_server import ComfyServer
from make_example_workflows import EXAMPLES, LOADER_NOTES
from registry_archive import build_archive, is_git_checkout
from ui_support import FRONTEND_158, PACK_MODULE, REPO, UI, open_templates, post, template_card

# what a user has instead of the demo's random-weight models (listed by ComfyUI, never loaded here)
USER_MODELS = {"checkpoints": "dreamshaper_8.safetensors", "edloras": "my_hero.safetensors",
               "controlnet": "control_v11p_sd15_openpose.pth", "loras": "my_sdxl_hero.safetensors"}
MODEL_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "MixOfShowLoadEDLoRA": "edlora_name",
                "ControlNetLoader": "control_net_name", "MixOfShowLoRAConcept": "lora_name"}
NOTE_TITLE = "About this workflow"
# the loaders ask the pack for the tokens of the (missing) demo files: a 404 the page logs, nothing else
MISSING_TOKENS = re.compile(r"HTTP 404: .*/mixofshow/tokens\?name=demo_\w+\.pth")

pytestmark = pytest.mark.skipif(not is_git_checkout(REPO), reason="not a git checkout: the archive is built from git")


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    if not (FRONTEND_158 / "index.html").is_file():
        pytest.skip(f"comfyui-frontend-package 1.58.1 is not installed at {FRONTEND_158} (tools/test.sh installs it)")
    root = tmp_path_factory.mktemp("registry-install")
    build_archive(REPO, root / "node.zip")
    pack = root / PACK_MODULE  # custom_nodes/<node id>, as a Registry install unpacks it
    with zipfile.ZipFile(root / "node.zip") as archive:
        archive.extractall(pack)
    assert not (pack / "tools").exists()
    base = root / "base"
    for folder, name in USER_MODELS.items():
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / name).write_bytes(b"")
    with ComfyServer(base, {PACK_MODULE: pack}, front_end_root=FRONTEND_158) as server:
        server.frontend = "1.58.1"
        yield server


@pytest.fixture(scope="module", params=["vue", "classic"])
def fresh_ui(request, registry_server, playwright_browser):
    """Nodes 2.0 (the default of new installs) and the classic canvas, in a window of the size the examples
    open fitted to."""
    settings = {"Comfy.VueNodes.Enabled": request.param == "vue", "Comfy.TutorialCompleted": True,
                "Comfy.Minimap.Visible": False}
    assert post(registry_server, "/settings", settings) == 200
    context = playwright_browser.new_context(viewport={"width": 1920, "height": 1080})
    ui = UI(registry_server, context.new_page(), request.param)
    ui.load()
    yield ui
    context.close()


def display_name(object_info: dict, node_class: str) -> str:
    return object_info[node_class]["display_name"].removesuffix(" (Mix-of-Show)")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_shows_its_note_and_reports_only_the_missing_models_it_explains(fresh_ui, name):
    ui = fresh_ui
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    (note,) = [n["widgets_values"][0] for n in workflow["nodes"] if n.get("title") == NOTE_TITLE]
    loaders = {n["type"] for n in workflow["nodes"] if n["type"] in MODEL_INPUTS}
    ui.close_dialogs()
    start = len(ui.errors)
    open_templates(ui)
    template_card(ui, name).click()
    ui.page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(workflow["nodes"]), timeout=20000)
    ui.settle(1500)
    # the note is on screen as the example opens
    shown = ui.page.get_by_text("Pick your own models", exact=True).first
    shown.wait_for(state="visible", timeout=10000)
    assert shown.evaluate("(e) => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.left >= 0 "
                          "&& r.bottom <= innerHeight && r.right <= innerWidth; }")
    ui.shot(f"registry-{name[:1]}-opened")
    # Run: the frontend's own report of what the server refused
    ui.page.evaluate("() => { app.extensionManager.lastNodeErrors = null; }")
    ui.queue()
    ui.page.wait_for_function("() => !!app.extensionManager.lastNodeErrors", timeout=20000)
    node_errors = ui.page.evaluate("() => JSON.parse(JSON.stringify(app.extensionManager.lastNodeErrors))")
    ui.shot(f"registry-{name[:1]}-run")
    object_info = ui.server.get("/object_info")
    reported = set()
    for node_id, found in node_errors.items():
        kind = found["class_type"]
        assert kind in MODEL_INPUTS, (node_id, found)
        for error in found["errors"]:  # the stock check, or the pack's loaders' own (V3 combos are not checked)
            assert error["extra_info"]["input_name"] == MODEL_INPUTS[kind], error
            assert error["type"] == "value_not_in_list" or (
                error["type"] == "custom_validation_failed" and "is not one of the choices" in error["details"]), error
        reported.add(kind)
    assert reported == loaders  # every loader of the example, and nothing else
    for kind in reported:  # the note tells, for each of them, what to pick and from where
        assert f"**{display_name(object_info, kind)}**" in note, kind
        assert EXAMPLES[name].get("loaders", LOADER_NOTES)[kind].split("→")[1][:60] in note, kind
    assert all(MISSING_TOKENS.search(e) for e in ui.errors[start:]), ui.errors[start:]
