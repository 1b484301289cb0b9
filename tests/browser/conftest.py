"""The web UI in real headless Chromium against real ComfyUI servers: the bundled frontend (1.32.9) and
comfyui-frontend-package 1.58.1 (served with --front-end-root), each in the classic LiteGraph canvas
and in Nodes 2.0 (the Vue renderer, setting Comfy.VueNodes.Enabled).

Fixtures are session-scoped and parametrised, so pytest runs every test of one frontend (one server)
and one renderer (one page) together. Screenshots go to .host/artifacts/browser/ (git-ignored)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from browser import ARGS, CHROMIUM
from comfy_server import ComfyServer, comfy_root
from server_setup import PACKS
from synthetic import make_edlora_state
from ui_support import FRONTEND_158, TINY_TOKENS, TINY_TOKENS_B, UI, post

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
FRONTENDS = {"1.32.9": None, "1.58.1": FRONTEND_158}
RENDERERS = ("classic", "vue")



def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian chromium is not installed (tools/test.sh installs it)"
    if not (comfy_root() / "main.py").is_file():
        return f"no ComfyUI at {comfy_root()}"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    missing = _missing()
    for item in items:  # the browser marker itself comes from tests/conftest.py
        if missing and here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=missing))


@pytest.fixture(scope="session")
def playwright_browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def _environ(**values: str):
    """os.environ with `values` set (for a child process started inside), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_sdxl_models(tmp_path_factory) -> Path:
    """The files the SDXL example runs on here, on the tiny SDXL (tools/make_example_workflows.py: TINY_SDXL),
    made once (a process of their own: the ControlNet's layout comes from ComfyUI)."""
    models = tmp_path_factory.mktemp("tiny-sdxl-models")
    subprocess.run([sys.executable, str(SUPPORT / "tiny_sdxl_files.py"), str(models)], check=True,
                   capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return models


@pytest.fixture(scope="session", params=list(FRONTENDS))
def server(request, tmp_path_factory, tiny_sdxl_models):
    """A ComfyUI server serving one frontend, with the demo models and two tiny ED-LoRAs."""
    import demo

    root = FRONTENDS[request.param]
    if root is not None and not (root / "index.html").is_file():
        pytest.skip(f"comfyui-frontend-package {request.param} is not installed at {root} (tools/test.sh installs it)")
    base = tmp_path_factory.mktemp(f"ui-{request.param}")
    demo.prepare(base)
    for path in tiny_sdxl_models.rglob("*.safetensors"):  # the SDXL example's tiny files (see tiny_sdxl_models)
        (base / "models" / path.parent.name / path.name).symlink_to(path)
    for name, tokens, seed in (("ui_tiny.pth", TINY_TOKENS, 50), ("ui_tiny_b.pth", TINY_TOKENS_B, 51)):
        torch.save(make_edlora_state(tokens, seed=seed, model_channels=32, text_layers=2, text_intermediate=512),
                   base / "models" / "edloras" / name)
    with contextlib.ExitStack() as stack:
        with _environ(OMP_NUM_THREADS=str(min(2, os.cpu_count() or 1))):
            # the examples sample the full-size SD1.5 while this process only waits: two threads
            server = stack.enter_context(ComfyServer(base, PACKS, front_end_root=root))
        server.frontend = request.param
        yield server


@pytest.fixture(scope="session", params=RENDERERS)
def renderer(request):
    return request.param


@pytest.fixture(scope="session")
def ui_session(server, renderer, playwright_browser):
    """A page of `server`'s app in `renderer` (set through the settings API before the page loads)."""
    settings = {"Comfy.VueNodes.Enabled": renderer == "vue", "Comfy.TutorialCompleted": True,
                "Comfy.Minimap.Visible": False}
    assert post(server, "/settings", settings) == 200
    context = playwright_browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    ui = UI(server, page, renderer)
    ui.load()
    yield ui
    context.close()


@pytest.fixture
def ui(ui_session):
    """The session's page with an empty graph; fails the test if the pack logged an error meanwhile."""
    ui_session.close_dialogs()
    ui_session.page.evaluate("() => { app.graph.clear(); app.extensionManager.toast.removeAll?.(); }")
    start = len(ui_session.errors)
    yield ui_session
    assert ui_session.errors[start:] == [], "the pack logged errors in the browser"


