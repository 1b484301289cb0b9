"""Headless Debian Chromium driven by Playwright (never `playwright install`: no browser download)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
            page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI", timeout=90000)
            yield page, errors
        finally:
            ctx.close()
