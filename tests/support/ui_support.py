"""What the browser tests share: the page wrapper and small helpers (imported by the test modules;
the fixtures are in conftest.py)."""
from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".host" / "artifacts" / "browser"
FRONTEND_158 = REPO / ".host" / "frontend-1.58.1" / "comfyui_frontend_package" / "static"
TINY_TOKENS = ("<u1>", "<u2>")
TINY_TOKENS_B = ("<w1>",)
_PACK_URL = "/extensions/mixofshow/"
_PACK_ROUTES = (_PACK_URL, "/mixofshow/", "/api/mixofshow/")
_NOT_THE_PACK = ("Content Security Policy", "api.comfy.org")  # the frontend's own lookups of node packs
# The app is ready and the pack's extension with it: the frontend assigns window.app only after app.setup()
# has run every extension's setup() (both frontends), and app.extensions lists the registered ones.
PACK_LOADED = ("() => !!(window.app && window.app.graph && window.comfyAPI) "
               "&& (window.app.extensions ?? []).some((e) => e.name === 'mixofshow.concepts')")


class UI:
    """One page of the app, plus what the tests need around it."""

    def __init__(self, server, page, renderer: str):
        self.server, self.page, self.renderer = server, page, renderer
        self.vue = renderer == "vue"
        self.errors: list[str] = []  # console errors / page errors that come from the pack
        self.messages: list[str] = []
        self.pack_scripts: set[str] = set()  # pack files the page fetched (status 200)
        self.responses: dict[str, int] = {}  # path -> last status
        page.on("response", lambda r: self._on_response(r))
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self._record_error(f"pageerror: {e}\n{e.stack or ''}"))

    @property
    def name(self) -> str:
        return f"{self.server.frontend}-{self.renderer}"

    def _on_response(self, response) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(response.url).path)
        self.responses[path] = response.status
        if path.startswith(_PACK_URL) and response.status == 200:
            self.pack_scripts.add(path)
        elif path.startswith(_PACK_ROUTES) and response.status >= 400:
            self._record_error(f"HTTP {response.status}: {response.url}")

    def _on_console(self, message) -> None:
        text = f"{message.type}: {message.text} @ {message.location.get('url', '')}"
        self.messages.append(text)
        if message.type == "error":
            self._record_error(text)

    def _record_error(self, text: str) -> None:
        if (_PACK_URL in text or "[mixofshow]" in text or "mixofshow." in text) and \
                not any(other in text for other in _NOT_THE_PACK):
            self.errors.append(text)

    def load(self) -> None:
        self.page.goto(self.server.url + "/", wait_until="domcontentloaded")
        self.page.wait_for_function(PACK_LOADED, timeout=120000)
        self.page.wait_for_timeout(1500)

    def close_dialogs(self) -> None:
        """Close what an earlier test left open (the template browser is a modal dialog): Escape, or
        its × button (1.32.9's template browser ignores Escape)."""
        for _ in range(3):
            dialogs = self.page.locator(".p-dialog, [role=dialog]").filter(visible=True)
            if not dialogs.count():
                return
            self.page.keyboard.press("Escape")
            self.settle(300)
            close = dialogs.first.locator("button:has(i.pi-times), button:has([class*='lucide--x'])")
            if dialogs.count() and close.count():
                close.first.click()
                self.settle(300)

    def wait_response(self, path: str, timeout: float = 15) -> int | None:
        """The status of the page's request for `path` (once it has been answered), or None."""
        deadline = time.time() + timeout
        while path not in self.responses and time.time() < deadline:
            self.page.wait_for_timeout(200)
        return self.responses.get(path)

    def shot(self, name: str, **kwargs) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{name}.png"
        (kwargs.pop("element", None) or self.page).screenshot(path=str(path), **kwargs)
        return path

    def load_api(self, graph: dict) -> None:
        """Load an API-format graph and lay it out on a grid wide enough for both renderers' node sizes
        (the frontend's own arrange() uses the classic sizes: Vue nodes would overlap). Nodes 2.0 takes
        positions from a loaded workflow, so the laid-out graph is loaded again as one."""
        self.page.evaluate("""async (g) => {
            await app.loadApiJson(g, 'test');
            app.graph.nodes.forEach((node, i) => { node.pos = [40 + (i % 4) * 560, 60 + Math.floor(i / 4) * 900]; });
            await app.loadGraphData(app.graph.serialize());
        }""", graph)
        self.settle()

    def settle(self, ms: int = 800) -> None:
        self.page.wait_for_timeout(ms)

    def show_node(self, node_id: int, scale: float = 1.0) -> None:
        """Put node `node_id` at the top left of the canvas at `scale`."""
        self.page.evaluate("""([id, scale]) => {
            const node = app.graph.getNodeById(id);
            const ds = app.canvas.ds;
            ds.scale = scale;
            ds.offset = [-node.pos[0] + 60, -node.pos[1] + 80];
            app.canvas.setDirty(true, true);
        }""", [node_id, scale])
        self.settle(600)

    def queue(self) -> None:
        self.page.evaluate("async () => { await app.queuePrompt(0, 1); }")

    def prompt(self) -> dict:
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def canvas_text(self) -> list[str]:
        """The strings the classic canvas draws in one full redraw (its text is not in the DOM)."""
        return self.page.evaluate("""() => {
            const drawn = [];
            const fillText = CanvasRenderingContext2D.prototype.fillText;
            CanvasRenderingContext2D.prototype.fillText = function (text) {
                drawn.push(String(text));
                return fillText.apply(this, arguments);
            };
            try { app.canvas.draw(true, true); } finally { CanvasRenderingContext2D.prototype.fillText = fillText; }
            return drawn;
        }""")

    def node_element(self, node_id: int):
        """The element that shows node `node_id` in Nodes 2.0 (None on the classic canvas)."""
        return self.page.locator(f'[data-node-id="{node_id}"]').first if self.vue else None

    def widget_element(self, node_id: int, widget: str):
        """The HTML element of a DOM widget (both renderers), as a locator."""
        handle = self.page.evaluate_handle("""([id, name]) => {
            const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
            return w.element;
        }""", [node_id, widget])
        return handle.as_element()

    def textarea(self, node_id: int, index: int = 0):
        """The textarea that is drawn for the node's `index`-th multiline widget."""
        if self.vue:
            return self.page.locator(f'[data-node-id="{node_id}"] textarea').nth(index)
        handle = self.page.evaluate_handle("""([id, i]) => app.graph.getNodeById(id).widgets
            .filter(w => w.element instanceof HTMLTextAreaElement)[i].element""", [node_id, index])
        return handle.as_element()


PACK_MODULE = "mixofshow"  # the pack's folder name in custom_nodes (the template browser's category)


def open_templates(ui: UI) -> None:
    """The templates browser, at the pack's examples (as a user opens them)."""
    ui.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    nav = ui.page.locator("nav span", has_text=PACK_MODULE).first
    nav.wait_for(state="visible", timeout=30000)
    nav.click()


def template_card(ui: UI, name: str):
    return ui.page.locator(f'[data-testid="template-workflow-{name}"]')


def wait_history(server, prompt_count: int, timeout: float = 600) -> dict:
    """The history entry of the `prompt_count`-th prompt of this server once it has finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        entries = [v for v in server.get("/history").values() if v.get("status", {}).get("completed") is not None]
        if len(entries) >= prompt_count:
            return sorted(entries, key=lambda e: e["prompt"][0])[prompt_count - 1]
        time.sleep(0.5)
    raise TimeoutError("the UI-queued prompt did not finish")


def post(server, path: str, body: dict) -> int:
    """POST JSON to a server route that answers with an empty body (/settings, /free); the status."""
    return server.post_json(path, body)[0]


def queue_and_wait(ui: UI, timeout: float = 600, fresh: bool = False) -> dict:
    """Queue the page's graph like the Run button does; the finished history entry. ``fresh``: empty the
    server's output cache first, so that every node runs (and reports to the page) again."""
    if fresh:
        post(ui.server, "/free", {"free_memory": True})
        time.sleep(1.5)  # the prompt worker wakes up for the flag and resets its caches
    before = len(ui.server.get("/history"))
    ui.queue()
    return wait_history(ui.server, before + 1, timeout)


def tiny_graph(**extra) -> dict:
    """Tiny random SD1.5 + the tiny ED-LoRA: nodes 1 (model), 2 (Load ED-LoRA), 4 (negative)."""
    graph = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "edlora_name": "ui_tiny.pth", "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
    }
    graph.update(extra)
    return graph

