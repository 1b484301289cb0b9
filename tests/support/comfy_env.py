"""A real ComfyUI, in this process, with the pack loaded the way ComfyUI loads custom nodes.

The ComfyUI root is ``$MIXOFSHOW_COMFYUI`` (your own checkout) or the project's host in ``.host/``
(:func:`comfy_server.comfy_root`, the one place that rule lives). :func:`env` puts it first on the import
path: the one path edit of the tests (the rest is pyproject.toml's ``pythonpath``), made at run time because
the root is chosen then and because ComfyUI's top-level ``nodes`` module must win over the pack's ``nodes``
package.
"""
from __future__ import annotations

import asyncio
import inspect
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from comfy_server import comfy_root

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "mixofshow_test_fixtures"

_ENV: SimpleNamespace | None = None
# how the executor's code reads its cache arguments: cache_args["ram"], self.cache_args.get("lru", 0)
_CACHE_ARG_READ = re.compile(r"""cache_args(?:\[\s*|\.get\(\s*)["']([A-Za-z_]\w*)["']""")


def available() -> bool:
    return (comfy_root() / "main.py").is_file()


def missing_host_reason() -> str:
    """Why the ComfyUI tiers skip, or "" when the host is there."""
    if available():
        return ""
    return f"no ComfyUI at {comfy_root()} (run tools/host/setup_host.sh or set MIXOFSHOW_COMFYUI)"


def cache_args_for(executor_class: type) -> dict:
    """Every key the installed executor reads from ``cache_args``, each 0 (no LRU cache, no RAM headroom).

    The keys are not in a signature (newer ComfyUI added ``ram_inactive`` to the dict main.py passes),
    so they are read off the source of the module that defines the executor and its cache set.
    """
    source = inspect.getsource(inspect.getmodule(executor_class))
    return {key: 0 for key in sorted(set(_CACHE_ARG_READ.findall(source)))}


def new_executor(execution, server):
    """A PromptExecutor of the installed ComfyUI with the classic cache."""
    executor_class = execution.PromptExecutor
    return executor_class(server, cache_type=execution.CacheType.CLASSIC, cache_args=cache_args_for(executor_class))


class _Server:
    """What PromptExecutor needs of the server: it records the events it is sent."""
    client_id = "tests"
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def env(cpu: bool = True) -> SimpleNamespace:
    """Import ComfyUI (on the CPU unless ``cpu=False``: benchmarks on a GPU) with a temporary base
    directory and load the pack (once)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    root = comfy_root()
    sys.path.insert(0, str(root))  # in front of the repo root: ComfyUI's nodes module, not the pack's package
    base = Path(tempfile.mkdtemp(prefix="mixofshow-base-"))
    for sub in ("models/edloras", "models/loras", "models/checkpoints", "models/controlnet", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    from comfy.cli_args import args  # parsed from [] unless enable_args_parsing() is called

    args.cpu = cpu
    args.base_directory = str(base)
    args.disable_api_nodes = True
    import execution
    import folder_paths

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO))), "the pack failed to load (see the log)"
    assert asyncio.run(nodes.load_custom_node(str(FIXTURES))), "the test fixture pack failed to load"
    pack_name = str(REPO).replace(".", "_x_")
    import importlib

    def pack(module: str):
        return importlib.import_module(f"{pack_name}.{module}")

    tiny_sd15 = importlib.import_module(str(FIXTURES).replace(".", "_x_") + ".tiny_sd15")
    tiny_sdxl = importlib.import_module(str(FIXTURES).replace(".", "_x_") + ".tiny_sdxl")
    _ENV = SimpleNamespace(root=root, base=base, nodes=nodes, execution=execution, folder_paths=folder_paths,
                           pack=pack, tiny=tiny_sd15, tiny_xl=tiny_sdxl, Server=_Server)
    return _ENV


def run_prompt(graph: dict, prompt_id: str = "test"):
    """Validate and execute an API-format prompt with ComfyUI's own code; returns (executor, server)."""
    e = env()
    valid = asyncio.run(e.execution.validate_prompt(prompt_id, graph, None))
    if not valid[0]:
        return SimpleNamespace(success=False, validation=valid, history_result={}, status_messages=[]), None
    server = _Server()
    executor = new_executor(e.execution, server)
    executor.execute(graph, prompt_id, {"client_id": "tests"}, valid[2])
    executor.validation = valid
    return executor, server


def execution_error(executor) -> str:
    for event, data in executor.status_messages:
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def node(node_id: str, **inputs) -> tuple:
    """Run one registered node's V3 ``execute`` directly (outside a prompt); returns its outputs."""
    return env().nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def node_ui(node_id: str, **inputs) -> dict:
    """The UI message of one node run (what the frontend receives after it executes)."""
    return env().nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).ui
