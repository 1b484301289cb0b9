"""A real ComfyUI server on 127.0.0.1 for the whole tests/api tier (started and stopped here)."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "host"))
import comfy_env  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from host_tier import module_without_host  # noqa: E402
from synthetic import make_edlora_state  # noqa: E402

MISSING_HOST = comfy_env.missing_host_reason()
FIXTURES = REPO / "tests" / "support" / "mixofshow_test_fixtures"
TINY = dict(text_layers=2, text_intermediate=512)


def pytest_pycollect_makemodule(module_path, parent):
    if MISSING_HOST:
        return module_without_host(module_path, parent, MISSING_HOST)
    return None


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server-base")
    folder = base / "models" / "edloras"
    folder.mkdir(parents=True)
    for i, tokens in enumerate([("<s1>", "<s2>"), ("<t1>",)]):
        torch.save(make_edlora_state(tokens, seed=40 + i, model_channels=32, **TINY), folder / f"srv_{i}.pth")
    for i, name in enumerate(("potter", "hermione", "thanos")):  # for the 64-channel "wide" tiny model
        torch.save(make_edlora_state((f"<{name}1>", f"<{name}2>"), seed=70 + i, model_channels=64, **TINY),
                   folder / f"wide_{name}.pth")
    (folder / "broken.pth").write_bytes(b"not a zip, not a pickle")
    with ComfyServer(base, {"mixofshow": REPO, "mixofshow_test_fixtures": FIXTURES}) as srv:
        yield srv
