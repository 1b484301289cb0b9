"""A real ComfyUI server on 127.0.0.1 for the whole tests/api tier (started and stopped here)."""
import comfy_env
import pytest
from comfy_server import ComfyServer
from host_tier import module_without_host
from server_setup import PACKS, write_tiny_edlora

MISSING_HOST = comfy_env.missing_host_reason()


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
        write_tiny_edlora(folder / f"srv_{i}.pth", tokens, seed=40 + i)
    for i, name in enumerate(("potter", "hermione", "thanos")):  # for the 64-channel "wide" tiny model
        write_tiny_edlora(folder / f"wide_{name}.pth", (f"<{name}1>", f"<{name}2>"), seed=70 + i, model_channels=64)
    (folder / "broken.pth").write_bytes(b"not a zip, not a pickle")
    with ComfyServer(base, PACKS) as srv:
        yield srv
