"""The example workflows as a user meets them: listed in the templates browser under the pack with
their thumbnail, opened from there without missing nodes or invalid widgets (every frontend ×
renderer), and run as shipped on the demo models (each once, on 1.58.1 in the classic canvas: the
full-size random SD1.5 is slow on CPU). The SDXL examples run on the test fixture's tiny SDXL: the
checkpoint loader becomes the fixture's TinySDXLLoader and the LoRAs and adapter files that fit it
(make_example_workflows.TINY_SDXL, TINY_SDXL_FUSED; the full-size SDXL needs about 20 GB on a CPU)."""
import json

import pytest
from comfy_server import error_message as execution_error
from make_example_workflows import EXAMPLES, THUMBNAIL_SIZE, swap_to_tiny
from ui_support import PACK_MODULE, REPO, open_templates, template_card, wait_history

NAMES = list(EXAMPLES)

WIDGET_PROBLEMS = """async () => {
    // widget values the backend would refuse: combo values not among the options, numbers out of range
    const info = await (await fetch('/object_info')).json();
    const problems = [];
    for (const node of app.graph.nodes) {
        const def = info[node.comfyClass];
        if (!def) continue;  // frontend-only nodes (notes)
        const specs = {...def.input.required, ...(def.input.optional || {})};
        for (const widget of node.widgets || []) {
            const spec = specs[widget.name];
            if (!spec) continue;
            const [type, options = {}] = spec;
            const choices = Array.isArray(type) ? type : type === 'COMBO' ? options.options : null;
            const where = `${node.title}.${widget.name} = ${widget.value}`;
            if (choices && !choices.includes(widget.value)) problems.push(where);
            if ((type === 'INT' || type === 'FLOAT') && (widget.value < options.min || widget.value > options.max)) {
                problems.push(`${where} outside [${options.min}, ${options.max}]`);
            }
        }
    }
    return problems;
}"""


# the template browser and the loaded graph do not depend on the renderer: classic on both frontends,
# and Nodes 2.0 (the default for new installs) on the newest
@pytest.mark.parametrize("server, renderer", [("1.32.9", "classic"), ("1.58.1", "classic"), ("1.58.1", "vue")],
                         indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_example_opens_from_the_templates_browser_with_its_thumbnail(ui, name):
    open_templates(ui)
    card = template_card(ui, name)
    card.wait_for(state="visible", timeout=20000)
    # as a user scrolls to it: the frontend loads a card's thumbnail once it is on screen (1.32.9 sorts by
    # "Newest", file times, so with seven examples any of them may open below the fold)
    card.scroll_into_view_if_needed()
    # the frontend fetches the thumbnail and shows it from a blob: URL (its fallback is a 224 px placeholder)
    assert ui.wait_response(f"/api/workflow_templates/{PACK_MODULE}/{name}.jpg") == 200
    thumbnail = card.locator("img").first
    ui.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:')",
                              arg=thumbnail.element_handle(), timeout=20000)
    assert thumbnail.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [THUMBNAIL_SIZE] * 2
    assert name in card.inner_text()
    ui.shot(f"templates-{name[:1]}", element=card)
    card.click()
    ui.page.wait_for_function("(n) => app.graph.nodes.length === n", arg=len(json.loads(
        (REPO / "example_workflows" / f"{name}.json").read_text())["nodes"]), timeout=20000)
    ui.settle(1500)
    body = ui.page.inner_text("body")
    assert "Invalid workflow" not in body and "missing" not in body.lower(), body[:2000]
    missing = ui.page.evaluate("() => app.graph.nodes.filter(n => n.has_errors || "
                               "!LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert missing == []
    assert ui.page.evaluate(WIDGET_PROBLEMS) == []
    ui.shot(f"example-{name[:1]}-opened")


@pytest.mark.parametrize("renderer", ["classic"], indirect=True)
@pytest.mark.parametrize("server", ["1.58.1"], indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_example_runs_as_shipped(ui, name):
    open_templates(ui)
    template_card(ui, name).click()
    ui.page.wait_for_function("() => app.graph.nodes.length > 5", timeout=20000)
    ui.settle(1000)
    example = EXAMPLES[name]
    if "tiny" in example:  # the SDXL examples: on the tiny SDXL (module text)
        linked = swap_to_tiny(ui.page, example["tiny"])
        assert all(linked), linked  # MODEL, CLIP and VAE all reconnected
    before = len(ui.server.get("/history"))
    ui.queue()
    entry = wait_history(ui.server, before + 1, timeout=1800)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = entry["outputs"]
    assert outputs["25"]["images"], "the sampled image was saved"
    for node_id in example["previews"]:
        assert outputs[node_id]["images"][0]["filename"].startswith("mixofshow_regions")
    ui.shot(f"example-{name[:1]}-after-run")
