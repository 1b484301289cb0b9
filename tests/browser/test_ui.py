"""The pack's extension in the web UI, per frontend × renderer: it loads cleanly, the loaders show their
own concept tokens as rendered text, typing "<" offers the connected tokens, a stock CLIP Text Encode
with a concept token gets a warning when queued, Gradient Fusion starts with a fixed seed and shows
the stage text it is sent."""
import ast
import re

from comfy_server import error_message as execution_error
from ui_support import REPO, TINY_TOKENS, TINY_TOKENS_B, queue_and_wait, tiny_graph

PACK_EXTENSIONS = {"mixofshow.concepts", "mixofshow.autocomplete", "mixofshow.regionsEditor",
                   "mixofshow.stockEncoderWarning", "mixofshow.fusion", "mixofshow.referencePose"}
PACK_NODES = ["MixOfShowLoadEDLoRA", "MixOfShowTextEncode", "MixOfShowConvertEDLoRA", "MixOfShowLoRAConcept",
              "MixOfShowGradientFusion", "MixOfShowSaveFusedBundle", "MixOfShowRegion", "MixOfShowBoxMask",
              "MixOfShowBoxMaskXYWH", "MixOfShowPoseBoxMask", "MixOfShowPoseRegions", "MixOfShowRegionalGuider",
              "MixOfShowRegionalSampler", "MixOfShowRegionsEditor", "MixOfShowLoadReferencePose"]

RENDERED_TEXT = """(element) => {
    // what a user sees: the element is laid out, on screen, and not covered by something else
    const r = element.getBoundingClientRect();
    const x = r.left + Math.min(r.width / 2, 40), y = r.top + r.height / 2;
    const top = document.elementFromPoint(x, y);
    return {text: element.innerText, width: r.width, height: r.height,
            onScreen: r.width > 0 && r.height > 0 && x > 0 && y > 0 && x < innerWidth && y < innerHeight,
            onTop: !!top && (element === top || element.contains(top)),
            covering: top && top !== element && !element.contains(top) ? `${top.tagName}.${top.className}` : null};
}"""


def rendered_text(element) -> dict:
    element.owner_frame().page.mouse.move(1, 450)  # no hover tooltip in the way
    element.owner_frame().page.wait_for_timeout(300)
    return element.evaluate(RENDERED_TEXT)


def test_extension_loads_without_errors(ui):
    info = ui.page.evaluate("""(types) => ({
        extensions: app.extensions.map(e => e.name).filter(n => n.startsWith('mixofshow')),
        registered: types.filter(t => !LiteGraph.registered_node_types[t]),
    })""", PACK_NODES)
    assert set(info["extensions"]) == PACK_EXTENSIONS
    assert info["registered"] == []
    shipped = {"/extensions/mixofshow/" + p.relative_to(REPO / "js").as_posix() for p in (REPO / "js").rglob("*.js")}
    assert shipped <= ui.pack_scripts, "every .js under js/ is loaded by the page"
    assert ui.errors == []
    ui.shot("extension-loaded")


def tokens_graph() -> dict:
    g = tiny_graph()
    g["3"] = {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "concepts": ["2", 2], "edlora_name": "ui_tiny_b.pth",
        "text_encoder_strength": 0.7, "unet_strength": 0.7}}
    g["5"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2],
                                                              "text": "a <u1> <u2> and a <w1>"}}
    g["6"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["7"] = {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["5", 0], "negative": ["4", 0],
              "latent_image": ["6", 0], "seed": 1, "steps": 1, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}}
    g["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/ui_tokens"}}
    return g


def test_loaders_show_their_own_tokens_as_rendered_text(ui):
    ui.load_api(tokens_graph())
    ui.show_node(2)
    for node_id, own in ((2, TINY_TOKENS), (3, TINY_TOKENS_B)):  # before any run: read from the file
        ui.page.wait_for_function("([id, text]) => app.graph.getNodeById(id).widgets.find(w => w.name === "
                                  "'concept_tokens').element.innerText.includes(text)", arg=[node_id, " ".join(own)])
    entry = queue_and_wait(ui, fresh=True)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert entry["outputs"]["3"]["text"] == [" ".join(TINY_TOKENS_B)]  # the file's own tokens, not the chain's
    for node_id, own, other in ((2, TINY_TOKENS, TINY_TOKENS_B), (3, TINY_TOKENS_B, TINY_TOKENS)):
        ui.show_node(node_id)
        element = ui.widget_element(node_id, "concept_tokens")
        seen = rendered_text(element)
        ui.shot(f"tokens-node{node_id}")
        assert seen["onScreen"] and seen["onTop"] and seen["height"] >= 16, str(seen)
        assert " ".join(own) in seen["text"] and other[0] not in seen["text"], seen
        ui.shot(f"tokens-node{node_id}-widget", element=element)


def test_autocomplete_offers_the_connected_concept_tokens(ui):
    g = {"1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
         "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
               "edlora_name": "demo_potter.pth", "text_encoder_strength": 0.7, "unet_strength": 0.7}},
         "3": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["2", 1], "concepts": ["2", 2], "text": ""}},
         "9": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["1", 1], "concepts": ["2", 2], "text": ""}}}
    ui.load_api(g)
    # node 9 is not linked to a concept set: unlink it so it has nothing to offer
    ui.page.evaluate("() => app.graph.getNodeById(9).disconnectInput(1)")
    ui.show_node(3)
    textarea = ui.textarea(3)
    textarea.click()
    ui.page.keyboard.type("a <")
    popup = ui.page.locator(".mixofshow-autocomplete")
    popup.wait_for(state="visible", timeout=10000)
    items = popup.locator(".mixofshow-autocomplete-item").all_inner_texts()
    assert [i.split()[0] for i in items] == ["<potter1>", "<potter2>"], items
    ui.shot("autocomplete-popup")
    ui.page.keyboard.type("potter2")  # narrows the list
    ui.page.wait_for_function("() => document.querySelectorAll('.mixofshow-autocomplete-item').length === 1")
    ui.page.keyboard.press("Enter")
    ui.settle(300)
    assert textarea.input_value() == "a <potter2> "
    assert ui.prompt()["3"]["inputs"]["text"] == "a <potter2> "  # the widget took the completion
    assert not popup.is_visible()
    ui.show_node(9)
    other = ui.textarea(9)
    other.click()
    ui.page.keyboard.type("a <")
    ui.settle(800)
    assert not popup.is_visible(), "a prompt without a connected concept set offers nothing"


def test_stock_encoder_with_a_concept_token_is_warned_about_when_queued(ui):
    g = tokens_graph()
    g["5"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "a <u1> on a bench"}}
    ui.load_api(g)
    entry = queue_and_wait(ui)
    # the toast as drawn (each frontend has its own toast markup; 1.58 also copies it to a screen-reader region)
    ui.page.get_by_text("Concept token in a stock text encoder").filter(visible=True).first.wait_for(timeout=15000)
    shown = ui.page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => !e.closest('.sr-only')
        && e.childElementCount === 0 && e.textContent.includes('is a stock text encoder')
        && e.getClientRects().length > 0).map(e => e.textContent)""")
    assert len(shown) == 1, shown  # one warning: the negative prompt has no concept token
    assert "<u1>" in shown[0] and "#5" in shown[0] and "Text Encode with Concepts" in shown[0], shown
    ui.shot("stock-encoder-warning")
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def test_gradient_fusion_seed_is_fixed_for_new_nodes_and_kept_for_loaded_ones(ui):
    # The new node gets an id no earlier graph of this page used: after app.graph.clear(), frontend 1.49.6 gives a
    # new node that reuses an old node's id that node's widget values (a frontend bug, gone in 1.58.1), so the test
    # would depend on the graphs of the tests before it.
    created = ui.page.evaluate("""() => {
        const node = LiteGraph.createNode('MixOfShowGradientFusion');
        window.mixofshowFreshNodeId = (window.mixofshowFreshNodeId ?? 100000) + 1;
        node.id = window.mixofshowFreshNodeId;
        app.graph.add(node);
        const control = node.widgets.find(w => w.name === 'control_after_generate');
        const value = control.value;
        control.value = 'randomize';
        return {value, workflow: app.graph.serialize()};
    }""")
    assert created["value"] == "fixed"
    loaded = ui.page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        return app.graph.nodes[0].widgets.find(w => w.name === 'control_after_generate').value;
    }""", created["workflow"])
    assert loaded == "randomize"


def test_stage_text_sent_to_the_fusion_node_is_shown(ui):
    node_id = ui.page.evaluate("""() => {
        const node = LiteGraph.createNode('MixOfShowGradientFusion');
        app.graph.add(node);
        node.pos = [100, 100];
        return node.id;
    }""")
    ui.show_node(node_id)
    text = "stage 2/3: cross-attention k/v, layer 5 of 32"
    # what the server's send_progress_text delivers on the websocket, as api.js dispatches it
    ui.page.evaluate("([id, text]) => window.comfyAPI.api.api.dispatchCustomEvent('progress_text', "
                     "{nodeId: String(id), text})", [node_id, text])
    # both renderers show it as HTML (a Vue component widget on the classic canvas too)
    shown = (ui.node_element(node_id) if ui.vue else ui.page).get_by_text(text, exact=True)
    shown.wait_for(state="visible", timeout=10000)
    assert rendered_text(shown.element_handle())["onTop"]
    ui.shot("fusion-stage-text")


def test_completion_and_box_helpers(ui):
    """The pure modules of js/lib, imported as the page imports them."""
    out = ui.page.evaluate("""async () => {
        const t = await import('/extensions/mixofshow/lib/tokens.js');
        const r = await import('/extensions/mixofshow/lib/regions.js');
        const candidates = [{text: '<potter1>'}, {text: '<potter2>'}, {text: 'ohwx woman'}, {text: '<potter1>'}];
        return {
            query: [t.completionQuery('a <pot', 6), t.completionQuery('a pot', 5), t.completionQuery('(x:1.2) <', 9)],
            matches: [t.matchCandidates(candidates, '<').map(c => c.text), t.matchCandidates(candidates, '<oh')
                      .map(c => c.text)],
            applied: [t.applyCompletion('a <pot, smiling', 2, 6, '<potter1>'),
                      t.applyCompletion('<po', 0, 3, 'ohwx woman')],
            tokens: t.tokensIn('a <p1> <p2>, (<p3>:1.2)'),
            moved: r.moveBox({top: 10, left: 10, bottom: 20, right: 30}, 500, -50, 100, 50),
            resized: r.resizeBox({top: 10, left: 10, bottom: 20, right: 30}, 'nw', 40, 40, 100, 50),
            drawn: r.boxFromPoints(90, 45, -5, 60, 100, 50),
            pose: r.boxesFromPose([[0, 0, 5, 5], [1, 1, 6, 6]], [{...r.parseBoxes('[{"prompt": "kept"}]')[0]}])
                   .map(b => [b.prompt, b.color]),
            parsed: [r.parseBoxes('not json'), r.parseBoxes('{"a": 1}')],
            label: [r.labelOf({label: '', prompt: 'a <p1> here'}, 0),
                    r.labelOf({label: '', prompt: '(big:1.2) red car'}, 1), r.labelOf({label: '', prompt: ''}, 2)],
        };
    }""")
    assert out["query"] == [{"start": 2, "prefix": "<pot"}, None, {"start": 8, "prefix": "<"}]
    assert out["matches"] == [["<potter1>", "<potter2>", "ohwx woman"], ["ohwx woman"]]
    assert out["applied"] == [{"text": "a <potter1>, smiling", "caret": 11}, {"text": "ohwx woman ", "caret": 11}]
    assert out["tokens"] == ["<p1>", "<p2>", "<p3>"]
    assert out["moved"] == {"top": 0, "left": 80, "bottom": 10, "right": 100}  # stopped at the border
    assert out["resized"] == {"top": 16, "left": 26, "bottom": 20, "right": 30}  # never below 4 px
    assert out["drawn"] == {"top": 45, "left": 0, "bottom": 50, "right": 90}
    assert out["pose"] == [["kept", "#e6194b"], ["", "#3cb44b"]]
    assert out["parsed"] == [[], []]
    assert out["label"] == ["<p1>", "big 1.2 red", "region 3"]


def python_names() -> tuple[dict[str, str], set[str]]:
    """The string constants of nodes/names.py ({name: value}, a socket io.Custom("X") as X) and which of
    them are sockets. Read, not imported: the pack's `nodes` package would meet ComfyUI's `nodes` module."""
    values, sockets = {}, set()
    for statement in ast.parse((REPO / "nodes" / "names.py").read_text()).body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            continue
        name, value = statement.targets[0].id, statement.value
        if isinstance(value, ast.Call) and ast.unparse(value.func) == "io.Custom" and value.args:
            sockets.add(name)
            value = value.args[0]
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            values[name] = value.value
    return values, sockets


def test_the_names_module_agrees_with_the_server(ui):
    """js/lib/names.js, imported as the page imports it: a name nodes/names.py also has is equal there
    (every socket and route of nodes/names.py is there), every other name is a registered node id or a
    socket type of the registered nodes, the pack's node ids all start with its prefix, and the routes
    answer from the pack."""
    js = ui.page.evaluate("async () => ({...(await import('/extensions/mixofshow/lib/names.js'))})")
    python, python_sockets = python_names()
    object_info = ui.server.get("/object_info")
    socket_types = {t for d in object_info.values() for t in d["output"] if isinstance(t, str)}
    pack_nodes = {n for n, d in object_info.items()
                  if re.fullmatch(r"custom_nodes\.mixofshow(@.*)?", d.get("python_module", ""))}

    shared = {k for k in python if k in python_sockets or k.startswith("ROUTE_")}
    assert len(shared) >= 5 and shared <= set(js), "every socket and route of nodes/names.py is in names.js"
    assert {k: js[k] for k in js if k in python} == {k: python[k] for k in js if k in python}
    assert all(python[k] in socket_types for k in python_sockets), "the pack's nodes use its sockets"
    node_ids = {k for k, v in js.items() if k not in python and v in object_info}
    comfy_sockets = {k for k, v in js.items() if k not in python and v in socket_types}
    assert set(js) - set(python) - node_ids - comfy_sockets == {"NODE_ID_PREFIX"}, \
        "every name is a nodes/names.py name, a registered node id or a socket type"
    assert len(pack_nodes) >= 12 and all(n.startswith(js["NODE_ID_PREFIX"]) for n in pack_nodes)
    assert {js[k] for k in node_ids if js[k].startswith(js["NODE_ID_PREFIX"])} <= pack_nodes

    assert ui.server.get(f"/api{js['ROUTE_TOKENS']}?name=ui_tiny.pth")["tokens"] == list(TINY_TOKENS)
    pose = ui.server.get_bytes("/api" + js["ROUTE_POSES"].replace("{name}", "harry_hermione_thanos.png"))
    assert pose.startswith(b"\x89PNG")  # get_bytes raises on an error status
    answer = ui.server.post_json(f"/api{js['ROUTE_POSE_BOXES']}", {"image": {"pose": "harry_hermione_thanos.png"},
                                                                  "margin": 3})
    assert answer[0] == 400 and "margin" in answer[1]["error"]  # the pack's own check


def test_the_pack_css_is_scoped_to_its_widgets(ui):
    """Every rule of the pack's stylesheets sits under the root class of one widget (the Regions Editor,
    the tokens widget, the autocomplete popup), and every class it names has the pack's prefix."""
    sheets = ui.page.evaluate("""() => [...document.querySelectorAll('style[id^="mixofshow-"]')].map(s => ({
        id: s.id, selectors: [...s.sheet.cssRules].flatMap(r => r.selectorText.split(',').map(x => x.trim()))}))""")
    assert {s["id"] for s in sheets} == {"mixofshow-editor-style", "mixofshow-tokens-style",
                                        "mixofshow-autocomplete-style"}
    for sheet in sheets:
        root = sheet["selectors"][0]
        assert re.fullmatch(r"\.mixofshow-[\w-]+", root), sheet
        for selector in sheet["selectors"]:
            assert selector == root or selector.startswith((root + " ", root + ".")), (sheet["id"], selector)
            assert all(c.startswith("mixofshow-") for c in re.findall(r"\.([\w-]+)", selector)), selector
