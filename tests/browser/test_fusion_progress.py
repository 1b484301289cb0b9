"""Gradient Fusion's progress in the bundled frontend (headless Chromium): while the node fuses, its current
stage ("text encoder 1/2", "UNet: concept 2 of 2, step 3/6", "solving ... layers") arrives as the
progress_text message and is rendered on the node; one screenshot is taken while it shows."""
import time
from pathlib import Path

import pytest
import torch
from browser import CHROMIUM
from comfy_server import ComfyServer, comfy_root
from fusion_graphs import fusion_and_save
from server_setup import PACKS
from synthetic import make_edlora_state
from ui_support import PACK_LOADED

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="Debian chromium is not installed (tools/test.sh installs it)"),
    pytest.mark.skipif(not (comfy_root() / "main.py").is_file(), reason=f"no ComfyUI at {comfy_root()}"),
]
pytest.importorskip("playwright")
TINY = dict(model_channels=32, text_layers=2, text_intermediate=512)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, playwright_browser):
    """A server on the bundled frontend and one page of it, from the tier's one Playwright browser (a second
    sync Playwright in the same process is refused)."""
    base = tmp_path_factory.mktemp("fusion-ui-base")
    (base / "models" / "edloras").mkdir(parents=True)
    for i, tokens in enumerate((("<p1>", "<p2>"), ("<q1>",))):
        torch.save(make_edlora_state(tokens, seed=60 + i, **TINY), base / "models" / "edloras" / f"progress_{i}.pth")
    with ComfyServer(base, PACKS) as server:
        context = playwright_browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/", wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI", timeout=90000)
            page.wait_for_function(PACK_LOADED, timeout=30000)
            yield server, page, errors
        finally:
            context.close()


GRAPH = fusion_and_save(("progress_0.pth", "progress_1.pth"), steps=6, size=128, prefix="ui_progress")

RENDERED = """() => {
    const node = app.graph.getNodeById(4);
    const widget = node && (node.widgets || []).find(w => w.name === '$$node-text-preview');
    return {widget: widget ? String(widget.value) : null, page: document.body.innerText};
}"""


def test_the_stage_is_shown_on_the_node_while_fusing(ui):
    server, page, errors = ui
    page.evaluate("""async (g) => {
        window.__fusionTexts = [];
        app.api.addEventListener('progress_text', (e) => window.__fusionTexts.push(e.detail));
        await app.loadApiJson(g, 'fusion-progress');
        app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.6; app.graph.setDirtyCanvas(true, true);
        await app.queuePrompt(0, 1);
    }""", GRAPH)
    shot = server.base / "output" / "fusion_progress.png"
    seen_while_running, deadline = [], time.time() + 300
    while time.time() < deadline:
        done = [v for v in server.get("/history").values() if v.get("status", {}).get("completed") is not None]
        state = page.evaluate(RENDERED)
        if state["widget"] and not done:
            seen_while_running.append(state)
            if "UNet: concept" in state["widget"] and not shot.exists():
                page.screenshot(path=str(shot))
        if done:
            assert done[-1]["status"]["status_str"] == "success"
            break
        time.sleep(0.1)
    else:
        raise TimeoutError("the fusion did not finish")
    texts = page.evaluate("() => window.__fusionTexts")
    mine = [t["text"] for t in texts if str(t["nodeId"]) == "4"]
    for expected in ("text encoder 1/2", "cross-attention k/v 2/2", "UNet: concept 2 of 2, step 6/6",
                     "fused 2 concepts into 204 layers"):
        assert expected in mine, (expected, mine[:20])
    assert any(t.startswith("solving ") and t.endswith(" layers") for t in mine)
    # rendered on the node, not only received: the frontend's text preview widget of node 4, in the DOM
    assert seen_while_running and any(s["widget"] in s["page"] for s in seen_while_running)
    assert any(s["widget"].startswith(("text encoder", "cross-attention", "UNet:", "solving"))
               for s in seen_while_running)
    final = page.evaluate(RENDERED)
    assert final["widget"] == "fused 2 concepts into 204 layers" and final["widget"] in final["page"]
    if not shot.exists():
        page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10000 and not errors
