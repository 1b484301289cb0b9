"""Headless Debian Chromium driven by Playwright (never `playwright install`: no browser download)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The app is ready once its start-up has opened a workflow (the restored or the default graph) and its spinner is
# off: frontends from 1.49 set window.app before that start-up loads its graph, which would replace one loaded
# as soon as window.app appears.
APP_READY = ("() => !!(window.app && window.app.graph && window.comfyAPI && window.app.extensionManager"
             " && window.app.extensionManager.workflow?.activeWorkflow && !window.app.extensionManager.spinner)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def comfy_page(url: str, width: int = 1400, height: int = 900):
    """A page with the ComfyUI app loaded; yields (page, errors) where errors collects page errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": width, "height": height})
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_function(APP_READY, timeout=90000)
            yield page, errors
        finally:
            ctx.close()


def load_workflow(page, workflow: dict, timeout: float = 30) -> None:
    """Load a UI-format workflow into the page's app and wait until the app shows that graph (its node ids)."""
    wanted = sorted(str(n["id"]) for n in workflow.get("nodes", []))
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.wait_for_function("(ids) => JSON.stringify(app.graph.nodes.map((n) => String(n.id)).sort()) "
                           "=== JSON.stringify(ids)", arg=wanted, timeout=timeout * 1000)
